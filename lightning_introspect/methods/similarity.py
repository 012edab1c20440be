"""How similar two batches of attribution maps are, sample by sample.

Metrics (:data:`METRICS`): the Spearman rank correlation of ``|map|`` (``"spearman_abs"``) and of the
signed map (``"spearman"``), and SSIM of the max-normalised ``|map|`` (``"ssim"``).

Conventions: maps of shape ``(N, C, H, W)`` are reduced over channels first (``sum |map|`` for the
absolute metrics, ``sum map`` for the signed one); ``(N, H, W)`` and ``(N, D)`` maps are used as they
are. The rank correlation of a constant map (an all-zero Grad-CAM after randomisation, for example) is
undefined; it is defined here as **0** ("no rank information shared"), never NaN. SSIM is computed on
``|map|`` divided by its maximum (data range 1, a Gaussian window of 11 pixels and sigma 1.5, shrunk for
maps smaller than that); two all-zero maps have SSIM 1; SSIM is skipped for maps that are not images.

Ranks come from ``scipy.stats.rankdata`` (ties share their mean rank). SSIM is torchmetrics' definition
(``structural_similarity_index_measure`` with ``data_range=1.0``, ``reduction="none"``; the tests check
agreement to 1e-5, shrunk windows included) computed here rather than called: the separable window
applied as two small matrix products, and the moments of a map shared by many pairs (the trained model's
map, compared with every randomised one) computed once, make it 5x to 12x faster than torchmetrics'
grouped convolution on CPU for 64 maps of 64x64 and 16 maps of 224x224 (``benchmarks/bench_similarity.py``).

Example:
    >>> import torch
    >>> a = torch.rand(3, 12, 12)
    >>> round(float(spearman_similarity(a, 2 * a).mean()), 4), round(float(ssim_similarity(a, a).mean()), 4)
    (1.0, 1.0)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from lightning_introspect._torch.memory import release_free_memory
from lightning_introspect.methods.chunks import DEFAULT_MEMORY_BUDGET

METRICS: tuple[str, ...] = ("spearman_abs", "spearman", "ssim")

_SSIM_K1, _SSIM_K2 = 0.01, 0.03
_BAND_LIMIT = 96  # up to this side, the Gaussian window is applied as a (reflect-padded) band matrix product

_Ranks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_Moments = tuple[torch.Tensor, torch.Tensor]


def check_metrics(metrics: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``metrics`` is a non-empty list of names from :data:`METRICS`."""
    if isinstance(metrics, str) or not metrics:
        raise ValueError(f"Expected `metrics` to be a non-empty list of {', '.join(repr(m) for m in METRICS)}, but got {metrics!r}.")
    for metric in metrics:
        if metric not in METRICS:
            raise ValueError(f"Expected every entry of `metrics` to be one of {', '.join(repr(m) for m in METRICS)}, but got {metric!r}.")


def _reduce_channels(maps: torch.Tensor, *, absolute: bool) -> torch.Tensor:
    maps = torch.nan_to_num(maps.detach().float())
    if maps.ndim < 2:
        raise ValueError(f"Expected attribution maps with a batch dimension, (N, ...), but got shape {tuple(maps.shape)}.")
    if maps.ndim == 4:  # (N, C, H, W): channel-reduce like the paper
        return maps.abs().sum(1) if absolute else maps.sum(1)
    return maps.abs() if absolute else maps


#: bytes of working memory per element of a channel-reduced map in one pass: measured at 3x384x384, SSIM holds
#: about 120 (its moments, their blur and the SSIM expression, float32 and float64 side by side), Spearman about 90
BYTES_PER_ELEMENT = 128

#: map elements (channels reduced) a side measured in one pass, so that one pass stays within the memory budget
DEFAULT_ELEMENTS = DEFAULT_MEMORY_BUDGET // BYTES_PER_ELEMENT


