"""Vision transformers: the token layout, the attention probabilities of one forward pass, attention rollout.

Token layout (:func:`token_grid`). A transformer block of a ViT outputs tokens ``(N, T, D)``: ``k``
*prefix* tokens (a class token, register tokens, a distillation token) followed by the ``P = T - k``
patch tokens of an ``h x w`` patch grid in row-major order, as timm, Hugging Face and the original ViT
lay them out. Unless ``num_prefix_tokens`` states ``k``, it is the smallest ``k >= 0`` for which ``T - k``
patches form a grid of the image's aspect ratio (``h * W == w * H``; a square image: ``T - k`` is a
perfect square) whose patches tile the image exactly (``H % h == W % w == 0``); when no grid tiles it,
the smallest ``k`` giving a grid of that aspect ratio. A class token and four registers before a 4x4 grid
(``T = 21``) give ``k = 5``. Ambiguous layouts exist (``T = 26`` on a 20x20 image: one class token and a
5x5 grid, or ten prefix tokens and a 4x4 grid): state ``num_prefix_tokens`` when in doubt. Prefix tokens
*after* the patches (some register implementations append them) are not recognised.

Attention capture (:func:`attention_maps`): one forward pass under a ``TorchFunctionMode`` (the same
interception :mod:`~lightning_introspect.methods.attribution` uses for ReLUs; no model edits, active only
during that pass) records the attention probabilities ``(N, heads, T, T)`` of every *self*-attention
(square scores) it computes:

* ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer`` / ``DecoderLayer``): its
  functional form is called with ``need_weights=True, average_attn_weights=False`` and the caller gets
  what it asked for (``None`` weights when it passed ``need_weights=False``, head-averaged weights by
  default). Under an active function mode PyTorch never takes the fused "fast path" (which computes no
  probabilities), in eval mode as in training, with or without gradients;
* ``F.scaled_dot_product_attention`` (timm's fused attention, hand-written modules): computed explicitly as
  ``softmax(q k^T * scale + mask) v`` (boolean masks: ``True`` = attend; ``is_causal``; grouped-query
  heads repeated), so the probabilities exist and gradients flow through them; attention dropout is not
  applied (introspection runs in eval mode, where every standard implementation passes ``dropout_p=0``);
* a softmax (``torch.softmax``, ``F.softmax``, ``Tensor.softmax``, ``nn.Softmax``) over the last
  dimension of square ``(N, heads, T, T)`` or ``(N, T, T)`` scores: hand-written ``softmax(q k^T /
  sqrt(d))``. Heads folded into the batch (``(N * heads, T, T)``, batch-major) are unfolded.

Rollout:

* :func:`attention_rollout` (Abnar & Zuidema 2020, "Quantifying attention flow in transformers"): per
  layer the heads are fused (mean, or max / min), optionally the smallest ``discard_ratio`` of each row's
  weights are set to zero, the identity is added for the residual connection and the rows are
  renormalised: ``A_hat = (A + I) / rowsum``; the rollout is the product ``A_hat_L ... A_hat_1``;
* :func:`grad_rollout` (Chefer, Gur & Wolf 2021, the gradient-weighted rollout of "Generic
  attention-model explainability" that replaces the LRP relevance of "Transformer interpretability
  beyond attention visualization" by the attention itself): per layer ``A_bar = mean_heads ReLU(dA ⊙ A)``
  with ``dA`` the gradient of the target score w.r.t. the probabilities, ``R = (I + A_bar_L) ...
  (I + A_bar_1)`` (no renormalisation, as in the paper).

The map of a sample is the class-token row of the product restricted to the patch columns (``k >= 1``:
token 0 is taken to be the class token, also when registers follow it); without prefix tokens (mean
pooling over the tokens) it is the mean over all token rows. It is reshaped to the ``h x w`` patch grid
and resized bilinearly (``align_corners=False``) to the input, like Grad-CAM. Raw values are kept (no
min-max normalisation). ``attention_rollout`` does not depend on the target: the same map for every class.

Every function runs under the introspection guards: eval mode with every flag restored, the global RNG
forked, hooks removed in ``finally``, gradients only through ``torch.autograd.grad`` w.r.t. the
probabilities (parameter ``.grad`` untouched), fresh fp32 input copies, usable inside
``torch.inference_mode()``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_introspect._torch.guards import fresh_input, introspection_mode, model_dtype, module_device
from lightning_introspect._torch.hooks import hooks
from lightning_introspect.methods.targets import Target, model_logits, target_scores

__all__ = [
    "ATTENTION_METHODS",
    "HEAD_FUSIONS",
    "AttentionMap",
    "attention_maps",
    "attention_problem",
    "attention_rollout",
    "grad_rollout",
    "gradient_rollout",
    "rollout",
    "rollout_map",
    "token_grid",
]

ATTENTION_METHODS: tuple[str, ...] = ("attention_rollout", "grad_rollout")
"""The method names of :func:`attention_rollout` and :func:`grad_rollout` in ``attribution.METHODS``."""

HEAD_FUSIONS: tuple[str, ...] = ("mean", "max", "min")
"""How :func:`attention_rollout` fuses the heads of a layer."""


# ----------------------------------------------------------------------------------------------------
# Token layout
# ----------------------------------------------------------------------------------------------------
def _grids(patches: int, height: int, width: int) -> Iterator[tuple[int, int]]:
    """``(h, w)`` with ``h * w == patches`` and the image's aspect ratio ``h * width == w * height``."""
    for h in range(1, patches + 1):
        if patches % h == 0 and h * width == (patches // h) * height:
            yield h, patches // h


def token_grid(num_tokens: int, image_size: Sequence[int], num_prefix_tokens: int | None = None) -> tuple[int, int, int]:
    """How ``num_tokens`` tokens of an image of ``image_size = (H, W)`` are laid out: ``(k, h, w)``,
    ``k`` prefix tokens followed by an ``h x w`` patch grid (the rule is in the module docstring).

    Args:
        num_tokens: ``T``, the tokens per sample.
        image_size: the input's spatial size ``(H, W)``.
        num_prefix_tokens: ``k`` when known (class token + registers); ``None``: inferred.

    Raises:
        ValueError: no grid fits (``num_prefix_tokens`` names the fix).

    Example:
        >>> token_grid(17, (16, 16)), token_grid(21, (16, 16)), token_grid(16, (16, 16))
        ((1, 4, 4), (5, 4, 4), (0, 4, 4))
        >>> token_grid(13, (16, 32))
        (5, 2, 4)
    """
    height, width = (int(s) for s in image_size[-2:])
    if num_prefix_tokens is not None:
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or not 0 <= num_prefix_tokens < num_tokens:
            raise ValueError(
                f"Expected `num_prefix_tokens` to be an int in [0, {num_tokens - 1}] (class / register tokens before the patches), "
                f"but got {num_prefix_tokens!r}."
            )
        grid = next(_grids(num_tokens - num_prefix_tokens, height, width), None)
        if grid is None:
            raise ValueError(
                f"Cannot lay out {num_tokens - num_prefix_tokens} patch tokens ({num_tokens} tokens minus `num_prefix_tokens`="
                f"{num_prefix_tokens}) as a patch grid of the {height}x{width} input's aspect ratio."
            )
        return num_prefix_tokens, grid[0], grid[1]
    for tiles in (True, False):
        for k in range(num_tokens):
            for h, w in _grids(num_tokens - k, height, width):
                if not tiles or (height % h == 0 and width % w == 0):
                    return k, h, w
    raise ValueError(
        f"Cannot lay out {num_tokens} tokens as prefix tokens followed by a patch grid of the {height}x{width} input; "
        "pass `num_prefix_tokens`."
    )


def tokens_first(activation: torch.Tensor, batch: int) -> torch.Tensor:
    """A token activation as ``(N, T, D)``: ``(T, N, D)`` (``batch_first=False`` transformers) is transposed."""
    if activation.shape[0] != batch and activation.shape[1] == batch:
        return activation.transpose(0, 1)
    return activation


def patch_map(scores: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int]) -> torch.Tensor:
    """Per-token scores ``(N, T)`` -> the patch tokens' scores on the grid, ``(N, 1, h, w)``."""
    return scores[:, num_prefix_tokens:].reshape(scores.shape[0], 1, *grid)


