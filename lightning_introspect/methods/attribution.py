"""Gradient attributions: saliency, input x gradient, guided backprop (with top-K), deconvnet, Grad-CAM.

Every function takes ``(model, inputs, target)`` and returns a detached map per sample, in batch order:

* :func:`saliency`, :func:`input_x_gradient`, :func:`guided_backprop`, :func:`deconvnet` and
  :func:`guided_grad_cam` return maps of the inputs' shape;
* :func:`grad_cam` returns ``(N, 1, *spatial)`` (the input's spatial size when ``upsample=True``), also
  for a vision transformer's token outputs ``(N, T, D)`` (the patch tokens on their grid);
* :func:`attention_rollout` and :func:`grad_rollout` (vision transformers, from
  :mod:`~lightning_introspect.methods.attention`) return ``(N, 1, H, W)``.

:func:`attribute` computes several methods sharing one forward pass: one ``torch.autograd.grad`` w.r.t.
``[input, activation]`` serves saliency, input x gradient and Grad-CAM; guided backprop and deconvnet
are further backward passes over the same graph with the ReLU backward rule switched (the rule is read
at backward time); LRP (``lightning_introspect.methods.lrp``) runs its own pass.

``target`` is anything :func:`lightning_introspect.methods.targets.target_scores` accepts: an int, one
class id per sample (list / tensor), ``"pred"``, a callable on the output, or a ``RegionTarget``
(segmentation). Every sample is explained with its own target.

Invariants (DESIGN.md): gradients only through ``torch.autograd.grad`` w.r.t. the inputs / one
activation (parameter ``.grad`` untouched), eval mode with every submodule's flag restored, the global
RNG forked, hooks removed in ``finally`` (also when the model raises), fresh fp32 input copies outside
autocast, and it works inside ``torch.inference_mode()`` (Lightning validation hooks).

ReLU backward rules (``g`` the incoming gradient, ``y`` the ReLU output):

* plain gradient: ``g * 1[y > 0]``;
* guided backprop (Springenberg et al. 2015): ``g * 1[y > 0] * 1[g > 0]``;
* deconvnet (Zeiler & Fergus 2014): ``relu(g)`` (the forward mask is ignored).

They are applied to every ReLU the forward pass computes -- ``nn.ReLU`` modules (also
``inplace=True``), ``F.relu`` / ``F.relu_``, ``torch.relu`` and ``Tensor.relu`` -- by a
``torch.overrides.TorchFunctionMode`` that is active only during our forward pass and swaps those calls
for an autograd function with a switchable backward. ReLUs written another way (``clamp(min=0)``,
``torch.maximum``) and other activations (GELU, SiLU, LeakyReLU ...) keep their plain gradient: the
methods warn when they see such activations or no ReLU at all (then guided backprop *is* the gradient).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_introspect._torch.guards import fresh_input, introspection_mode, private_generator
from lightning_introspect._torch.hooks import hooks
from lightning_introspect._torch.layers import get_layer
from lightning_introspect.methods.attention import (
    ATTENTION_METHODS,
    attention_rollout,
    grad_rollout,
    token_grid,
    tokens_first,
)
from lightning_introspect.methods.targets import (
    RegionTarget,
    Target,
    model_logits,
    target_indices,
    target_scores,
)

__all__ = [
    "IG_METHODS",
    "METHODS",
    "SIGNED_METHODS",
    "attention_rollout",
    "attribute",
    "auto_layer",
    "deconvnet",
    "grad_cam",
    "guided_backprop",
    "grad_rollout",
    "guided_grad_cam",
    "ig_alphas",
    "input_x_gradient",
    "integrated_gradients",
    "saliency",
    "smoothgrad",
]

LayerSpec = str | nn.Module | None

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------
# Switchable ReLU backward
# ----------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------
# The shared forward pass
# ----------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------
# Pieces shared by the public functions and `attribute`
# ----------------------------------------------------------------------------------------------------
def _cam(
    activation: torch.Tensor, grad: torch.Tensor, *, relu: bool, inputs: torch.Tensor | None = None, num_prefix_tokens: int | None = None,
) -> torch.Tensor:
    if activation.ndim == 3 and inputs is not None and inputs.ndim == 4:
        return _token_cam(activation, grad, inputs, relu=relu, num_prefix_tokens=num_prefix_tokens)
    if activation.ndim < 3:
        raise ValueError(
            f"Grad-CAM needs a layer with spatial dimensions, output (N, C, H, W), but the layer gave {tuple(activation.shape)}; "
            "pass a convolutional `layer`."
        )
    spatial = tuple(range(2, activation.ndim))
    alpha = grad.mean(dim=spatial, keepdim=True)
    cam = (alpha * activation).sum(dim=1, keepdim=True)
    return F.relu(cam) if relu else cam


def _token_cam(activation: torch.Tensor, grad: torch.Tensor, inputs: torch.Tensor, *, relu: bool, num_prefix_tokens: int | None) -> torch.Tensor:
    """Grad-CAM of tokens ``(N, T, D)`` (or ``(T, N, D)``) of an image model: the patch tokens on their grid
    (:func:`~lightning_introspect.methods.attention.token_grid`), channel weights = mean gradient over the
    patches, ``(N, 1, h, w)``; the prefix tokens (class, registers) are left out."""
    n = inputs.shape[0]
    tokens, grads = tokens_first(activation, n), tokens_first(grad, n)
    k, h, w = token_grid(tokens.shape[1], inputs.shape[2:], num_prefix_tokens)
    alpha = grads[:, k:].mean(dim=1, keepdim=True)
    cam = (alpha * tokens[:, k:]).sum(dim=-1).reshape(n, 1, h, w)
    return F.relu(cam) if relu else cam


def _upsample(cam: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    size = tuple(inputs.shape[2:])
    if cam.ndim != inputs.ndim or tuple(cam.shape[2:]) == size:
        return cam
    mode = {3: "linear", 4: "bilinear", 5: "trilinear"}.get(cam.ndim)
    if mode is None:
        return cam
    return F.interpolate(cam, size=size, mode=mode, align_corners=False)


def _check_top_k(top_k: Any) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"Expected `top_k` to be a positive int or None, but got {top_k!r}.")


def _top_k_hook(activation: torch.Tensor, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    act = activation.detach()

    def keep_top_k(grad: torch.Tensor) -> torch.Tensor:
        strength = act * grad
        n = strength.shape[0]
        # positions: spatial locations (channels summed) for (N, C, *S) maps, features for (N, F)
        per_position = strength.sum(dim=1) if strength.ndim >= 3 else strength
        flat = per_position.reshape(n, -1)
        k_eff = min(k, flat.shape[1])
        idx = flat.topk(k_eff, dim=1).indices
        mask = torch.zeros_like(flat).scatter_(1, idx, 1.0).view_as(per_position)
        return grad * (mask.unsqueeze(1) if strength.ndim >= 3 else mask)

    return keep_top_k


def _guided_grad(fwd: _Forward, *, top_k: int | None, retain: bool) -> torch.Tensor:
    handle = None
    if top_k is not None:
        assert fwd.activation is not None  # internal: the caller captured the layer
        handle = fwd.activation.register_hook(_top_k_hook(fwd.activation, top_k))
        fwd.handles.append(handle)
    try:
        (g,) = fwd.grad([fwd.x], rule="guided", retain=retain)
    finally:
        if handle is not None:
            handle.remove()
    return g


# ----------------------------------------------------------------------------------------------------
# Public methods
# ----------------------------------------------------------------------------------------------------
def saliency(model: nn.Module, inputs: torch.Tensor, target: Target, *, abs: bool = True) -> torch.Tensor:  # noqa: A002
    """Vanilla gradient of the target score w.r.t. the inputs (Simonyan et al. 2014), as captum ``Saliency``.

    Args:
        model: any ``nn.Module`` returning ``(N, C, ...)`` scores.
        inputs: ``(N, ...)`` floating inputs (not modified).
        target: int, per-sample ids, ``"pred"``, callable or ``RegionTarget``.
        abs: return ``|gradient|`` (captum's default) instead of the signed gradient.

    Returns:
        A detached tensor of the inputs' shape.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> saliency(net, torch.ones(2, 1, 2, 2), [0, 2]).shape
        torch.Size([2, 1, 2, 2])
    """
    with _forward(model, inputs, target) as fwd:
        (g,) = fwd.grad([fwd.x], retain=False)
    return (g.abs() if abs else g).detach()


def input_x_gradient(model: nn.Module, inputs: torch.Tensor, target: Target) -> torch.Tensor:
    """Inputs times the gradient of the target score (signed), as captum ``InputXGradient``.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> input_x_gradient(net, torch.ones(2, 4), "pred").shape
        torch.Size([2, 4])
    """
    with _forward(model, inputs, target) as fwd:
        (g,) = fwd.grad([fwd.x], retain=False)
        return (fwd.x * g).detach()


def guided_backprop(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    *,
    top_k: int | None = None,
    layer: LayerSpec = None,
) -> torch.Tensor:
    """Guided backpropagation: ReLUs pass back only positive gradients where their output was positive.

    Equals captum ``GuidedBackprop`` on models whose ReLUs are ``nn.ReLU`` modules, and also covers
    ``F.relu`` / ``torch.relu`` / in-place ReLUs, which captum does not see (see the module docstring).

    Top-K variant (``top_k=K``): at ``layer`` (default :func:`auto_layer`, the deepest feature map) the
    guided gradient ``G`` arriving from the target score is multiplied by the activation ``A`` of that
    layer. For an ``(N, C, *S)`` feature map a *position* is a spatial location and its strength is
    ``sum_c A[n, c, s] * G[n, c, s]``; for an ``(N, F)`` layer each feature is a position with strength
    ``A * G``. For each sample the K positions of largest strength keep their gradient (all channels),
    the gradient at every other position is set to zero, and the guided backward continues from there
    to the input. The map shows which input pixels drive the layer's K most score-relevant responses.
    ``K >= number of positions`` gives plain guided backprop.

    Args:
        model: the model.
        inputs: ``(N, ...)`` floating inputs (not modified).
        target: int, per-sample ids, ``"pred"``, callable or ``RegionTarget``.
        top_k: keep only the K strongest positions at ``layer`` (``None``: no masking).
        layer: dotted name or submodule for ``top_k`` (ignored without ``top_k``).

    Returns:
        A detached signed tensor of the inputs' shape.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
        >>> guided_backprop(net, torch.randn(2, 1, 4, 4), 1, top_k=2, layer="1").shape
        torch.Size([2, 1, 4, 4])
    """
    _check_top_k(top_k)
    if top_k is not None and layer is None:
        layer = auto_layer(model, inputs)
    with _forward(model, inputs, target, layer=layer if top_k is not None else None, modified_relu=True) as fwd:
        _warn_relu_coverage(fwd, "guided_backprop")
        return _guided_grad(fwd, top_k=top_k, retain=False).detach()


def deconvnet(model: nn.Module, inputs: torch.Tensor, target: Target) -> torch.Tensor:
    """Deconvnet: ReLUs pass back ``relu(gradient)``, ignoring the forward mask; as captum ``Deconvolution``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> deconvnet(net, torch.randn(2, 4), [0, 1]).shape
        torch.Size([2, 4])
    """
    with _forward(model, inputs, target, modified_relu=True) as fwd:
        _warn_relu_coverage(fwd, "deconvnet")
        (g,) = fwd.grad([fwd.x], rule="deconvnet", retain=False)
    return g.detach()


def grad_cam(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    layer: LayerSpec,
    *,
    relu: bool = True,
    upsample: bool = True,
    num_prefix_tokens: int | None = None,
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ``ReLU(sum_k alpha_k A^k)``, ``alpha_k`` the spatial mean of ``d score / d A^k``.

    ``A`` is the output of ``layer`` and the score the pre-softmax target score. Equals captum
    ``LayerGradCam(relu_attributions=relu)``; with ``upsample`` the map is resized bilinearly
    (``align_corners=False``) to the input's spatial size, as captum's ``LayerAttribution.interpolate``
    with ``"bilinear"`` (captum's own default is ``"nearest"``). The absolute scale is kept (no
    min-max normalisation).

    Vision transformers: a layer whose output is tokens ``(N, T, D)`` (``(T, N, D)`` with
    ``batch_first=False``) for image inputs ``(N, C, H, W)`` -- a transformer block -- is explained on its
    patch tokens: the ``k`` prefix tokens (class, registers) are dropped, the ``T - k`` patch tokens laid
    out on their ``h x w`` grid (:func:`~lightning_introspect.methods.attention.token_grid`: ``k`` inferred
    unless ``num_prefix_tokens`` states it), and the embedding dimension ``D`` plays the channels:
    ``alpha_d`` is the mean over the patches of ``d score / d A[:, p, d]``. With a head that reads only
    the class token, the patch tokens of the *last* block's output do not reach the score (zero map):
    explain an earlier block, as :func:`auto_layer` does.

    Args:
        model: the model.
        inputs: ``(N, C, H, W)`` inputs (1-D / 3-D spatial inputs work too).
        target: int, per-sample ids, ``"pred"``, callable or ``RegionTarget``.
        layer: dotted name or submodule whose output ``(N, K, h, w)`` is explained ("auto" is resolved
            by :func:`auto_layer`).
        relu: apply the ReLU to the weighted sum.
        upsample: resize to the input's spatial size.
        num_prefix_tokens: token outputs only: the tokens before the patches (``None``: inferred).

    Returns:
        A detached ``(N, 1, H, W)`` tensor (``(N, 1, h, w)`` without upsampling).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(4, 3))
        >>> grad_cam(net, torch.randn(2, 1, 8, 8), "pred", "1").shape
        torch.Size([2, 1, 8, 8])
    """
    if isinstance(layer, str) and layer == "auto":
        layer = auto_layer(model, inputs)
    if layer is None:
        raise ValueError("Expected `layer` to name the feature map Grad-CAM explains (or 'auto'), but got None.")
    with _forward(model, inputs, target, layer=layer) as fwd:
        assert fwd.activation is not None
        (g,) = fwd.grad([fwd.activation], retain=False)
        cam = _cam(fwd.activation.detach(), g, relu=relu, inputs=inputs, num_prefix_tokens=num_prefix_tokens)
    return (_upsample(cam, inputs) if upsample else cam).detach()


def guided_grad_cam(
    model: nn.Module, inputs: torch.Tensor, target: Target, layer: LayerSpec, *, num_prefix_tokens: int | None = None,
) -> torch.Tensor:
    """Guided Grad-CAM: guided backprop times the (ReLU'd, bilinearly upsampled) Grad-CAM map.

    One forward pass and two backward passes (captum ``GuidedGradCam`` needs two of each). Equals
    captum ``GuidedGradCam(...).attribute(..., interpolate_mode="bilinear")``. A token layer of a vision
    transformer is laid out as in :func:`grad_cam` (``num_prefix_tokens``).

    Returns:
        A detached signed tensor of the inputs' shape.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(4, 3))
        >>> guided_grad_cam(net, torch.randn(2, 1, 8, 8), 0, "1").shape
        torch.Size([2, 1, 8, 8])
    """
    options = {"grad_cam": {"num_prefix_tokens": num_prefix_tokens}} if num_prefix_tokens is not None else None
    out = attribute(model, inputs, target, ["guided_grad_cam"], layer=layer, options=options)
    return out["guided_grad_cam"]


# ----------------------------------------------------------------------------------------------------
# Path methods: SmoothGrad and integrated gradients (many gradients of inputs built from the samples)
# ----------------------------------------------------------------------------------------------------
IG_METHODS = ("riemann_trapezoid", "riemann_right", "riemann_left", "riemann_middle", "gausslegendre")
"""Quadrature rules of :func:`integrated_gradients` (captum's ``method`` names and meaning)."""

DEFAULT_PATH_BATCH = 128
"""Rows (noisy copies / path points x samples) per forward pass of SmoothGrad and integrated gradients."""


def ig_alphas(steps: int, method: str = "riemann_trapezoid") -> tuple[list[float], list[float]]:
    """The points ``alpha_j`` on the straight path from the baseline (0) to the input (1) and their
    weights ``w_j``: integrated gradients is ``(x - x') * sum_j w_j * grad(x' + alpha_j (x - x'))``.

    * ``riemann_left`` / ``riemann_right`` / ``riemann_middle``: ``steps`` equal intervals, each evaluated
      at its left end / right end / middle, weight ``1 / steps``;
    * ``riemann_trapezoid``: ``steps`` equally spaced points from 0 to 1 included, weight
      ``1 / (steps - 1)`` with the end points weighted half (the trapezoidal rule; needs ``steps >= 2``).
      captum's ``riemann_trapezoid`` uses the same points with weights ``1 / steps`` (its weights sum to
      ``(steps - 1) / steps``, so its attributions are that factor smaller than ours and fall short of
      completeness by it);
    * ``gausslegendre``: Gauss-Legendre nodes and weights mapped from [-1, 1] to [0, 1].

    The weights sum to 1 (the path has length one), so a model linear in its input gets exactly
    ``(x - x') * gradient``.

    Example:
        >>> ig_alphas(3, "riemann_trapezoid")
        ([0.0, 0.5, 1.0], [0.25, 0.5, 0.25])
        >>> ig_alphas(2, "riemann_right")
        ([0.5, 1.0], [0.5, 0.5])
    """
    _check_steps(steps, method)
    if method == "gausslegendre":
        import numpy as np

        nodes, gauss = np.polynomial.legendre.leggauss(steps)
        return [float(0.5 * (a + 1.0)) for a in nodes], [float(0.5 * w) for w in gauss]
    if method == "riemann_trapezoid":
        alphas = [j / (steps - 1) for j in range(steps)]
        weights = [1.0 / (steps - 1)] * steps
        weights[0] = weights[-1] = 0.5 / (steps - 1)
        return alphas, weights
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
    return [(j + offset) / steps for j in range(steps)], [1.0 / steps] * steps


def _check_steps(steps: Any, method: Any) -> None:
    if method not in IG_METHODS:
        raise ValueError(f"Expected `method` to be one of {', '.join(repr(m) for m in IG_METHODS)}, but got {method!r}.")
    least = 2 if method == "riemann_trapezoid" else 1
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < least:
        raise ValueError(f"Expected `steps` to be an int >= {least} for method {method!r}, but got {steps!r}.")


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected `batch_size` to be a positive int (rows per forward pass), but got {batch_size!r}.")


def _predicted_ids(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Each sample's arg-max class on the clean inputs (one forward, no gradients): ``"pred"`` of a path
    method explains the prediction for the sample itself, not for each perturbed copy."""
    with introspection_mode(model, grad=False):
        x = fresh_input(inputs.to(_model_device(model, inputs)), requires_grad=False, dtype=_input_dtype(model))
        return target_indices(model_logits(model(x)).float(), "pred")


def _tiled_target(target: Target, n: int, model: nn.Module, inputs: torch.Tensor) -> Callable[[int], Target]:
    """``copies -> target`` for ``copies`` stacked copies of the ``N`` samples (row ``c * N + i`` is a copy
    of sample ``i``): each copy is explained with its sample's own target."""
    if isinstance(target, str):
        target = _predicted_ids(model, inputs) if target == "pred" else target  # a bad string: target_scores names it
    if isinstance(target, RegionTarget):
        ids = target.class_id if isinstance(target.class_id, int) else torch.as_tensor(target.class_id).flatten()
        mask = torch.as_tensor(target.mask)
        region = target

        def tile_region(copies: int) -> Target:
            class_id = ids if isinstance(ids, int) or ids.numel() == 1 else ids.repeat(copies)
            tiled = mask.repeat(copies, 1, 1) if mask.ndim == 3 and mask.shape[0] == n else mask
            return RegionTarget(class_id=class_id, mask=tiled) if copies > 1 else region

        return tile_region
    if isinstance(target, (int, str)) or (callable(target) and not isinstance(target, torch.Tensor)):
        return lambda copies: target  # the same class for every row / a row-wise score function
    ids = torch.as_tensor(target)
    if ids.ndim > 1 or ids.numel() not in (1, n):
        raise ValueError(f"Expected `target` to hold 1 or N={n} class ids (one per sample), but got shape {tuple(ids.shape)}.")
    flat = ids.flatten()
    return lambda copies: flat if flat.numel() == 1 else flat.repeat(copies)


def _copy_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    copies: int,
    make: Callable[[int, int], torch.Tensor],
    batch_size: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Gradients of the target score w.r.t. ``copies`` inputs built from the samples, a chunk at a time.

    ``make(start, stop)`` returns copies ``start .. stop - 1`` stacked, ``((stop - start) * N, ...)``;
    yields ``(start, gradients)`` with gradients ``(stop - start, N, ...)``. Every chunk is one guarded
    forward pass (:func:`_forward`) of at most ``batch_size`` rows (at least one copy of the samples).
    """
    n = inputs.shape[0]
    tiled = _tiled_target(target, n, model, inputs)
    per_pass = max(1, batch_size // n)
    for start in range(0, copies, per_pass):
        stop = min(copies, start + per_pass)
        with _forward(model, make(start, stop), tiled(stop - start)) as fwd:
            (g,) = fwd.grad([fwd.x], retain=False)
        yield start, g.detach().view(stop - start, *inputs.shape)


def _noise_std(inputs: torch.Tensor, noise: float) -> torch.Tensor:
    """Smilkov et al.'s noise level: ``noise`` times each sample's value range ``max - min``, shaped to broadcast."""
    flat = inputs.detach().flatten(1).float()
    spread = flat.max(dim=1).values - flat.min(dim=1).values
    return (noise * spread).view(-1, *([1] * (inputs.ndim - 1)))


def smoothgrad(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    *,
    samples: int = 16,
    noise: float = 0.15,
    abs: bool = True,  # noqa: A002
    generator: torch.Generator | None = None,
    batch_size: int = DEFAULT_PATH_BATCH,
) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017): the saliency map averaged over noisy copies of each input.

    Each sample ``x`` is copied ``samples`` times with Gaussian noise of standard deviation
    ``sigma = noise * (max(x) - min(x))`` added (the paper's noise level: a fraction of the sample's value
    range; 0.1-0.2 is its recommendation), and the gradients of the target score at the copies are
    averaged: ``mean_s |d score / d x (x + e_s)|`` with ``abs=True`` (the smoothed saliency map, captum
    ``NoiseTunnel(Saliency()).attribute(nt_type="smoothgrad", stdevs=sigma)``), or the signed mean
    gradient with ``abs=False`` (the paper's ``M_hat``; show its magnitude).

    The noise comes from ``generator`` (a private ``torch.Generator`` seeded 0 when ``None``; the global
    RNG is never drawn from): for ``s = 0 .. samples - 1`` in turn, ``torch.randn(inputs.shape,
    generator=generator)`` on the model's device, times ``sigma``. Copies are explained in batches of at most
    ``batch_size`` rows; ``"pred"`` is each sample's prediction on the clean input.

    Args:
        model: the model.
        inputs: ``(N, ...)`` floating inputs (not modified).
        target: int, per-sample ids, ``"pred"``, a callable on the output (row-wise) or a ``RegionTarget``.
        samples: number of noisy copies per sample.
        noise: noise standard deviation as a fraction of each sample's value range (>= 0).
        abs: average ``|gradient|`` (unsigned) instead of the signed gradient.
        generator: the source of the noise (on the model's device).
        batch_size: most rows (copies x samples) per forward pass.

    Returns:
        A detached tensor of the inputs' shape.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> smoothgrad(net, torch.randn(2, 4), [0, 2], samples=4).shape
        torch.Size([2, 4])
    """
    _check_inputs(inputs)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"Expected `samples` to be a positive int (noisy copies per sample), but got {samples!r}.")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"Expected `noise` to be a float >= 0 (a fraction of each sample's value range), but got {noise!r}.")
    _check_batch_size(batch_size)
    device = _model_device(model, inputs)
    if generator is None:
        generator = private_generator(0, device)
    x = inputs.detach().to(device, _input_dtype(model))
    sigma = _noise_std(x, float(noise))
    total = torch.zeros_like(x)

    def noisy(start: int, stop: int) -> torch.Tensor:
        draws = [torch.randn(x.shape, generator=generator, device=device) for _ in range(start, stop)]
        return torch.cat([x + sigma * e for e in draws])

    for _, grads in _copy_gradients(model, x, target, samples, noisy, batch_size):
        total += (grads.abs() if abs else grads).sum(dim=0)
    return total / samples


