"""Objectives of feature visualisation: what an optimised image should make the model do.

An :class:`Objective` maps the recorded activations of some layers (and, when asked for, the model
output) to one differentiable score per image. The builders -- :func:`channel`, :func:`neuron`,
:func:`layer`, :func:`class_logit`, :func:`dense_class_logit` (segmentation), :func:`token_channel` (an
embedding dimension of a vision transformer over its patch tokens), :func:`diversity` -- compose with
``+``, ``-`` and scalar ``*``:
``channel("features.8", 3) - 0.5 * diversity("features.8")``; :func:`stack_objectives` gives
different parts of one batch different objectives.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Union

import torch
import torch.nn.functional as F

OUTPUT = "<output>"  # the pseudo-layer name of the model's output (class logits)

ChannelSpec = Union[int, Sequence[int], torch.Tensor]  # noqa: UP007 (a runtime alias on Python 3.10)


class Objective:
    """A differentiable score per image, computed from recorded activations and the model output.

    Built by :func:`neuron`, :func:`channel`, :func:`layer`, :func:`class_logit` and
    :func:`diversity`; combine with ``+``, ``-``, unary ``-`` and multiplication / division by a
    number. ``sum([...])`` works too.

    Args:
        fn: ``fn(activations, output) -> Tensor[N]``; ``activations`` maps layer names to the
            recorded outputs of those layers, ``output`` is the model output (``None`` when no part
            of the objective needs it: the forward pass then stops after the last target layer).
        layers: the layer names ``fn`` reads (``OUTPUT`` for the model output).
        description: a short human-readable name.

    Example:
        >>> obj = channel("features.8", 3) - 0.5 * layer("features.4")
        >>> sorted(obj.layers), obj.description
        (['features.4', 'features.8'], 'channel(features.8, 3) - 0.5*layer(features.4)')
    """

    def __init__(
        self,
        fn: Callable[[Mapping[str, torch.Tensor], torch.Tensor | None], torch.Tensor],
        layers: Iterable[str],
        description: str,
    ) -> None:
        self.fn = fn
        self.layers = frozenset(layers)
        self.description = description

    @property
    def needs_output(self) -> bool:
        return OUTPUT in self.layers

    @property
    def module_layers(self) -> list[str]:
        """The layer names (not the model output) the objective reads, sorted."""
        return sorted(n for n in self.layers if n != OUTPUT)

    def __call__(self, activations: Mapping[str, torch.Tensor], output: torch.Tensor | None = None) -> torch.Tensor:
        return self.fn(activations, output)

    def __repr__(self) -> str:
        return f"Objective({self.description})"

    def _combine(self, other: Objective, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sym: str) -> Objective:
        a, b = self, other
        return Objective(lambda acts, out: op(a(acts, out), b(acts, out)), [*a.layers, *b.layers], f"{a.description} {sym} {b.description}")

    def __add__(self, other: object) -> Objective:
        if isinstance(other, Objective):
            return self._combine(other, operator.add, "+")
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0:
            return self
        return NotImplemented

    def __radd__(self, other: object) -> Objective:  # sum([...]) starts from 0
        return self.__add__(other)

    def __sub__(self, other: object) -> Objective:
        if isinstance(other, Objective):
            return self._combine(other, operator.sub, "-")
        return NotImplemented

    def __neg__(self) -> Objective:
        return -1.0 * self

    def __mul__(self, weight: object) -> Objective:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            return NotImplemented
        w, a = float(weight), self
        return Objective(lambda acts, out: w * a(acts, out), a.layers, f"{w:g}*{a.description}")

    __rmul__ = __mul__

    def __truediv__(self, weight: object) -> Objective:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight == 0:
            return NotImplemented
        return self * (1.0 / float(weight))


def _check_layer_name(name: object, argument: str = "layer") -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"Expected `{argument}` to be a dotted layer name (str), but got {name!r}.")
    return name


class _IndexCache:
    """Remembers the last checked index tensor of an objective (the same every optimisation step)."""

    def __init__(self, spec: ChannelSpec, argument: str) -> None:
        self.spec, self.argument = spec, argument
        self.key: tuple | None = None
        self.value: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None

    def __call__(self, n: int, size: int, what: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (n, size, str(device))
        if key != self.key or self.value is None or self.rows is None:
            self.value = _per_image_index(self.spec, n, size, argument=self.argument, what=what, device=device)
            self.rows = torch.arange(n, device=device)
            self.key = key
        return self.rows, self.value


def _per_image_index(spec: ChannelSpec, n: int, size: int, *, argument: str, what: str, device: torch.device) -> torch.Tensor:
    """Normalise an int / list of ints to ``(n,)`` long indices, each checked against ``size``."""
    if isinstance(spec, bool):
        raise ValueError(f"Expected `{argument}` to be an int or a list of ints, but got {spec!r}.")
    idx = torch.as_tensor(spec, device=device)
    if idx.is_floating_point() or idx.dtype == torch.bool or idx.ndim > 1:
        raise ValueError(f"Expected `{argument}` to be an int or a list of ints, but got {spec!r}.")
    idx = idx.long().flatten()
    if idx.numel() not in (1, n):
        raise ValueError(f"Expected `{argument}` to hold 1 or N={n} entries (one per image), but got {idx.numel()}.")
    bad = (idx < 0) | (idx >= size)
    if bad.any():
        raise ValueError(f"Expected `{argument}` in [0, {size - 1}] ({what}), but got {sorted(set(idx[bad].tolist()))}.")
    return idx.expand(n)


def _activation(acts: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    a = acts[name]
    if a.ndim < 2:
        raise ValueError(f"Expected the output of layer {name!r} to have shape (N, C, ...), but got {tuple(a.shape)}.")
    return a


def channel(layer: str, channel: ChannelSpec) -> Objective:
    """Mean activation of one channel over all positions (a linear layer: the unit itself).

    ``channel`` may be a list with one entry per image of the batch.

    Example:
        >>> obj = channel("0", [0, 1])
        >>> obj({"0": torch.arange(8.0).view(2, 2, 2)}).tolist()
        [0.5, 6.5]
    """
    name = _check_layer_name(layer)
    index = _IndexCache(channel, "channel")

    def fn(acts: Mapping[str, torch.Tensor], _out: torch.Tensor | None) -> torch.Tensor:
        a = _activation(acts, name)
        rows, idx = index(a.shape[0], a.shape[1], f"layer {name!r} has {a.shape[1]} channels", a.device)
        picked = a[rows, idx]
        return picked.flatten(1).mean(1) if picked.ndim > 1 else picked

    return Objective(fn, [name], f"channel({name}, {_short(channel)})")


def patch_token_channels(activation: torch.Tensor, prefix: int = 0, *, sequence_first: bool = False) -> torch.Tensor:
    """The patch tokens of a token activation as channels over positions: ``(N, T, D)`` -> ``(N, D, T - prefix)``.

    ``prefix`` tokens (a class token, register tokens) come before the patches and are left out;
    ``sequence_first``: the activation is ``(T, N, D)`` (``batch_first=False`` transformers). In this
    layout an embedding dimension of a vision transformer is what a channel is to a CNN, and the patch
    tokens are its positions.

    Example:
        >>> tokens = torch.arange(6.0).view(1, 3, 2)  # a class token and two patch tokens of width 2
        >>> patch_token_channels(tokens, 1).tolist()
        [[[2.0, 4.0], [3.0, 5.0]]]
    """
    a = activation.transpose(0, 1) if sequence_first else activation
    if a.ndim != 3:
        raise ValueError(f"Expected token activations (N, T, D), but got shape {tuple(activation.shape)}.")
    if not 0 <= prefix < a.shape[1]:
        raise ValueError(f"Expected `prefix` in [0, {a.shape[1] - 1}] (the tokens before the patches), but got {prefix}.")
    return a[:, prefix:].transpose(1, 2)


def token_channel(layer: str, channel: ChannelSpec, *, prefix: int = 0, sequence_first: bool = False) -> Objective:
    """Vision transformers: the mean of one embedding dimension over the patch tokens of a token layer.

    The token counterpart of :func:`channel`: a block of a ViT outputs ``(N, T, D)``, ``prefix`` class /
    register tokens followed by the patch tokens; the objective is dimension ``channel`` of the output,
    averaged over the patch tokens (tokens ``prefix:``; :func:`patch_token_channels`). The prefix tokens
    are left out because they do not belong to a place in the image: the class token mixes every patch
    and is what the head reads, so it is what a class image already shows.
    :func:`~lightning_introspect.methods.featviz.layers.patch_token_layouts` finds ``prefix``.

    ``channel`` may be a list with one entry per image of the batch.

    Example:
        >>> tokens = torch.tensor([[[9.0, 0.0], [1.0, 2.0], [3.0, 4.0]]])  # class token 9 is left out
        >>> token_channel("blocks.1", 0, prefix=1)({"blocks.1": tokens}).tolist()
        [2.0]
    """
    name = _check_layer_name(layer)
    index = _IndexCache(channel, "channel")

    def fn(acts: Mapping[str, torch.Tensor], _out: torch.Tensor | None) -> torch.Tensor:
        a = patch_token_channels(acts[name], prefix, sequence_first=sequence_first)
        rows, idx = index(a.shape[0], a.shape[1], f"layer {name!r} has {a.shape[1]} embedding dimensions", a.device)
        return a[rows, idx].mean(1)

    skipped = f", patches from token {prefix}" if prefix else ""
    return Objective(fn, [name], f"token_channel({name}, {_short(channel)}{skipped})")


def neuron(layer: str, channel: ChannelSpec, y: int | None = None, x: int | None = None) -> Objective:
    """The activation of one channel at one spatial position ``(y, x)`` (default: the centre).

    Example:
        >>> neuron("0", 1, 0, 1)({"0": torch.arange(8.0).view(1, 2, 2, 2)}).tolist()
        [5.0]
    """
    name = _check_layer_name(layer)
    for arg, val in (("y", y), ("x", x)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int)):
            raise ValueError(f"Expected `{arg}` to be an int position or None (the centre), but got {val!r}.")

    index = _IndexCache(channel, "channel")

    def fn(acts: Mapping[str, torch.Tensor], _out: torch.Tensor | None) -> torch.Tensor:
        a = _activation(acts, name)
        rows, idx = index(a.shape[0], a.shape[1], f"layer {name!r} has {a.shape[1]} channels", a.device)
        picked = a[rows, idx]
        if picked.ndim == 1:
            return picked
        if picked.ndim != 3:
            raise ValueError(f"`neuron` needs a layer with (N, C, H, W) or (N, C) outputs; {name!r} gives {tuple(a.shape)}.")
        h, w = picked.shape[-2:]
        yy = h // 2 if y is None else y
        xx = w // 2 if x is None else x
        if not (0 <= yy < h and 0 <= xx < w):
            raise ValueError(f"Expected `y` in [0, {h - 1}] and `x` in [0, {w - 1}] (layer {name!r} maps are {h}x{w}), but got y={yy}, x={xx}.")
        return picked[:, yy, xx]

    pos = "centre" if y is None and x is None else f"{y}, {x}"
    return Objective(fn, [name], f"neuron({name}, {_short(channel)}, {pos})")


def layer(layer: str) -> Objective:
    """DeepDream: the mean squared activation of the whole layer.

    Example:
        >>> layer("0")({"0": torch.tensor([[1.0, 3.0]])}).tolist()
        [5.0]
    """
    name = _check_layer_name(layer)

    def fn(acts: Mapping[str, torch.Tensor], _out: torch.Tensor | None) -> torch.Tensor:
        return _activation(acts, name).pow(2).flatten(1).mean(1)

    return Objective(fn, [name], f"layer({name})")


def class_logit(class_id: ChannelSpec) -> Objective:
    """The model output (pre-softmax logit) of ``class_id``; a list gives one class per image.

    A dense ``(N, C, H, W)`` output (segmentation) has one logit per pixel, so "the logit of a class" is
    not one number there: on such an output this objective *is* :func:`dense_class_logit` with its default
    region (the class's mean logit over the central half of the height and width), so the function and
    :class:`~lightning_introspect.callbacks.feature_visualization.FeatureVisualization` agree. Other
    outputs with positions (``(N, C, L)``) give the mean over all positions.

    Example:
        >>> class_logit([1, 0])({}, torch.tensor([[1.0, 2.0], [3.0, 4.0]])).tolist()
        [2.0, 3.0]
        >>> out = torch.zeros(1, 2, 4, 4); out[0, 1, 1:3, 1:3] = 1.0  # class 1 fires in the centre only
        >>> class_logit(1)({}, out).tolist()
        [1.0]
    """

    index = _IndexCache(class_id, "class_id")
    dense = dense_class_logit(class_id)

    def fn(acts: Mapping[str, torch.Tensor], out: torch.Tensor | None) -> torch.Tensor:
        if out is None or out.ndim < 2:
            raise ValueError(f"`class_logit` needs a model output of shape (N, num_classes), but got {None if out is None else tuple(out.shape)}.")
        if out.ndim == 4:
            return dense(acts, out)
        rows, idx = index(out.shape[0], out.shape[1], f"the model outputs {out.shape[1]} classes", out.device)
        picked = out[rows, idx]
        return picked.flatten(1).mean(1) if picked.ndim > 1 else picked

    return Objective(fn, [OUTPUT], f"class_logit({_short(class_id)})")


#: the default region of :func:`dense_class_logit`: the central half of the height and of the width
DEFAULT_REGION = 0.5


def central_region(size: tuple[int, int], fraction: float = DEFAULT_REGION) -> torch.Tensor:
    """A bool ``(H, W)`` mask of the centred box covering ``fraction`` of the height and of the width
    (at least one pixel each way; rounded so the box stays centred, up to one pixel on odd sizes).

    Example:
        >>> central_region((4, 6), 0.5).int().tolist()
        [[0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]]
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"Expected `region` to be a fraction in (0, 1] or an (H, W) bool mask, but got {fraction!r}.")
    mask = torch.zeros(size, dtype=torch.bool)
    spans = []
    for side in size:
        extent = min(side, max(1, round(fraction * side)))
        start = (side - extent) // 2
        spans.append(slice(start, start + extent))
    mask[spans[0], spans[1]] = True
    return mask


