"""The guarded forward pass every gradient method differentiates, and the checks and lookups around it.

:func:`_forward` runs the model once under the introspection guards (eval mode with every flag
restored, the global RNG forked, gradients on also inside ``torch.inference_mode``, hooks removed when
the block exits) on a fresh fp32 copy of the inputs on the model's device, optionally captures one
layer's output and optionally routes the ReLUs through the switchable backward of
:mod:`~lightning_introspect.methods.relu_backward`. The :class:`_Forward` it yields takes gradients of the
target scores with ``torch.autograd.grad`` w.r.t. the input leaf and / or the activation only
(parameter ``.grad`` untouched), with the ReLU rule chosen per call.

Also here: the input checks (:func:`_check_inputs`, :func:`_is_token_ids`), the model's device and
input dtype, the layer lookup by name or module (:func:`_layer_module`) and the warning when guided
backprop / deconvnet would not change the gradient (:func:`_warn_relu_coverage`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_introspect._torch.guards import fresh_input, introspection_mode
from lightning_introspect._torch.hooks import hooks
from lightning_introspect._torch.layers import get_layer
from lightning_introspect.methods.relu_backward import _ReluInterceptor, _ReluSwitch
from lightning_introspect.methods.targets import Target, model_logits, target_scores

__all__ = ["LayerSpec"]

LayerSpec = str | nn.Module | None
"""A layer given by its dotted name or as the submodule itself (``None``: no layer)."""


def _input_dtype(model: nn.Module) -> torch.dtype:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if not dtypes or torch.float32 in dtypes or len(dtypes) > 1:
        return torch.float32
    return dtypes.pop()  # a model held entirely in half / bfloat16 cannot take fp32 inputs


def _model_device(model: nn.Module, inputs: torch.Tensor) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return inputs.device


def _layer_module(model: nn.Module, layer: LayerSpec, argument: str = "layer") -> tuple[str, nn.Module]:
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, module
        raise ValueError(f"Expected `{argument}` to be a submodule of the model (or its dotted name), but got a {type(layer).__name__} that is not part of it.")
    if not isinstance(layer, str):
        raise ValueError(f"Expected `{argument}` to be a dotted layer name (str) or a submodule, but got {layer!r}.")
    return layer, get_layer(model, layer, argument=argument)


@dataclass
class _Forward:
    """One forward pass: the input leaf, the output, the per-sample scores, the captured activation."""

    x: torch.Tensor
    output: torch.Tensor
    scores: torch.Tensor
    switch: _ReluSwitch
    layer_name: str | None = None
    activation: torch.Tensor | None = None
    calls: int = 0
    handles: list[Any] = field(default_factory=list)

    def grad(self, wrt: Sequence[torch.Tensor], *, rule: str = "plain", retain: bool = True) -> tuple[torch.Tensor, ...]:
        self.switch.rule = rule
        grads = torch.autograd.grad(self.scores.sum(), list(wrt), retain_graph=retain, allow_unused=True)
        return tuple(torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads))


def _is_token_ids(inputs: Any) -> bool:
    """Integer ``(N, T)`` inputs: token ids, explained at the embedding output."""
    return isinstance(inputs, torch.Tensor) and inputs.ndim == 2 and not inputs.is_floating_point() and not inputs.is_complex() and inputs.dtype != torch.bool


def _check_inputs(inputs: Any) -> None:
    if not isinstance(inputs, torch.Tensor):
        raise ValueError(f"Expected `inputs` to be a tensor of shape (N, ...), but got {type(inputs).__name__}.")
    if inputs.ndim < 2:
        raise ValueError(f"Expected `inputs` of shape (N, ...) with a batch dimension, but got {tuple(inputs.shape)}.")
    if not inputs.is_floating_point():
        hint = (" Token ids (N, T) are explained at the embedding output: use `attribute(...)`, `integrated_gradients` or "
                "`lightning_introspect.methods.token_attribution`.") if _is_token_ids(inputs) else ""
        raise ValueError(f"Expected floating-point `inputs` (gradients w.r.t. them are needed), but got dtype {inputs.dtype}.{hint}")


@contextlib.contextmanager
def _forward(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    *,
    layer: LayerSpec = None,
    modified_relu: bool = False,
) -> Iterator[_Forward]:
    """Run one forward pass under the introspection guards; hooks are removed when the block exits."""
    _check_inputs(inputs)
    layer_name, module = _layer_module(model, layer) if layer is not None else (None, None)
    with introspection_mode(model), hooks() as handles:
        device = _model_device(model, inputs)
        x = fresh_input(inputs.to(device), dtype=_input_dtype(model))
        captured: list[torch.Tensor] = []

        def capture(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            # A tuple / list output (e.g. an LSTM's (out, state), a block's (out, aux)): its first
            # element is the feature map, as in the probes and feature visualisation.
            packed = isinstance(output, (tuple, list)) and bool(output) and isinstance(output[0], torch.Tensor)
            tensor = output[0] if packed else output
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(
                    f"Expected the layer {layer_name!r} to output a tensor (or a tuple whose first element is one), "
                    f"but got {type(output).__name__}; choose another layer."
                )
            captured.append(tensor)
            # Hand a copy downstream: an in-place op after the layer (ReLU(inplace=True)) must not
            # overwrite the activation we differentiate w.r.t.
            if not packed:
                return tensor.clone()
            rest = list(output[1:])
            if isinstance(output, list):
                return [tensor.clone(), *rest]
            return type(output)(tensor.clone(), *rest) if hasattr(output, "_fields") else type(output)((tensor.clone(), *rest))

        if module is not None:
            handles.append(module.register_forward_hook(capture))
        switch = _ReluSwitch()
        # The model gets a clone of the leaf, so an in-place first op cannot touch the leaf.
        with _ReluInterceptor(switch) if modified_relu else contextlib.nullcontext():
            output = model_logits(model(x.clone())).float()
        scores = target_scores(output, target)
        if module is not None and not captured:
            raise ValueError(f"The layer {layer_name!r} did not run in the forward pass; choose a layer the model calls.")
        fwd = _Forward(
            x=x,
            output=output,
            scores=scores,
            switch=switch,
            layer_name=layer_name,
            activation=captured[-1] if captured else None,
            calls=len(captured),
            handles=handles,
        )
        if fwd.calls > 1:
            warnings.warn(
                f"The layer {layer_name!r} ran {fwd.calls} times in one forward pass; its last call is used.",
                stacklevel=3,
            )
        yield fwd


def _warn_relu_coverage(fwd: _Forward, method: str) -> None:
    others = ", ".join(sorted(fwd.switch.others))
    if fwd.switch.relus == 0:
        seen = f" (it uses {others}, whose backward is not modified)" if others else ""
        warnings.warn(
            f"{method}: the forward pass computed no ReLU (nn.ReLU, F.relu, torch.relu, Tensor.relu){seen}, so the "
            f"modified backward rule never applied and {method} equals the plain gradient for this model.",
            stacklevel=3,
        )
    elif others:
        warnings.warn(
            f"{method}: the model also uses {others}; only ReLUs get the {method} backward rule, those "
            "activations keep their plain gradient.",
            stacklevel=3,
        )
