"""``PerClassMetrics``: per-class precision / recall / F1 / accuracy (and IoU / Dice for segmentation) at the
start, middle and end of training.

A mean accuracy hides which classes the network learned and which it never did. This callback keeps
per-class metrics (torchmetrics, ``average=None``) at fractions of training, compares them with the
untrained network, and calls out the classes that improved least.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from typing_extensions import override

from lightning_introspect._lightning import pl
from lightning_introspect._torch.guards import introspection_mode
from lightning_introspect.callbacks.base import (
    IntrospectionCallback,
    IntrospectionInputError,
    check_callable,
    check_choice,
    check_positive_int,
    split_batch,
)
from lightning_introspect.callbacks.checks import check_int
from lightning_introspect.callbacks.outputs import (
    LogitsSource,
    example_logits,
    extract_logits,
    extract_targets,
    validation_batches,
)
from lightning_introspect.methods.per_class import (
    METRICS,
    TASKS,
    build_metrics,
    due_snapshots,
    least_improved,
    main_metric,
    mean_iou,
    metrics_for,
    per_class_values,
    prepare_predictions,
    resolve_task,
    snapshot_fraction,
    snapshot_label,
)
from lightning_introspect.render.charts import bars_figure, confusion_image
from lightning_introspect.render.per_class import (
    per_class_summary,
    per_class_summary_lines,
    per_class_table,
    snapshot_column,
)

__all__ = ["METRICS", "TASKS", "PerClassMetrics", "snapshot_label"]


def _tag_safe(name: str) -> str:
    return str(name).replace("/", "_").replace(" ", "_")


# ------------------------------------------------------------------------------------ callback
class PerClassMetrics(IntrospectionCallback):
    """Per-class metrics at the start, middle and end of training (and per epoch if asked), for
    classification and segmentation.

    "start" is measured before the first optimizer step by one evaluation pass of the callback's own
    over the validation batches the trainer would use (eval mode, ``no_grad``, modes restored, global
    RNG forked: training is unchanged). Every other snapshot reuses the trainer's own validation pass:
    the logits ``validation_step`` returns (``on_validation_batch_end`` outputs) and the labels of the
    batch, accumulated in torchmetrics metrics (``average=None``), so there is no extra forward pass and
    under DDP the metric states are synced by torchmetrics (every rank takes part; rank zero writes).

    Where the logits come from: ``output_transform(outputs)`` if given; else the ``validation_step``
    output when it is a tensor, a dict with ``"logits"`` / ``"preds"``, an object with ``.logits`` or a
    tuple (its first tensor). If ``validation_step`` returns nothing usable, the output of the last
    ``self(...)`` call of the LightningModule in that step is used (a forward hook attached during
    validation only). The start pass calls ``pl_module(inputs)`` on the batch's inputs
    (:func:`split_batch`) and applies the same extraction. Labels: ``target_transform(batch)`` or the
    batch's second element / ``"y"`` / ``"target"`` / ``"label"`` key.

    Snapshots: each fraction ``f`` in ``at`` is taken at the first validation at or after epoch
    ``ceil(f * max_epochs) - 1``; ``"end"`` is the last validation of the fit, also when EarlyStopping,
    ``trainer.should_stop`` or a KeyboardInterrupt ends it early (set in ``on_fit_end`` /
    ``on_exception``). Without ``max_epochs`` / ``max_steps`` only "start" and "end" are taken (a
    warning says which fractions were skipped) and ``snapshot_epochs`` says which epochs were used.

    Tags written (``<class>`` is the class name, ``<metric>`` one of ``metrics``):

    * ``introspect/per_class/<metric>/<class>`` -- scalar at each snapshot (and every ``every_n_epochs``);
      classes with no support in the validation data get no scalar (no NaN is written);
    * ``introspect/per_class/mean_iou`` -- segmentation: the mean IoU over the classes with support, at
      every validation epoch of the fit (the headline curve);
    * ``introspect/per_class/table`` -- markdown: classes x snapshots for each metric, with deltas to the
      first snapshot and the support;
    * ``introspect/per_class/summary`` -- markdown: the classes that improved least, classes with no support;
    * ``introspect/per_class/bars`` -- grouped bar chart (classes x snapshots, one panel per metric);
    * ``introspect/per_class/confusion`` -- at each snapshot, the confusion matrix as an image (rows: true,
      columns: predicted, colour = row share; for segmentation counts are pixels); for multilabel one row per
      label with TN / FP / FN / TP shares;
    * ``introspect/per_class/update_seconds`` and ``introspect/per_class/seconds`` -- own wall time.

    Results on the instance:

    * ``snapshots``: ``{"start" | "middle" | "end" | "at_0.25": {metric: [value per class], "support": [count per class]}}``;
      a value is ``None`` for a class with no support (no sample of that class) in the validation data;
      for segmentation the metrics include ``"iou"`` and ``"dice"`` and the support counts pixels;
    * ``mean_iou``: segmentation: ``{snapshot key: mean IoU}``;
    * ``resolved_task``: the task in use (``task`` with ``"auto"`` resolved at the first batch);
    * ``snapshot_epochs``: ``{key: {"epoch": e, "step": s}}`` (``epoch == -1``: before training);
    * ``confusion``: ``{key: confusion matrix as nested lists}``;
    * ``history``: per-epoch entries ``{"epoch", "step", metric: [...], "support": [...]}`` (``every_n_epochs``);
    * ``latest``: the most recent validation's values (and ``"mean_iou"`` for segmentation).
    All are in the callback's ``state_dict``, so a resumed fit keeps its start snapshot.

    Args:
        num_classes: number of classes (labels for ``"multilabel"``). ``None``: taken from the logits'
            width (dim 1) at the first batch. When given, a different width is a clear error.
        task: ``"auto"`` (the default: ``"segmentation"`` when the logits are per pixel ``(N, C, H, W)`` and
            the labels integer masks ``(N, H, W)`` or ``(N, 1, H, W)`` of their size, else ``"multiclass"``;
            decided once, before training), ``"multiclass"`` (logits ``(N, C)``, labels ``(N,)``; any other
            shape is counted per element), ``"segmentation"`` (per pixel, with IoU and Dice),
            ``"multilabel"`` (``(N, L)`` logits and 0/1 labels) or ``"binary"`` (one logit / probability
            per sample, or two logits; reported as two classes).
        metrics: per-class metrics among ``"precision"``, ``"recall"``, ``"f1"``, ``"accuracy"`` (for
            multiclass the per-class accuracy equals recall), ``"specificity"``, ``"iou"`` and ``"dice"``
            (both from the confusion matrix; always added for segmentation).
        at: fractions of training for snapshots (0.0 = start, 0.5 = "middle", 1.0 = "end").
        class_names: display names, one per class (default ``"0"``, ``"1"``, ...).
        output_transform: callable ``outputs -> logits`` applied to what ``validation_step`` returned (or,
            in the start pass / hook fallback, to what ``forward`` returned).
        target_transform: callable ``batch -> labels``.
        every_n_epochs: also log per-class scalars every n-th validation epoch (curves); ``None``: only
            at the snapshots.
        threshold: probability threshold for ``"multilabel"`` and ``"binary"``.
        ignore_index: a label value to ignore (e.g. 255 in segmentation masks).
        least_improved: how many least-improved classes the summary names.
        confusion_matrix: log the confusion matrix image (drawn with PIL: about 15 ms of CPU per image).
        bar_chart: log the grouped bar chart at each snapshot (about 0.25 s of CPU per chart).
        enabled, seed, on_error: see :class:`IntrospectionCallback`. Input errors (wrong ``num_classes``,
            labels out of range, no logits found) raise ``ValueError`` whatever ``on_error`` says.

    Limits: only the first validation dataloader is used. Under DDP the ``DistributedSampler`` pads the
    validation set to a multiple of the world size by repeating samples, so those few samples count
    twice (use a validation size divisible by the number of processes for exact numbers). With
    ``limit_val_batches=0`` nothing is measured (one warning).

    Example:
        >>> from lightning_introspect.demo import DigitsCNN, DigitsDataModule
        >>> from lightning_introspect._lightning import Trainer
        >>> cb = PerClassMetrics(num_classes=10, at=(0.0, 1.0))
        >>> trainer = Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, callbacks=[cb])
        >>> trainer.fit(DigitsCNN(), datamodule=DigitsDataModule(limit=64))  # doctest: +SKIP
        >>> sorted(cb.snapshots), len(cb.snapshots["end"]["recall"])  # doctest: +SKIP
        (['end', 'start'], 10)
    """

    name = "per_class"
    rank_zero_only = False

    def __init__(
        self,
        *,
        num_classes: int | None = None,
        task: str = "auto",
        metrics: Sequence[str] = ("precision", "recall", "f1", "accuracy"),
        at: Sequence[float] | None = (0.0, 0.5, 1.0),
        class_names: Sequence[str] | None = None,
        output_transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        every_n_epochs: int | None = None,
        threshold: float = 0.5,
        ignore_index: int | None = None,
        least_improved: int = 3,
        confusion_matrix: bool = True,
        bar_chart: bool = True,
        enabled: bool = True,
        seed: int = 0,
        on_error: str = "warn",
    ) -> None:
        super().__init__(enabled=enabled, every_n_epochs=every_n_epochs, at=at, seed=seed, on_error=on_error)
        check_choice(task, "task", TASKS)
        check_positive_int(num_classes, "num_classes", allow_none=True)
        check_positive_int(least_improved, "least_improved")
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        if not metrics:
            raise ValueError(f"Expected `metrics` to name at least one of {', '.join(map(repr, METRICS))}, but got [].")
        for m in metrics:
            check_choice(m, "metrics", METRICS)
        if task == "binary" and num_classes not in (None, 1, 2):
            raise ValueError(f"Expected `num_classes` to be 1, 2 or None for task='binary', but got {num_classes!r}.")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"Expected `threshold` to be a probability in [0, 1], but got {threshold!r}.")
        check_int(ignore_index, "ignore_index")
        check_callable(output_transform, "output_transform")
        check_callable(target_transform, "target_transform")
        self.task = task
        self.num_classes = 2 if task == "binary" else num_classes
        self.metrics = metrics
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        if self.class_names is not None and self.num_classes is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"Expected `class_names` to have num_classes={self.num_classes} entries, but got {len(self.class_names)}."
            )
        self.output_transform = output_transform
        self.target_transform = target_transform
        self.threshold = float(threshold)
        self.ignore_index = ignore_index
        self.least_improved = least_improved
        self.confusion_matrix = bool(confusion_matrix)
        self.bar_chart = bool(bar_chart)
        self._num_classes_given = self.num_classes
        self._source = LogitsSource(output_transform)
        self.reset()

    # ---------------------------------------------------------------------------- results
    @override
    def reset(self) -> None:
        self.num_classes = self._num_classes_given  # a width read from the logits of a previous fit is forgotten
        self.resolved_task: str | None = None  # `task` with "auto" resolved from the first logits and labels
        self.snapshots: dict[str, dict[str, list[Any]]] = {}
        self.mean_iou: dict[str, float | None] = {}
        self.snapshot_epochs: dict[str, dict[str, int]] = {}
        self.confusion: dict[str, list[list[int]]] = {}
        self.history: list[dict[str, Any]] = []
        self.latest: dict[str, Any] | None = None
        self._logged: set[tuple[str, int]] = set()
        self._metric_objs: Any = None
        self._metric_device: torch.device | None = None
        self._collecting = False  # this rank collects the current validation epoch
        self._sync_due = False  # every rank meets at the end of this validation epoch (collective)
        self._all_disabled = False  # every rank knows the callback is off: no more meetings
        self._update_seconds = 0.0

    @override
    def extra_state(self) -> dict[str, Any]:
        return {
            "snapshots": self.snapshots,
            "mean_iou": self.mean_iou,
            "snapshot_epochs": self.snapshot_epochs,
            "confusion": self.confusion,
            "history": self.history,
            "latest": self.latest,
        }

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.snapshots = dict(state.get("snapshots", {}))
        self.mean_iou = dict(state.get("mean_iou", {}))
        self.snapshot_epochs = dict(state.get("snapshot_epochs", {}))
        self.confusion = dict(state.get("confusion", {}))
        self.history = list(state.get("history", []))
        self.latest = state.get("latest")

    @property
    def names(self) -> list[str]:
        """The class names (``"0"``, ``"1"``, ... unless ``class_names`` was given)."""
        n = self.num_classes or 0
        return list(self.class_names) if self.class_names is not None else [str(i) for i in range(n)]

    @property
    def active_metrics(self) -> list[str]:
        """The metrics kept: ``metrics``, plus ``"iou"`` and ``"dice"`` once the task is segmentation."""
        return metrics_for(self.resolved_task or self.task, self.metrics)

    @property
    def segmentation(self) -> bool:
        return self.resolved_task == "segmentation"

    # ------------------------------------------------------------------------ Lightning hooks
    @override
    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.limit_val_batches == 0:
            self.warn_once(
                "no-val", "PerClassMetrics: `limit_val_batches=0`, so there is no validation data to measure; "
                "no snapshot will be taken."
            )

    @override
    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A few validation samples through the model: a wrong ``num_classes`` / ``class_names`` / label range
        is refused before training; a model without logits is skipped."""
        if trainer.limit_val_batches == 0:
            return
        example = example_logits(self, trainer, pl_module)
        if example is None:
            return
        batch, logits = example
        self._prepare(logits, extract_targets(batch, self.target_transform))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and 0.0 in self.at and "start" not in self.snapshots and trainer.limit_val_batches != 0:
            self._start_snapshot(trainer, pl_module)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and not self._all_disabled and not trainer.sanity_checking and self.trainer_fn(trainer) == "fit":
            self._sync_due = True  # on every rank, a disabled one too: see _end_collecting
            self.run(trainer, self._begin_collecting, pl_module, log_seconds=False)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._collecting:
            self._source.new_batch()  # a forward captured during an earlier batch must not be read for this one

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._collecting and not self.disabled and dataloader_idx == 0:
            self.run(trainer, self._update_from_step, outputs, batch, pl_module, log_seconds=False)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sync_due:
            self._end_collecting(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and not self.disabled and self._end_pending():
            self.run(trainer, self._finish, trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop()
        if self.enabled and not self.disabled and not isinstance(exception, IntrospectionInputError) and self._end_pending():
            self.run(trainer, self._finish, trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop()

    @override
    def on_disable(self) -> None:
        self._collecting = False
        self._source.detach()

    def _stop(self) -> None:
        self._collecting = False
        self._sync_due = False
        self._source.detach()

    # ------------------------------------------------------------------------------- metrics
    def _metrics(self, device: torch.device) -> Any:
        if self._metric_objs is None:
            self._metric_objs = build_metrics(
                self.resolved_task or self.task, self.active_metrics, int(self.num_classes or 0), threshold=self.threshold,
                ignore_index=self.ignore_index, device=device,
            )
        elif self._metric_device != device:
            self._metric_objs = self._metric_objs.to(device)
        self._metric_device = device
        return self._metric_objs

    def _prepare(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate shapes and ranges (``num_classes`` and the task are read from the first logits when not given)."""
        if self.resolved_task is None:
            self.resolved_task = resolve_task(self.task, logits.detach(), target.detach())
        preds, target, self.num_classes = prepare_predictions(
            logits, target, task=self.resolved_task, num_classes=self.num_classes, threshold=self.threshold,
            ignore_index=self.ignore_index, class_names=self.class_names,
        )
        return preds, target

    def _update(self, logits: torch.Tensor | None, batch: Any) -> None:
        if logits is None:
            raise IntrospectionInputError(
                "PerClassMetrics found no logits: return them from `validation_step` (a tensor, or a dict with a "
                "'logits' key), call `self(x)` in it, or pass `output_transform`."
            )
        preds, target = self._prepare(logits, extract_targets(batch, self.target_transform))
        self._metrics(preds.device).update(preds, target)

    def _update_from_step(self, outputs: Any, batch: Any, pl_module: Any) -> None:
        start = time.perf_counter()
        try:
            logits = self.batch_logits(self._source, outputs, batch, pl_module)
            self._update(logits, batch)
        finally:
            self._update_seconds += time.perf_counter() - start

    def _compute(self) -> tuple[dict[str, list[Any]], list[list[int]]] | None:
        """Compute (synced across ranks by torchmetrics) and reset; ``None`` if nothing was seen."""
        objs = self._metric_objs
        if objs is None or not any(getattr(m, "update_count", 0) for m in objs.values()):
            return None
        result = objs.compute()
        objs.reset()
        return per_class_values(result, self.resolved_task or self.task, self.active_metrics)

    # ------------------------------------------------------------------------------- work
    def _start_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the first step: one evaluation pass of our own over the validation batches the trainer
        would use (every rank takes part: the metric states are synced)."""
        loader = self.val_dataloader(trainer)
        if getattr(trainer, "val_dataloaders", None) is None or loader is None:
            self.warn_once("no-val-start", "PerClassMetrics: no validation data, so there is no start snapshot.")
            return
        self.run(trainer, self._start_pass, trainer, pl_module, loader, log_seconds=False)
        if self.agree(trainer):  # a rank that failed alone must not leave the others waiting in the sync
            self.run(trainer, self._store_start, trainer)
        else:
            self._all_disabled = True

    def _start_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Any) -> None:
        if self._metric_objs is not None:
            self._metric_objs.reset()
        with introspection_mode(pl_module, grad=False):
            for batch in validation_batches(trainer, loader):
                output = pl_module(split_batch(batch)[0])
                self._update(extract_logits(output, self.output_transform), batch)

    def _store_start(self, trainer: pl.Trainer) -> None:
        computed = self._compute()
        if computed is None:
            return
        self._store("start", computed, epoch=-1, step=int(trainer.global_step))
        self._log_snapshots(trainer, ["start"], step=int(trainer.global_step))

    def _begin_collecting(self, pl_module: Any) -> None:
        if self._metric_objs is not None:
            self._metric_objs.reset()
        self._source.attach(pl_module)
        self._update_seconds = 0.0
        self._collecting = True

    def _end_collecting(self, trainer: pl.Trainer) -> None:
        """Every rank that began the epoch comes here, a disabled one too: they agree before the sync."""
        self._stop()
        if self.agree(trainer):
            self.run(trainer, self._log_epoch, trainer)
        else:
            self._all_disabled = True

    def _log_epoch(self, trainer: pl.Trainer) -> None:
        computed = self._compute()
        step, epoch = int(trainer.global_step), int(trainer.current_epoch)
        self.writer(trainer).scalar(self.tag("update_seconds"), self._update_seconds, step)
        if computed is None:
            return
        values, table = computed
        self.latest = {"epoch": epoch, "step": step, "values": values, "confusion": table}
        if self.segmentation:
            self.latest["mean_iou"] = miou = mean_iou(values)
            if miou is not None and trainer.is_global_zero:
                self.writer(trainer).scalar(self.tag("mean_iou"), miou, step)
        due = due_snapshots(self.fraction_epochs(trainer), epoch, taken=self.snapshots)
        for key in due:
            self._store(key, computed, epoch=epoch, step=step)
        per_epoch = self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0
        if per_epoch:
            self.history.append({"epoch": epoch, "step": step, **values, **({"mean_iou": mean_iou(values)} if self.segmentation else {})})
        if due:
            self._log_snapshots(trainer, due, step=step)
        elif per_epoch:
            self._log_scalars(trainer, values, step)  # curves only: images and tables at the snapshots

    def _end_pending(self) -> bool:
        """Whether the last validation of the fit is newer than the "end" snapshot (or there is none)."""
        if 1.0 not in self.at or self.latest is None:
            return False
        end = self.snapshot_epochs.get("end")
        return end is None or (end["step"], end["epoch"]) != (self.latest["step"], self.latest["epoch"])

    def _finish(self, trainer: Any) -> None:
        """Fit end (also early stop / interrupt): "end" becomes the last validation of the fit."""
        latest = self.latest
        if latest is None or not self._end_pending():
            return
        self._store("end", (latest["values"], latest["confusion"]), epoch=latest["epoch"], step=latest["step"])
        self._log_snapshots(trainer, ["end"], step=latest["step"])

    def _store(self, key: str, computed: tuple[dict[str, list[Any]], list[list[int]]], *, epoch: int, step: int) -> None:
        values, table = computed
        self.snapshots[key] = {k: list(v) for k, v in values.items()}
        if "iou" in values:
            self.mean_iou[key] = mean_iou(values)
        self.snapshot_epochs[key] = {"epoch": int(epoch), "step": int(step)}
        self.confusion[key] = [list(r) for r in table]
        self.snapshots = dict(sorted(self.snapshots.items(), key=lambda kv: self._order(kv[0])))
        self.mean_iou = dict(sorted(self.mean_iou.items(), key=lambda kv: self._order(kv[0])))

    def _order(self, key: str) -> tuple[float, int]:
        return snapshot_fraction(key), self.snapshot_epochs.get(key, {}).get("step", 0)

    # --------------------------------------------------------------------------- logging
    def _log_scalars(self, trainer: Any, values: dict[str, list[Any]], step: int) -> None:
        if not trainer.is_global_zero or ("scalars", step) in self._logged:
            return
        self._logged.add(("scalars", step))
        names = self.names
        scalars = {
            self.tag(m, _tag_safe(names[i])): v
            for m in self.active_metrics
            if m in values
            for i, v in enumerate(values[m])
            if v is not None
        }
        self.writer(trainer).scalars(scalars, step)

    def _log_confusion(self, trainer: Any, table: list[list[int]], step: int, *, title: str) -> None:
        if not self.confusion_matrix or not trainer.is_global_zero or ("confusion", step) in self._logged:
            return
        self._logged.add(("confusion", step))
        title = f"{title}, pixels" if self.segmentation else title
        image = confusion_image(table, self.names, multilabel=self.resolved_task == "multilabel", title=title)
        self.writer(trainer).image(self.tag("confusion"), image, step)

    def _log_snapshots(self, trainer: Any, keys: list[str], *, step: int) -> None:
        if not trainer.is_global_zero:
            return
        writer = self.writer(trainer)
        for key in keys:
            self._log_scalars(trainer, self.snapshots[key], step)
        self._log_confusion(trainer, self.confusion[keys[-1]], step, title=self._column(keys[-1]))
        if ("tables", step) in self._logged and "end" not in keys:
            return
        self._logged.add(("tables", step))
        writer.text(self.tag("table"), self.table_markdown(), step)
        writer.text(self.tag("summary"), self.summary_markdown(), step)
        if self.bar_chart:
            self.figure(trainer, self.tag("bars"), lambda: bars_figure(self.snapshots, self._shown_metrics(), self.names, self._column),
                        step, final="end" in keys)

    # ---------------------------------------------------------------------------- reading
    def _column(self, key: str) -> str:
        return snapshot_column(key, self.snapshot_epochs)

    def table_markdown(self) -> str:
        """Classes x snapshots for every metric, with the change since the first snapshot, as markdown."""
        return per_class_table(self.snapshots, self._shown_metrics(), self.names, self._column)

    def _shown_metrics(self) -> list[str]:
        """The active metrics every snapshot has (a snapshot resumed from before segmentation was known may lack IoU)."""
        return [m for m in self.active_metrics if all(m in snap for snap in self.snapshots.values())]

    def least_improved_classes(self) -> list[tuple[str, float, float]]:
        """``(class, first value, last value)`` of the classes whose main metric improved least.

        The main metric is ``"f1"`` if asked for, otherwise the first of ``metrics``; classes with no
        support in either snapshot are left out.
        """
        keys = list(self.snapshots)
        if len(keys) < 2:
            return []
        first, last = self.snapshots[keys[0]], self.snapshots[keys[-1]]
        return least_improved(first, last, self._main_metric(), self.names, self.least_improved)

    def _main_metric(self) -> str:
        """IoU for segmentation (what segmentation is judged by); else ``"f1"`` if asked for, or the first metric."""
        shown = self._shown_metrics()
        return "iou" if self.segmentation and "iou" in shown else main_metric(shown or self.metrics)

    def summary_markdown(self) -> str:
        """The least-improved classes and the classes without support, as markdown."""
        summary = per_class_summary(
            self.snapshots, self._main_metric(), self.names, self.least_improved_classes(),
            lowest=self.least_improved, column=self._column,
        )
        if not self.mean_iou:
            return summary
        cells = ", ".join(f"{self._column(k)}: {'n/a' if v is None else f'{v:.3f}'}" for k, v in self.mean_iou.items())
        return f"**Mean IoU** (classes with support): {cells}\n\n{summary}"

    def summary_lines(self) -> list[str]:
        """The main metric at start / middle / end, the classes that improved least (and the mean IoU curve)."""
        lines = per_class_summary_lines(self.snapshots, self._shown_metrics(), self.least_improved_classes())
        if self.mean_iou:
            lines.append("mean IoU: " + " -> ".join("n/a" if v is None else f"{v:.3f}" for v in self.mean_iou.values()))
        return lines
