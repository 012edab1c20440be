"""What :class:`~lightning_introspect.callbacks.per_class_metrics.PerClassMetrics` keeps and writes: a snapshot
stored in its results (in snapshot order), the per-class scalars, the confusion image, the table, the summary and
the bar chart at a snapshot's step, and the same table, summary and summary lines as text. The drawing and the
markdown are :mod:`lightning_introspect.render.charts` and :mod:`lightning_introspect.render.per_class`; the
callback decides when.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from lightning_introspect.methods.per_class import least_improved, main_metric, mean_iou, snapshot_fraction
from lightning_introspect.render.charts import bars_chart, confusion_image
from lightning_introspect.render.per_class import (
    per_class_summary,
    per_class_summary_lines,
    per_class_table,
    snapshot_column,
)

if TYPE_CHECKING:
    from lightning_introspect.callbacks.per_class_metrics import PerClassMetrics

__all__ = [
    "Computed",
    "history_entry",
    "keep_latest",
    "least_improved_classes",
    "log_scalars",
    "log_snapshots",
    "store_snapshot",
    "summary_lines",
    "summary_markdown",
    "table_markdown",
]

#: one validation's per-class values ``{metric: [value per class], "support": [...]}`` and its confusion matrix
Computed = tuple[dict[str, list[Any]], list[list[int]]]


def _tag_safe(name: str) -> str:
    return str(name).replace("/", "_").replace(" ", "_")


def store_snapshot(cb: PerClassMetrics, key: str, computed: Computed, *, epoch: int, step: int) -> None:
    """Keep ``computed`` as snapshot ``key`` (values, mean IoU, epoch and step, confusion matrix), the snapshots
    ordered by fraction of training, then step."""
    values, table = computed
    cb.snapshots[key] = {k: list(v) for k, v in values.items()}
    if "iou" in values:
        cb.mean_iou[key] = mean_iou(values)
    cb.snapshot_epochs[key] = {"epoch": int(epoch), "step": int(step)}
    cb.confusion[key] = [list(r) for r in table]

    def order(key: str) -> tuple[float, int]:
        return snapshot_fraction(key), cb.snapshot_epochs.get(key, {}).get("step", 0)

    cb.snapshots = dict(sorted(cb.snapshots.items(), key=lambda kv: order(kv[0])))
    cb.mean_iou = dict(sorted(cb.mean_iou.items(), key=lambda kv: order(kv[0])))


def keep_latest(cb: PerClassMetrics, trainer: Any, computed: Computed, *, epoch: int, step: int) -> None:
    """Keep a validation's values as ``cb.latest`` (with its mean IoU for segmentation, written as the curve's
    point at ``step`` on rank zero)."""
    values, table = computed
    cb.latest = {"epoch": epoch, "step": step, "values": values, "confusion": table}
    if cb.segmentation:
        cb.latest["mean_iou"] = miou = mean_iou(values)
        if miou is not None and trainer.is_global_zero:
            cb.writer(trainer).scalar(cb.tag("mean_iou"), miou, step)


def history_entry(cb: PerClassMetrics, values: dict[str, list[Any]], *, epoch: int, step: int) -> dict[str, Any]:
    """A validation's entry of ``cb.history`` (with its mean IoU for segmentation)."""
    return {"epoch": epoch, "step": step, **values, **({"mean_iou": mean_iou(values)} if cb.segmentation else {})}


def log_scalars(cb: PerClassMetrics, trainer: Any, values: dict[str, list[Any]], step: int) -> None:
    """One scalar per metric and class with support, once per step (rank zero)."""
    if not trainer.is_global_zero or ("scalars", step) in cb._logged:
        return
    cb._logged.add(("scalars", step))
    names = cb.names
    scalars = {
        cb.tag(m, _tag_safe(names[i])): v
        for m in cb.active_metrics
        if m in values
        for i, v in enumerate(values[m])
        if v is not None
    }
    cb.writer(trainer).scalars(scalars, step)


