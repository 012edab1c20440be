"""Feature visualisation: optimise the *input* until a neuron, channel, layer or class logit fires.

Instead of changing the weights to lower a loss, we change an image to raise an objective of the
(frozen) model's activations. Unregularised, the optimum is high-frequency, checkerboard-like noise,
so three kinds of regulariser are offered (Olah et al. 2017, "Feature Visualization", Distill):

* **frequency penalisation** -- ``frequency_penalty`` weighs total variation (``penalty="tv"``) or
  the amplitude of the image above half the Nyquist frequency (``penalty="highfreq"``); works with either
  parameterisation. A *Fourier parameterisation* (``param="fourier"``: the image is the inverse FFT of
  a spectrum scaled by 1/f, with colour decorrelation for 3-channel images) is a softer form of it.
* **transformation robustness** -- ``transforms``: every step sees the image randomly padded,
  jittered, scaled and rotated (:class:`TransformRobustness`, one ``affine_grid`` + ``grid_sample``),
  so the optimum has to survive small shifts;
* **a learned prior** -- ``prior``: optimise the latent code of a decoder (e.g. of an autoencoder
  trained on your data, :func:`fit_autoencoder_prior`) so the image stays near the data distribution.

Objectives (:class:`Objective`) compose with ``+``, ``-`` and scalar ``*``: ``channel("features.8", 3)
- 0.5 * diversity("features.8")``. A per-image channel / class list optimises a batch of
visualisations in one run (``channel("features.8", [0, 1, 2, 3])`` with ``shape=(4, 1, 32, 32)``).

Non-interference: the model runs in eval mode and is restored; parameters keep their ``requires_grad``
and never receive a ``.grad`` (gradients are taken with ``torch.autograd.grad`` w.r.t. the image
parameters only); forward hooks sit only on the target layers and are removed in ``finally``; all
randomness comes from a private generator and the global RNG is forked. Works from inside
``torch.inference_mode()``.

Speed (CPU): the optimisation steps of a batch of at least 4096 input values run the model through
``torch.func.functional_call`` with detached, channels-last copies of its parameters (:func:`frozen_params`):
the same function, about a third less CPU time for a small CNN; checked against the model's own pass on the starting images (a model whose
forward needs NCHW strides keeps its own parameters).

No Lightning import here: usable in a notebook.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from lightning_introspect._torch.guards import (
    fork_global_rng,
    gradients_on,
    introspection_mode,
    module_device,
    private_generator,
)
from lightning_introspect._torch.hooks import hooks
from lightning_introspect._torch.layers import get_layer

PARAMS = ("pixels", "fourier")
PENALTIES = ("tv", "highfreq")
RANGE_FNS = ("sigmoid", "clamp")
OUTPUT = "<output>"  # the pseudo-layer name of the model's output (class logits)

# The Fourier image is ifft(spectrum * 1/f) / _FOURIER_DAMP: with ortho normalisation the lowest
# frequencies are scaled by up to max(H, W), so this keeps the first Adam steps of a comparable size
# to the pixel parameterisation's (Lucid uses the same constant).
_FOURIER_DAMP = 4.0

# Below this many input elements a step is dominated by per-op overhead, where `functional_call` adds more
# than channels-last saves (one 32 px image: ~1.4x slower; four: ~0.6-0.8x of the module's time).
_FAST_MIN_ELEMENTS = 4 * 32 * 32

ChannelSpec = Union[int, Sequence[int], torch.Tensor]  # noqa: UP007 (a runtime alias on Python 3.10)


# ============================================================================================ objectives
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
        layers: Sequence[str],
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

    Example:
        >>> class_logit([1, 0])({}, torch.tensor([[1.0, 2.0], [3.0, 4.0]])).tolist()
        [2.0, 3.0]
    """

    index = _IndexCache(class_id, "class_id")

    def fn(_acts: Mapping[str, torch.Tensor], out: torch.Tensor | None) -> torch.Tensor:
        if out is None or out.ndim < 2:
            raise ValueError(f"`class_logit` needs a model output of shape (N, num_classes), but got {None if out is None else tuple(out.shape)}.")
        rows, idx = index(out.shape[0], out.shape[1], f"the model outputs {out.shape[1]} classes", out.device)
        picked = out[rows, idx]
        return picked.flatten(1).mean(1) if picked.ndim > 1 else picked

    return Objective(fn, [OUTPUT], f"class_logit({_short(class_id)})")


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


