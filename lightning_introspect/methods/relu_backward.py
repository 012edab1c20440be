"""The switchable ReLU backward of guided backprop and deconvnet, applied without editing the model.

:class:`_ReluInterceptor` is a ``torch.overrides.TorchFunctionMode``, active only during the forward
pass of :func:`~lightning_introspect.methods.gradients._forward`, that routes every ReLU call --
``nn.ReLU`` modules (also ``inplace=True``), ``F.relu`` / ``F.relu_``, ``torch.relu`` and ``Tensor.relu``
-- through :class:`_SwitchableReLU`, an autograd function whose backward rule is read from a
:class:`_ReluSwitch` at backward time (``g`` the incoming gradient, ``y`` the ReLU output):

* ``"plain"``: ``g * 1[y > 0]``, the ordinary gradient;
* ``"guided"`` (guided backprop): ``g * 1[y > 0] * 1[g > 0]``;
* ``"deconvnet"``: ``relu(g)``, the forward mask ignored.

So one forward graph serves every rule. The switch also counts the ReLUs seen and names the other
activations (GELU, SiLU, ...) whose backward stays plain, for the coverage warnings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__: list[str] = []  # private machinery of the gradient methods


_RELU_FUNCS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_INPLACE_RELU_FUNCS = {torch.relu_, torch.Tensor.relu_}
# Activations whose backward the guided / deconvnet rules do NOT modify (warned about).
_OTHER_ACTIVATIONS = {
    F.gelu: "gelu",
    F.silu: "silu",
    F.leaky_relu: "leaky_relu",
    F.elu: "elu",
    F.selu: "selu",
    F.relu6: "relu6",
    F.hardtanh: "hardtanh",
    F.hardswish: "hardswish",
    F.mish: "mish",
    F.softplus: "softplus",
    torch.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    torch.Tensor.tanh: "tanh",
    torch.Tensor.sigmoid: "sigmoid",
}


@dataclass
class _ReluSwitch:
    """Which backward rule the ReLUs of one forward pass apply; read at backward time."""

    rule: str = "plain"
    relus: int = 0
    others: set[str] = field(default_factory=set)


class _SwitchableReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, switch: _ReluSwitch, inplace: bool) -> torch.Tensor:
        if inplace:
            out = torch.relu_(x)
            ctx.mark_dirty(x)
        else:
            out = torch.relu(x)
        ctx.switch = switch
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (out,) = ctx.saved_tensors
        rule = ctx.switch.rule
        if rule == "deconvnet":  # relu(g)
            return grad.clamp_min(0), None, None
        # threshold_backward(g, t, 0) = g where t > 0 else 0: the native ReLU backward kernel.
        # guided: min(y, g) > 0 <=> y > 0 and g > 0
        gate = torch.minimum(out, grad) if rule == "guided" else out
        return torch.ops.aten.threshold_backward(grad, gate, 0), None, None


class _ReluInterceptor(TorchFunctionMode):
    """Routes every ReLU call of the forward pass through :class:`_SwitchableReLU`."""

    def __init__(self, switch: _ReluSwitch) -> None:
        super().__init__()
        self.switch = switch

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _RELU_FUNCS and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            self.switch.relus += 1
            inplace = func in _INPLACE_RELU_FUNCS or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            return _SwitchableReLU.apply(args[0], self.switch, inplace)
        name = _OTHER_ACTIVATIONS.get(func)
        if name is not None:
            self.switch.others.add(name)
        return func(*args, **kwargs)
