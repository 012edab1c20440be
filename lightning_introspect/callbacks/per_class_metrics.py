"""``PerClassMetrics``: per-class precision / recall / F1 / accuracy (and IoU / Dice for segmentation) at the
start, middle and end of training.

A mean accuracy hides which classes the network learned and which it never did. This callback keeps
per-class metrics (torchmetrics, ``average=None``) at fractions of training, compares them with the
untrained network, and calls out the classes that improved least.

The callback says when and where; its pieces: :mod:`~lightning_introspect.callbacks.per_class_arguments` (the
argument checks), :mod:`~lightning_introspect.callbacks.per_class_collect` (the torchmetrics metrics, a batch
checked and added, the start pass), :mod:`~lightning_introspect.callbacks.per_class_report` (snapshots kept;
scalars, confusion image, table, summary and bars written). The maths lives in
:mod:`lightning_introspect.methods.per_class`, the drawing in :mod:`lightning_introspect.render.per_class` and
:mod:`lightning_introspect.render.charts`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from typing_extensions import override

from lightning_introspect._lightning import pl
from lightning_introspect.callbacks import per_class_collect as collect
from lightning_introspect.callbacks import per_class_report as report
from lightning_introspect.callbacks.base import IntrospectionCallback, IntrospectionInputError
from lightning_introspect.callbacks.outputs import LogitsSource
from lightning_introspect.callbacks.per_class_arguments import check_per_class_arguments
from lightning_introspect.methods.per_class import (
    METRICS,
    TASKS,
    due_snapshots,
    metrics_for,
    snapshot_label,
)

__all__ = ["METRICS", "TASKS", "PerClassMetrics", "snapshot_label"]

#: the results kept in the callback's ``state_dict`` (a resumed fit keeps its start snapshot)
_RESULTS = ("snapshots", "mean_iou", "snapshot_epochs", "confusion", "history", "latest")


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
        bar_chart: log the grouped bar chart at each snapshot (drawn with PIL: 10-40 ms per chart).
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
        args = check_per_class_arguments(
            task=task, num_classes=num_classes, least_improved=least_improved, metrics=metrics, threshold=threshold,
            ignore_index=ignore_index, output_transform=output_transform, target_transform=target_transform,
            class_names=class_names,
        )
        self.task, self.ignore_index, self.least_improved = task, ignore_index, least_improved
        self.num_classes, self.metrics, self.class_names, self.threshold = args
        self.output_transform, self.target_transform = output_transform, target_transform
        self.confusion_matrix, self.bar_chart = bool(confusion_matrix), bool(bar_chart)
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
        return {key: getattr(self, key) for key in _RESULTS}

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
        if trainer.limit_val_batches != 0:
            collect.check_example(self, trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and 0.0 in self.at and "start" not in self.snapshots and trainer.limit_val_batches != 0:
            self._start_snapshot(trainer, pl_module)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and not self._all_disabled and not trainer.sanity_checking and self.trainer_fn(trainer) == "fit":
            self._sync_due = True  # on every rank, a disabled one too: see _end_collecting
            self.run(trainer, collect.begin_epoch, self, pl_module, log_seconds=False)

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
            self.run(trainer, collect.update_from_step, self, outputs, batch, pl_module, log_seconds=False)

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

    # ---------------------------------------------------------------------------- measuring
    def _update(self, logits: torch.Tensor | None, batch: Any) -> None:
        collect.update(self, logits, batch)

    def _compute(self) -> report.Computed | None:
        return collect.compute(self)

    # ------------------------------------------------------------------------------- work
    def _start_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the first step: one evaluation pass of our own over the validation batches the trainer
        would use (every rank takes part: the metric states are synced)."""
        loader = self.val_dataloader(trainer)
        if getattr(trainer, "val_dataloaders", None) is None or loader is None:
            self.warn_once("no-val-start", "PerClassMetrics: no validation data, so there is no start snapshot.")
            return
        self.run(trainer, collect.start_pass, self, trainer, pl_module, loader, log_seconds=False)
        if self.agree(trainer):  # a rank that failed alone must not leave the others waiting in the sync
            self.run(trainer, self._store_start, trainer)
        else:
            self._all_disabled = True

    def _store_start(self, trainer: pl.Trainer) -> None:
        computed = self._compute()
        if computed is None:
            return
        report.store_snapshot(self, "start", computed, epoch=-1, step=int(trainer.global_step))
        report.log_snapshots(self, trainer, ["start"], step=int(trainer.global_step))

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
        values = computed[0]
        report.keep_latest(self, trainer, computed, epoch=epoch, step=step)  # and the mean IoU curve
        due = due_snapshots(self.fraction_epochs(trainer), epoch, taken=self.snapshots)
        for key in due:
            report.store_snapshot(self, key, computed, epoch=epoch, step=step)
        per_epoch = self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0
        if per_epoch:
            self.history.append(report.history_entry(self, values, epoch=epoch, step=step))
        if due:
            report.log_snapshots(self, trainer, due, step=step)
        elif per_epoch:
            report.log_scalars(self, trainer, values, step)  # curves only: images and tables at the snapshots

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
        report.store_snapshot(self, "end", (latest["values"], latest["confusion"]), epoch=latest["epoch"], step=latest["step"])
        report.log_snapshots(self, trainer, ["end"], step=latest["step"])

    # ---------------------------------------------------------------------------- reading
    def table_markdown(self) -> str:
        """Classes x snapshots for every metric, with the change since the first snapshot, as markdown."""
        return report.table_markdown(self)

    def least_improved_classes(self) -> list[tuple[str, float, float]]:
        """``(class, first value, last value)`` of the classes whose main metric improved least.

        The main metric is ``"f1"`` if asked for, otherwise the first of ``metrics``; classes with no
        support in either snapshot are left out.
        """
        return report.least_improved_classes(self)

    def summary_markdown(self) -> str:
        """The least-improved classes and the classes without support, as markdown."""
        return report.summary_markdown(self)

    def summary_lines(self) -> list[str]:
        """The main metric at start / middle / end, the classes that improved least (and the mean IoU curve)."""
        return report.summary_lines(self)
