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

Where the pieces live: this module holds the gradient methods, the Grad-CAM and top-K pieces they
share, the registry (:data:`METHODS` and the method sets) and :func:`attribute`. It builds on, and
exports the public names of, :mod:`~lightning_introspect.methods.path_attribution` (:func:`smoothgrad`,
:func:`integrated_gradients`, :func:`ig_alphas`), :mod:`~lightning_introspect.methods.cam_layer`
(:func:`auto_layer`), :mod:`~lightning_introspect.methods.gradients` (the guarded forward pass) and
:mod:`~lightning_introspect.methods.relu_backward` (the switchable ReLU backward).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# `from m import _x as _x`: private names other modules (token_attribution) import from here, re-exported.
from lightning_introspect.methods.attention import (
    ATTENTION_METHODS,
    attention_rollout,
    grad_rollout,
    token_grid,
    tokens_first,
)
from lightning_introspect.methods.cam_layer import auto_layer
from lightning_introspect.methods.gradients import (
    LayerSpec,
    _Forward,
    _forward,
    _is_token_ids,
    _layer_module,
    _warn_relu_coverage,
)
from lightning_introspect.methods.gradients import _model_device as _model_device
from lightning_introspect.methods.path_attribution import (
    DEFAULT_PATH_BATCH,
    IG_METHODS,
    _predicted_ids,
    ig_alphas,
    integrated_gradients,
    smoothgrad,
)
from lightning_introspect.methods.path_attribution import _check_batch_size as _check_batch_size
from lightning_introspect.methods.path_attribution import _tiled_target as _tiled_target
from lightning_introspect.methods.targets import Target, target_indices

__all__ = [
    "DEFAULT_PATH_BATCH",
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
# The registry
# ----------------------------------------------------------------------------------------------------
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