def integrated_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    *,
    steps: int = 32,
    baseline: float | torch.Tensor | None = None,
    method: str = "riemann_trapezoid",
    batch_size: int = DEFAULT_PATH_BATCH,
    embedding_layer: LayerSpec = None,
) -> torch.Tensor:
    """Integrated gradients (Sundararajan et al. 2017): ``(x - x') * integral_0^1 grad(x' + a (x - x')) da``.

    The integral along the straight path from the baseline ``x'`` to the input is approximated by the
    quadrature ``method`` with ``steps`` points (:func:`ig_alphas`), evaluated in batches of at most
    ``batch_size`` rows. Equals captum ``IntegratedGradients(model).attribute(inputs, baselines, target,
    n_steps=steps, method=method)`` (for ``riemann_trapezoid``: captum's times ``steps / (steps - 1)``, see
    :func:`ig_alphas`). Completeness: each sample's attributions sum to ``score(x) -
    score(x')`` up to the quadrature error (``riemann_trapezoid`` and ``gausslegendre`` converge fastest).

    Token ids (integer inputs ``(N, T)``): the path runs in the embedding space instead, from the
    baseline embedding to the embedding output of ``embedding_layer`` (found automatically when
    ``None``), and the result is one score per token ``(N, T)``, summed over the embedding dimension;
    ``baseline`` is then a token id (its embedding at every position: a pad or mask token) or ``None``
    (the zero embedding). See :func:`lightning_introspect.methods.token_attribution.token_integrated_gradients`.

    Args:
        model: the model.
        inputs: ``(N, ...)`` floating inputs (not modified), or ``(N, T)`` integer token ids.
        target: int, per-sample ids, ``"pred"`` (the prediction on the input itself), a callable on the
            output (row-wise) or a ``RegionTarget``.
        steps: number of points on the path.
        baseline: floating inputs: ``None`` (zeros), a number, or a tensor broadcastable to ``inputs``
            (e.g. a blurred copy, or the data mean of shape ``(C, 1, 1)``).
        method: one of :data:`IG_METHODS`.
        batch_size: most rows (path points x samples) per forward pass.
        embedding_layer: token ids only: the embedding module (dotted name or submodule).

    Returns:
        A detached signed tensor of the inputs' shape (``(N, T)`` for token ids).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x = torch.randn(2, 4)
        >>> ig = integrated_gradients(net, x, 1, steps=64)
        >>> gap = net(x)[:, 1] - net(torch.zeros(2, 4))[:, 1]
        >>> torch.allclose(ig.sum(1), gap, atol=1e-3)
        True
    """
    if isinstance(inputs, torch.Tensor) and inputs.ndim == 2 and not inputs.is_floating_point():
        from lightning_introspect.methods.token_attribution import token_integrated_gradients

        if baseline is not None and not isinstance(baseline, int):
            raise ValueError(f"Expected `baseline` to be a token id (int) or None for token-id inputs, but got {baseline!r}.")
        return token_integrated_gradients(
            model, inputs, target, steps=steps, baseline=baseline, method=method, batch_size=batch_size, embedding_layer=embedding_layer
        )
    _check_inputs(inputs)
    _check_batch_size(batch_size)
    alphas, weights = ig_alphas(steps, method)
    device = _model_device(model, inputs)
    dtype = _input_dtype(model)
    x = inputs.detach().to(device, dtype)
    if baseline is None:
        base = torch.zeros_like(x)
    elif isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        base = torch.full_like(x, float(baseline))
    elif isinstance(baseline, torch.Tensor):
        try:
            base = torch.broadcast_to(baseline.detach().to(device, dtype), x.shape).clone()
        except RuntimeError as err:
            raise ValueError(f"Expected `baseline` to broadcast to the inputs' shape {tuple(x.shape)}, but got {tuple(baseline.shape)}.") from err
    else:
        raise ValueError(f"Expected `baseline` to be None, a number or a tensor broadcastable to the inputs, but got {type(baseline).__name__}.")
    delta = x - base
    total = torch.zeros_like(x)

    def path(start: int, stop: int) -> torch.Tensor:
        return torch.cat([base + alphas[j] * delta for j in range(start, stop)])

    for start, grads in _copy_gradients(model, x, target, steps, path, batch_size):
        w = torch.tensor(weights[start : start + grads.shape[0]], dtype=grads.dtype, device=grads.device)
        total += (w.view(-1, *([1] * x.ndim)) * grads).sum(dim=0)
    return (delta * total).detach()