def upsample_map(cam: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(N, 1, h, w)`` resized bilinearly (``align_corners=False``) to ``size``, as Grad-CAM's maps."""
    if tuple(cam.shape[2:]) == tuple(size):
        return cam
    return F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------------
# Capture
# ----------------------------------------------------------------------------------------------------
@dataclass
class AttentionMap:
    """The attention probabilities of one self-attention call.

    Attributes:
        layer: dotted name of the innermost module that was running (``""``: the model itself).
        probs: ``(N, heads, T, T)`` probabilities, rows summing to one; part of the autograd graph of the
            pass when it ran with gradients (the tensor the output was computed from).
        source: ``"multi_head_attention"``, ``"scaled_dot_product_attention"`` or ``"softmax"``.
        graph: the tensor the output was computed from, when it differs from ``probs`` by a view (heads
            folded into the batch); the gradient is taken w.r.t. it.
    """

    layer: str
    probs: torch.Tensor
    source: str
    graph: torch.Tensor | None = None


_SOFTMAX_FUNCS: set[Any] = {torch.softmax, F.softmax, torch.Tensor.softmax}
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _explicit_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.scaled_dot_product_attention`` written out (PyTorch's documented reference semantics):
    ``(softmax(q k^T * scale + mask) v, probabilities)``; dropout is not applied (eval mode)."""
    length, source = query.shape[-2], key.shape[-2]
    factor = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and query.ndim >= 3 and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
    scores = query @ key.transpose(-2, -1) * factor
    if is_causal:
        allowed = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    return probs @ value, probs


class _AttentionRecorder(TorchFunctionMode):
    """Records the probabilities of every self-attention computed while active (see the module docstring)."""

    def __init__(self, batch: int, current: Callable[[], str]) -> None:
        super().__init__()
        self.batch = batch
        self.current = current
        self.maps: list[AttentionMap] = []

    def _record(self, probs: torch.Tensor, source: str, graph: torch.Tensor | None = None) -> None:
        if probs.ndim < 3 or probs.shape[-1] != probs.shape[-2]:
            return  # cross-attention (queries and keys differ): not part of a rollout
        tokens = probs.shape[-1]
        graph = probs if graph is None else graph  # the tensor the output was computed from: gradients are taken w.r.t. it
        if probs.ndim == 3:
            if probs.shape[0] % self.batch:
                return
            probs = probs.reshape(self.batch, probs.shape[0] // self.batch, tokens, tokens)
        elif probs.shape[0] != self.batch:
            return
        else:
            probs = probs.reshape(self.batch, -1, tokens, tokens)
        self.maps.append(AttentionMap(self.current(), probs, source, graph))

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            bound = _MHA_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            need, average = bound.arguments["need_weights"], bound.arguments["average_attn_weights"]
            bound.arguments["need_weights"], bound.arguments["average_attn_weights"] = True, False
            result: Any = func(*bound.args, **bound.kwargs)
            output, weights = result
            # `weights` is a view of the probabilities the output was computed from (heads folded into the
            # batch); the gradient is taken w.r.t. that tensor.
            base = weights._base if weights._base is not None and weights._base.numel() == weights.numel() else None
            self._record(weights if weights.ndim == 4 else weights.unsqueeze(0), "multi_head_attention", base)
            if not need:
                return output, None
            return output, (weights.mean(dim=-3) if average else weights)
        if func is F.scaled_dot_product_attention:
            named = dict(zip(_SDPA_ARGS, args))
            named.update(kwargs)
            output, probs = _explicit_sdpa(**named)
            self._record(probs, "scaled_dot_product_attention")
            return output
        if func in _SOFTMAX_FUNCS and args and isinstance(args[0], torch.Tensor):
            out = func(*args, **kwargs)
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if isinstance(dim, int) and out.ndim in (3, 4) and dim in (-1, out.ndim - 1) and out.is_floating_point():
                self._record(out, "softmax")
            return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def _recording(model: nn.Module, batch: int) -> Iterator[_AttentionRecorder]:
    """The recorder, active for the block, with the name of the innermost running module (module hooks
    removed on exit, also when the model raises)."""
    names = {m: n for n, m in model.named_modules()}
    stack: list[str] = []

    def enter(module: nn.Module, _args: Any) -> None:
        stack.append(names[module])

    def leave(module: nn.Module, _args: Any, _out: Any) -> None:
        if stack:
            stack.pop()

    with hooks() as handles:
        for module in names:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
        recorder = _AttentionRecorder(batch, lambda: stack[-1] if stack else "")
        with recorder:
            yield recorder


def _image_input(model: nn.Module, inputs: Any, *, requires_grad: bool) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4 or not inputs.is_floating_point():
        got = f"{inputs.dtype} {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"Expected `inputs` to be floating images (N, C, H, W) for attention rollout, but got {got}.")
    return fresh_input(inputs.to(module_device(model, inputs.device)), requires_grad=requires_grad, dtype=model_dtype(model))


NO_ATTENTION = (
    "the forward pass computed no self-attention probabilities: no nn.MultiheadAttention, "
    "F.scaled_dot_product_attention or softmax over the last dimension of square (N, [heads,] T, T) scores ran"
)


def _self_attention(maps: list[AttentionMap]) -> list[AttentionMap]:
    """The layers of one rollout: those with the token count of the last one (one warning if others are left out)."""
    if not maps:
        raise ValueError(f"Attention rollout needs the model's attention probabilities, but {NO_ATTENTION}. Use 'grad_cam' or 'saliency' for this model.")
    tokens = maps[-1].probs.shape[-1]
    kept = [m for m in maps if m.probs.shape[-1] == tokens]
    if len(kept) < len(maps):
        left = sorted({f"{m.layer or 'model'} ({m.probs.shape[-1]} tokens)" for m in maps if m.probs.shape[-1] != tokens})
        warnings.warn(f"Attention rollout uses the {len(kept)} attention layers over {tokens} tokens; left out: {', '.join(left)}.", stacklevel=3)
    return kept


def attention_maps(model: nn.Module, inputs: torch.Tensor) -> list[AttentionMap]:
    """The attention probabilities of every self-attention in one forward pass of ``inputs``, in call order.

    Eval mode, no gradients, global RNG forked; nothing of the model is changed (see the module docstring
    for what is recognised).

    Args:
        model: the model.
        inputs: ``(N, ...)`` inputs (any dtype the model takes; not modified).

    Returns:
        One :class:`AttentionMap` per self-attention call, ``probs`` detached ``(N, heads, T, T)``.

    Example:
        >>> enc = nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=16, batch_first=True)
        >>> [(m.layer, m.source, tuple(m.probs.shape)) for m in attention_maps(enc, torch.randn(3, 5, 8))]
        [('self_attn', 'multi_head_attention', (3, 2, 5, 5))]
    """
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2:
        raise ValueError(f"Expected `inputs` to be a tensor of shape (N, ...), but got {getattr(inputs, 'shape', type(inputs).__name__)}.")
    with introspection_mode(model, grad=False):
        x = fresh_input(inputs.to(module_device(model, inputs.device)), requires_grad=False,
                        dtype=model_dtype(model) if inputs.is_floating_point() else None)
        with _recording(model, x.shape[0]) as recorder:
            model(x)
    return [AttentionMap(m.layer, m.probs.detach(), m.source) for m in recorder.maps]


def attention_problem(model: nn.Module, sample: torch.Tensor) -> str | None:
    """Why :func:`attention_rollout` / :func:`grad_rollout` cannot explain ``model`` on ``sample``
    (one forward pass of its first item), or ``None`` when they can.

    Example:
        >>> attention_problem(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), torch.randn(1, 1, 8, 8))[:34]
        'the forward pass computed no self-'
    """
    if not isinstance(sample, torch.Tensor) or sample.ndim != 4 or not sample.is_floating_point():
        return f"attention rollout explains images (N, C, H, W), but the inputs are {getattr(sample, 'shape', type(sample).__name__)}."
    maps = attention_maps(model, sample[:1])
    if not maps:
        return f"{NO_ATTENTION}."
    try:
        token_grid(maps[-1].probs.shape[-1], sample.shape[2:])
    except ValueError as err:
        return str(err)
    return None


# ----------------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------------
def _check_options(head_fusion: Any, discard_ratio: Any) -> None:
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"Expected `head_fusion` to be one of {', '.join(repr(h) for h in HEAD_FUSIONS)}, but got {head_fusion!r}.")
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)) or not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"Expected `discard_ratio` to be a float in [0, 1) (the share of each row's weights set to zero), but got {discard_ratio!r}.")


def rollout(attentions: Sequence[torch.Tensor], *, head_fusion: str = "mean", discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout of per-layer probabilities ``(N, heads, T, T)`` (first layer first): ``(N, T, T)``.

    Per layer: heads fused (``head_fusion``), the ``floor(discard_ratio * T)`` smallest weights of each
    row set to zero, ``A_hat = A + I`` with rows renormalised; result ``A_hat_L @ ... @ A_hat_1``.

    Example:
        >>> a = torch.softmax(torch.randn(1, 2, 3, 3), dim=-1)
        >>> r = rollout([a, a])
        >>> r.shape, torch.allclose(r.sum(-1), torch.ones(1, 3))
        (torch.Size([1, 3, 3]), True)
    """
    _check_options(head_fusion, discard_ratio)
    result: torch.Tensor | None = None
    for a in attentions:
        fused = {"mean": lambda t: t.mean(dim=1), "max": lambda t: t.amax(dim=1), "min": lambda t: t.amin(dim=1)}[head_fusion](a.float())
        drop = int(math.floor(discard_ratio * fused.shape[-1]))
        if drop:
            fused = fused.scatter(-1, fused.topk(drop, dim=-1, largest=False).indices, 0.0)
        eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        step = fused + eye
        step = step / step.sum(dim=-1, keepdim=True)
        result = step if result is None else step @ result
    if result is None:
        raise ValueError("Expected at least one attention layer to roll out, but got none.")
    return result


