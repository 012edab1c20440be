"""How :class:`~lightning_introspect.callbacks.per_class_metrics.PerClassMetrics` measures: the torchmetrics
metrics (``average=None``) built once the task and the number of classes are known and moved with the logits'
device, a batch's logits and labels checked and turned into predictions, the values computed (synced across ranks
by torchmetrics) and reset, and the start pass of its own over the validation batches before training.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from lightning_introspect._torch.guards import introspection_mode
from lightning_introspect.callbacks.data import split_batch
from lightning_introspect.callbacks.outputs import (
    example_logits,
    extract_logits,
    extract_targets,
    validation_batches,
)
from lightning_introspect.errors import IntrospectionInputError
from lightning_introspect.methods.per_class import (
    build_metrics,
    per_class_values,
    prepare_predictions,
    resolve_task,
)

if TYPE_CHECKING:
    from lightning_introspect._lightning import pl
    from lightning_introspect.callbacks.per_class_metrics import PerClassMetrics
    from lightning_introspect.callbacks.per_class_report import Computed

__all__ = ["begin_epoch", "check_example", "compute", "prepare", "start_pass", "update", "update_from_step"]


def _metrics(cb: PerClassMetrics, device: torch.device) -> Any:
    if cb._metric_objs is None:
        cb._metric_objs = build_metrics(
            cb.resolved_task or cb.task, cb.active_metrics, int(cb.num_classes or 0), threshold=cb.threshold,
            ignore_index=cb.ignore_index, device=device,
        )
    elif cb._metric_device != device:
        cb._metric_objs = cb._metric_objs.to(device)
    cb._metric_device = device
    return cb._metric_objs


def prepare(cb: PerClassMetrics, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes and ranges (``num_classes`` and the task are read from the first logits when not given)."""
    if cb.resolved_task is None:
        cb.resolved_task = resolve_task(cb.task, logits.detach(), target.detach())
    preds, target, cb.num_classes = prepare_predictions(
        logits, target, task=cb.resolved_task, num_classes=cb.num_classes, threshold=cb.threshold,
        ignore_index=cb.ignore_index, class_names=cb.class_names,
    )
    return preds, target


def check_example(cb: PerClassMetrics, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """A few validation samples through the model before training: a wrong ``num_classes`` / ``class_names`` /
    label range is refused (``IntrospectionInputError``); a model without logits is skipped."""
    example = example_logits(cb, trainer, pl_module)
    if example is None:
        return
    batch, logits = example
    prepare(cb, logits, extract_targets(batch, cb.target_transform))


def begin_epoch(cb: PerClassMetrics, pl_module: Any) -> None:
    """A validation epoch of the fit starts: fresh metrics, the module's forward watched, the clock at zero."""
    if cb._metric_objs is not None:
        cb._metric_objs.reset()
    cb._source.attach(pl_module)
    cb._update_seconds = 0.0
    cb._collecting = True


def update(cb: PerClassMetrics, logits: torch.Tensor | None, batch: Any) -> None:
    """Add a batch's predictions and labels to the metrics (``IntrospectionInputError`` when there are no logits)."""
    if logits is None:
        raise IntrospectionInputError(
            "PerClassMetrics found no logits: return them from `validation_step` (a tensor, or a dict with a "
            "'logits' key), call `self(x)` in it, or pass `output_transform`."
        )
    preds, target = prepare(cb, logits, extract_targets(batch, cb.target_transform))
    _metrics(cb, preds.device).update(preds, target)


def update_from_step(cb: PerClassMetrics, outputs: Any, batch: Any, pl_module: Any) -> None:
    """Add a validation step's logits (see ``LogitsSource``) and labels, timed into ``cb._update_seconds``."""
    start = time.perf_counter()
    try:
        update(cb, cb.batch_logits(cb._source, outputs, batch, pl_module), batch)
    finally:
        cb._update_seconds += time.perf_counter() - start


def compute(cb: PerClassMetrics) -> Computed | None:
    """Compute (synced across ranks by torchmetrics) and reset; ``None`` if nothing was seen."""
    objs = cb._metric_objs
    if objs is None or not any(getattr(m, "update_count", 0) for m in objs.values()):
        return None
    result = objs.compute()
    objs.reset()
    return per_class_values(result, cb.resolved_task or cb.task, cb.active_metrics)


def start_pass(cb: PerClassMetrics, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Any) -> None:
    """The validation batches the trainer would use through the model, in eval mode under ``no_grad`` (modes
    restored, global RNG forked), into freshly reset metrics."""
    if cb._metric_objs is not None:
        cb._metric_objs.reset()
    with introspection_mode(pl_module, grad=False):
        for batch in validation_batches(trainer, loader):
            output = pl_module(split_batch(batch)[0])
            update(cb, extract_logits(output, cb.output_transform), batch)
