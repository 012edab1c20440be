"""Weight distributions on the tensors' own device, and how far weights have moved from initialisation.

Everything here is pure torch and works on many tensors at once (a whole model's parameters):

* :func:`histograms` bins every tensor over its own finite ``[min, max]`` range with ``bins`` equal
  bins. The binning runs on the tensor's device; only the counts, the edges and five summary numbers
  per tensor come back to the CPU, in one transfer per device and phase (no per-tensor sync).
  Non-finite values (NaN, +Inf, -Inf) are counted separately and never break the binning.
* :func:`drift` compares current tensors with a snapshot of their initial values: relative change
  ``||W - W0|| / ||W0||``, cosine distance ``1 - cos(W, W0)`` and the 1-D Wasserstein distance between
  the two value distributions (:func:`wasserstein_1d`, from their quantile functions).

The bin index is ``floor((x - min) * bins / (max - min))`` in the tensor's float precision (float32
for float32 and half-precision weights) on every device, so the counts equal
``numpy.histogram(values, bins, range=(min, max))`` except for a value within float rounding of an edge,
which may land in the neighbouring bin.

Example:
    >>> w = torch.tensor([0.0, 1.0, 1.0, 3.0, float("nan")])
    >>> h = histogram(w, bins=3)
    >>> h.counts.tolist(), h.edges.tolist(), h.nan
    ([1, 2, 1], [0.0, 1.0, 2.0, 3.0], 1)
    >>> d = drift({"fc": torch.ones(4) * 2}, {"fc": torch.ones(4)})["fc"]
    >>> round(d.relative_change, 6), round(d.cosine_distance, 6), round(d.wasserstein, 6)
    (1.0, 0.0, 1.0)
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "DriftStats",
    "HistogramStats",
    "cosine_distance",
    "drift",
    "histogram",
    "histograms",
    "relative_change",
    "wasserstein_1d",
]

DEFAULT_MAX_SAMPLES = 8192
_F32_MAX = float(torch.finfo(torch.float32).max)
_SMALL_NUMEL = 2048  # CPU tensors up to this size are binned together (per-call overhead dominates them)
_BATCH_NUMEL = 1 << 20  # values concatenated at most per batch of small tensors
_CHUNK = 1 << 18  # CPU binning works through tensors in chunks of 1 MiB of float32 (they stay in cache)


@dataclass(frozen=True)
class HistogramStats:
    """One tensor's histogram and summary, on the CPU.

    Attributes:
        counts: ``(bins,)`` int64 counts of the finite values.
        edges: ``(bins + 1,)`` float64 edges, evenly spaced over ``[min, max]`` of the finite values
            (``[v - 0.5, v + 0.5]`` when every finite value is ``v``, as numpy does; ``[0, 1]`` when
            there is no finite value).
        min, max: of the finite values (0.0 when there is none).
        num: number of finite values (``counts.sum()``).
        sum, sum_squares: of the finite values.
        nan, posinf, neginf: numbers of NaN, +Inf and -Inf values.
        numel: number of values in the tensor.
    """

    counts: torch.Tensor
    edges: torch.Tensor
    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    numel: int = 0

    @property
    def nonfinite(self) -> int:
        """NaN + Inf values."""
        return self.nan + self.posinf + self.neginf

    @property
    def mean(self) -> float:
        """Mean of the finite values (NaN when there is none)."""
        return self.sum / self.num if self.num else math.nan

    @property
    def std(self) -> float:
        """Population standard deviation of the finite values (NaN when there is none)."""
        if not self.num:
            return math.nan
        return math.sqrt(max(self.sum_squares / self.num - self.mean**2, 0.0))

    def summary(self) -> dict[str, float]:
        """Plain numbers for logs and checkpoints: min, max, mean, std, num, nonfinite."""
        return {
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "std": self.std,
            "num": float(self.num),
            "nonfinite": float(self.nonfinite),
        }


@dataclass(frozen=True)
class DriftStats:
    """How far one tensor moved from its initial value.

    Attributes:
        relative_change: ``||W - W0|| / ||W0||`` (``inf`` if ``W0`` is all zeros and ``W`` is not; 0 if both are).
        cosine_distance: ``1 - cos(W, W0)`` in ``[0, 2]`` (NaN if either is all zeros).
        wasserstein: 1-D Wasserstein-1 distance between the value distributions of ``W`` and ``W0``,
            in the units of the weights (see :func:`wasserstein_1d`).
        distance: ``||W - W0||``.
        norm, initial_norm: ``||W||`` and ``||W0||``.
    """

    relative_change: float
    cosine_distance: float
    wasserstein: float
    distance: float
    norm: float
    initial_norm: float


# ------------------------------------------------------------------------------------------ histograms
def _as_items(tensors: Mapping[Hashable, torch.Tensor] | Sequence[torch.Tensor]) -> list[tuple[Hashable, torch.Tensor]]:
    if isinstance(tensors, Mapping):
        items = list(tensors.items())
    elif isinstance(tensors, torch.Tensor):
        raise ValueError("Expected `tensors` to be a mapping or a sequence of tensors; use `histogram` for one tensor.")
    else:
        items = list(enumerate(tensors))
    for key, t in items:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"Expected every entry of `tensors` to be a tensor, but {key!r} is {type(t).__name__}.")
    return items


def _flat_float(t: torch.Tensor) -> torch.Tensor:
    """A detached flat floating view (copy only for non-float dtypes); float64 stays float64."""
    t = t.detach()
    if t.is_complex():
        raise ValueError("Histograms of complex tensors are not supported; pass `t.real` / `t.abs()`.")
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.reshape(-1)


def _bin_range(lo: float, hi: float) -> tuple[float, float]:
    if lo == hi:  # numpy's convention for a constant tensor
        if lo - 0.5 < lo < hi + 0.5:
            return lo - 0.5, hi + 0.5
        span = abs(lo) * 2.0**-20  # |v| > 2**52: v +- 0.5 == v, and a zero width would divide by zero
        return lo - span, hi + span
    return lo, hi


class _Workspace:
    """Reusable CPU scratch buffers, so binning many tensors allocates (and page-faults) once."""

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def get(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers.get(dtype)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype)
            self.buffers[dtype] = buf
        return buf[:n]


def _counts_by_sorting(idx: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of the integers ``0 .. bins-1`` in ``idx`` with deterministic kernels only (sort + searchsorted)."""
    ordered = idx.reshape(-1).sort().values
    bounds = torch.searchsorted(ordered, torch.arange(bins + 1, device=idx.device, dtype=ordered.dtype))
    return bounds.diff()