def _log_confusion(cb: PerClassMetrics, trainer: Any, table: list[list[int]], step: int, *, title: str) -> None:
    if not cb.confusion_matrix or not trainer.is_global_zero or ("confusion", step) in cb._logged:
        return
    cb._logged.add(("confusion", step))
    title = f"{title}, pixels" if cb.segmentation else title
    image = confusion_image(table, cb.names, multilabel=cb.resolved_task == "multilabel", title=title)
    cb.writer(trainer).image(cb.tag("confusion"), image, step)


def log_snapshots(cb: PerClassMetrics, trainer: Any, keys: list[str], *, step: int) -> None:
    """Write the snapshots ``keys`` taken at ``step``: their scalars, the confusion image of the last, and (once
    per step, again for "end") the table, the summary and the bar chart (rank zero)."""
    if not trainer.is_global_zero:
        return
    writer = cb.writer(trainer)
    for key in keys:
        log_scalars(cb, trainer, cb.snapshots[key], step)
    _log_confusion(cb, trainer, cb.confusion[keys[-1]], step, title=_column(cb, keys[-1]))
    if ("tables", step) in cb._logged and "end" not in keys:
        return
    cb._logged.add(("tables", step))
    writer.text(cb.tag("table"), table_markdown(cb), step)
    writer.text(cb.tag("summary"), summary_markdown(cb), step)
    if cb.bar_chart:
        cb.figure(trainer, cb.tag("bars"), lambda: bars_chart(cb.snapshots, _shown_metrics(cb), cb.names, partial(_column, cb)),
                  step, final="end" in keys)


# ------------------------------------------------------------------------------------ reading
def _column(cb: PerClassMetrics, key: str) -> str:
    return snapshot_column(key, cb.snapshot_epochs)


def _shown_metrics(cb: PerClassMetrics) -> list[str]:
    """The active metrics every snapshot has (a snapshot resumed from before segmentation was known may lack IoU)."""
    return [m for m in cb.active_metrics if all(m in snap for snap in cb.snapshots.values())]


def _main_metric(cb: PerClassMetrics) -> str:
    """IoU for segmentation (what segmentation is judged by); else ``"f1"`` if asked for, or the first metric."""
    shown = _shown_metrics(cb)
    return "iou" if cb.segmentation and "iou" in shown else main_metric(shown or cb.metrics)


def table_markdown(cb: PerClassMetrics) -> str:
    """Classes x snapshots for every metric, with the change since the first snapshot, as markdown."""
    return per_class_table(cb.snapshots, _shown_metrics(cb), cb.names, partial(_column, cb))


def least_improved_classes(cb: PerClassMetrics) -> list[tuple[str, float, float]]:
    """``(class, first value, last value)`` of the classes whose main metric improved least between the first
    and the last snapshot (none with fewer than two snapshots)."""
    keys = list(cb.snapshots)
    if len(keys) < 2:
        return []
    first, last = cb.snapshots[keys[0]], cb.snapshots[keys[-1]]
    return least_improved(first, last, _main_metric(cb), cb.names, cb.least_improved)


def summary_markdown(cb: PerClassMetrics) -> str:
    """The mean IoU per snapshot (segmentation), the least-improved classes and the classes without support."""
    column = partial(_column, cb)
    summary = per_class_summary(
        cb.snapshots, _main_metric(cb), cb.names, least_improved_classes(cb), lowest=cb.least_improved, column=column,
    )
    if not cb.mean_iou:
        return summary
    cells = ", ".join(f"{column(k)}: {'n/a' if v is None else f'{v:.3f}'}" for k, v in cb.mean_iou.items())
    return f"**Mean IoU** (classes with support): {cells}\n\n{summary}"


def summary_lines(cb: PerClassMetrics) -> list[str]:
    """The main metric at each snapshot, the classes that improved least (and the mean IoU curve)."""
    lines = per_class_summary_lines(cb.snapshots, _shown_metrics(cb), least_improved_classes(cb))
    if cb.mean_iou:
        lines.append("mean IoU: " + " -> ".join("n/a" if v is None else f"{v:.3f}" for v in cb.mean_iou.values()))
    return lines