def _lrp(model: nn.Module, inputs: torch.Tensor, target: Target, **options: Any) -> torch.Tensor:
    """Layer-wise relevance propagation; see ``lightning_introspect.methods.lrp.lrp`` (imported lazily)."""
    from lightning_introspect.methods.lrp import lrp

    return lrp(model, inputs, target, **options)


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "saliency": saliency,
    "input_x_gradient": input_x_gradient,
    "guided_backprop": guided_backprop,
    "deconvnet": deconvnet,
    "grad_cam": grad_cam,
    "guided_grad_cam": guided_grad_cam,
    "lrp": _lrp,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "attention_rollout": attention_rollout,
    "grad_rollout": grad_rollout,
}
"""Name -> function. ``grad_cam`` and ``guided_grad_cam`` take the layer as 4th argument; ``attention_rollout``
and ``grad_rollout`` (:mod:`~lightning_introspect.methods.attention`) explain vision transformers."""

SIGNED_METHODS: frozenset[str] = frozenset({"input_x_gradient", "guided_backprop", "deconvnet", "guided_grad_cam", "lrp", "integrated_gradients"})
"""Methods whose maps take both signs (show them with a diverging colormap centred on 0).

``saliency`` and ``smoothgrad`` are unsigned with their default ``abs=True``; ``grad_cam`` with its default
``relu=True``."""