def dense_class_logit(class_id: ChannelSpec, region: float | torch.Tensor = DEFAULT_REGION) -> Objective:
    """Segmentation: the mean logit of ``class_id`` over a region of a dense ``(N, C, H, W)`` output.

    The class image of a segmentation model should show *an object of the class*, not a texture of it:
    maximising the class's logit at every pixel asks for the class everywhere, from edge to edge, which
    is not what the model ever saw. Maximising it over a centred region asks for one object of the class
    in the middle of the image, with room around it for the context the model uses to find its borders.
    The *mean* over the region (not the sum) keeps the objective's scale the scale of one logit, whatever
    the output's size, so the numbers compare across models, image sizes and the classifier's
    :func:`class_logit`.

    Args:
        class_id: one class id, or one per image of the batch.
        region: a fraction in (0, 1]: the centred box covering that fraction of the height and of the
            width (default 0.5, the central half each way: a quarter of the pixels; 1.0: the whole
            output), or an explicit ``(H, W)`` bool mask over the output's pixels.

    Raises:
        ValueError: a bad ``region`` (here, or, for a mask of the wrong size or an empty one, at the first
            call), or an output that is not ``(N, C, H, W)``.

    Example:
        >>> out = torch.arange(32.0).view(1, 2, 4, 4)  # class 1: 16, 17, ... 31
        >>> dense_class_logit(1)({}, out).tolist()  # the mean of 21, 22, 25, 26
        [23.5]
        >>> left = torch.zeros(4, 4, dtype=torch.bool); left[:, 0] = True
        >>> dense_class_logit(1, region=left)({}, out).tolist()  # the mean of 16, 20, 24, 28
        [22.0]
    """
    index = _IndexCache(class_id, "class_id")
    if isinstance(region, torch.Tensor):
        if region.dtype != torch.bool or region.ndim != 2:
            raise ValueError(f"Expected `region` to be a fraction in (0, 1] or an (H, W) bool mask, but got a {region.dtype} tensor of shape {tuple(region.shape)}.")
        if not bool(region.any()):
            raise ValueError("Expected `region` to cover at least one pixel, but the mask is all False.")
        described = f"mask {tuple(region.shape)}"
    else:
        central_region((1, 1), region)  # checks the fraction now, not at the first optimisation step
        described = "central half" if region == DEFAULT_REGION else f"central {region:g}"
    masks: dict[tuple[tuple[int, int], str], torch.Tensor] = {}

    def region_of(size: tuple[int, int], device: torch.device) -> torch.Tensor:
        key = (size, str(device))
        if key not in masks:
            if isinstance(region, torch.Tensor):
                if tuple(region.shape) != size:
                    raise ValueError(f"Expected the `region` mask to match the output's size {size}, but got {tuple(region.shape)}.")
                masks[key] = region.to(device)
            else:
                masks[key] = central_region(size, float(region)).to(device)
        return masks[key]

    def fn(_acts: Mapping[str, torch.Tensor], out: torch.Tensor | None) -> torch.Tensor:
        if out is None or out.ndim != 4:
            raise ValueError(
                f"`dense_class_logit` needs a dense model output of shape (N, C, H, W), but got {None if out is None else tuple(out.shape)}; "
                "use `class_logit` for a classifier."
            )
        rows, idx = index(out.shape[0], out.shape[1], f"the model outputs {out.shape[1]} classes", out.device)
        mask = region_of((int(out.shape[-2]), int(out.shape[-1])), out.device)
        return out[rows, idx][:, mask].mean(1)

    return Objective(fn, [OUTPUT], f"dense_class_logit({_short(class_id)}, {described})")