def reduced_elements(maps: torch.Tensor) -> int:
    """The elements of ``maps`` once channels are reduced: what one pass's working memory grows with.

    Example:
        >>> reduced_elements(torch.zeros(2, 3, 8, 8)), reduced_elements(torch.zeros(2, 5))
        (128, 10)
    """
    return maps.numel() // maps.shape[1] if maps.ndim == 4 and maps.shape[1] else maps.numel()


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"Expected two batches of maps of the same shape, but got {tuple(a.shape)} and {tuple(b.shape)}.")


# ------------------------------------------------------------------------------------ Spearman
def _centred_ranks(x: torch.Tensor) -> _Ranks:
    """``(ranks - mean rank, their norm, constant-row flag)`` of ``(N, D)`` values (float64, CPU)."""
    x = x.detach().cpu().double()
    constant = x.amax(1) == x.amin(1) if x.shape[1] else torch.ones(x.shape[0], dtype=torch.bool)
    ranks = torch.from_numpy(rankdata(x.numpy(), method="average", axis=1)).reshape(x.shape)
    ranks = ranks - ranks.mean(1, keepdim=True)
    return ranks, ranks.pow(2).sum(1).sqrt(), constant


def _rank_correlation(a: _Ranks, b: _Ranks) -> torch.Tensor:
    """Spearman correlation of matching rows of two :func:`_centred_ranks` results; 0 for a constant row."""
    (ra, na, ca), (rb, nb, cb) = a, b
    rho = (ra * rb).sum(1) / (na * nb).clamp_min(1e-300)
    dead = ca | cb | (ra.shape[1] < 2)
    return torch.nan_to_num(rho, nan=0.0).clamp(-1.0, 1.0).masked_fill(dead, 0.0)


def spearman_similarity(a: torch.Tensor, b: torch.Tensor, *, absolute: bool = True) -> torch.Tensor:
    """Per-sample Spearman rank correlation between two batches of maps: ``(N,)``.

    The Pearson correlation of the ranks, ties given their mean rank (as ``scipy.stats.spearmanr``),
    vectorised over the batch. A constant map (zero variance) has no ranks to correlate: its
    correlation is defined as 0, never NaN.

    Args:
        a: maps ``(N, ...)``.
        b: maps of the same shape.
        absolute: rank ``|map|`` (channels summed) instead of the signed map.

    Example:
        >>> a = torch.arange(8.0).view(2, 4)
        >>> spearman_similarity(a, a ** 2).round(decimals=4).tolist(), spearman_similarity(a, torch.zeros(2, 4)).tolist()
        ([1.0, 1.0], [0.0, 0.0])
    """
    _check_pair(a, b)
    x = _centred_ranks(_reduce_channels(a, absolute=absolute).flatten(1))
    y = _centred_ranks(_reduce_channels(b, absolute=absolute).flatten(1))
    return _rank_correlation(x, y).float()


# ---------------------------------------------------------------------------------------- SSIM
@functools.lru_cache(maxsize=16)
def _gaussian_1d(sigma: float) -> torch.Tensor:
    """torchmetrics' SSIM window: ``int(3.5 sigma + 0.5) * 2 + 1`` taps, normalised (float32)."""
    size = int(3.5 * sigma + 0.5) * 2 + 1
    dist = torch.arange((1 - size) / 2, (1 + size) / 2, 1, dtype=torch.float32)
    gauss = torch.exp(-torch.pow(dist / sigma, 2) / 2)
    return gauss / gauss.sum()