def _acc_dtype(device: torch.device) -> torch.dtype:
    """float64 for the few numbers that travel to the CPU, except where the device has none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _bin_counts(x: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    """int64 counts of the values of ``x`` (all finite, on an accelerator) in ``bins`` equal bins over ``[lo, hi]``.

    The bin index is ``floor((x - lo) * bins / (hi - lo))`` in the float precision of ``x`` (float32 for
    float32 / half weights), like ``torch.histc``. On the CPU, :func:`_cpu_counts` does the same.
    """
    if x.numel() == 0:
        return torch.zeros(bins, dtype=torch.int64, device=x.device)
    dtype = torch.float64 if _needs_float64(lo, hi) else x.dtype
    if dtype == torch.float64 and x.device.type == "mps":
        dtype = torch.float32
    if torch.are_deterministic_algorithms_enabled():  # histc / bincount on CUDA would raise
        pos = (x.to(dtype) - lo) * (bins / (hi - lo))
        return _counts_by_sorting(pos.to(torch.int64).clamp_(0, bins - 1), bins)
    return torch.histc(x.to(dtype), bins=bins, min=lo, max=hi).to(torch.int64)


def _cpu_counts(x: torch.Tensor, bins: int, lo: float, hi: float, work: _Workspace) -> tuple[torch.Tensor, float, float]:
    """CPU: the counts (as :func:`_bin_counts`), the sum and the sum of squares of ``x`` (all finite).

    ``x`` is read from memory once, in chunks of ``_CHUNK`` values: everything after the first pass over
    a chunk (its sums, the scaling, the cast, the bincount) runs on data that is still in the CPU cache.
    Per chunk: ``pos = (x - lo) * (bins / (hi - lo))`` into a reused buffer; values are >= lo, so the
    cast truncates to the floor (numpy's float -> uint8 cast, SIMD, about 3x faster than torch's
    ``copy_``); ``x == hi`` gives index ``bins``, folded into the last bin. Sums accumulate in float64.
    """
    n = x.numel()
    if n == 0:
        return torch.zeros(bins, dtype=torch.int64), 0.0, 0.0
    dtype = torch.float64 if _needs_float64(lo, hi) else x.dtype
    scale = bins / (hi - lo)
    counts = torch.zeros(bins + 1, dtype=torch.int64)
    total = squares = 0.0
    for start in range(0, n, _CHUNK):
        chunk = x[start : start + _CHUNK].to(dtype)
        m = chunk.numel()
        pos = work.get(m, dtype)
        torch.sub(chunk, lo, out=pos)
        total += float(chunk.sum())
        squares += float(torch.dot(chunk, chunk))
        pos.mul_(scale)
        if bins < 255:
            idx = work.get(m, torch.uint8)
            np.copyto(idx.numpy(), pos.numpy(), casting="unsafe")
        else:
            idx = pos.clamp_(0, bins).to(torch.int64)
        counts += torch.bincount(idx, minlength=bins + 1)[: bins + 1]
    counts[bins - 1] += counts[bins]
    return counts[:bins], total, squares


def _needs_float64(lo: float, hi: float) -> bool:
    """A float32 range whose width overflows would put everything in one bin (see :func:`_bin_counts`)."""
    return hi - lo > _F32_MAX or max(abs(lo), abs(hi)) > _F32_MAX / 4


def _small_cpu_batches(flats: Mapping[Hashable, torch.Tensor]) -> list[list[Hashable]]:
    """Keys of the small non-empty CPU tensors, grouped by dtype, in batches of at most ``_BATCH_NUMEL`` values."""
    groups: dict[torch.dtype, list[list[Hashable]]] = {}
    sizes: dict[torch.dtype, int] = {}
    for key, x in flats.items():
        if x.device.type != "cpu" or not 0 < x.numel() <= _SMALL_NUMEL:
            continue
        batches = groups.setdefault(x.dtype, [[]])
        if sizes.get(x.dtype, 0) + x.numel() > _BATCH_NUMEL:
            batches.append([])
            sizes[x.dtype] = 0
        batches[-1].append(key)
        sizes[x.dtype] = sizes.get(x.dtype, 0) + x.numel()
    return [batch for batches in groups.values() for batch in batches if batch]


def _batched_small(
    xs: Sequence[torch.Tensor], bins: int
) -> list[tuple[list[float], tuple[float, float], torch.Tensor] | None]:
    """Stats, range and counts of many small all-finite CPU tensors of one dtype with one op per step.

    Per tensor, the ~15 torch calls of the general path cost about 200 µs of overhead -- more than the
    binning of a few thousand values. Here the values are concatenated once and reduced per segment
    (``scatter_reduce`` / ``index_add_``); the bin index is the same float expression as in
    :func:`_cpu_counts`, so the counts are identical. ``None`` for a tensor with a non-finite value or
    an extreme range: the general path handles those.
    """
    k = len(xs)
    cat = torch.cat(list(xs))
    seg = torch.repeat_interleave(torch.arange(k), torch.tensor([x.numel() for x in xs]))
    finite = torch.isfinite(cat)
    bad = [False] * k
    if not bool(finite.all()):
        bad = (torch.bincount(seg[~finite], minlength=k) > 0).tolist()
        cat, seg = cat[finite], seg[finite]  # bad tensors keep some values; their results are discarded
    mins = torch.zeros(k, dtype=cat.dtype).scatter_reduce_(0, seg, cat, "amin", include_self=False)
    maxs = torch.zeros(k, dtype=cat.dtype).scatter_reduce_(0, seg, cat, "amax", include_self=False)
    wide = cat.double()  # may be `cat` itself: nothing in place
    sums = torch.zeros(k, dtype=torch.float64).index_add_(0, seg, wide)
    squares = torch.zeros(k, dtype=torch.float64).index_add_(0, seg, wide * wide)
    rows = torch.stack([mins.double(), maxs.double(), sums, squares], dim=1).tolist()

    ranges = [_bin_range(mn, mx) for mn, mx, _, _ in rows]
    for i, (lo, hi) in enumerate(ranges):
        bad[i] = bad[i] or (cat.dtype != torch.float64 and _needs_float64(lo, hi))
    lo_t = torch.tensor([lo for lo, _ in ranges], dtype=cat.dtype)
    scale_t = torch.tensor([bins / (hi - lo) for lo, hi in ranges], dtype=cat.dtype)
    pos = (cat - lo_t[seg]).mul_(scale_t[seg])
    idx = pos.to(torch.int64).clamp_(0, bins).add_(seg * (bins + 1))
    counts = torch.bincount(idx, minlength=k * (bins + 1)).reshape(k, bins + 1)
    counts[:, bins - 1] += counts[:, bins]
    counts = counts[:, :bins]
    return [None if bad[i] else (rows[i], ranges[i], counts[i]) for i in range(k)]


def histograms(
    tensors: Mapping[Hashable, torch.Tensor] | Sequence[torch.Tensor], *, bins: int = 32
) -> dict[Hashable, HistogramStats]:
    """Histograms of many tensors, each over its own finite value range, computed on their devices.

    Two phases, each ending in one small device-to-CPU transfer per device: (1) min, max, sum, sum of
    squares of every tensor; (2) the bin counts (on the CPU: counts, sum and sum of squares, in
    cache-sized chunks, so each value is read from memory twice in all). Tensors with a NaN or Inf
    value take a slower path (boolean masking) that counts them separately. Small CPU tensors (up to 2048 values: biases,
    norm layers) are concatenated and binned together, a few ops for all of them instead of ~15 each;
    their counts are the same, their sums are accumulated in float64.

    Args:
        tensors: a mapping ``key -> tensor`` or a sequence of tensors (keys are then 0, 1, ...).
            Any shape and floating / integer dtype; gradients are not tracked and nothing is modified.
        bins: number of equal-width bins.

    Returns:
        ``key -> HistogramStats`` in the order given.

    Example:
        >>> out = histograms({"a": torch.arange(4.0), "b": torch.zeros(3)}, bins=2)
        >>> out["a"].counts.tolist(), out["b"].edges.tolist()
        ([2, 2], [-0.5, 0.0, 0.5])
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"Expected `bins` to be a positive int, but got {bins!r}.")
    items = _as_items(tensors)
    flats = {key: _flat_float(t) for key, t in items}

    with torch.no_grad():
        stats: dict[Hashable, list[float]] = {}
        ranges: dict[Hashable, tuple[float, float]] = {}
        counts_out: dict[Hashable, torch.Tensor] = {}
        # small CPU tensors (biases, norms): a few batched ops instead of ~15 calls each
        for batch in _small_cpu_batches(flats):
            for key, done in zip(batch, _batched_small([flats[k] for k in batch], bins)):
                if done is not None:
                    stats[key], ranges[key], counts_out[key] = done

        # phase 1: min / max (NaN-propagating, so "finite min and max" means "all finite"), sum, sum of squares
        by_device: dict[torch.device, list[Hashable]] = {}
        for key, x in flats.items():
            if key not in counts_out:
                by_device.setdefault(x.device, []).append(key)
        for device, keys in by_device.items():
            on_cpu = device.type == "cpu"  # the CPU takes its sums in phase 2, while the values are in cache
            rows = []
            for key in keys:
                x = flats[key]
                if x.numel() == 0:
                    rows.append(torch.zeros(2 if on_cpu else 4, dtype=_acc_dtype(x.device), device=x.device))
                    continue
                mn, mx = torch.aminmax(x)
                parts = [mn, mx] if on_cpu else [mn, mx, x.sum(), torch.dot(x, x)]
                rows.append(torch.stack(parts).to(_acc_dtype(x.device)))
            for key, row in zip(keys, torch.stack(rows).cpu().double().tolist()):
                stats[key] = row + [0.0, 0.0] if on_cpu else row

        # non-finite tensors: count what is not finite, keep the finite values
        nonfinite: dict[Hashable, tuple[int, int, int]] = {}
        for key, (mn, mx, _, _) in list(stats.items()):
            if key in counts_out or (math.isfinite(mn) and math.isfinite(mx)):
                continue
            x = flats[key]
            finite_mask = torch.isfinite(x)
            counts = torch.stack([torch.isnan(x).sum(), (x == math.inf).sum(), (x == -math.inf).sum()])
            nonfinite[key] = tuple(int(v) for v in counts.tolist())  # type: ignore[assignment]
            finite = x[finite_mask]
            flats[key] = finite
            if finite.numel():
                fmn, fmx = torch.aminmax(finite)
                stats[key] = torch.stack([fmn, fmx, finite.sum(), torch.dot(finite, finite)]).cpu().double().tolist()
            else:
                stats[key] = [0.0, 0.0, 0.0, 0.0]

        # phase 2: the counts, on the device, one transfer per device
        for keys in by_device.values():
            for key in keys:
                mn, mx, _, _ = stats[key]
                ranges[key] = _bin_range(mn, mx) if flats[key].numel() else (0.0, 1.0)
        work = _Workspace()
        for device, keys in by_device.items():
            if device.type == "cpu":
                for key in keys:
                    counts_out[key], total, squares = _cpu_counts(flats[key], bins, *ranges[key], work)
                    stats[key][2:] = [total, squares]
                continue
            stacked = torch.stack([_bin_counts(flats[k], bins, *ranges[k]) for k in keys]).cpu()
            for key, row in zip(keys, stacked):
                counts_out[key] = row

    # every tensor's edges in one call (row i equals np.linspace(lo_i, hi_i, bins + 1) bit for bit)
    bounds = np.array([ranges[key] for key, _ in items], dtype=np.float64).reshape(-1, 2)
    all_edges = torch.from_numpy(np.linspace(bounds[:, 0], bounds[:, 1], bins + 1, axis=-1))
    out: dict[Hashable, HistogramStats] = {}
    for (key, t), edges in zip(items, all_edges):
        mn, mx, total, squares = stats[key]
        nan, posinf, neginf = nonfinite.get(key, (0, 0, 0))
        num = flats[key].numel()
        out[key] = HistogramStats(
            counts=counts_out[key],
            edges=edges,
            min=mn if num else 0.0,
            max=mx if num else 0.0,
            num=num,
            sum=total,
            sum_squares=squares,
            nan=nan,
            posinf=posinf,
            neginf=neginf,
            numel=t.numel(),
        )
    return out