PATH_METHODS: frozenset[str] = frozenset({"smoothgrad", "integrated_gradients"})
"""Methods that explain many inputs built from each sample (noisy copies, points on a path): their own
passes, in batches, after the shared forward pass of :func:`attribute`."""

LAYER_METHODS: frozenset[str] = frozenset({"grad_cam", "guided_grad_cam"})
"""Methods that explain a layer (need ``layer``)."""

ROLLOUT_METHODS: frozenset[str] = frozenset(ATTENTION_METHODS)
"""Methods that read the attention probabilities (vision transformers): their own pass after the shared one;
a model without self-attention is refused (``attention.attention_problem`` says why before a fit)."""


# ----------------------------------------------------------------------------------------------------
# attribute: several methods, one forward pass
# ----------------------------------------------------------------------------------------------------
def _check_methods(methods: Any, argument: str = "methods") -> list[str]:
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, (list, tuple)) or not methods:
        raise ValueError(f"Expected `{argument}` to be a non-empty list of method names from {', '.join(METHODS)}, but got {methods!r}.")
    out: list[str] = []
    for name in methods:
        if name not in METHODS:
            raise ValueError(f"Expected every entry of `{argument}` to be one of {', '.join(repr(m) for m in METHODS)}, but got {name!r}.")
        if name not in out:
            out.append(name)
    return out


