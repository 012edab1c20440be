"""Cheap image statistics, image perturbations and error rates by statistic, for error analysis.

Everything works on batches ``(N, C, H, W)`` of floats (any value range) in pure torch:

* statistics (one number per image): ``sharpness`` (variance of the Laplacian of the grey image),
  ``noise`` (Immerkaer's fast noise-sigma estimate), ``brightness`` (mean grey level), ``contrast``
  (standard deviation of the grey level, RMS contrast) and ``saturation`` (mean chroma, max - min over
  the RGB channels; only for 3-channel images);
* perturbations: :func:`gaussian_blur` (sigma in pixels), :func:`gaussian_noise` (private generator)
  and :func:`color_filter` (an "Instagram-like" fade: contrast towards the image mean, for RGB also
  desaturation and a warm cast);
* :func:`error_rate_by_bin`: the error rate in each quantile bin of a statistic, so "errors
  concentrate on blurry images" is a number; :func:`mean_by_bin`: the same bins for a score (an
  image's mean IoU in segmentation);
* :func:`perturbation_accuracy`: per-class accuracy of a classifier under each perturbation and strength,
  the images perturbed and classified in chunks sized to a memory budget (:func:`perturbation_batch_size`).

Every perturbation works image by image (the blur as weighted sums of shifted copies, each image's mean on
its own, the noise drawn image after image from one generator), so an image comes out the same, bit for
bit, whatever chunk of a batch it is perturbed in.

Example:
    >>> x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> stats = image_statistics(x)
    >>> sorted(stats), stats["sharpness"].shape
    (['brightness', 'contrast', 'noise', 'saturation', 'sharpness'], torch.Size([4]))
    >>> bool((image_statistics(gaussian_blur(x, 1.0))["sharpness"] < stats["sharpness"]).all())
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F

from lightning_introspect.methods.chunks import DEFAULT_MEMORY_BUDGET, chunk_slices, rows_per_chunk

STATISTICS = ("sharpness", "noise", "brightness", "contrast", "saturation")
PERTURBATIONS = ("blur", "noise", "color")

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
_NOISE_MASK = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
_LUMA = (0.299, 0.587, 0.114)


def _check_images(x: torch.Tensor, argument: str = "images") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"Expected `{argument}` to be a tensor of shape (N, C, H, W), but got {shape}.")
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        raise ValueError(f"Expected `{argument}` to be at least 3x3 pixels, but got {tuple(x.shape)}.")
    return x.detach().float()


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, 1, H, W)``: ITU-R 601 luma for 3 channels, the channel mean otherwise."""
    x = _check_images(x)
    if x.shape[1] == 3:
        weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)
    return x.mean(dim=1, keepdim=True)


def _filter(gray: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    return F.conv2d(gray, kernel.to(gray.device, gray.dtype).view(1, 1, 3, 3))  # "valid": no border effects


def _sharpness_gray(gray: torch.Tensor) -> torch.Tensor:
    return _filter(gray, _LAPLACIAN).flatten(1).var(dim=1, unbiased=False)


def _noise_gray(gray: torch.Tensor) -> torch.Tensor:
    response = _filter(gray, _NOISE_MASK).abs().flatten(1)
    return math.sqrt(math.pi / 2.0) * response.mean(dim=1) / 6.0


def _brightness_gray(gray: torch.Tensor) -> torch.Tensor:
    return gray.flatten(1).mean(dim=1)


def _contrast_gray(gray: torch.Tensor) -> torch.Tensor:
    return gray.flatten(1).std(dim=1, unbiased=False)


def sharpness(x: torch.Tensor) -> torch.Tensor:
    """Variance of the Laplacian of each grey image (valid region): low = blurry. ``(N,)``."""
    return _sharpness_gray(to_gray(x))


def noise_level(x: torch.Tensor) -> torch.Tensor:
    """Immerkaer's (1996) estimate of the Gaussian noise sigma of each grey image. ``(N,)``.

    ``sigma = sqrt(pi / 2) / (6 (W - 2) (H - 2)) * sum |I * M|`` with ``M`` the difference of two
    Laplacians, which cancels image structure of up to second order.
    """
    return _noise_gray(to_gray(x))


def brightness(x: torch.Tensor) -> torch.Tensor:
    """Mean grey level of each image. ``(N,)``."""
    return _brightness_gray(to_gray(x))


def contrast(x: torch.Tensor) -> torch.Tensor:
    """RMS contrast: standard deviation of the grey level of each image. ``(N,)``."""
    return _contrast_gray(to_gray(x))


def saturation(x: torch.Tensor) -> torch.Tensor:
    """Mean chroma (max - min over the RGB channels) of each 3-channel image: 0 for grey images. ``(N,)``."""
    x = _check_images(x)
    if x.shape[1] != 3:
        raise ValueError(f"Expected 3-channel images for `saturation`, but got {x.shape[1]} channel(s).")
    return (x.amax(dim=1) - x.amin(dim=1)).flatten(1).mean(dim=1)


_STAT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sharpness": sharpness,
    "noise": noise_level,
    "brightness": brightness,
    "contrast": contrast,
    "saturation": saturation,
}
_GRAY_STAT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {  # the same, from a grey image
    "sharpness": _sharpness_gray,
    "noise": _noise_gray,
    "brightness": _brightness_gray,
    "contrast": _contrast_gray,
}


