"""``PerClassMetrics``: per-class precision / recall / F1 / accuracy at the start, middle and end of training.

A mean accuracy hides which classes the network learned and which it never did. This callback keeps
per-class metrics (torchmetrics, ``average=None``) at fractions of training, compares them with the
untrained network, and calls out the classes that improved least.
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lightning_introspect._lightning import rank_zero_warn
from lightning_introspect._torch.guards import introspection_mode
from lightning_introspect._torch.hooks import hooks, output_as_tensor
from lightning_introspect.callbacks.base import (
    IntrospectionCallback,
    check_callable,
    check_choice,
    check_positive_int,
    draw_samples,
    split_batch,
)

TASKS = ("multiclass", "multilabel", "binary")
METRICS = ("precision", "recall", "f1", "accuracy", "specificity")
_OUTPUT_KEYS = ("logits", "preds")


class IntrospectionInputError(ValueError):
    """What the model or the data gave does not fit the callback's configuration.

    Raised whatever ``on_error`` says: a wrong ``num_classes`` or out-of-range labels are not glitches
    to warn about, and they show up in the first validation batch (or in the start pass, before the
    first training step).
    """


# ------------------------------------------------------------------------------ shared helpers
def extract_logits(output: Any, output_transform: Callable[[Any], Any] | None = None) -> torch.Tensor | None:
    """Logits from what ``validation_step`` (or ``forward``) returned; ``None`` if there are none.

    With ``output_transform`` its result is used. Otherwise: a tensor as is; a dict's ``"logits"`` or
    ``"preds"`` entry; an object with a ``.logits`` attribute (HuggingFace outputs); the first tensor of
    a tuple / list.
    """
    if output_transform is not None:
        output = output_transform(output)
        if output is not None and not isinstance(output, torch.Tensor):
            raise IntrospectionInputError(
                f"Expected `output_transform` to return a tensor of logits, but it returned {type(output).__name__}."
            )
        return output
    if output is None or isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in _OUTPUT_KEYS:
            value = output.get(key)
            if isinstance(value, torch.Tensor):
                return value
        return None
    value = getattr(output, "logits", None)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(output, (tuple, list)):
        return next((v for v in output if isinstance(v, torch.Tensor)), None)
    return None


def logits_only(model: Any, output_transform: Callable[[Any], Any] | None = None) -> Any:
    """A context in which ``model(x)`` returns :func:`extract_logits` of its output (for the methods, which
    need one tensor); see :func:`lightning_introspect._torch.hooks.output_as_tensor`."""
    return output_as_tensor(model, lambda out: extract_logits(out, output_transform))


def extract_targets(batch: Any, target_transform: Callable[[Any], Any] | None = None) -> torch.Tensor:
    """Labels from a batch: ``target_transform(batch)`` or :func:`split_batch`'s targets."""
    target = target_transform(batch) if target_transform is not None else split_batch(batch)[1]
    if not isinstance(target, torch.Tensor):
        raise IntrospectionInputError(
            "Cannot find the labels in the validation batch: return (inputs, labels) / a dict with a 'y', "
            "'target' or 'label' key, or pass `target_transform` (a callable batch -> labels tensor)."
        )
    return target