def attribute(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    methods: Sequence[str],
    *,
    layer: LayerSpec = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, torch.Tensor]:
    """Several attribution methods for the same inputs and target, sharing one forward pass.

    One forward pass serves every gradient method asked for: saliency, input x gradient and Grad-CAM
    share one ``torch.autograd.grad`` w.r.t. ``[input, activation]``; guided backprop, guided Grad-CAM
    and deconvnet are extra backward passes over the same graph with the ReLU rule switched. LRP runs
    its own pass; SmoothGrad and integrated gradients their own batched passes over the noisy copies /
    path points (``"pred"`` is taken from the shared pass); attention rollout and its gradient-weighted
    version one pass each. The results equal the single-method functions.

    Token ids (integer inputs ``(N, T)``): the methods of
    :data:`~lightning_introspect.methods.token_attribution.TOKEN_METHODS` give one score per token, at the
    output of the embedding layer (``layer``; ``None`` or ``"auto"``: found automatically), see
    :func:`~lightning_introspect.methods.token_attribution.token_attributions`.

    Args:
        model: the model.
        inputs: ``(N, ...)`` floating inputs (not modified).
        target: int, per-sample ids, ``"pred"``, callable or ``RegionTarget``; ``"pred"`` is taken from
            the shared forward pass, so every method explains the same classes.
        methods: names from :data:`METHODS`.
        layer: the feature map for ``grad_cam`` / ``guided_grad_cam`` and for guided backprop's ``top_k``
            (``None`` or ``"auto"``: :func:`auto_layer`).
        options: per-method keyword options, e.g. ``{"saliency": {"abs": False}, "guided_backprop":
            {"top_k": 4}, "grad_cam": {"relu": True, "upsample": True}, "lrp": {"rule": "epsilon"},
            "smoothgrad": {"samples": 16, "noise": 0.15}, "integrated_gradients": {"steps": 32, "baseline": 0.0},
            "attention_rollout": {"head_fusion": "mean", "discard_ratio": 0.0}}``; ``num_prefix_tokens`` (the
            class / register tokens of a vision transformer) for ``grad_cam`` and the rollouts.

    Returns:
        ``{method: map}`` in the order of ``methods``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(4, 3))
        >>> maps = attribute(net, torch.randn(2, 1, 8, 8), "pred", ["saliency", "grad_cam"])
        >>> {k: tuple(v.shape) for k, v in maps.items()}
        {'saliency': (2, 1, 8, 8), 'grad_cam': (2, 1, 8, 8)}
    """
    names = _check_methods(methods)
    options = {k: dict(v) for k, v in (options or {}).items()}
    unknown = sorted(set(options) - set(METHODS))
    if unknown:
        raise ValueError(f"Expected the keys of `options` to be method names from {', '.join(METHODS)}, but got {unknown}.")
    sal_opts = options.get("saliency", {})
    cam_opts = options.get("grad_cam", {})
    guided_opts = options.get("guided_backprop", {})
    if _is_token_ids(inputs):  # token ids: scores per token at the embedding output
        from lightning_introspect.methods.token_attribution import token_attributions

        return token_attributions(model, inputs, target, names, embedding_layer=None if layer == "auto" else layer, options=options)
    for method, allowed in (
        ("saliency", {"abs"}), ("grad_cam", {"relu", "upsample", "num_prefix_tokens"}), ("guided_backprop", {"top_k", "layer"}),
        ("attention_rollout", {"head_fusion", "discard_ratio", "num_prefix_tokens", "upsample"}),
        ("grad_rollout", {"num_prefix_tokens", "upsample"}),
        ("smoothgrad", {"samples", "noise", "abs", "generator", "batch_size"}),
        ("integrated_gradients", {"steps", "baseline", "method", "batch_size"}),
    ):
        bad = sorted(set(options.get(method, {})) - allowed)
        if bad:
            raise ValueError(f"Unknown option(s) {bad} for {method!r} in `options`; valid: {', '.join(sorted(allowed))}.")
    for method in ("input_x_gradient", "deconvnet", "guided_grad_cam"):
        if options.get(method):
            raise ValueError(f"{method!r} takes no options, but `options` gives {sorted(options[method])}.")
    top_k = guided_opts.get("top_k")
    _check_top_k(top_k)

    gradient_names = [m for m in names if m != "lrp" and m not in PATH_METHODS and m not in ROLLOUT_METHODS]
    predicted: torch.Tensor | None = None  # "pred" resolved once, so the path methods explain the same classes
    needs_layer = any(m in LAYER_METHODS for m in gradient_names) or ("guided_backprop" in gradient_names and top_k is not None)
    if isinstance(layer, str) and layer == "auto":
        layer = None
    if needs_layer and layer is None:
        layer = auto_layer(model, inputs)
    if "guided_backprop" in gradient_names and guided_opts.get("layer") is not None and top_k is not None:
        if "grad_cam" in gradient_names or "guided_grad_cam" in gradient_names:
            if _layer_module(model, guided_opts["layer"])[1] is not _layer_module(model, layer)[1]:
                raise ValueError("`options['guided_backprop']['layer']` must equal `layer` when Grad-CAM shares the pass.")
        else:
            layer = guided_opts["layer"]

    results: dict[str, torch.Tensor] = {}
    if gradient_names:
        want_plain_x = any(m in ("saliency", "input_x_gradient") for m in gradient_names)
        want_cam = any(m in LAYER_METHODS for m in gradient_names)
        want_guided = "guided_backprop" in gradient_names
        want_guided_plain = "guided_grad_cam" in gradient_names and (not want_guided or top_k is not None)
        want_deconv = "deconvnet" in gradient_names
        modified = want_guided or want_guided_plain or want_deconv
        steps = [s for s, on in (("plain", want_plain_x or want_cam), ("guided", want_guided), ("guided_plain", want_guided_plain), ("deconvnet", want_deconv)) if on]
        target_for_pass = target
        with _forward(model, inputs, target_for_pass, layer=layer if needs_layer else None, modified_relu=modified) as fwd:
            if modified:
                for name in ("guided_backprop", "deconvnet", "guided_grad_cam"):
                    if name in gradient_names:
                        _warn_relu_coverage(fwd, name)
            grads: dict[str, torch.Tensor] = {}
            cam = None
            for i, step in enumerate(steps):
                retain = i < len(steps) - 1
                if step == "plain":
                    wrt = [fwd.x] if want_plain_x else []
                    if want_cam:
                        assert fwd.activation is not None  # captured: a layer method was asked for
                        wrt.append(fwd.activation)
                    got = fwd.grad(wrt, retain=retain)
                    if want_plain_x:
                        grads["x"] = got[0]
                    if want_cam:
                        assert fwd.activation is not None
                        cam = _cam(fwd.activation.detach(), got[-1], relu=bool(cam_opts.get("relu", True)), inputs=inputs,
                                   num_prefix_tokens=cam_opts.get("num_prefix_tokens"))
                elif step == "guided":
                    grads["guided"] = _guided_grad(fwd, top_k=top_k, retain=retain)
                elif step == "guided_plain":
                    grads["guided_plain"] = _guided_grad(fwd, top_k=None, retain=retain)
                else:
                    (grads["deconvnet"],) = fwd.grad([fwd.x], rule="deconvnet", retain=retain)
            x = fwd.x.detach()
            if isinstance(target, str) and target == "pred":
                predicted = target_indices(fwd.output.detach(), "pred")
        for name in gradient_names:
            if name == "saliency":
                g = grads["x"]
                results[name] = g.abs() if sal_opts.get("abs", True) else g
            elif name == "input_x_gradient":
                results[name] = x * grads["x"]
            elif name == "guided_backprop":
                results[name] = grads["guided"]
            elif name == "deconvnet":
                results[name] = grads["deconvnet"]
            elif name == "grad_cam":
                assert cam is not None
                results[name] = _upsample(cam, inputs) if cam_opts.get("upsample", True) else cam
            elif name == "guided_grad_cam":
                assert cam is not None
                plain_cam = cam if cam_opts.get("relu", True) else F.relu(cam)
                guided = grads["guided_plain"] if "guided_plain" in grads else grads["guided"]
                results[name] = guided * _upsample(plain_cam, inputs)
    if "lrp" in names:
        results["lrp"] = _lrp(model, inputs, target, **options.get("lrp", {}))
    if any(m in PATH_METHODS for m in names):
        path_target: Target = target
        if isinstance(target, str) and target == "pred":
            path_target = predicted if predicted is not None else _predicted_ids(model, inputs)
        if "smoothgrad" in names:
            results["smoothgrad"] = smoothgrad(model, inputs, path_target, **options.get("smoothgrad", {}))
        if "integrated_gradients" in names:
            results["integrated_gradients"] = integrated_gradients(model, inputs, path_target, **options.get("integrated_gradients", {}))
    if "attention_rollout" in names:  # the same map for every class: no target
        results["attention_rollout"] = attention_rollout(model, inputs, **options.get("attention_rollout", {}))
    if "grad_rollout" in names:
        rollout_target: Target = predicted if predicted is not None else target  # "pred" of the shared pass, if any
        results["grad_rollout"] = grad_rollout(model, inputs, rollout_target, **options.get("grad_rollout", {}))
    return {name: results[name].detach() for name in names}