@functools.lru_cache(maxsize=16)
def _band(n: int, sigma: float) -> torch.Tensor:
    """``(n, n)`` matrix ``B`` with ``B @ x`` = the Gaussian window filtered along ``x``'s rows, reflect-padded."""
    g = _gaussian_1d(sigma)
    pad = (g.numel() - 1) // 2
    rows = torch.arange(n)
    band = torch.zeros(n, n, dtype=g.dtype)
    for t in range(g.numel()):
        cols = rows + t - pad
        cols = torch.where(cols < 0, -cols, cols)
        cols = torch.where(cols > n - 1, 2 * (n - 1) - cols, cols)
        band.index_put_((rows, cols), g[t].expand(n), accumulate=True)
    return band


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(M, H, W)`` images filtered with the separable Gaussian window (reflect padding, same size)."""
    h, w = x.shape[-2:]
    if max(h, w) <= _BAND_LIMIT:  # two small matrix products beat a 1-channel convolution by ~15x on CPU
        return _band(h, sigma) @ x @ _band(w, sigma).T
    g = _gaussian_1d(sigma)
    pad = (g.numel() - 1) // 2
    m = x.shape[0]
    y = F.pad(x.unsqueeze(0), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, g.view(1, 1, -1, 1).expand(m, 1, -1, 1), groups=m)
    return F.conv2d(y, g.view(1, 1, 1, -1).expand(m, 1, 1, -1), groups=m).squeeze(0)


def _ssim_moments(x: torch.Tensor, sigma: float) -> _Moments:
    """Local mean and local mean of squares of ``(N, H, W)`` images."""
    mu, sq = _gaussian_blur(torch.cat([x, x * x]), sigma).split(x.shape[0])
    return mu, sq


def _ssim_pairs(x: torch.Tensor, mx: _Moments, y: torch.Tensor, my: _Moments, sigma: float) -> torch.Tensor:
    """Mean SSIM of matching ``(N, H, W)`` images in [0, 1] given their :func:`_ssim_moments`: torchmetrics'
    definition (data range 1, reflect padding, every pixel averaged)."""
    (mu_x, sq_x), (mu_y, sq_y) = mx, my
    xy = _gaussian_blur(x * y, sigma)
    mu_xx, mu_yy, mu_xy = mu_x.pow(2), mu_y.pow(2), mu_x * mu_y
    var_x = (sq_x - mu_xx).clamp_min(0.0)
    var_y = (sq_y - mu_yy).clamp_min(0.0)
    cov = xy - mu_xy
    c1, c2 = _SSIM_K1**2, _SSIM_K2**2
    ssim = ((2 * mu_xy + c1) * (2 * cov + c2)) / ((mu_xx + mu_yy + c1) * (var_x + var_y + c2))
    return torch.nan_to_num(ssim.flatten(1).mean(1).float(), nan=0.0)


def _ssim_input(maps: torch.Tensor) -> torch.Tensor | None:
    """``|map|`` (channels summed) divided by its maximum, ``(N, H, W)`` float32 CPU; ``None`` if not an image."""
    x = _reduce_channels(maps, absolute=True)
    if x.ndim != 3 or min(x.shape[-2:]) < 3:
        return None
    return (x / x.flatten(1).amax(1).clamp_min(1e-30).view(-1, 1, 1)).cpu()


def ssim_sigma(shape: Sequence[int]) -> float:
    """The window's sigma for maps of this shape (``(..., H, W)``): 11 pixels and sigma 1.5, shrunk (sigma
    alike) to the largest odd size that fits; torchmetrics derives the same window size from this sigma.

    Example:
        >>> ssim_sigma((4, 32, 32)), ssim_sigma((4, 5, 8))
        (1.5, 0.6818181818181818)
    """
    size = min(11, min(shape[-2:]))
    size = size if size % 2 == 1 else size - 1
    return 1.5 * size / 11.0


def ssim_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Per-sample SSIM of the max-normalised ``|map|``: ``(N,)``; ``None`` when the maps are not images.

    The values of ``torchmetrics.functional.structural_similarity_index_measure(x, y, sigma=ssim_sigma(x.shape),
    data_range=1.0, reduction="none")`` on the normalised maps: an 11-pixel Gaussian window of sigma 1.5,
    reflect padding, the mean over all pixels; the window shrunk to the largest odd size that fits smaller
    maps (sigma scaled alike); maps under 3x3 pixels get ``None``. Two all-zero maps have SSIM 1.

    Args:
        a: maps ``(N, H, W)`` or ``(N, C, H, W)`` (channels summed after ``abs``).
        b: maps of the same shape.

    Example:
        >>> a = torch.rand(2, 16, 16)
        >>> torch.allclose(ssim_similarity(a, a), torch.ones(2))
        True
    """
    _check_pair(a, b)
    x, y = _ssim_input(a), _ssim_input(b)
    if x is None or y is None:
        return None
    sigma = ssim_sigma(x.shape)
    return _ssim_pairs(x, _ssim_moments(x, sigma), y, _ssim_moments(y, sigma), sigma)