def histogram(tensor: torch.Tensor, *, bins: int = 32) -> HistogramStats:
    """The histogram of one tensor (see :func:`histograms`).

    Example:
        >>> histogram(torch.tensor([0.0, 0.5, 1.0, float("inf")]), bins=2).counts.tolist()
        [1, 2]
    """
    return histograms([tensor], bins=bins)[0]


# ------------------------------------------------------------------------------------------------ drift
def _sample_index(numel: int, max_samples: int, seed: int) -> torch.Tensor | None:
    """Fixed random positions (with replacement) from a private generator; ``None``: use every value."""
    if numel <= max_samples:
        return None
    gen = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randint(numel, (max_samples,), generator=gen)


def _quantiles(sorted_values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated quantiles of an ascending 1-D tensor at ``levels`` in [0, 1]."""
    pos = levels * (sorted_values.numel() - 1)
    lo = pos.floor().long().clamp_(0, sorted_values.numel() - 1)
    hi = (lo + 1).clamp_(max=sorted_values.numel() - 1)
    frac = (pos - lo.to(pos.dtype)).to(sorted_values.dtype)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def _wasserstein_tensor(a: torch.Tensor, b: torch.Tensor, max_samples: int, seed: int) -> torch.Tensor:
    a = _flat_float(a)
    b = _flat_float(b).to(a.device, a.dtype)
    if a.numel() == 0 or b.numel() == 0:
        return torch.tensor(math.nan, device=a.device)
    if a.numel() == b.numel():
        # paired positions: the same elements of the current and the initial tensor
        idx = _sample_index(a.numel(), max_samples, seed)
        if idx is not None:
            idx = idx.to(a.device)
            a, b = a[idx], b[idx]
        return (a.sort().values - b.sort().values).abs().mean()
    ia = _sample_index(a.numel(), max_samples, seed)
    ib = _sample_index(b.numel(), max_samples, seed + 1)
    a = a if ia is None else a[ia.to(a.device)]
    b = b if ib is None else b[ib.to(b.device)]
    k = max(a.numel(), b.numel())
    levels = (torch.arange(k, device=a.device, dtype=_acc_dtype(a.device)) + 0.5) / k
    return (_quantiles(a.sort().values, levels) - _quantiles(b.sort().values, levels)).abs().mean()


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor, *, max_samples: int = DEFAULT_MAX_SAMPLES, seed: int = 0) -> float:
    """1-D Wasserstein-1 distance between the value distributions of ``a`` and ``b``.

    ``W1 = integral over q in (0, 1) of |Q_a(q) - Q_b(q)|`` with ``Q`` the quantile functions. For two
    tensors of the same size it is exactly ``mean(|sort(a) - sort(b)|)`` (what
    ``scipy.stats.wasserstein_distance`` returns); for different sizes both quantile functions are
    interpolated at ``max(len(a), len(b))`` mid-point levels. Tensors larger than ``max_samples`` are
    subsampled at fixed random positions (private generator, ``seed``); for equal sizes the same
    positions are used in both, so ``W1`` is 0 for identical tensors and small changes give small values.

    Example:
        >>> wasserstein_1d(torch.tensor([0.0, 1.0, 3.0]), torch.tensor([5.0, 6.0, 8.0]))
        5.0
    """
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"Expected `max_samples` to be a positive int, but got {max_samples!r}.")
    with torch.no_grad():
        return float(_wasserstein_tensor(a, b, max_samples, seed))


def _norms(w: torch.Tensor, w0: torch.Tensor) -> tuple[float, float, float]:
    a, b = _flat_float(w), _flat_float(w0).to(w.device)
    a, b = a.to(torch.promote_types(a.dtype, b.dtype)), b.to(torch.promote_types(a.dtype, b.dtype))
    vals = torch.stack([torch.linalg.vector_norm(a - b), torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)])
    d, n, n0 = vals.cpu().double().tolist()
    return d, n, n0


def _relative(d: float, n0: float) -> float:
    if n0 > 0:
        return d / n0
    return 0.0 if d == 0 else (math.inf if math.isfinite(d) else math.nan)


def _cosine_from_norms(d: float, n: float, n0: float) -> float:
    # 1 - cos = (||W - W0||^2 - (||W|| - ||W0||)^2) / (2 ||W|| ||W0||): exact algebra that keeps its
    # precision when W is close to W0 (1 - dot / (n * n0) would cancel catastrophically).
    if not (n > 0 and n0 > 0) or not all(math.isfinite(v) for v in (d, n, n0)):
        return math.nan
    return min(2.0, max(0.0, (d * d - (n - n0) ** 2) / (2.0 * n * n0)))


def relative_change(w: torch.Tensor, w0: torch.Tensor) -> float:
    """``||W - W0|| / ||W0||`` (Frobenius norms; ``inf`` if ``W0`` is all zeros and ``W`` is not).

    Example:
        >>> relative_change(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0]))
        1.3333333333333333
    """
    _check_same_shape(w, w0, "w")
    with torch.no_grad():
        d, _, n0 = _norms(w, w0)
    return _relative(d, n0)


def cosine_distance(w: torch.Tensor, w0: torch.Tensor) -> float:
    """``1 - cos(W, W0)`` over the flattened tensors, in ``[0, 2]`` (NaN if either is all zeros).

    Example:
        >>> round(cosine_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])), 6)
        1.0
    """
    _check_same_shape(w, w0, "w")
    with torch.no_grad():
        d, n, n0 = _norms(w, w0)
    return _cosine_from_norms(d, n, n0)


def _check_same_shape(w: torch.Tensor, w0: torch.Tensor, key: object) -> None:
    if tuple(w.shape) != tuple(w0.shape):
        raise ValueError(
            f"Expected the current and the initial tensor of {key!r} to have the same shape, "
            f"but got {tuple(w.shape)} and {tuple(w0.shape)}."
        )


def _key_seed(seed: int, key: Hashable) -> int:
    return int(seed) * 1_000_003 + zlib.crc32(repr(key).encode())


def drift(
    current: Mapping[Hashable, torch.Tensor],
    initial: Mapping[Hashable, torch.Tensor],
    *,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
) -> dict[Hashable, DriftStats]:
    """Relative change, cosine distance and Wasserstein distance of every tensor from its initial value.

    The initial tensors may live on the CPU: each is moved to its current tensor's device one at a time
    (so the extra device memory is one tensor), the maths runs there, and four numbers per tensor come
    back, in one transfer per device.

    Args:
        current: ``key -> current tensor`` (e.g. a layer's weight).
        initial: ``key -> initial tensor`` of the same shape; every key of ``current`` must be present.
        max_samples: values per tensor used for the Wasserstein distance (see :func:`wasserstein_1d`).
        seed: seed of the fixed sample positions (combined with each key).

    Returns:
        ``key -> DriftStats`` in the order of ``current``.

    Example:
        >>> w0 = {"fc": torch.tensor([1.0, 0.0])}
        >>> drift({"fc": torch.tensor([1.0, 0.0])}, w0)["fc"].relative_change
        0.0
    """
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"Expected `max_samples` to be a positive int, but got {max_samples!r}.")
    missing = [k for k in current if k not in initial]
    if missing:
        raise ValueError(f"Expected `initial` to hold every key of `current`, but it lacks {missing!r}.")
    for key, w in current.items():
        _check_same_shape(w, initial[key], key)

    raw: dict[Hashable, list[float]] = {}
    by_device: dict[torch.device, list[Hashable]] = {}
    for key, w in current.items():
        by_device.setdefault(w.device, []).append(key)
    with torch.no_grad():
        for device, keys in by_device.items():
            rows = []
            for key in keys:
                a = _flat_float(current[key])
                b = _flat_float(initial[key]).to(device, non_blocking=True)
                dtype = torch.promote_types(a.dtype, b.dtype)
                a, b = a.to(dtype), b.to(dtype)
                if a.numel() == 0:
                    rows.append(torch.zeros(4, dtype=_acc_dtype(device), device=device))
                    continue
                rows.append(
                    torch.stack(
                        [
                            torch.linalg.vector_norm(a - b),
                            torch.linalg.vector_norm(a),
                            torch.linalg.vector_norm(b),
                            _wasserstein_tensor(a, b, max_samples, _key_seed(seed, key)),
                        ]
                    ).to(_acc_dtype(device))
                )
            for key, row in zip(keys, torch.stack(rows).cpu().double().tolist()):
                raw[key] = row

    out: dict[Hashable, DriftStats] = {}
    for key in current:
        d, n, n0, w1 = raw[key]
        out[key] = DriftStats(
            relative_change=_relative(d, n0),
            cosine_distance=_cosine_from_norms(d, n, n0),
            wasserstein=w1,
            distance=d,
            norm=n,
            initial_norm=n0,
        )
    return out