# ----------------------------------------------------------------------------------------------------
# auto_layer
# ----------------------------------------------------------------------------------------------------
def _dense_head_index(calls: Sequence[tuple[str, tuple[int, ...] | None, bool]], output: Any) -> int:
    """Where the output head of a dense (per-pixel) model starts in ``calls``: the last convolution
    producing the output's shape; ``len(calls)`` for other models (nothing is cut)."""
    if not isinstance(output, torch.Tensor) or output.ndim != 4 or max(output.shape[2:]) <= 1:
        return len(calls)
    heads = [i for i, (_, shape, is_conv) in enumerate(calls) if is_conv and shape == tuple(output.shape)]
    return heads[-1] if heads and heads[-1] > 0 else len(calls)


def auto_layer(model: nn.Module, example_input: torch.Tensor) -> str:
    """The feature map Grad-CAM explains by default: the last convolution's output, as late as it stays.

    Runs one forward pass (eval mode, no grad, global RNG forked) recording every module call as it
    completes. Takes the last call of a 2-D (more generally N-D spatial) convolution, then moves on
    through the calls that follow it while the output keeps that shape (BatchNorm, the ReLU, a residual
    block or stage that ends there), and returns the last of those modules that runs once per forward.
    Without a convolution: the last module whose output has spatial dimensions larger than 1.
    For :class:`~lightning_introspect.demo.DigitsCNN` this is ``"features.9"`` (the ReLU after the last
    conv); for a torchvision-style ResNet ``"layer4"``.

    Dense outputs (segmentation, ``(N, C, H, W)`` logits): the output head -- the last convolution whose
    output is the logits' shape, typically a 1x1 classifier -- and everything after it are left out, so
    the choice is the deepest feature map before the head (for a U-Net its last decoder stage). Grad-CAM
    of the head itself would only re-weight the logit map it produces.

    Vision transformers (image inputs, and after the last convolution -- the patch embedding, if it is
    one -- modules with children that output tokens ``(1, T, D)`` / ``(T, 1, D)`` laid out as prefix tokens
    and a patch grid, see :func:`~lightning_introspect.methods.attention.token_grid`): the last such block
    whose *patch tokens reach the output*, found with one more forward and backward pass (the gradient of
    the predicted class's score w.r.t. each block's output; a module returning the same tensor as a block
    inside it, such as the ``nn.Sequential`` holding the blocks, gives way to that block). With a
    mean-pooling head this is the last block; with a head that reads only the class token it is the block
    before the last (the last block's patch tokens feed nothing but themselves), as pytorch-grad-cam
    recommends. When no block qualifies (one block and a class-token head) the convolution rule above
    applies (the patch embedding). The choice is logged at INFO.

    Raises:
        ValueError: if no module outputs a spatial feature map (images: 4-D) or a qualifying token block.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 2))
        >>> auto_layer(net, torch.zeros(1, 1, 8, 8))
        '1'
    """
    _check_inputs(example_input)
    names = {m: n for n, m in model.named_modules() if n}
    calls: list[tuple[str, tuple[int, ...] | None, bool]] = []
    block_shapes: list[tuple[int, ...] | None] = []  # per call: a container's output (a tuple's first tensor)

    def record(module: nn.Module, _inputs: Any, output: Any) -> None:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        calls.append((names[module], shape, isinstance(module, nn.modules.conv._ConvNd)))
        first = _first_tensor(output) if next(module.children(), None) is not None else None
        block_shapes.append(None if first is None else tuple(first.shape))

    with introspection_mode(model, grad=False), hooks() as handles:
        for module in names:
            handles.append(module.register_forward_hook(record))
        output = model(example_input[:1].to(_model_device(model, example_input)))
    calls = calls[: _dense_head_index(calls, _logits_or_none(output))]
    counts: dict[str, int] = {}
    for name, _, _ in calls:
        counts[name] = counts.get(name, 0) + 1

    image = example_input.ndim == 4

    def spatial(shape: tuple[int, ...] | None) -> bool:
        # image inputs: 3-D outputs are tokens (N, T, D), not 1-D feature maps
        return shape is not None and len(shape) >= 3 and any(s > 1 for s in shape[2:]) and (not image or len(shape) == 4)

    conv_idx = [i for i, (_, shape, is_conv) in enumerate(calls) if is_conv and spatial(shape)]
    blocks = [
        name for i, (name, _, _) in enumerate(calls)
        if image and i > (conv_idx[-1] if conv_idx else -1) and counts[name] == 1 and _token_layout(block_shapes[i], example_input) is not None
    ]
    if blocks:
        chosen = _reaching_block(model, example_input, blocks)
        if chosen is not None:
            log.info("auto_layer: %r, the last transformer block whose patch tokens reach the output.", chosen)
            return chosen
        log.info("auto_layer: the patch tokens of no transformer block (%s) reach the output; using the feature-map rule.", ", ".join(blocks))
    if conv_idx:
        start = conv_idx[-1]
        shape = calls[start][1]
        best = calls[start][0] if counts[calls[start][0]] == 1 else None
        for name, s, _ in calls[start + 1 :]:
            if s != shape:
                break
            if counts[name] == 1:
                best = name
        if best is not None:
            return best
    candidates = [name for name, shape, _ in calls if spatial(shape) and counts[name] == 1]
    if not candidates:
        tokens = f" nor a transformer block whose patch tokens reach the output (blocks seen: {', '.join(blocks)})" if blocks else ""
        raise ValueError(
            f"Cannot choose a layer automatically: no submodule outputs a spatial feature map (N, C, H, W){tokens}. "
            "Pass `layer` with the dotted name of a convolutional layer or of a transformer block."
        )
    return candidates[-1]