# ------------------------------------------------------------------------------------ batching
def map_similarity(a: torch.Tensor, b: torch.Tensor, metrics: Sequence[str] = METRICS) -> dict[str, torch.Tensor]:
    """Per-sample similarity of two batches of maps for each metric in ``metrics``: ``{metric: (N,)}``.

    ``"ssim"`` is left out when the maps are not images (see :func:`ssim_similarity`).

    Example:
        >>> a = torch.rand(3, 12, 12)
        >>> {k: v.shape for k, v in map_similarity(a, a).items()}
        {'spearman_abs': torch.Size([3]), 'spearman': torch.Size([3]), 'ssim': torch.Size([3])}
        >>> sorted(map_similarity(torch.rand(3, 10), torch.rand(3, 10)))  # not images: no SSIM
        ['spearman', 'spearman_abs']
    """
    return map_similarities([(a, b)], metrics)[0]


def map_similarities(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], metrics: Sequence[str] = METRICS, *, budget: int = DEFAULT_ELEMENTS
) -> list[dict[str, torch.Tensor]]:
    """:func:`map_similarity` of many ``(a, b)`` pairs in a few batched passes; the same per-sample values.

    Pairs of maps of one shape are measured together, at most ``budget`` elements of channel-reduced maps
    (:func:`reduced_elements`) a side per pass (a larger pair alone), so a pass holds about
    ``budget * BYTES_PER_ELEMENT`` bytes; an ``a`` tensor shared by several pairs (the same object) is ranked
    and filtered once.

    Example:
        >>> a = torch.rand(2, 8, 8)
        >>> [sorted(s) for s in map_similarities([(a, torch.rand(2, 8, 8)), (a, a)], ["spearman"])]
        [['spearman'], ['spearman']]
    """
    check_metrics(metrics)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (a, b) in enumerate(pairs):
        _check_pair(a, b)
        if a.ndim < 2:
            _reduce_channels(a, absolute=True)  # raises the shape error
        groups.setdefault(tuple(a.shape[1:]), []).append(i)
    # a pair larger than the budget is measured in slices of its samples (the metrics are per sample); the slices
    # of one `a` are made once, so pairs sharing it still share their slices
    slices: dict[tuple[int, int], torch.Tensor] = {}
    parts: list[list[dict[str, torch.Tensor]]] = [[] for _ in pairs]
    for indices in groups.values():
        chunk: list[tuple[torch.Tensor, torch.Tensor]] = []
        results: list[dict[str, torch.Tensor]] = []
        size = 0
        for i in indices:
            a, b = pairs[i]
            per_sample = max(1, reduced_elements(b[:1]))
            rows = max(1, budget // per_sample)
            for start in range(0, max(1, b.shape[0]), rows):
                if rows < b.shape[0]:
                    a_part = slices.setdefault((id(a), start), a[start : start + rows])
                    pair = (a_part, b[start : start + rows])
                else:
                    pair = (a, b)
                n = reduced_elements(pair[1])
                if chunk and size + n > budget:
                    _similarity_chunk(chunk, metrics, results)
                    release_free_memory()  # a full pass's working copies are free now
                    chunk, results, size = [], [], 0
                chunk.append(pair)
                results.append({})
                parts[i].append(results[-1])
                size += n
        _similarity_chunk(chunk, metrics, results)
    return [p[0] if len(p) == 1 else {m: torch.cat([q[m] for q in p]) for m in p[0]} for p in parts]


def _similarity_chunk(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], metrics: Sequence[str], out: list[dict[str, torch.Tensor]]) -> None:
    """Fill ``out[i]`` with the similarity of ``pairs[i]`` (maps of one shape), batched."""
    unique: dict[int, int] = {}
    firsts: list[torch.Tensor] = []
    for a, _ in pairs:
        if id(a) not in unique:
            unique[id(a)] = len(firsts)
            firsts.append(a)
    offsets = [0]
    for a in firsts:
        offsets.append(offsets[-1] + a.shape[0])
    a_rows = torch.cat([torch.arange(a.shape[0]) + offsets[unique[id(a)]] for a, _ in pairs])
    a_all = torch.cat(firsts)
    b_all = torch.cat([b for _, b in pairs])
    values: dict[str, torch.Tensor] = {}
    for metric in metrics:
        if metric in ("spearman_abs", "spearman"):
            absolute = metric == "spearman_abs"
            ra, na, ca = _centred_ranks(_reduce_channels(a_all, absolute=absolute).flatten(1))
            rb = _centred_ranks(_reduce_channels(b_all, absolute=absolute).flatten(1))
            values[metric] = _rank_correlation((ra[a_rows], na[a_rows], ca[a_rows]), rb).float()
        else:
            x, y = _ssim_input(a_all), _ssim_input(b_all)
            if x is None or y is None:
                continue
            sigma = ssim_sigma(x.shape)
            mu_x, sq_x = _ssim_moments(x, sigma)
            values[metric] = _ssim_pairs(x[a_rows], (mu_x[a_rows], sq_x[a_rows]), y, _ssim_moments(y, sigma), sigma)
    start = 0
    for (_, b), res in zip(pairs, out):
        k = b.shape[0]
        res.update({m: v[start : start + k] for m, v in values.items()})
        start += k