# ============================================================================== image statistics
def _radial_frequency(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """``|f|`` in cycles per pixel on the ``rfft2`` grid ``(h, w // 2 + 1)`` (Nyquist = 0.5)."""
    fy = torch.fft.fftfreq(h, device=device).view(-1, 1)
    fx = torch.fft.rfftfreq(w, device=device).view(1, -1)
    return torch.sqrt(fy * fy + fx * fx)


def _rfft_weights(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """How often each ``rfft2`` column stands for itself in the full spectrum (1 or 2)."""
    weights = torch.full((1, w // 2 + 1), 2.0, device=device)
    weights[0, 0] = 1.0
    if w % 2 == 0:
        weights[0, -1] = 1.0
    return weights.expand(h, -1)


def high_frequency_fraction(images: torch.Tensor, *, cutoff: float = 0.25) -> torch.Tensor:
    """The share of an image's (mean-removed) spectral energy above ``cutoff`` cycles/pixel: ``(N,)``.

    A "how natural" number: photos and digits keep most energy at low frequencies (a few percent
    above half the Nyquist frequency), the checkerboard noise of an unregularised optimum much more.
    A constant image gives 0.

    Example:
        >>> checker = (torch.arange(8).view(1, -1) + torch.arange(8).view(-1, 1)) % 2
        >>> wave = torch.cos(torch.arange(8) * 2 * math.pi / 8).view(1, -1).expand(8, -1)
        >>> high_frequency_fraction(torch.stack([checker, wave]).float().unsqueeze(1)).round(decimals=3).tolist()
        [1.0, 0.0]
    """
    if images.ndim != 4:
        raise ValueError(f"Expected `images` of shape (N, C, H, W), but got {tuple(images.shape)}.")
    x = images.detach().float()
    x = x - x.mean(dim=(2, 3), keepdim=True)
    h, w = x.shape[-2:]
    power = torch.fft.rfft2(x, norm="ortho").abs().pow(2).sum(1) * _rfft_weights(h, w, x.device)
    high = (_radial_frequency(h, w, x.device) > cutoff).to(power.dtype)
    total = power.flatten(1).sum(1)
    return torch.where(total > 0, (power * high).flatten(1).sum(1) / total.clamp_min(1e-30), torch.zeros_like(total))


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels, per image: ``(N,)``."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
    return dx + dy


def high_frequency_energy(images: torch.Tensor, *, cutoff: float = 0.25) -> torch.Tensor:
    """Root-mean-square of the image's high-pass part (frequencies above ``cutoff`` cycles/pixel): ``(N,)``.

    Differentiable; in the image's units (like total variation), so the two penalties take weights of
    a similar size. It penalises exactly the energy :func:`high_frequency_fraction` counts.
    """
    h, w = images.shape[-2:]
    spec = torch.fft.rfft2(images, norm="ortho")
    mask = (_radial_frequency(h, w, images.device) > cutoff).to(images.dtype) * _rfft_weights(h, w, images.device)
    energy = (spec.real.pow(2) + spec.imag.pow(2)).mul(mask).flatten(1).sum(1) / images[0].numel()
    return torch.sqrt(energy + 1e-12)


def frequency_penalty_of(images: torch.Tensor, kind: str = "tv") -> torch.Tensor:
    """The frequency penalty ``kind`` (``"tv"`` or ``"highfreq"``) of images in [0, 1]: ``(N,)``."""
    if kind == "tv":
        return total_variation(images)
    if kind == "highfreq":
        return high_frequency_energy(images)
    raise ValueError(f"Expected `penalty` to be one of {', '.join(repr(p) for p in PENALTIES)}, but got {kind!r}.")


# ============================================================================ transformations
@dataclass(frozen=True)
class TransformRobustness:
    """Random pad, jitter, scale and rotation applied to the image at every optimisation step.

    In order: pad by ``pad`` pixels (``fill``: ``"reflection"``, ``"border"`` or a constant value in the
    image range), shift by an integer in ``[-jitter, jitter]`` pixels per axis, scale by a factor drawn
    from ``scale``, rotate by up to ``degrees``, shift again by ``[-jitter_after, jitter_after]``
    pixels; the output keeps the input's size (a model with a flatten layer still works). Each image of
    a batch gets its own draw. All done with one ``affine_grid`` + ``grid_sample``.

    Use :meth:`for_size` for defaults scaled to an image size (Lucid's 128 px settings scaled down:
    at 32 px it is pad 3, jitter 2, scale 0.9-1.1, rotate 10 degrees, jitter 1).

    Example:
        >>> t = TransformRobustness.for_size(32)
        >>> (t.pad, t.jitter, t.jitter_after)
        (3, 2, 1)
        >>> t(torch.rand(2, 1, 32, 32), generator=torch.Generator().manual_seed(0)).shape
        torch.Size([2, 1, 32, 32])
    """

    pad: int = 3
    jitter: int = 2
    scale: tuple[float, float] = (0.9, 1.1)
    degrees: float = 10.0
    jitter_after: int = 1
    fill: str | float = "reflection"

    def __post_init__(self) -> None:
        for name in ("pad", "jitter", "jitter_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Expected `{name}` to be a non-negative int (pixels), but got {value!r}.")
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"Expected `scale` to be (low, high) with 0 < low <= high, but got {self.scale!r}.")
        if not 0 <= self.degrees < 180:
            raise ValueError(f"Expected `degrees` in [0, 180), but got {self.degrees!r}.")
        if isinstance(self.fill, str) and self.fill not in ("reflection", "border"):
            raise ValueError(f"Expected `fill` to be 'reflection', 'border' or a number, but got {self.fill!r}.")

    @classmethod
    def for_size(cls, size: int, *, strength: float = 1.0) -> TransformRobustness:
        """Lucid's defaults (pad 12, jitter 8, scale 0.9-1.1, rotate 10 deg, jitter 4 at 128 px) scaled to ``size``.

        ``strength`` multiplies the pixel amounts, the scale range and the angle.
        """
        f = size / 128.0 * strength

        def px(v: float) -> int:
            return max(1, round(v * f)) if strength > 0 else 0

        return cls(
            pad=px(12),
            jitter=px(8),
            scale=(1 - 0.1 * strength, 1 + 0.1 * strength),
            degrees=10.0 * strength,
            jitter_after=px(4),
        )

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = images.shape
        p = self.pad
        if p > 0:
            if isinstance(self.fill, str):
                mode = "reflect" if self.fill == "reflection" and p < min(h, w) else "replicate"
                canvas = F.pad(images, (p, p, p, p), mode=mode)
            else:
                canvas = F.pad(images, (p, p, p, p), mode="constant", value=float(self.fill))
        else:
            canvas = images
        hp, wp = h + 2 * p, w + 2 * p

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)

        def shift(k: int) -> torch.Tensor:
            return torch.randint(-k, k + 1, (n, 2), generator=generator).double()

        t1, t2 = shift(self.jitter), shift(self.jitter_after)
        s = uniform(*self.scale)
        theta_rad = uniform(-self.degrees, self.degrees) * math.pi / 180.0
        cos, sin = torch.cos(theta_rad) / s, torch.sin(theta_rad) / s
        # Pixel coordinates relative to the centre: input = A (output - t2) - t1, A = rotation / scale.
        a = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (n, 2, 2)
        d_out = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64)
        d_in = torch.tensor([wp / 2.0, hp / 2.0], dtype=torch.float64)
        mat = a * d_out.view(1, 1, 2) / d_in.view(1, 2, 1)
        offset = (-(a @ t2.unsqueeze(-1)).squeeze(-1) - t1) / d_in
        theta = torch.cat([mat, offset.unsqueeze(-1)], dim=-1).to(images.dtype).to(images.device)
        grid = F.affine_grid(theta, [n, images.shape[1], h, w], align_corners=False)
        return F.grid_sample(canvas, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resolve_transforms(transforms: object, size: int) -> TransformRobustness | None:
    """``None`` / ``False`` -> none; ``True`` / ``"auto"`` -> :meth:`TransformRobustness.for_size`; a float -> that strength."""
    if transforms is None or transforms is False:
        return None
    if transforms is True or transforms == "auto":
        return TransformRobustness.for_size(size)
    if isinstance(transforms, TransformRobustness):
        return transforms
    if isinstance(transforms, (int, float)) and not isinstance(transforms, bool) and transforms >= 0:
        return TransformRobustness.for_size(size, strength=float(transforms)) if transforms > 0 else None
    raise ValueError(
        "Expected `transforms` to be None/False, True/'auto', a non-negative strength (float) or a "
        f"TransformRobustness, but got {transforms!r}."
    )


# ============================================================================ parameterisations
def default_color_correlation() -> torch.Tensor:
    """A generic colour basis ``(3, 3)``: luminance plus two opponent axes with smaller spread.

    Columns map decorrelated channels to RGB; the luminance column has norm 1. Use
    :func:`color_correlation_from_data` for the basis of your own images.
    """
    basis = torch.tensor(
        [
            [1 / math.sqrt(3), 1 / math.sqrt(2), 1 / math.sqrt(6)],
            [1 / math.sqrt(3), -1 / math.sqrt(2), 1 / math.sqrt(6)],
            [1 / math.sqrt(3), 0.0, -2 / math.sqrt(6)],
        ]
    )
    return basis * torch.tensor([1.0, 0.35, 0.2]).view(1, 3)


def color_correlation_from_data(images: torch.Tensor) -> torch.Tensor:
    """The square root of the colour covariance of ``(N, 3, H, W)`` images, scaled to a largest column norm of 1.

    Pass it as ``color_correlation`` to :func:`visualize_features`.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Expected `images` of shape (N, 3, H, W), but got {tuple(images.shape)}.")
    pix = images.detach().double().permute(1, 0, 2, 3).reshape(3, -1)
    cov = torch.cov(pix)
    vals, vecs = torch.linalg.eigh(cov)
    root = vecs * vals.clamp_min(0).sqrt().view(1, 3)
    root = root / root.norm(dim=0).max().clamp_min(1e-12)
    return root.float()


class _Image(nn.Module):
    """An image parameterisation: ``forward()`` returns ``(N, C, H, W)`` in ``value_range``."""

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        *,
        param: str,
        value_range: tuple[float, float],
        range_fn: str,
        decorrelate: bool,
        color_correlation: torch.Tensor | None,
        decay_power: float,
        init_std: float,
        generator: torch.Generator,
        device: torch.device,
    ) -> None:
        super().__init__()
        n, c, h, w = shape
        self.shape, self.param, self.range_fn = shape, param, range_fn
        self.lo, self.hi = value_range
        if param == "pixels":
            self.values = nn.Parameter((torch.randn(shape, generator=generator) * init_std).to(device))
        else:
            spec = torch.randn(n, c, h, w // 2 + 1, 2, generator=generator) * init_std
            self.values = nn.Parameter(spec.to(device))
            freq = _radial_frequency(h, w, device)
            self.register_buffer("scale", 1.0 / freq.clamp_min(1.0 / max(h, w)).pow(decay_power) / _FOURIER_DAMP)
        self.decorrelate = bool(decorrelate and c == 3)
        if self.decorrelate:
            corr = default_color_correlation() if color_correlation is None else torch.as_tensor(color_correlation, dtype=torch.float32)
            if corr.shape != (3, 3):
                raise ValueError(f"Expected `color_correlation` of shape (3, 3), but got {tuple(corr.shape)}.")
            self.register_buffer("corr", corr.to(device))

    def unit(self) -> torch.Tensor:
        """The image in [0, 1] units (before mapping to ``value_range``)."""
        n, c, h, w = self.shape
        if self.param == "pixels":
            z = self.values
        else:
            spec = torch.view_as_complex(self.values) * self.scale
            z = torch.fft.irfft2(spec, s=(h, w), norm="ortho")
        if self.decorrelate:
            z = torch.einsum("rk,nkhw->nrhw", self.corr, z)
        if self.range_fn == "sigmoid":
            return torch.sigmoid(z)
        if self._projected:
            return z + 0.5  # the pixels are projected back into [-0.5, 0.5] after each step
        return (z + 0.5).clamp(0, 1)

    @property
    def _projected(self) -> bool:
        return self.param == "pixels" and self.range_fn == "clamp" and not self.decorrelate

    def forward(self) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * self.unit()

    @torch.no_grad()
    def project(self) -> None:
        if self._projected:
            self.values.clamp_(-0.5, 0.5)


class _Prior(nn.Module):
    """Images decoded by a user decoder from an optimised latent ``(N, latent_dim)``."""

    def __init__(self, decoder: nn.Module, n: int, latent_dim: int, *, init_std: float, value_range: tuple[float, float], generator: torch.Generator, device: torch.device) -> None:
        super().__init__()
        self.decoder = [decoder]  # a list, so the decoder's parameters are not ours to optimise
        self.lo, self.hi = value_range
        self.latent = nn.Parameter((torch.randn(n, latent_dim, generator=generator) * init_std).to(device))

    def forward(self) -> torch.Tensor:
        return self.decoder[0](self.latent).clamp(self.lo, self.hi)


def infer_latent_dim(decoder: nn.Module) -> int:
    """The input width of a decoder that starts with an ``nn.Linear`` (or has an ``latent_dim`` attribute)."""
    dim = getattr(decoder, "latent_dim", None)
    if isinstance(dim, int) and dim > 0:
        return dim
    first = next((m for m in decoder.modules() if isinstance(m, (nn.Linear, nn.ConvTranspose2d, nn.Conv2d))), None)
    if isinstance(first, nn.Linear):
        return int(first.in_features)
    raise ValueError("Cannot infer the prior's latent size: pass `latent_dim` (the decoder does not start with an nn.Linear).")


# ============================================================================== the optimisation
@dataclass
class FeatureVisualizationResult:
    """What :func:`visualize_features` returns.

    Attributes:
        images: ``(N, C, H, W)`` optimised images in ``value_range`` (display space, detached, CPU).
        objective: ``(N,)`` the objective of the final images, untransformed.
        initial_objective: ``(N,)`` the objective of the starting images (the noise / decoded latent).
        trace: ``(steps, N)`` the objective at each step, as optimised (on the transformed image).
        high_frequency_fraction: ``(N,)`` see :func:`high_frequency_fraction`.
        latents: ``(N, latent_dim)`` the optimised latent codes when a prior was used, else ``None``.
        model_inputs: ``(N, C, H, W)`` the final images as the model sees them (``(image - mean) / std``).
    """

    images: torch.Tensor
    objective: torch.Tensor
    initial_objective: torch.Tensor
    trace: torch.Tensor
    high_frequency_fraction: torch.Tensor
    model_inputs: torch.Tensor
    latents: torch.Tensor | None = None
    settings: dict[str, object] = field(default_factory=dict)


class _Stop(Exception):
    """Raised from the last needed hook to skip the rest of the forward pass."""


class ActivationRecorder:
    """Forward hooks on the objective's layers only; call it like the model to get ``(acts, output)``.

    Use as a context manager: the hooks are removed on exit, also on errors. ``params``: tensors that
    stand in for some of the model's parameters during the call (``torch.func.functional_call``; the
    model's own parameters are put back afterwards, also on errors), e.g. :func:`frozen_params`.
    """

    def __init__(self, model: nn.Module, objective: Objective, params: Mapping[str, torch.Tensor] | None = None) -> None:
        self.model = model
        self.params = dict(params) if params else None
        self.needs_output = objective.needs_output
        self.modules = {name: get_layer(model, name, argument="layer") for name in objective.module_layers}
        self.acts: dict[str, torch.Tensor] = {}
        self._ctx = hooks()
        self._handles: list | None = None

    def __enter__(self) -> ActivationRecorder:
        self._handles = self._ctx.__enter__()
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)

    def _hook(self, name: str) -> Callable[..., None]:
        def record(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"Layer {name!r} returns {type(output).__name__}, not a tensor; choose another layer.")
            self.acts[name] = output
            if not self.needs_output and len(self.acts) == len(self.modules):
                raise _Stop

        return record

    def __call__(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        self.acts = {}
        output = None
        try:
            output = self.model(x) if self.params is None else torch.func.functional_call(self.model, self.params, (x,))
        except _Stop:
            pass
        if isinstance(output, (tuple, list)):
            output = output[0]
        missing = sorted(set(self.modules) - set(self.acts))
        if missing:
            raise ValueError(f"The layer(s) {missing} did not run in the model's forward pass; choose layers that do.")
        return self.acts, output


def frozen_params(model: nn.Module, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """On CPU: the model's floating parameters, detached, with 4-D ones (2-D conv weights) in channels-last
    memory format; ``{}`` on other devices (not measured there).

    Passed to :class:`ActivationRecorder` (``torch.func.functional_call``), they make every convolution,
    BatchNorm, ReLU and pooling of an optimisation step run on NHWC tensors, and autograd build no graph
    for the weights: the same values, about a third less CPU time for a small CNN (NCHW max-pooling alone
    is ~10x slower than NHWC on CPU; an eval-mode BatchNorm backward is ~40 % cheaper when its weight
    does not require grad). The model itself is not changed (the tensors are detached copies / views).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 1))
        >>> {k: (v.ndim, v.requires_grad) for k, v in frozen_params(net).items()}
        {'0.weight': (4, False), '0.bias': (1, False), '3.weight': (2, False), '3.bias': (1, False)}
        >>> frozen_params(net)["0.weight"].is_contiguous(memory_format=torch.channels_last)
        True
    """
    device = module_device(model) if device is None else torch.device(device)
    if device.type != "cpu":
        return {}
    with torch.inference_mode(False):
        return {
            name: p.detach().to(memory_format=torch.channels_last) if p.ndim == 4 else p.detach()
            for name, p in model.named_parameters()
            if p.is_floating_point()
        }


def _same_objective(fn: Callable[[], torch.Tensor], reference: torch.Tensor) -> bool:
    """Whether ``fn()`` (the objective through :func:`frozen_params`) runs and matches ``reference`` (the
    model's own pass) to float precision; a model whose forward assumes NCHW strides (``x.view(n, -1)``
    after a conv fails here) or behaves differently then keeps its own parameters."""
    try:
        values = fn().detach().float().cpu()
    except RuntimeError:
        return False
    scale = 1.0 + float(reference.abs().max()) if reference.numel() else 1.0
    return values.shape == reference.shape and bool(torch.allclose(values, reference, rtol=1e-3, atol=1e-4 * scale))


def _as_channel_tensor(value: float | Sequence[float], c: int, device: torch.device, argument: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32, device=device).flatten()
    if t.numel() not in (1, c):
        raise ValueError(f"Expected `{argument}` to be a number or {c} numbers (one per channel), but got {value!r}.")
    return t.view(1, -1, 1, 1)


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Expected `shape` to be (N, C, H, W) ints, but got {shape!r}.") from err
    if len(dims) == 3:
        dims = (1, *dims)
    if len(dims) != 4 or min(dims) < 1:
        raise ValueError(f"Expected `shape` to be (N, C, H, W) or (C, H, W) positive ints, but got {shape!r}.")
    return dims  # type: ignore[return-value]


def objective_values(
    model: nn.Module,
    objective: Objective,
    images: torch.Tensor,
    *,
    mean: float | Sequence[float] = 0.0,
    std: float | Sequence[float] = 1.0,
    transforms: TransformRobustness | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """The objective of display-space ``images`` (optionally after one random transform): ``(N,)``.

    Use it to check robustness: the value of a visualisation under fresh random jitter.
    """
    device = module_device(model, images.device)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    gen = private_generator(seed)
    with introspection_mode(model, grad=False), ActivationRecorder(model, objective) as rec:
        x = images.detach().to(device=device, dtype=torch.float32)
        if transforms is not None:
            x = transforms(x, gen)
        c = x.shape[1]
        x = (x - _as_channel_tensor(mean, c, device, "mean")) / _as_channel_tensor(std, c, device, "std")
        acts, out = rec(x.to(dtype))
        return objective(acts, out).detach().float().cpu()


def visualize_features(
    model: nn.Module,
    objective: Objective,
    *,
    shape: Sequence[int] = (1, 1, 32, 32),
    steps: int = 128,
    lr: float = 0.05,
    param: str = "pixels",
    frequency_penalty: float = 0.0,
    penalty: str = "tv",
    transforms: bool | str | float | TransformRobustness | None = None,
    prior: nn.Module | None = None,
    latent_dim: int | None = None,
    latent_penalty: float = 0.0,
    latent_std: float = 1.0,
    value_range: tuple[float, float] = (0.0, 1.0),
    range_fn: str = "sigmoid",
    mean: float | Sequence[float] = 0.0,
    std: float | Sequence[float] = 1.0,
    decorrelate: bool | None = None,
    color_correlation: torch.Tensor | None = None,
    decay_power: float = 1.0,
    init_std: float = 0.01,
    seed: int = 0,
) -> FeatureVisualizationResult:
    """Optimise images (or a prior's latent codes) to maximise ``objective`` on a frozen ``model``.

    Each step: image = parameterisation (in ``value_range``); random transform (if ``transforms``);
    ``(image - mean) / std`` into the model; per image, loss = ``-objective + |objective| *
    (frequency_penalty * penalty(image) + latent_penalty * mean(latent^2))`` (``|objective|`` detached);
    Adam step on the image parameters (or the latent) only.

    Args:
        model: the network (left as it was: modes, ``requires_grad``, no ``.grad``, hooks).
        objective: what to maximise (:func:`channel`, :func:`neuron`, :func:`layer`, :func:`class_logit`,
            sums of those); one value per image.
        shape: ``(N, C, H, W)`` of the optimised batch (``(C, H, W)`` means N = 1).
        steps: optimisation steps.
        lr: Adam learning rate.
        param: ``"pixels"`` or ``"fourier"`` (1/f-scaled spectrum; decorrelated colour for C = 3).
        frequency_penalty: weight of ``penalty`` (computed on the image in [0, 1] units; 0 = off).
            Relative: each image's penalty is multiplied by its current ``|objective|`` (detached), so
            the same weight suits a layer whose activations are 2 and a logit that reaches 50 (for a
            positive objective it amounts to maximising ``log(objective) - weight * penalty``). 1-4 is
            a useful range with ``"tv"``.
        penalty: ``"tv"`` (mean absolute neighbour difference) or ``"highfreq"`` (root-mean-square of the
            part of the image above half the Nyquist frequency).
        transforms: ``None``/``False``; ``True``/``"auto"`` for :meth:`TransformRobustness.for_size`; a
            float strength; or a :class:`TransformRobustness`.
        prior: a decoder ``latent (N, latent_dim) -> image (N, C, H, W)`` in ``value_range`` (end it with
            a sigmoid for [0, 1]); its latent is optimised instead of pixels (``param`` is then unused).
            The decoder's mode is set to eval and restored, its weights are not changed.
        latent_dim: the prior's latent size (default: inferred from a leading ``nn.Linear``).
        latent_penalty: weight of the mean squared latent (keeps the code where the decoder was trained);
            relative to ``|objective|`` like ``frequency_penalty``.
        latent_std: standard deviation of the initial latent codes.
        value_range: the valid range of the images in display space (e.g. ``(0, 1)`` for digits).
        range_fn: ``"sigmoid"`` (smooth squashing into the range) or ``"clamp"`` (hard; for pixels a
            projection after every step).
        mean: subtracted before the model (scalar or per channel): the data normalisation.
        std: divided by before the model (scalar or per channel).
        decorrelate: decorrelate colours (C = 3); default: on for ``"fourier"``.
        color_correlation: ``(3, 3)`` decorrelated -> RGB matrix (default :func:`default_color_correlation`).
        decay_power: exponent of the 1/f scaling of the Fourier parameterisation.
        init_std: standard deviation of the initial pixel / spectrum noise.
        seed: seed of the private generator (initial noise, transforms); same seed, same images.

    Returns:
        A :class:`FeatureVisualizationResult`.

    Raises:
        ValueError: a bad argument, naming it and the valid choices (layers: the closest names).

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        >>> res = visualize_features(net, channel("0", [0, 1]), shape=(2, 1, 16, 16), steps=20, seed=1)
        >>> res.images.shape, res.trace.shape, bool((res.objective > res.initial_objective).all())
        (torch.Size([2, 1, 16, 16]), torch.Size([20, 2]), True)
    """
    if not isinstance(objective, Objective):
        raise ValueError(f"Expected `objective` to be an Objective (channel(...), class_logit(...), ...), but got {type(objective).__name__}.")
    n, c, h, w = _check_shape(shape)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Expected `steps` to be a positive int, but got {steps!r}.")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"Expected `lr` to be a positive number, but got {lr!r}.")
    if param not in PARAMS:
        raise ValueError(f"Expected `param` to be one of {', '.join(repr(p) for p in PARAMS)}, but got {param!r}.")
    if penalty not in PENALTIES:
        raise ValueError(f"Expected `penalty` to be one of {', '.join(repr(p) for p in PENALTIES)}, but got {penalty!r}.")
    if range_fn not in RANGE_FNS:
        raise ValueError(f"Expected `range_fn` to be one of {', '.join(repr(p) for p in RANGE_FNS)}, but got {range_fn!r}.")
    if not (isinstance(frequency_penalty, (int, float)) and frequency_penalty >= 0):
        raise ValueError(f"Expected `frequency_penalty` to be a non-negative number, but got {frequency_penalty!r}.")
    if not (isinstance(latent_penalty, (int, float)) and latent_penalty >= 0):
        raise ValueError(f"Expected `latent_penalty` to be a non-negative number, but got {latent_penalty!r}.")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"Expected `value_range` to be (low, high) with low < high, but got {value_range!r}.")
    if prior is not None and not isinstance(prior, nn.Module):
        raise ValueError(f"Expected `prior` to be an nn.Module decoder (latent -> image), but got {type(prior).__name__}.")
    robust = resolve_transforms(transforms, min(h, w))
    for name in objective.module_layers:  # fail early, with the closest valid names
        get_layer(model, name, argument="layer")

    device = module_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    gen = private_generator(seed)
    settings = {"param": "prior" if prior is not None else param, "frequency_penalty": float(frequency_penalty), "penalty": penalty, "transforms": robust, "steps": steps, "lr": float(lr), "seed": seed}

    with introspection_mode(model, grad=True), ActivationRecorder(model, objective, frozen_params(model, device) if n * c * h * w >= _FAST_MIN_ELEMENTS else None) as rec:
        m_t = _as_channel_tensor(mean, c, device, "mean")
        s_t = _as_channel_tensor(std, c, device, "std")
        if (s_t == 0).any():
            raise ValueError(f"Expected `std` to be non-zero, but got {std!r}.")
        prior_ctx = introspection_mode(prior, grad=True) if prior is not None else fork_global_rng()
        with prior_ctx:
            if prior is not None:
                dim = infer_latent_dim(prior) if latent_dim is None else latent_dim
                if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                    raise ValueError(f"Expected `latent_dim` to be a positive int, but got {latent_dim!r}.")
                image_fn: nn.Module = _Prior(prior, n, dim, init_std=latent_std, value_range=(lo, hi), generator=gen, device=device)
                probe = image_fn()
                if tuple(probe.shape) != (n, c, h, w):
                    raise ValueError(f"Expected the prior to decode latents of size {dim} to images of shape {(n, c, h, w)}, but got {tuple(probe.shape)}.")
            else:
                dec = (param == "fourier") if decorrelate is None else bool(decorrelate)
                image_fn = _Image((n, c, h, w), param=param, value_range=(lo, hi), range_fn=range_fn, decorrelate=dec, color_correlation=color_correlation, decay_power=decay_power, init_std=init_std, generator=gen, device=device)
            params = [p for p in image_fn.parameters()]
            opt = torch.optim.Adam(params, lr=float(lr))

            def evaluate(img: torch.Tensor) -> torch.Tensor:
                acts, out = rec(((img - m_t) / s_t).to(dtype))
                values = objective(acts, out).float()
                if not isinstance(values, torch.Tensor) or values.shape != (n,):
                    raise ValueError(f"Expected the objective to give one value per image, shape ({n},), but got {getattr(values, 'shape', values)!r}.")
                return values

            with torch.no_grad():
                start = image_fn()
                params_fast, rec.params = rec.params, None
                initial = evaluate(start).detach().float().cpu()  # the model as it is
            if params_fast:  # the channels-last pass only where it gives the same objective, run as a step runs it
                rec.params = params_fast
                rec.params = params_fast if _same_objective(lambda: evaluate(start.detach().requires_grad_(True)), initial) else None
            trace = []  # kept on the device: no host sync per step
            for _ in range(steps):
                img = image_fn()
                values = evaluate(robust(img, gen) if robust is not None else img)
                trace.append(values.detach())
                penalties = torch.zeros(n, device=device)
                if frequency_penalty > 0:
                    penalties = penalties + float(frequency_penalty) * frequency_penalty_of((img - lo) / (hi - lo), penalty)
                if prior is not None and latent_penalty > 0:
                    penalties = penalties + float(latent_penalty) * image_fn.latent.pow(2).mean(1)
                # Penalties are relative to the objective's current size, so one weight suits any layer.
                loss = (values.detach().abs() * penalties - values).sum()
                for p, g in zip(params, torch.autograd.grad(loss, params)):
                    p.grad = g  # the image's own parameters, never the model's
                opt.step()
                if isinstance(image_fn, _Image):
                    image_fn.project()
            for p in params:
                p.grad = None
            with torch.no_grad():
                final_img = image_fn().detach()
                final = evaluate(final_img).detach().float().cpu()
                model_inputs = ((final_img - m_t) / s_t).detach().cpu()
    images = final_img.float().cpu()
    latents = image_fn.latent.detach().cpu() if isinstance(image_fn, _Prior) else None
    return FeatureVisualizationResult(
        images=images,
        objective=final,
        initial_objective=initial,
        trace=torch.stack(trace).float().cpu(),
        high_frequency_fraction=high_frequency_fraction(images),
        model_inputs=model_inputs,
        latents=latents,
        settings=settings,
    )


# =========================================================================== a learned prior
class MLPDecoder(nn.Module):
    """A small MLP decoder ``latent -> image`` with a sigmoid output mapped to ``value_range``.

    The latent is standardised: ``z`` is mapped to ``latent_mean + latent_scale * z`` before the first
    layer, so a standard-normal ``z`` lands where the encoder put the training data.
    """

    def __init__(self, latent_dim: int, shape: Sequence[int], hidden: int = 256, value_range: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__()
        self.latent_dim = int(latent_dim)
        self.shape = tuple(int(s) for s in shape)
        self.lo, self.hi = (float(v) for v in value_range)
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, math.prod(self.shape)))
        self.register_buffer("latent_mean", torch.zeros(latent_dim))
        self.register_buffer("latent_scale", torch.ones(latent_dim))

    def decode_raw(self, code: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from an unstandardised code (as the encoder produces it)."""
        return torch.sigmoid(self.net(code)).view(code.shape[0], *self.shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * self.decode_raw(self.latent_mean + self.latent_scale * z)


def fit_autoencoder_prior(
    images: torch.Tensor,
    *,
    latent_dim: int = 16,
    hidden: int = 256,
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 3e-3,
    value_range: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
) -> MLPDecoder:
    """Train a small MLP autoencoder on display-space ``images`` and return its decoder, as a prior.

    The returned decoder takes *standardised* latents (the encoder's per-dimension mean and spread
    over ``images`` are folded in), so optimising a latent from a standard-normal start with a
    ``latent_penalty`` (:func:`visualize_features`) stays near the data. Its parameters do not require
    grad. Seeded, and the global RNG is left untouched. A few seconds for 1,000 digits at 32 px on
    2 CPU cores.

    Example:
        >>> imgs = torch.rand(64, 1, 8, 8)
        >>> dec = fit_autoencoder_prior(imgs, latent_dim=4, steps=5)
        >>> dec(torch.zeros(2, 4)).shape
        torch.Size([2, 1, 8, 8])
    """
    if images.ndim != 4:
        raise ValueError(f"Expected `images` of shape (N, C, H, W), but got {tuple(images.shape)}.")
    lo, hi = (float(v) for v in value_range)
    data = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    n = data.shape[0]
    gen = private_generator(seed)
    with fork_global_rng(), gradients_on():
        torch.manual_seed(seed)  # layer initialisation, inside the fork: the caller's RNG is untouched
        encoder = nn.Sequential(nn.Flatten(), nn.Linear(data[0].numel(), hidden), nn.ReLU(), nn.Linear(hidden, latent_dim))
        decoder = MLPDecoder(latent_dim, data.shape[1:], hidden=hidden)
        params = [*encoder.parameters(), *decoder.parameters()]
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            batch = data[torch.randint(0, n, (min(batch_size, n),), generator=gen)]
            code = encoder(batch)
            logits = decoder.net(code).view_as(batch)
            loss = F.binary_cross_entropy_with_logits(logits, batch) + 1e-3 * code.pow(2).mean()
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p.grad = g
            opt.step()
        with torch.no_grad():
            codes = encoder(data)
            decoder.latent_mean.copy_(codes.mean(0))
            decoder.latent_scale.copy_(codes.std(0).clamp_min(1e-6))
    decoder.lo, decoder.hi = lo, hi
    decoder.eval()
    for p in decoder.parameters():
        p.grad = None
        p.requires_grad_(False)
    return decoder


__all__ = [
    "OUTPUT",
    "ActivationRecorder",
    "FeatureVisualizationResult",
    "MLPDecoder",
    "Objective",
    "TransformRobustness",
    "channel",
    "class_logit",
    "color_correlation_from_data",
    "default_color_correlation",
    "diversity",
    "fit_autoencoder_prior",
    "frequency_penalty_of",
    "high_frequency_energy",
    "high_frequency_fraction",
    "layer",
    "neuron",
    "objective_values",
    "resolve_transforms",
    "stack_objectives",
    "total_variation",
    "visualize_features",
]
