"""Which tensors :class:`~lightning_introspect.callbacks.weight_histograms.WeightHistograms` follows: the initial
weights ``W0`` copied to the CPU at fit start (kept from the checkpoint on resume), modules replaced mid-fit
followed (their weights as they are then become their ``W0``), the layers put in execution order, and the
weights, biases or gradients of an evaluation. Which layers a spec names, and what counts as a replacement, is
:mod:`lightning_introspect.methods.weight_layers`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_introspect.callbacks.data import split_batch
from lightning_introspect.methods.weight_layers import depth_order, follow_replacements, own_bias, own_weight

if TYPE_CHECKING:
    from lightning_introspect._lightning import pl
    from lightning_introspect.callbacks.weight_histograms import WeightHistograms

__all__ = ["follow_module_replacements", "snapshot_initial", "trace_order", "tracked_tensors"]


def _cpu_copy(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to("cpu", copy=True)


def snapshot_initial(cb: WeightHistograms, pl_module: nn.Module) -> bool:
    """Keep ``W0`` of every tracked layer (a checkpointed one is kept; a layer it lacks, or whose shape changed,
    is snapshotted now, said once); whether the snapshot is fresh (not from a checkpoint)."""
    if not cb._modules:
        cb._modules = cb.resolve(pl_module)
    cb._model = pl_module
    weights = cb._weights()
    fresh = cb._initial is None
    if cb._initial is None:
        cb._initial = {n: _cpu_copy(w) for n, w in weights.items()}
    for n, w in weights.items():
        w0 = cb._initial.get(n)
        if w0 is None or tuple(w0.shape) != tuple(w.shape):
            cb.warn_once(
                f"resnap-{n}",
                f"WeightHistograms: the checkpointed initial weights lack layer {n!r} (or its shape changed); "
                "its drift is measured from now on.",
            )
            cb._initial[n] = _cpu_copy(w)
    cb._initial_hists = None
    return fresh


def follow_module_replacements(cb: WeightHistograms, trainer: pl.Trainer) -> None:
    """Track the modules now in the model when tracked ones were replaced since the last look: the new
    modules' weights become their ``W0`` (said once per layer), and layers that are gone are dropped."""
    if cb._model is None or cb._initial is None:
        return
    changes = follow_replacements(cb._model, cb._modules, cb._initial, cb.layer_spec)
    if changes is None:
        return
    cb._modules = changes.modules
    for n in changes.gone:
        cb._initial.pop(n, None)
        cb.warn_once(
            f"gone-{n}",
            f"WeightHistograms: layer {n!r} was removed from the model (or no longer has a weight) at step "
            f"{trainer.global_step}; it is no longer tracked.",
        )
    for n in changes.renewed:
        weight = own_weight(cb._modules[n])
        cb._initial[n] = _cpu_copy(weight)  # type: ignore[arg-type]
        cb.warn_once(
            f"replaced-{n}",
            f"WeightHistograms: layer {n!r} was replaced at step {trainer.global_step} (now a "
            f"{type(cb._modules[n]).__name__} with weight {tuple(weight.shape)}); its histograms follow the new "  # type: ignore[union-attr]
            "module and its drift is measured from the new module's weights as they are now.",
        )
    cb._initial_hists = None
    cb._ordered = False  # trace the depth of the new modules at the next training batch


def trace_order(cb: WeightHistograms, pl_module: nn.Module, batch: Any) -> None:
    """Put the tracked layers in execution order (one forward of the batch's inputs, see ``depth_order``); on
    failure keep registration order, said once."""
    cb._ordered = True
    try:
        order = depth_order(pl_module, split_batch(batch)[0], list(cb._modules))
    except Exception as err:  # a model whose forward does not take the batch's inputs
        cb.warn_once(
            "order",
            f"WeightHistograms: could not trace the execution order ({type(err).__name__}: {err}); "
            "the drift-by-depth figure uses registration order.",
        )
        return
    cb._modules = {n: cb._modules[n] for n in order}


def tracked_tensors(cb: WeightHistograms, *, grad: bool = False) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` with keys ``<layer>`` and ``bias/<layer>`` (gradients where they exist if ``grad``)."""
    out: dict[str, torch.Tensor] = {}
    for n, m in cb._modules.items():
        w, b = own_weight(m), own_bias(m) if cb.include_bias else None
        for key, t in ((n, w), (f"bias/{n}", b)):
            t = t.grad if grad and t is not None else t
            if t is not None:
                out[key] = t
    return out