class PendingSimilarities:
    """Map pairs queued under keys and measured with :func:`map_similarities` in batches, flushed whenever
    ``budget`` elements of channel-reduced maps are waiting (memory stays bounded for large maps and many pairs).

    Example:
        >>> pending = PendingSimilarities(["spearman"])
        >>> a = torch.rand(2, 4, 4)
        >>> pending.add("same", a, a)
        >>> [(key, sims["spearman"].tolist()) for key, sims in pending.results()]
        [('same', [1.0, 1.0])]
    """

    def __init__(self, metrics: Sequence[str], budget: int = DEFAULT_ELEMENTS) -> None:
        check_metrics(metrics)
        self.metrics, self.budget = list(metrics), budget
        self.keys: list[Any] = []
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.size = 0
        self.done: list[tuple[Any, dict[str, torch.Tensor]]] = []

    def add(self, key: Any, a: torch.Tensor, b: torch.Tensor) -> None:
        """Queue the pair ``(a, b)`` under ``key`` (measured at the next flush)."""
        _check_pair(a, b)
        self.keys.append(key)
        self.pairs.append((a, b))
        self.size += reduced_elements(b)
        if self.size >= self.budget:
            self.flush()

    def flush(self) -> None:
        """Measure every queued pair now."""
        if self.pairs:
            self.done.extend(zip(self.keys, map_similarities(self.pairs, self.metrics, budget=self.budget)))
        self.keys, self.pairs, self.size = [], [], 0

    def results(self) -> list[tuple[Any, dict[str, torch.Tensor]]]:
        """``[(key, {metric: (N,)})]`` for every pair added, in order."""
        self.flush()
        return self.done


def mean_and_std(values: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, float]]:
    """The mean and the (population) standard deviation of each metric's per-sample values.

    Example:
        >>> mean_and_std({"spearman": torch.tensor([0.2, 0.4])})
        ({'spearman': 0.30000001192092896}, {'spearman': 0.10000000149011612})
    """
    means = {k: float(v.mean()) for k, v in values.items()}
    stds = {k: float(v.std(correction=0)) if v.numel() > 1 else 0.0 for k, v in values.items()}
    return means, stds


__all__ = [
    "METRICS",
    "PendingSimilarities",
    "check_metrics",
    "map_similarities",
    "map_similarity",
    "mean_and_std",
    "spearman_similarity",
    "ssim_sigma",
    "ssim_similarity",
]