def _first_tensor(output: Any) -> torch.Tensor | None:
    """A module's output tensor, or the first element of a tuple / list output (a transformer layer's
    ``(hidden, attention)``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _logits_or_none(output: Any) -> torch.Tensor | None:
    """The logits of a model's output as :func:`model_logits` reads them (tensor, dict, ``.logits``, tuple), or ``None``."""
    try:
        return model_logits(output)
    except ValueError:
        return None


def _token_layout(shape: tuple[int, ...] | None, example_input: torch.Tensor) -> tuple[int, int, int] | None:
    """``(k, h, w)`` when ``shape`` is one sample's tokens ``(1, T, D)`` / ``(T, 1, D)`` of the image: prefix
    tokens and a patch grid of at least two patches; else ``None``."""
    if shape is None or len(shape) != 3 or 1 not in shape[:2]:
        return None
    tokens = shape[1] if shape[0] == 1 else shape[0]
    try:
        k, h, w = token_grid(tokens, example_input.shape[2:])
    except ValueError:
        return None
    return (k, h, w) if h * w >= 2 else None


def _reaching_block(model: nn.Module, example_input: torch.Tensor, blocks: Sequence[str]) -> str | None:
    """The last of ``blocks`` (token outputs, in call order) whose patch tokens get a non-zero gradient of
    the predicted class's score (one sample; one forward and one backward pass); ``None`` if none does."""
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            first = _first_tensor(output)
            if first is not None and first.requires_grad:
                captured[name] = first
        return hook

    with introspection_mode(model), hooks() as handles:
        for name in blocks:
            handles.append(get_layer(model, name).register_forward_hook(capture(name)))
        x = fresh_input(example_input[:1].to(_model_device(model, example_input)), dtype=_input_dtype(model))
        output = _logits_or_none(model(x.clone()))
        if output is None or not output.is_floating_point() or output.ndim < 2:
            return None
        names = [n for n in blocks if n in captured]
        if not names:
            return None
        grads = torch.autograd.grad(target_scores(output.float(), "pred").sum(), [captured[n] for n in names], allow_unused=True)
        reaching = []
        for name, grad in zip(names, grads):
            layout = _token_layout(tuple(captured[name].shape), example_input)
            if grad is not None and layout is not None and bool(tokens_first(grad, 1)[:, layout[0]:].abs().sum() > 0):
                reaching.append(name)
        if not reaching:
            return None
        chosen = reaching[-1]
        # a container returning the very tensor of a block inside it (nn.Sequential of blocks): the block
        return next(n for n in names if captured[n] is captured[chosen])