def image_statistics(x: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The statistics ``names`` (default: all of :data:`STATISTICS`) of each image, as ``{name: (N,)}``.

    ``saturation`` is silently left out for images that do not have 3 channels. The grey image is
    computed once for all the statistics that use it (the same values as the single functions).
    """
    names = STATISTICS if names is None else tuple(names)
    bad = [n for n in names if n not in _STAT_FNS]
    if bad:
        raise ValueError(f"Expected `statistics` to be among {', '.join(map(repr, STATISTICS))}, but got {bad}.")
    x = _check_images(x)
    gray: torch.Tensor | None = None  # converted once, on the first statistic that reads it
    out = {}
    for n in names:
        if n in _GRAY_STAT_FNS:
            if gray is None:
                gray = to_gray(x)
            out[n] = _GRAY_STAT_FNS[n](gray)
        elif x.shape[1] == 3:
            out[n] = _STAT_FNS[n](x)
    return out


# ------------------------------------------------------------------------------------- normalisation
def is_image_batch(x: object) -> TypeGuard[torch.Tensor]:
    """Whether ``x`` is a batch of images these statistics can measure: ``(N, C, H, W)`` with 1 or 3
    channels and at least 3x3 pixels.

    Example:
        >>> is_image_batch(torch.zeros(2, 3, 8, 8)), is_image_batch(torch.zeros(2, 8))
        (True, False)
    """
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] in (1, 3) and min(x.shape[-2:]) >= 3


def _channel_view(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def unnormalize(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """Inputs as they were before ``(x - mean) / std`` (one value, or one per channel), as floats; ``x``
    itself (detached) when ``mean`` / ``std`` are not known.

    Example:
        >>> unnormalize(torch.zeros(1, 1, 1, 1), [0.5], [0.25]).item()
        0.5
    """
    x = x.detach().float()
    if mean is None or std is None:
        return x
    return x * _channel_view(std, x) + _channel_view(mean, x)


def normalize(raw: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """``(raw - mean) / std`` per channel, the inverse of :func:`unnormalize`; ``raw`` when they are not known.

    Example:
        >>> normalize(torch.full((1, 1, 1, 1), 0.5), [0.5], [0.25]).item()
        0.0
    """
    if mean is None or std is None:
        return raw
    return (raw - _channel_view(mean, raw)) / _channel_view(std, raw)


# ------------------------------------------------------------------------------------- perturbations
def gaussian_kernel1d(sigma: float, *, radius: int | None = None) -> torch.Tensor:
    """A normalised 1-D Gaussian of standard deviation ``sigma`` pixels (radius ``ceil(3 sigma)``)."""
    if sigma <= 0:
        raise ValueError(f"Expected `sigma` to be positive, but got {sigma!r}.")
    radius = max(1, math.ceil(3.0 * sigma)) if radius is None else radius
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _weighted_shifts(padded: torch.Tensor, k: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """``sum_t k[t] * padded[t : t + size]`` along ``dim``: a 1-D filter in elementwise operations only
    (a product, then a sum: a fused multiply-add could round differently in vectorised and scalar loops)."""
    out = padded.narrow(dim, 0, size) * float(k[0])
    for t in range(1, k.numel()):
        out += padded.narrow(dim, t, size) * float(k[t])
    return out


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur each channel with a separable Gaussian of ``sigma`` pixels (replicate padding); 0 = copy.

    The two passes are weighted sums of shifted copies, not convolutions: elementwise work gives every
    image the same bits whatever batch it is in (CPU convolution kernels change with the batch size), at
    about the convolution's speed for these short kernels.
    """
    if sigma < 0 or math.isnan(sigma):
        raise ValueError(f"Expected the blur `sigma` to be >= 0, but got {sigma!r}.")
    x = _check_images(x)
    if sigma == 0:
        return x.clone()
    k = gaussian_kernel1d(sigma).to(torch.float64)  # weights as Python floats: the same in every dtype
    r = k.numel() // 2
    h, w = x.shape[-2:]
    out = _weighted_shifts(F.pad(x, (r, r, 0, 0), mode="replicate"), k, w, 3)
    return _weighted_shifts(F.pad(out, (0, 0, r, r), mode="replicate"), k, h, 2)


def gaussian_noise(x: torch.Tensor, std: float, *, generator: torch.Generator) -> torch.Tensor:
    """``x`` plus i.i.d. Gaussian noise of standard deviation ``std`` drawn from ``generator`` (on CPU).

    The global RNG is never used: pass :func:`lightning_introspect._torch.guards.private_generator`.
    """
    if std < 0 or math.isnan(std):
        raise ValueError(f"Expected the noise `std` to be >= 0, but got {std!r}.")
    x = _check_images(x)
    noise = torch.empty(x.shape, dtype=x.dtype, device=generator.device)
    for image in noise:  # image after image: a chunk of a batch draws what the whole batch would for it
        image.normal_(generator=generator)
    return x + std * noise.to(x.device)


def color_filter(x: torch.Tensor, strength: float) -> torch.Tensor:
    """A faded "Instagram-like" filter of ``strength`` in [0, 1] (0 = copy).

    The contrast of each image shrinks towards its mean by ``strength`` (``1`` = flat image); for RGB
    the colours are also desaturated towards grey by ``strength`` and shifted warm (red up, blue down)
    by ``0.1 * strength`` of the image's value range.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"Expected the colour filter `strength` to be in [0, 1], but got {strength!r}.")
    x = _check_images(x)
    if strength == 0:
        return x.clone()
    out = x
    if x.shape[1] == 3:
        gray = to_gray(x)
        out = (1.0 - strength) * out + strength * gray
    # each image's mean on its own: a reduction over a batch may split an image's sum differently
    mean = torch.stack([image.mean() for image in out]).view(-1, 1, 1, 1)
    out = mean + (1.0 - strength) * (out - mean)
    if x.shape[1] == 3:
        span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1)
        cast = torch.tensor([1.0, 0.0, -1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        out = out + 0.1 * strength * span * cast
    return out


def perturb(x: torch.Tensor, kind: str, strength: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply one perturbation: ``"blur"`` (sigma px), ``"noise"`` (std, needs ``generator``) or ``"color"``."""
    if kind == "blur":
        return gaussian_blur(x, strength)
    if kind == "noise":
        if generator is None:
            raise ValueError("The 'noise' perturbation needs a private `generator`.")
        return gaussian_noise(x, strength, generator=generator)
    if kind == "color":
        return color_filter(x, strength)
    raise ValueError(f"Expected `perturbations` entries to be one of {', '.join(map(repr, PERTURBATIONS))}, but got {kind!r}.")


# --------------------------------------------------------------------------------- error analysis
@dataclass
class BinnedErrors:
    """Error rate by quantile bin of one statistic.

    Attributes:
        edges: ``len(counts) + 1`` bin edges (quantiles; tied quantiles are merged, so there may be
            fewer bins than asked for).
        counts: samples per bin.
        errors: wrong predictions per bin.
        rate: ``errors / counts`` per bin (``None`` for an empty bin).
    """

    edges: list[float]
    counts: list[int]
    errors: list[int]
    rate: list[float | None]


def _quantile_bins(values: torch.Tensor, num_bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(edges, bin index of each value, finite mask)``: ``num_bins`` quantile bins of the finite values (tied
    quantiles merged); ``edges`` is empty when no value is finite."""
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"Expected `num_bins` to be a positive int, but got {num_bins!r}.")
    v = values.detach().flatten().double().cpu()
    keep = torch.isfinite(v)
    v = v[keep]
    if v.numel() == 0:
        return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.long), keep
    q = torch.quantile(v, torch.linspace(0, 1, num_bins + 1, dtype=torch.float64))
    edges = torch.unique(q)  # sorted; ties merged
    if edges.numel() == 1:
        edges = torch.cat([edges, edges])
    return edges, torch.bucketize(v, edges[1:-1], right=True), keep


def error_rate_by_bin(values: torch.Tensor, wrong: torch.Tensor, *, num_bins: int = 5) -> BinnedErrors:
    """Split ``values`` into ``num_bins`` quantile bins and report the error rate of each.

    Bin ``i`` holds ``edges[i] <= v < edges[i + 1]`` (the last bin includes its upper edge).

    Example:
        >>> v = torch.arange(10.0)
        >>> b = error_rate_by_bin(v, v < 3, num_bins=2)
        >>> b.counts, b.rate
        ([5, 5], [0.6, 0.0])
    """
    w = wrong.detach().flatten().bool().cpu()
    if values.numel() != w.numel():
        raise ValueError(f"Expected `values` and `wrong` to have the same length, but got {values.numel()} and {w.numel()}.")
    edges, idx, keep = _quantile_bins(values, num_bins)
    if edges.numel() == 0:
        return BinnedErrors(edges=[], counts=[], errors=[], rate=[])
    nb = edges.numel() - 1
    counts = torch.bincount(idx, minlength=nb)
    errors = torch.bincount(idx, weights=w[keep].double(), minlength=nb).round().long()
    rate = [None if int(c) == 0 else float(e) / float(c) for c, e in zip(counts, errors)]
    return BinnedErrors(edges=edges.tolist(), counts=counts.tolist(), errors=errors.tolist(), rate=rate)


@dataclass
class BinnedMeans:
    """The mean of a per-sample score (e.g. an image's mean IoU) by quantile bin of one statistic.

    Attributes:
        edges: ``len(counts) + 1`` bin edges (quantiles of the statistic; tied quantiles merged).
        counts: samples per bin.
        mean: the mean score per bin (``None`` for an empty bin).
    """

    edges: list[float]
    counts: list[int]
    mean: list[float | None]


def mean_by_bin(values: torch.Tensor, scores: torch.Tensor, *, num_bins: int = 5) -> BinnedMeans:
    """Split ``values`` into ``num_bins`` quantile bins (as :func:`error_rate_by_bin`) and report the mean of
    ``scores`` in each; samples whose value or score is not finite are left out.

    Example:
        >>> v = torch.arange(10.0)
        >>> b = mean_by_bin(v, (v >= 5).float(), num_bins=2)
        >>> b.counts, b.mean
        ([5, 5], [0.0, 1.0])
    """
    s = scores.detach().flatten().double().cpu()
    if values.numel() != s.numel():
        raise ValueError(f"Expected `values` and `scores` to have the same length, but got {values.numel()} and {s.numel()}.")
    finite = torch.isfinite(s)
    edges, idx, keep = _quantile_bins(values.detach().flatten().double().cpu()[finite], num_bins)
    if edges.numel() == 0:
        return BinnedMeans(edges=[], counts=[], mean=[])
    nb = edges.numel() - 1
    counts = torch.bincount(idx, minlength=nb)
    sums = torch.bincount(idx, weights=s[finite][keep], minlength=nb)
    mean = [None if int(c) == 0 else float(t) / float(c) for c, t in zip(counts, sums)]
    return BinnedMeans(edges=edges.tolist(), counts=counts.tolist(), mean=mean)


def per_class_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float | None]:
    """Accuracy (recall) of each class; ``None`` for a class with no samples."""
    pred, target = pred.flatten().long().cpu(), target.flatten().long().cpu()
    total = torch.bincount(target, minlength=num_classes)[:num_classes]
    right = torch.bincount(target[pred == target], minlength=num_classes)[:num_classes]
    return [None if int(t) == 0 else float(r) / float(t) for r, t in zip(right, total)]


@dataclass
class PerturbationResult:
    """Accuracy under one perturbation at each strength.

    Attributes:
        kind: ``"blur"``, ``"noise"`` or ``"color"``.
        strengths: the strengths, ``0.0`` (clean) first.
        accuracy: overall accuracy at each strength.
        per_class: per strength, one accuracy per class (``None``: no sample of that class).
    """

    kind: str
    strengths: list[float]
    accuracy: list[float]
    per_class: list[list[float | None]]


#: a chunk of the perturbation test holds about this many copies of its images: the perturbed copy, the
#: blur's padded copies and the model's activations (a small CNN's forward pass makes ~8 input sizes)
PERTURBATION_FACTOR = 16


def perturbation_batch_size(x: torch.Tensor, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Images of ``x`` perturbed and classified together within ``memory_budget`` bytes
    (:data:`PERTURBATION_FACTOR` copies of an image each); every image at once when they fit.

    Example:
        >>> perturbation_batch_size(torch.zeros(512, 1, 32, 32)), perturbation_batch_size(torch.zeros(64, 3, 384, 384))
        (512, 3)
    """
    row = x[:1].numel() * x.element_size()
    return min(max(1, int(x.shape[0])), rows_per_chunk(PERTURBATION_FACTOR * row, memory_budget))


def perturbed_chunks(x: torch.Tensor, kind: str, strength: float, *, seed: int, rows: int) -> Iterator[torch.Tensor]:
    """``x`` under one perturbation, ``rows`` images at a time, in order. The noise comes from one private
    generator seeded with ``seed``, drawn image by image: the images are the same whatever ``rows``.

    Example:
        >>> x = torch.rand(5, 1, 4, 4)
        >>> whole = next(perturbed_chunks(x, "noise", 0.5, seed=0, rows=5))
        >>> torch.equal(torch.cat(list(perturbed_chunks(x, "noise", 0.5, seed=0, rows=2))), whole)
        True
    """
    gen = torch.Generator().manual_seed(int(seed)) if kind == "noise" else None
    for part in chunk_slices(int(x.shape[0]), rows):
        yield perturb(x[part], kind, strength, generator=gen)


def _sweep(
    score: Callable[[Iterable[torch.Tensor]], Any], x: torch.Tensor, strengths: Mapping[str, Sequence[float]], *, seed: int,
    noise_scale: float, rows: int,
) -> dict[str, list[tuple[float, Any]]]:
    """:func:`perturbation_sweep` with ``score`` given the images as chunks of ``rows``."""
    clean = score(x[part] for part in chunk_slices(int(x.shape[0]), rows))
    out: dict[str, list[tuple[float, Any]]] = {}
    for kind, values in strengths.items():
        results = [(0.0, clean)]
        for s in sorted({float(v) for v in values if float(v) != 0.0}):
            strength = s * noise_scale if kind == "noise" else s
            results.append((s, score(perturbed_chunks(x, kind, strength, seed=seed, rows=rows))))
        out[kind] = results
    return out


@torch.no_grad()
def perturbation_accuracy(
    predict: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    strengths: Mapping[str, Sequence[float]],
    seed: int = 0,
    noise_scale: float = 1.0,
    batch_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> dict[str, PerturbationResult]:
    """Per-class accuracy of ``predict`` (inputs -> logits ``(N, C)``) under each perturbation and strength.

    The images are perturbed and classified ``batch_size`` at a time, so the memory held at once is one
    chunk's, not every perturbed image's; the results do not depend on the chunk size (the perturbations
    work image by image, see the module docstring).

    Args:
        predict: the model; called on chunks of ``batch_size`` perturbed inputs (on ``x``'s device).
        x: ``(N, C, H, W)`` inputs; ``y``: ``(N,)`` labels.
        num_classes: number of classes.
        strengths: ``{kind: [strength, ...]}``; the clean accuracy (strength 0) is always included.
        seed: seed of the private generator of the noise (the same noise at every call).
        noise_scale: noise strengths are multiplied by it (e.g. the inputs' standard deviation, so a
            strength is a fraction of the data's spread).
        batch_size: images per chunk; ``None``: :func:`perturbation_batch_size` of ``memory_budget``.
        memory_budget: bytes one chunk may hold (when ``batch_size`` is ``None``).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> res = perturbation_accuracy(net, torch.rand(8, 1, 4, 4), torch.zeros(8, dtype=torch.long),
        ...                             num_classes=2, strengths={"blur": [1.0]})
        >>> res["blur"].strengths
        [0.0, 1.0]
    """
    x = _check_images(x, "x")
    y = y.flatten().long()
    if y.numel() != x.shape[0]:
        raise ValueError(f"Expected one label per input, but got {y.numel()} labels for {x.shape[0]} inputs.")
    rows = perturbation_batch_size(x, memory_budget) if batch_size is None else int(batch_size)
    if rows < 1:
        raise ValueError(f"Expected `batch_size` to be None or a positive int, but got {batch_size!r}.")

    def accuracy_of(chunks: Iterable[torch.Tensor]) -> tuple[float, list[float | None]]:
        preds = []
        for inputs in chunks:
            logits = predict(inputs)
            preds.append(logits.detach().float().reshape(logits.shape[0], -1).argmax(dim=1).cpu())
        pred = torch.cat(preds)
        return float((pred == y.cpu()).float().mean()), per_class_accuracy(pred, y, num_classes)

    bad = [k for k in strengths if k not in PERTURBATIONS]
    if bad:
        raise ValueError(f"Expected `perturbations` entries to be among {', '.join(map(repr, PERTURBATIONS))}, but got {bad}.")
    return {
        kind: PerturbationResult(kind=kind, strengths=[s for s, _ in rows_], accuracy=[r[0] for _, r in rows_], per_class=[r[1] for _, r in rows_])
        for kind, rows_ in _sweep(accuracy_of, x, strengths, seed=seed, noise_scale=noise_scale, rows=rows).items()
    }


def perturbation_sweep(
    score: Callable[[torch.Tensor], Any], x: torch.Tensor, strengths: Mapping[str, Sequence[float]], *, seed: int, noise_scale: float
) -> dict[str, list[tuple[float, Any]]]:
    """``score`` of the clean ``x`` and of ``x`` under each perturbation kind at each non-zero strength
    (ascending; strength 0 is the clean score, computed once): ``{kind: [(strength, score), ...]}``.

    Every strength draws its noise from a private generator seeded with ``seed`` (the same noise pattern
    at every strength, and at every call: results compare across epochs); ``noise`` strengths are
    multiplied by ``noise_scale``. ``score`` gets every image at once (the images
    :func:`perturbation_accuracy` classifies in chunks).

    Example:
        >>> sweep = perturbation_sweep(lambda t: float(t.std()), torch.ones(1, 1, 4, 4), {"noise": [0.5]}, seed=0, noise_scale=1.0)
        >>> [s for s, _ in sweep["noise"]], sweep["noise"][0][1]
        ([0.0, 0.5], 0.0)
    """
    return _sweep(lambda chunks: score(torch.cat(list(chunks))), x, strengths, seed=seed, noise_scale=noise_scale,
                  rows=max(1, int(x.shape[0])))