def gradient_rollout(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gradient-weighted rollout (Chefer et al. 2021): ``prod_l (I + mean_heads ReLU(dA_l ⊙ A_l))``, ``(N, T, T)``.

    Example:
        >>> a = torch.softmax(torch.randn(1, 2, 3, 3), dim=-1)
        >>> torch.equal(gradient_rollout([a], [torch.zeros_like(a)]), torch.eye(3).expand(1, 3, 3))
        True
    """
    result: torch.Tensor | None = None
    for a, g in zip(attentions, gradients, strict=True):
        weighted = (g.float() * a.float()).clamp_min(0).mean(dim=1)
        step = weighted + torch.eye(weighted.shape[-1], dtype=weighted.dtype, device=weighted.device)
        result = step if result is None else step @ result
    if result is None:
        raise ValueError("Expected at least one attention layer to roll out, but got none.")
    return result


def rollout_map(relevance: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Per-token scores ``(N, T)`` from a rollout ``(N, T, T)``: the class token's row (token 0) with
    prefix tokens, else the mean over all rows (mean pooling)."""
    return relevance[:, 0] if num_prefix_tokens > 0 else relevance.mean(dim=1)


def attention_rollout(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target | None = None,
    *,
    gradient_weighted: bool = False,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    num_prefix_tokens: int | None = None,
    upsample: bool = True,
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of a vision transformer, as a map over the input.

    One forward pass records every self-attention's probabilities (:func:`attention_maps`); they are
    rolled out (:func:`rollout`), the class token's row (mean over the rows without prefix tokens) is
    reshaped to the patch grid (:func:`token_grid`) and resized to the input. With
    ``gradient_weighted=True`` this is :func:`grad_rollout` (``target`` needed; ``head_fusion`` and
    ``discard_ratio`` do not apply).

    Args:
        model: a model computing self-attention (see the module docstring for what is recognised).
        inputs: ``(N, C, H, W)`` floating images (not modified).
        target: ignored by plain rollout (the same map for every class); the class explained when
            ``gradient_weighted``.
        gradient_weighted: weight the attention by its gradient (Chefer et al. 2021).
        head_fusion: ``"mean"`` (the paper), ``"max"`` or ``"min"`` over the heads.
        discard_ratio: share of each row's smallest weights set to zero before the identity is added.
        num_prefix_tokens: class + register tokens before the patches (``None``: :func:`token_grid` infers it).
        upsample: resize to the input's ``(H, W)``; ``False``: the ``(h, w)`` patch grid.

    Returns:
        A detached non-negative ``(N, 1, H, W)`` map (``(N, 1, h, w)`` without upsampling).

    Raises:
        ValueError: inputs that are not images, a model without self-attention, tokens that do not form
            a patch grid, or a bad option.

    Example:
        >>> class ViT(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed, self.cls = nn.Conv2d(1, 8, 4, stride=4), nn.Parameter(torch.zeros(1, 1, 8))
        ...         self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        ...         self.head = nn.Linear(8, 3)
        ...     def forward(self, x):
        ...         t = self.embed(x).flatten(2).transpose(1, 2)
        ...         return self.head(self.block(torch.cat([self.cls.expand(len(x), -1, -1), t], 1))[:, 0])
        >>> attention_rollout(ViT(), torch.randn(2, 1, 16, 16)).shape
        torch.Size([2, 1, 16, 16])
    """
    if gradient_weighted:
        if target is None:
            raise ValueError("Expected a `target` (the class to explain) with `gradient_weighted=True`, but got None.")
        return grad_rollout(model, inputs, target, num_prefix_tokens=num_prefix_tokens, upsample=upsample)
    _check_options(head_fusion, discard_ratio)
    _image_input(model, inputs, requires_grad=False)
    maps = _self_attention(attention_maps(model, inputs))
    k, h, w = token_grid(maps[-1].probs.shape[-1], inputs.shape[2:], num_prefix_tokens)
    relevance = rollout([m.probs for m in maps], head_fusion=head_fusion, discard_ratio=discard_ratio)
    cam = patch_map(rollout_map(relevance, k), k, (h, w))
    return (upsample_map(cam, inputs.shape[2:]) if upsample else cam).detach()


def grad_rollout(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    *,
    num_prefix_tokens: int | None = None,
    upsample: bool = True,
) -> torch.Tensor:
    """Gradient-weighted attention rollout (Chefer et al. 2021) of a vision transformer, for ``target``.

    One forward pass records every self-attention's probabilities ``A_l`` inside the autograd graph;
    one ``torch.autograd.grad`` of the target score w.r.t. all of them gives ``dA_l``; the map is the class
    token's row (mean over the rows without prefix tokens) of :func:`gradient_rollout` on the patch grid,
    resized to the input.

    Args:
        model: a model computing self-attention.
        inputs: ``(N, C, H, W)`` floating images (not modified).
        target: int, per-sample ids, ``"pred"``, callable or ``RegionTarget``.
        num_prefix_tokens: class + register tokens before the patches (``None``: inferred).
        upsample: resize to the input's ``(H, W)``.

    Returns:
        A detached non-negative ``(N, 1, H, W)`` map (``(N, 1, h, w)`` without upsampling).

    Example:
        >>> class Tokens(nn.Module):
        ...     def forward(self, x):
        ...         return x.flatten(2).transpose(1, 2)
        >>> vit = nn.Sequential(nn.Conv2d(1, 8, 4, stride=4), Tokens(),
        ...                     nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
        ...                     nn.Flatten(), nn.Linear(16 * 8, 3))
        >>> grad_rollout(vit, torch.randn(2, 1, 16, 16), "pred").shape
        torch.Size([2, 1, 16, 16])
    """
    with introspection_mode(model, grad=True):
        x = _image_input(model, inputs, requires_grad=True)
        with _recording(model, x.shape[0]) as recorder:
            output = model_logits(model(x.clone()))
        maps = _self_attention(recorder.maps)
        score = target_scores(output.float(), target).sum()
        wrt = [m.graph if m.graph is not None else m.probs for m in maps]
        live = [t for t in wrt if t.requires_grad]  # probabilities outside the graph (constant attention) get zeros
        found = dict(zip(map(id, live), torch.autograd.grad(score, live, allow_unused=True))) if live and score.requires_grad else {}
        gradients = [
            torch.zeros_like(m.probs) if found.get(id(t)) is None else found[id(t)].reshape(m.probs.shape) for m, t in zip(maps, wrt)
        ]
        attentions = [m.probs.detach() for m in maps]
    k, h, w = token_grid(attentions[-1].shape[-1], inputs.shape[2:], num_prefix_tokens)
    relevance = gradient_rollout(attentions, [g.detach() for g in gradients])
    cam = patch_map(rollout_map(relevance, k), k, (h, w))
    return (upsample_map(cam, inputs.shape[2:]) if upsample else cam).detach()