class OutputCapture:
    """Keeps the last output of a module's forward while it is attached (the no-``validation_step``-output fallback).

    The hook only stores a reference (no extra forward pass); :meth:`detach` removes it. Used across
    Lightning hooks, so it owns an ``ExitStack`` around :func:`hooks` that :meth:`detach` closes.
    """

    def __init__(self) -> None:
        self.output: Any = None
        self._stack: contextlib.ExitStack | None = None

    def attach(self, module: torch.nn.Module) -> None:
        self.detach()
        self._stack = contextlib.ExitStack()
        handles = self._stack.enter_context(hooks())
        handles.append(module.register_forward_hook(self._keep))

    def _keep(self, _module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        self.output = output

    def take(self) -> Any:
        out, self.output = self.output, None
        return out

    def detach(self) -> None:
        self.output = None
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()


def run_strict(callback: IntrospectionCallback, trainer: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``callback.run(trainer, fn, *args)`` (error policy, timing), except that input errors always raise."""
    caught: list[IntrospectionInputError] = []

    def call() -> Any:
        try:
            return fn(*args)
        except IntrospectionInputError as err:
            caught.append(err)
            return None

    result = callback.run(trainer, call)
    if caught:
        raise caught[0]
    return result


def snapshot_label(fraction: float) -> str:
    """``0.0`` -> ``"start"``, ``0.5`` -> ``"middle"``, ``1.0`` -> ``"end"``, others ``"at_0.25"``."""
    return {0.0: "start", 0.5: "middle", 1.0: "end"}.get(float(fraction), f"at_{float(fraction):g}")


def _tag_safe(name: str) -> str:
    return str(name).replace("/", "_").replace(" ", "_")


def _fmt(value: float | None) -> str:
    return "no support" if value is None else f"{value:.3f}"


# ------------------------------------------------------------------------------------ callback
class PerClassMetrics(IntrospectionCallback):
    """Per-class classification metrics at the start, middle and end of training (and per epoch if asked).

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
    * ``introspect/per_class/table`` -- markdown: classes x snapshots for each metric, with deltas to the
      first snapshot and the support;
    * ``introspect/per_class/summary`` -- markdown: the classes that improved least, classes with no support;
    * ``introspect/per_class/bars`` -- grouped bar chart (classes x snapshots, one panel per metric);
    * ``introspect/per_class/confusion`` -- at each snapshot, the confusion matrix as an image (rows: true,
      columns: predicted, colour = row share); for multilabel one row per label with TN / FP / FN / TP shares;
    * ``introspect/per_class/update_seconds`` and ``introspect/per_class/seconds`` -- own wall time.

    Results on the instance:

    * ``snapshots``: ``{"start" | "middle" | "end" | "at_0.25": {metric: [value per class], "support": [count per class]}}``;
      a value is ``None`` for a class with no support (no sample of that class) in the validation data;
    * ``snapshot_epochs``: ``{key: {"epoch": e, "step": s}}`` (``epoch == -1``: before training);
    * ``confusion``: ``{key: confusion matrix as nested lists}``;
    * ``history``: per-epoch entries ``{"epoch", "step", metric: [...], "support": [...]}`` (``every_n_epochs``);
    * ``latest``: the most recent validation's values.
    All are in the callback's ``state_dict``, so a resumed fit keeps its start snapshot.

    Args:
        num_classes: number of classes (labels for ``"multilabel"``). ``None``: taken from the logits'
            width (dim 1) at the first batch. When given, a different width is a clear error.
        task: ``"multiclass"`` (logits ``(N, C)`` or per-pixel ``(N, C, H, W)``, labels ``(N, ...)``),
            ``"multilabel"`` (``(N, L)`` logits and 0/1 labels) or ``"binary"`` (one logit / probability
            per sample, or two logits; reported as two classes).
        metrics: per-class metrics among ``"precision"``, ``"recall"``, ``"f1"``, ``"accuracy"`` (for
            multiclass the per-class accuracy equals recall) and ``"specificity"``.
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
        task: str = "multiclass",
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
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise ValueError(f"Expected `ignore_index` to be an int or None, but got {ignore_index!r}.")
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
        self._reset_results()
        self._metric_objs: Any = None
        self._metric_device: torch.device | None = None
        self._collecting = False
        self._capture = OutputCapture()
        self._update_seconds = 0.0

    # ---------------------------------------------------------------------------- results
    def _reset_results(self) -> None:
        self.snapshots: dict[str, dict[str, list[Any]]] = {}
        self.snapshot_epochs: dict[str, dict[str, int]] = {}
        self.confusion: dict[str, list[list[int]]] = {}
        self.history: list[dict[str, Any]] = []
        self.latest: dict[str, Any] | None = None
        self._logged: set[tuple[str, int]] = set()

    def extra_state(self) -> dict[str, Any]:
        return {
            "snapshots": self.snapshots,
            "snapshot_epochs": self.snapshot_epochs,
            "confusion": self.confusion,
            "history": self.history,
            "latest": self.latest,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.snapshots = dict(state.get("snapshots", {}))
        self.snapshot_epochs = dict(state.get("snapshot_epochs", {}))
        self.confusion = dict(state.get("confusion", {}))
        self.history = list(state.get("history", []))
        self.latest = state.get("latest")

    @property
    def names(self) -> list[str]:
        """The class names (``"0"``, ``"1"``, ... unless ``class_names`` was given)."""
        n = self.num_classes or 0
        return list(self.class_names) if self.class_names is not None else [str(i) for i in range(n)]

    # ------------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._reset_results()  # a resumed fit restores them from the checkpoint after setup
            self._metric_objs = None
            if self.enabled and trainer.limit_val_batches == 0:
                self.warn_once(
                    "no-val", "PerClassMetrics: `limit_val_batches=0`, so there is no validation data to measure; "
                    "no snapshot will be taken."
                )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.active(trainer) and 0.0 in self.at and "start" not in self.snapshots:
            self._run_strict(trainer, self._start_snapshot, trainer, pl_module)
        elif self.active(trainer) and trainer.global_step == 0:
            self._run_strict(trainer, self._check_output, trainer, pl_module)  # no start pass: check the config now

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.active(trainer) and self._fitting(trainer):
            self._begin_collecting(pl_module)  # cheap: reset the metric states, attach the output hook

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._collecting and dataloader_idx == 0:
            self._quiet(self._update_from_step, outputs, batch)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._collecting:
            self._run_strict(trainer, self._end_collecting, trainer)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.enabled and not self.disabled and self._end_pending():
            self.run(trainer, self._finish, trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._collecting = False
        self._capture.detach()
        if self.enabled and not self.disabled and not isinstance(exception, IntrospectionInputError) and self._end_pending():
            self.run(trainer, self._finish, trainer)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._collecting = False
        self._capture.detach()

    # --------------------------------------------------------------------------- error policy
    def _run_strict(self, trainer: Any, fn: Callable[..., Any], *args: Any) -> Any:
        return run_strict(self, trainer, fn, *args)

    def _quiet(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Per-batch work: the error policy of :meth:`run` without a scalar per batch (time summed)."""
        if self.disabled:
            return None
        start = time.perf_counter()
        try:
            return fn(*args)
        except IntrospectionInputError:
            self._collecting = False
            self._capture.detach()
            raise
        except Exception:
            if self.on_error == "raise":
                raise
            self.disabled = True
            self._collecting = False
            self._capture.detach()
            rank_zero_warn(
                f"{type(self).__name__} failed and is disabled for the rest of this fit (on_error='warn'); "
                f"training continues.\n{traceback.format_exc()}"
            )
            return None
        finally:
            elapsed = time.perf_counter() - start
            self._update_seconds += elapsed
            self.seconds_total += elapsed

    @staticmethod
    def _fitting(trainer: Any) -> bool:
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        return str(getattr(fn, "value", fn)) == "fit"

    # ------------------------------------------------------------------------------- metrics
    def _build_metrics(self, device: torch.device) -> Any:
        from torchmetrics import MetricCollection
        from torchmetrics import classification as tmc

        n = int(self.num_classes or 0)
        common: dict[str, Any] = {"average": None, "ignore_index": self.ignore_index}
        if self.task == "multilabel":
            common.update(num_labels=n, threshold=self.threshold)
            makers = {
                "precision": tmc.MultilabelPrecision,
                "recall": tmc.MultilabelRecall,
                "f1": tmc.MultilabelF1Score,
                "accuracy": tmc.MultilabelAccuracy,
                "specificity": tmc.MultilabelSpecificity,
            }
            confmat = tmc.MultilabelConfusionMatrix(num_labels=n, threshold=self.threshold, ignore_index=self.ignore_index)
        else:
            common.update(num_classes=n)
            makers = {
                "precision": tmc.MulticlassPrecision,
                "recall": tmc.MulticlassRecall,
                "f1": tmc.MulticlassF1Score,
                "accuracy": tmc.MulticlassAccuracy,
                "specificity": tmc.MulticlassSpecificity,
            }
            confmat = tmc.MulticlassConfusionMatrix(num_classes=n, ignore_index=self.ignore_index)
        collection = MetricCollection({m: makers[m](**common) for m in self.metrics})
        collection.add_metrics({"_confusion": confmat})
        return collection.to(device)

    def _metrics(self, device: torch.device) -> Any:
        if self._metric_objs is None:
            self._metric_objs = self._build_metrics(device)
        elif self._metric_device != device:
            self._metric_objs = self._metric_objs.to(device)
        self._metric_device = device
        return self._metric_objs

    def _prepare(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate shapes and ranges; return ``(preds, target)`` in the form torchmetrics expects."""
        logits = logits.detach()
        target = target.detach().to(logits.device)
        if logits.shape[0] != target.shape[0]:
            raise IntrospectionInputError(
                f"The logits ({tuple(logits.shape)}) and labels ({tuple(target.shape)}) have different batch sizes; "
                "check `output_transform` / `target_transform`."
            )
        if self.task == "binary":
            if logits.is_floating_point() and logits.ndim == 2 and logits.shape[1] == 2:
                preds = logits.float()
            elif logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1):
                p = logits.float().flatten()
                if (p < 0).any() or (p > 1).any():  # logits, not probabilities (as torchmetrics decides)
                    p = p.sigmoid()
                preds = (p >= self.threshold).long()
            else:
                raise IntrospectionInputError(
                    f"Expected binary logits of shape (N,), (N, 1) or (N, 2), but got {tuple(logits.shape)}."
                )
            target = target.flatten().long()
            self._check_range(target, 2)
            return preds, target
        if not logits.is_floating_point():
            if logits.shape != target.shape:
                raise IntrospectionInputError(
                    f"Integer predictions must have the labels' shape {tuple(target.shape)}, but got {tuple(logits.shape)}."
                )
            width = None
        else:
            if logits.ndim < 2:
                raise IntrospectionInputError(
                    f"Expected logits of shape (N, C) or (N, C, ...), but got {tuple(logits.shape)}; "
                    "use `output_transform` to pick the logits out of the model output."
                )
            width = logits.shape[1]
        if self.num_classes is None:
            if width is None:
                raise IntrospectionInputError("Pass `num_classes`: the model returns class ids, not logits.")
            self.num_classes = int(width)
            if self.class_names is not None and len(self.class_names) != width:
                raise IntrospectionInputError(
                    f"Expected `class_names` to have one entry per class ({width} from the logits' width), "
                    f"but got {len(self.class_names)}."
                )
        if width is not None and width != self.num_classes:
            fix = (
                "for one logit per sample (binary classification) pass `task='binary'`"
                if width == 1 and self.task == "multiclass"
                else f"set `num_classes` to {width} or fix `output_transform`"
            )
            raise IntrospectionInputError(
                f"Expected logits with `num_classes`={self.num_classes} columns (dim 1), but got logits of shape "
                f"{tuple(logits.shape)}; {fix}."
            )
        if self.task == "multilabel":
            if target.shape != logits.shape:
                raise IntrospectionInputError(
                    f"Expected multilabel targets of the logits' shape {tuple(logits.shape)}, but got {tuple(target.shape)}."
                )
            target = target.long()
            self._check_range(target, 2)
            return logits.float(), target
        if logits.is_floating_point() and target.shape != logits.shape[:1] + logits.shape[2:]:
            raise IntrospectionInputError(
                f"Expected labels of shape {tuple(logits.shape[:1] + logits.shape[2:])} for logits of shape "
                f"{tuple(logits.shape)}, but got {tuple(target.shape)}; use `target_transform`."
            )
        if target.is_floating_point():
            if not torch.equal(target, target.round()):
                raise IntrospectionInputError("Expected integer class labels, but got non-integer floats.")
        target = target.long()
        self._check_range(target, int(self.num_classes))
        return (logits.float() if logits.is_floating_point() else logits.long()), target

    def _check_range(self, target: torch.Tensor, n: int) -> None:
        valid = target if self.ignore_index is None else target[target != self.ignore_index]
        if valid.numel() and (valid.min() < 0 or valid.max() >= n):
            raise IntrospectionInputError(
                f"Labels out of range: expected values in [0, {n - 1}] (num_classes={n}"
                f"{'' if self.ignore_index is None else f', ignore_index={self.ignore_index}'}), but got min "
                f"{int(valid.min())} and max {int(valid.max())}."
            )

    def _update(self, output: Any, batch: Any) -> None:
        logits = extract_logits(output, self.output_transform)
        if logits is None:
            raise IntrospectionInputError(
                "PerClassMetrics found no logits: return them from `validation_step` (a tensor, or a dict with a "
                "'logits' key), call `self(x)` in it, or pass `output_transform`."
            )
        preds, target = self._prepare(logits, extract_targets(batch, self.target_transform))
        self._metrics(preds.device).update(preds, target)

    def _update_from_step(self, outputs: Any, batch: Any) -> None:
        captured = self._capture.take()
        if outputs is None or extract_logits(outputs, self.output_transform) is None:
            outputs = captured  # validation_step returned no logits: use the module's own forward output
        self._update(outputs, batch)

    def _compute(self) -> tuple[dict[str, list[Any]], list[list[int]]] | None:
        """Compute (synced across ranks by torchmetrics) and reset; ``None`` if nothing was seen."""
        objs = self._metric_objs
        if objs is None or not any(getattr(m, "update_count", 0) for m in objs.values()):
            return None
        result = objs.compute()
        objs.reset()
        confmat = result.pop("_confusion").detach().cpu().long()
        if self.task == "multilabel":  # (L, 2, 2): [[tn, fp], [fn, tp]]
            support = confmat[:, 1, :].sum(dim=1)
            table = confmat.reshape(confmat.shape[0], 4)
        else:
            support = confmat.sum(dim=1)
            table = confmat
        values: dict[str, list[Any]] = {}
        for m in self.metrics:
            v = result[m].detach().float().cpu().tolist()
            values[m] = [None if int(s) == 0 or not math.isfinite(x) else float(x) for x, s in zip(v, support.tolist())]
        values["support"] = [int(s) for s in support.tolist()]
        return values, table.tolist()

    # ------------------------------------------------------------------------------- work
    def _start_snapshot(self, trainer: Any, pl_module: Any) -> None:
        if trainer.limit_val_batches == 0:
            return
        loader = self.val_dataloader(trainer)
        if getattr(trainer, "val_dataloaders", None) is None or loader is None:
            self.warn_once("no-val-start", "PerClassMetrics: no validation data, so there is no start snapshot.")
            return
        max_batches = (trainer.num_val_batches or [math.inf])[0]
        if self._metric_objs is not None:
            self._metric_objs.reset()
        with introspection_mode(pl_module, grad=False):
            for i, batch in enumerate(loader):
                if i >= max_batches:
                    break
                batch = trainer.strategy.batch_to_device(batch)
                x, _ = split_batch(batch)
                self._update(pl_module(x), batch)
        computed = self._compute()
        if computed is None:
            return
        self._store("start", computed, epoch=-1, step=int(trainer.global_step))
        self._log_snapshots(trainer, ["start"], step=int(trainer.global_step))

    def _check_output(self, trainer: Any, pl_module: Any) -> None:
        """Two validation samples through the model: a wrong ``num_classes`` / ``class_names`` fails before training."""
        if trainer.limit_val_batches == 0 or self.target_transform is not None:
            return
        loader = self.val_dataloader(trainer)
        if loader is None:
            return
        try:
            x, y = draw_samples(loader, 2, seed=self.seed)
            with introspection_mode(pl_module, grad=False):
                output = pl_module(trainer.strategy.batch_to_device(x))
        except Exception:  # the model does not take the bare inputs: checked at the first validation instead
            return
        logits = extract_logits(output, self.output_transform)
        if logits is not None and y is not None:
            self._prepare(logits, y)

    def _begin_collecting(self, pl_module: Any) -> None:
        if self._metric_objs is not None:
            self._metric_objs.reset()
        self._capture.attach(pl_module)
        self._update_seconds = 0.0
        self._collecting = True

    def _end_collecting(self, trainer: Any) -> None:
        self._collecting = False
        self._capture.detach()
        computed = self._compute()
        step, epoch = int(trainer.global_step), int(trainer.current_epoch)
        self.writer(trainer).scalar(self.tag("update_seconds"), self._update_seconds, step)
        if computed is None:
            return
        values, table = computed
        self.latest = {"epoch": epoch, "step": step, "values": values, "confusion": table}
        due = []
        for f, target_epoch in sorted(self.fraction_epochs(trainer).items()):
            key = snapshot_label(f)
            if f == 0.0 or target_epoch < 0 or key in self.snapshots or epoch < target_epoch:
                continue
            self._store(key, computed, epoch=epoch, step=step)
            due.append(key)
        per_epoch = self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0
        if per_epoch:
            self.history.append({"epoch": epoch, "step": step, **values})
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
        if not self._end_pending():
            return
        self._store("end", (self.latest["values"], self.latest["confusion"]), epoch=self.latest["epoch"], step=self.latest["step"])
        self._log_snapshots(trainer, ["end"], step=self.latest["step"])

    def _store(self, key: str, computed: tuple[dict[str, list[Any]], list[list[int]]], *, epoch: int, step: int) -> None:
        values, table = computed
        self.snapshots[key] = {k: list(v) for k, v in values.items()}
        self.snapshot_epochs[key] = {"epoch": int(epoch), "step": int(step)}
        self.confusion[key] = [list(r) for r in table]
        self.snapshots = dict(sorted(self.snapshots.items(), key=lambda kv: self._order(kv[0])))

    def _order(self, key: str) -> tuple[float, int]:
        frac = {"start": 0.0, "middle": 0.5, "end": 1.0}.get(key)
        if frac is None:
            frac = float(key[3:]) if key.startswith("at_") else 2.0
        return frac, self.snapshot_epochs.get(key, {}).get("step", 0)

    # --------------------------------------------------------------------------- logging
    def _log_scalars(self, trainer: Any, values: dict[str, list[Any]], step: int) -> None:
        if not trainer.is_global_zero or ("scalars", step) in self._logged:
            return
        self._logged.add(("scalars", step))
        names = self.names
        scalars = {
            self.tag(m, _tag_safe(names[i])): v
            for m in self.metrics
            for i, v in enumerate(values[m])
            if v is not None
        }
        self.writer(trainer).scalars(scalars, step)

    def _log_confusion(self, trainer: Any, table: list[list[int]], step: int, *, title: str) -> None:
        if not self.confusion_matrix or not trainer.is_global_zero or ("confusion", step) in self._logged:
            return
        self._logged.add(("confusion", step))
        image = confusion_image(table, self.names, multilabel=self.task == "multilabel", title=title)
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
            writer.figure(self.tag("bars"), bars_figure(self.snapshots, self.metrics, self.names, self._column), step)

    def _column(self, key: str) -> str:
        e = self.snapshot_epochs.get(key, {})
        if e.get("epoch", -1) < 0:
            return f"{key} (before training)"
        return f"{key} (epoch {e['epoch']}, step {e['step']})"

    def table_markdown(self) -> str:
        """Classes x snapshots for every metric, with the change since the first snapshot, as markdown."""
        keys = list(self.snapshots)
        if not keys:
            return "No snapshot yet."
        names = self.names
        first = keys[0]
        lines = []
        for m in self.metrics:
            lines += [f"### {m}", "", "| class | " + " | ".join(self._column(k) for k in keys) + " | support |"]
            lines.append("|---" * (len(keys) + 2) + "|")
            for i, name in enumerate(names):
                cells = []
                for k in keys:
                    v = self.snapshots[k][m][i]
                    base = self.snapshots[first][m][i]
                    cell = _fmt(v)
                    if k != first and v is not None and base is not None:
                        cell += f" ({v - base:+.3f})"
                    cells.append(cell)
                support = self.snapshots[keys[-1]]["support"][i]
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {support} |")
            lines.append("")
        return "\n".join(lines)

    def least_improved_classes(self) -> list[tuple[str, float, float]]:
        """``(class, first value, last value)`` of the classes whose main metric improved least.

        The main metric is ``"f1"`` if asked for, otherwise the first of ``metrics``; classes with no
        support in either snapshot are left out.
        """
        keys = list(self.snapshots)
        if len(keys) < 2:
            return []
        metric = "f1" if "f1" in self.metrics else self.metrics[0]
        first, last = self.snapshots[keys[0]][metric], self.snapshots[keys[-1]][metric]
        rows = [(name, a, b) for name, a, b in zip(self.names, first, last) if a is not None and b is not None]
        rows.sort(key=lambda r: (r[2] - r[1], r[2]))
        return rows[: self.least_improved]

    def summary_markdown(self) -> str:
        """The least-improved classes and the classes without support, as markdown."""
        keys = list(self.snapshots)
        if not keys:
            return "No snapshot yet."
        metric = "f1" if "f1" in self.metrics else self.metrics[0]
        lines = []
        rows = self.least_improved_classes()
        if rows:
            lines.append(f"**Least improved ({metric}, {keys[0]} -> {keys[-1]}):**")
            lines += [f"- class {n}: {a:.3f} -> {b:.3f} ({b - a:+.3f})" for n, a, b in rows]
        else:
            lines.append(f"Only one snapshot so far ({self._column(keys[0])}).")
        last = self.snapshots[keys[-1]]
        worst = sorted((v, n) for n, v in zip(self.names, last[metric]) if v is not None)[: self.least_improved]
        if worst:
            lines.append(f"\n**Lowest {metric} at {keys[-1]}:** " + ", ".join(f"{n} ({v:.3f})" for v, n in worst))
        missing = [n for n, s in zip(self.names, last["support"]) if s == 0]
        if missing:
            lines.append(f"\n**No support** (no sample in the validation data; no value reported): {', '.join(missing)}")
        lines.append("\nSnapshots: " + "; ".join(self._column(k) for k in keys))
        return "\n".join(lines)

    def summary_lines(self) -> list[str]:
        keys = list(self.snapshots)
        if not keys:
            return ["no snapshot taken"]
        out = []
        for m in self.metrics[:2]:
            parts = []
            for k in keys:
                vals = [v for v in self.snapshots[k][m] if v is not None]
                parts.append(f"{k} {sum(vals) / max(1, len(vals)):.3f}")
            out.append(f"mean per-class {m}: " + ", ".join(parts))
        rows = self.least_improved_classes()
        if rows:
            out.append("least improved: " + ", ".join(f"{n} ({a:.2f}->{b:.2f})" for n, a, b in rows))
        return out


# ------------------------------------------------------------------------------- rendering
def _text_image(text: str, font: Any, *, angle: int = 0, fill: tuple[int, int, int] = (0, 0, 0)) -> Any:
    """``text`` on a transparent PIL image, rotated by ``angle`` degrees (counter-clockwise)."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(text)
    image = Image.new("RGBA", (max(1, right - left + 2), max(1, bottom - top + 2)), (255, 255, 255, 0))
    ImageDraw.Draw(image).text((1 - left, 1 - top), text, fill=fill, font=font)
    return image.rotate(angle, expand=True) if angle else image


def confusion_image(
    table: Sequence[Sequence[int]], names: Sequence[str], *, multilabel: bool = False, title: str = ""
) -> Any:
    """A confusion matrix as an HWC uint8 RGB image: row shares as colour (``Blues``), counts as text.

    Rows are the true classes, columns the predicted ones (for multilabel: one row per label with its
    TN / FP / FN / TP counts); a colour bar gives the share scale. Counts are printed when the matrix
    has at most 400 cells. Drawn with numpy and PIL (as :func:`~lightning_introspect.render.grid.captioned_grid`):
    a 10-class matrix takes a few milliseconds, where a matplotlib figure with one text artist per
    cell took about 0.2 s of CPU.

    Example:
        >>> confusion_image([[5, 1], [0, 4]], ["cat", "dog"], title="end").shape[-1]
        3
    """
    import matplotlib
    import numpy as np
    from PIL import Image, ImageDraw

    from lightning_introspect.render.grid import font as _font

    counts = np.asarray(table, dtype=np.float64)
    if counts.ndim != 2 or counts.size == 0:
        raise ValueError(f"Expected `table` to be a non-empty 2-D table of counts, but got shape {counts.shape}.")
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    n_rows, n_cols = counts.shape
    rows = [str(n) for n in names][:n_rows]
    rows += [str(i) for i in range(len(rows), n_rows)]
    cols = ["TN", "FP", "FN", "TP"] if multilabel else [str(n) for n in names][:n_cols]
    cols += [str(i) for i in range(len(cols), n_cols)]
    cell = max(6, min(44, 1300 // max(n_rows, n_cols)))
    font, small, label_font = _font(11), _font(10 if cell >= 30 else 8), _font(13)
    black = (0, 0, 0)

    # the colour grid, one block of cell x cell pixels per entry
    rgb = (matplotlib.colormaps["Blues"](np.clip(shares, 0.0, 1.0))[..., :3] * 255.0 + 0.5).astype(np.uint8)
    grid = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)

    col_labels = [_text_image(c, font) for c in cols]
    rotate = max(im.width for im in col_labels) > cell - 2
    if rotate:
        col_labels = [im.rotate(90, expand=True) for im in col_labels]
    row_labels = [_text_image(r, font) for r in rows]
    xlabel = _text_image("count share" if multilabel else "predicted", label_font)
    ylabel = _text_image("label" if multilabel else "true", label_font, angle=90)
    title_im = _text_image(title or "confusion matrix", label_font)
    bar_ticks = [_text_image(f"{v:.1f}", font) for v in np.linspace(0.0, 1.0, 6)]

    gap, tick = 6, 4
    grid_h, grid_w = n_rows * cell, n_cols * cell
    left = 10 + ylabel.width + gap + max(im.width for im in row_labels) + tick + 3
    top = 10 + title_im.height + 10
    bar_x = left + grid_w + 16
    bar_w = max(12, cell // 3)
    width = bar_x + bar_w + tick + 3 + max(im.width for im in bar_ticks) + 10
    height = top + grid_h + tick + 3 + max(im.height for im in col_labels) + gap + xlabel.height + 10
    width = max(width, title_im.width + 20)

    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    canvas[top : top + grid_h, left : left + grid_w] = grid
    ramp = (matplotlib.colormaps["Blues"](np.linspace(1.0, 0.0, grid_h))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    canvas[top : top + grid_h, bar_x : bar_x + bar_w] = ramp[:, None, :]
    image = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((left - 1, top - 1, left + grid_w, top + grid_h), outline=black)
    draw.rectangle((bar_x - 1, top - 1, bar_x + bar_w, top + grid_h), outline=black)

    for r, im in enumerate(row_labels):  # y tick marks and class names
        cy = top + r * cell + cell // 2
        draw.line((left - 1 - tick, cy, left - 1, cy), fill=black)
        image.paste(im, (left - 1 - tick - 3 - im.width, cy - im.height // 2), im)
    for c, im in enumerate(col_labels):  # x tick marks and class names
        cx = left + c * cell + cell // 2
        draw.line((cx, top + grid_h, cx, top + grid_h + tick), fill=black)
        image.paste(im, (cx - im.width // 2, top + grid_h + tick + 3), im)
    for i, im in enumerate(bar_ticks):  # the colour bar's scale
        cy = top + grid_h - 1 - round(i / (len(bar_ticks) - 1) * (grid_h - 1))
        draw.line((bar_x + bar_w, cy, bar_x + bar_w + tick, cy), fill=black)
        image.paste(im, (bar_x + bar_w + tick + 3, cy - im.height // 2), im)
    label_y = top + grid_h + tick + 3 + max(im.height for im in col_labels) + gap
    image.paste(xlabel, (left + grid_w // 2 - xlabel.width // 2, label_y), xlabel)
    image.paste(ylabel, (10, top + grid_h // 2 - ylabel.height // 2), ylabel)
    title_x = max(10, min(left + grid_w // 2 - title_im.width // 2, width - 10 - title_im.width))
    image.paste(title_im, (title_x, 10), title_im)

    if n_rows * n_cols <= 400:  # the counts, white on dark cells
        for r in range(n_rows):
            for c in range(n_cols):
                fill = (255, 255, 255) if shares[r, c] > 0.5 else black
                center = (left + c * cell + cell / 2, top + r * cell + cell / 2)
                draw.text(center, f"{int(counts[r, c])}", fill=fill, font=small, anchor="mm")
    return np.asarray(image).copy()


def bar_polygons(x: Any, heights: Any, width: float) -> Any:
    """Corner vertices ``(N, 4, 2)`` of bars centred at ``x`` with ``heights`` (from 0) and ``width``."""
    import numpy as np

    x0 = np.asarray(x, dtype=np.float64) - width / 2
    h = np.asarray(heights, dtype=np.float64)
    verts = np.zeros((x0.shape[0], 4, 2))
    verts[:, :2, 0] = x0[:, None]
    verts[:, 2:, 0] = (x0 + width)[:, None]
    verts[:, 1:3, 1] = h[:, None]
    return verts


def bars_figure(
    snapshots: Mapping[str, Mapping[str, Sequence[Any]]],
    metrics: Sequence[str],
    names: Sequence[str],
    column: Callable[[str], str] = str,
) -> Any:
    """Grouped bar chart: one panel per metric, classes on x, one bar per snapshot (no bar = no support).

    The bars of one snapshot in one panel are a single ``PolyCollection`` (the same pixels as ``ax.bar``,
    without one ``Rectangle`` artist per bar), and the figure is a plain ``Figure`` (no pyplot state).
    """
    import numpy as np
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    keys = list(snapshots)
    n = len(names)
    fig = Figure(figsize=(max(5.0, 0.5 * n * max(1, len(keys)) / 2 + 2), 2.2 * len(metrics)))
    axes = fig.subplots(len(metrics), 1, squeeze=False)
    width = 0.8 / max(1, len(keys))
    x = np.arange(n)
    handles = []
    for ax, m in zip(axes[:, 0], metrics):
        for j, k in enumerate(keys):
            vals = np.array([np.nan if v is None else v for v in snapshots[k][m]], dtype=np.float64)
            bars = PolyCollection(bar_polygons(x + (j - (len(keys) - 1) / 2) * width, np.nan_to_num(vals, nan=0.0), width),
                                  facecolors=f"C{j % 10}", edgecolors="none", alpha=0.9 if j == len(keys) - 1 else 0.6,
                                  label=column(k))
            ax.add_collection(bars)
            if ax is axes[0, 0]:
                handles.append(bars)
        last = snapshots[keys[-1]][m] if keys else []
        for i, v in enumerate(last):
            if v is None:
                ax.text(i, 0.5, "no support", rotation=90, ha="center", va="center", fontsize=6, color="gray")
        ax.autoscale_view()
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(m, fontsize=8)
        ax.set_xticks(x, list(names), fontsize=7)
    fig.legend(handles, [h.get_label() for h in handles], fontsize=7, ncol=max(1, min(4, len(keys))),
               loc="upper center", frameon=False)
    top = 1.0 - 0.35 / fig.get_figheight()
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.05, top=top, hspace=0.35)
    return fig