def diversity(layer: str) -> Objective:
    """Minus the mean cosine similarity of an image's Gram matrix to the other images' (batch >= 2).

    Add it with a weight to a channel objective to get different images per batch entry.
    """
    name = _check_layer_name(layer)

    def fn(acts: Mapping[str, torch.Tensor], _out: torch.Tensor | None) -> torch.Tensor:
        a = _activation(acts, name)
        n = a.shape[0]
        if n < 2:
            return a.new_zeros(n)
        flat = a.flatten(2)
        gram = F.normalize((flat @ flat.transpose(1, 2)).flatten(1), dim=1)
        sim = gram @ gram.T
        return -(sim.sum(1) - sim.diagonal()) / (n - 1)

    return Objective(fn, [name], f"diversity({name})")


def stack_objectives(parts: Sequence[tuple[Objective, int]]) -> Objective:
    """One batch, several objectives: the first ``k_0`` images get ``parts[0]``, the next ``k_1`` the next...

    Lets one optimisation serve many visualisations (e.g. channels of two layers and some classes).

    Example:
        >>> obj = stack_objectives([(channel("0", [0, 1]), 2), (class_logit(1), 1)])
        >>> acts = {"0": torch.arange(6.0).view(3, 2)}
        >>> obj(acts, torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])).tolist()
        [0.0, 3.0, 3.0]
    """
    parts = [(obj, int(k)) for obj, k in parts]
    if not parts or any(not isinstance(obj, Objective) or k < 1 for obj, k in parts):
        raise ValueError("Expected `parts` to be a non-empty list of (Objective, number of images >= 1) pairs.")

    def fn(acts: Mapping[str, torch.Tensor], out: torch.Tensor | None) -> torch.Tensor:
        values, start = [], 0
        for obj, k in parts:
            sl = slice(start, start + k)
            values.append(obj({name: a[sl] for name, a in acts.items()}, None if out is None else out[sl]))
            start += k
        return torch.cat(values)

    layers = [name for obj, _ in parts for name in obj.layers]
    return Objective(fn, layers, " | ".join(f"{k}x {obj.description}" for obj, k in parts))


def _short(spec: object) -> str:
    if isinstance(spec, torch.Tensor):
        spec = spec.tolist()
    return str(spec).replace(" ", "")



__all__ = [
    "DEFAULT_REGION",
    "OUTPUT",
    "ChannelSpec",
    "Objective",
    "central_region",
    "channel",
    "class_logit",
    "dense_class_logit",
    "diversity",
    "layer",
    "neuron",
    "patch_token_channels",
    "stack_objectives",
    "token_channel",
]
