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

Why the CPU path has its own engine (chunked numpy binning, small tensors batched, large ones in
threads) instead of ``torch.histc`` per tensor: ``torch.histc`` costs ~11 ns per float32 value on the
CPU, several times our whole pass. ``benchmarks/bench_histograms.py --engines`` (torch 2, 2 cores, 32
bins, every parameter, medians of 5 interleaved runs, wall time) measured:

==========================  ==========  ===================  ===================
model (tensors, values)     threads     ours                 plain ``torch.histc`` / ``np.histogram``
==========================  ==========  ===================  ===================
ResNet-50 (161, 25.6M)      1           65 ms                338 ms (5.2x) / 348 ms (5.4x)
ResNet-50                   2           47 ms                238 ms (5.1x) / 307 ms (6.6x)
small CNN (22, 0.98M)       1           3.9 ms               14 ms (3.6x) / 16 ms (4.1x)
small CNN                   2           4.2 ms               12 ms (2.8x) / 15 ms (3.6x)
==========================  ==========  ===================  ===================

In the whole recurring epoch-end call of ``WeightHistograms`` in a CPU fit (binning, drift, writing,
summary; no figures) that is 250 ms with ours vs 430 ms with ``torch.histc`` for ResNet-50, 26 vs 29 ms
for the small CNN: the binning would grow from about a fifth to over half of the call.

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

import functools
import math
import threading
import zlib
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import numpy as np
import torch

from lightning_introspect._torch.guards import one_blas_thread, torch_threads

K = TypeVar("K", bound=Hashable)  # the caller's keys (layer names, ...), kept in the results

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
_CHUNK = 1 << 16  # CPU binning works through tensors in chunks of 256 KiB of float32 (they stay in L2)
_KEPT_DTYPES = (torch.float32, torch.float64)
_PARALLEL_NUMEL = 1 << 20  # CPU tensors above _SMALL_NUMEL holding fewer values in all are binned in one thread


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
def _as_items(tensors: Mapping[Any, torch.Tensor] | Sequence[torch.Tensor]) -> list[tuple[Any, torch.Tensor]]:
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
    """A detached flat floating view (copy only for other dtypes); float32 and float64 stay as they are."""
    t = t.detach()
    if t.dtype not in _KEPT_DTYPES:
        if t.is_complex():
            raise ValueError("Histograms of complex tensors are not supported; pass `t.real` / `t.abs()`.")
        t = t.float()
    return t.reshape(-1)


def _bin_range(lo: float, hi: float) -> tuple[float, float]:
    if lo == hi:  # numpy's convention for a constant tensor
        if lo - 0.5 < lo < hi + 0.5:
            return lo - 0.5, hi + 0.5
        span = abs(lo) * 2.0**-20  # |v| > 2**52: v +- 0.5 == v, and a zero width would divide by zero
        return lo - span, hi + span
    return lo, hi


def _counts_by_sorting(idx: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of the integers ``0 .. bins-1`` in ``idx`` with deterministic kernels only (sort + searchsorted)."""
    ordered = idx.reshape(-1).sort().values
    bounds = torch.searchsorted(ordered, torch.arange(bins + 1, device=idx.device, dtype=ordered.dtype))
    return bounds.diff()


def _acc_dtype(device: torch.device) -> torch.dtype:
    """float64 for the few numbers that travel to the CPU, except where the device has none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _needs_float64(lo: float, hi: float) -> bool:
    """A float32 range whose width overflows would put everything in one bin (see :func:`_bin_counts`)."""
    return hi - lo > _F32_MAX or max(abs(lo), abs(hi)) > _F32_MAX / 4


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


# ---------------------------------------------------------------------------------- CPU binning
class _Workspace:
    """Reusable CPU scratch arrays, so binning many tensors allocates (and page-faults) once."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, np.dtype], np.ndarray] = {}

    def get(self, n: int, dtype: type | np.dtype, what: str = "scratch") -> np.ndarray:
        key = (what, np.dtype(dtype))
        buf = self.buffers.get(key)
        if buf is None or buf.shape[0] < n:
            buf = np.ones(n, dtype=key[1]) if what == "ones" else np.empty(n, dtype=key[1])
            self.buffers[key] = buf
        return buf[:n]


def _cpu_float_type(lo: float, hi: float, bins: int, dtype: np.dtype) -> type | None:
    """The float type the CPU computes bin positions in (that of the data, float64 for a float32 range that
    needs it); ``None`` for a range whose width or scale overflows float64 (:func:`_extreme_positions`)."""
    span = hi - lo
    if not math.isfinite(span) or not math.isfinite(bins / span):
        return None
    if dtype == np.float64 or _needs_float64(lo, hi) or bins / span > _F32_MAX:
        return np.float64
    return np.float32


def _index_type(bins: int) -> type:
    return np.uint8 if bins < 255 else np.int16 if bins < 32767 else np.int32


def _count_indices(idx: np.ndarray, bins: int) -> np.ndarray:
    """int64 counts of the bin indices ``idx`` (in ``0 .. bins``; ``bins`` is ``x == hi``, folded into the last bin)."""
    counts = torch.bincount(torch.from_numpy(idx), minlength=bins + 1).numpy()
    counts[bins - 1] += counts[bins]
    return counts[:bins]


def _extreme_positions(a: np.ndarray, bins: int, lo: float, hi: float) -> np.ndarray:
    """Bin positions in float64 where ``hi - lo`` or ``bins / (hi - lo)`` overflows (~1e308 or denormal data)."""
    x = np.asarray(a, dtype=np.float64)
    with np.errstate(over="ignore"):
        if math.isfinite(hi - lo):  # a denormal width: divide before scaling
            pos = (x - lo) / (hi - lo) * bins
        else:  # a width beyond float64: halve everything first
            pos = (0.5 * x - 0.5 * lo) / (0.5 * hi - 0.5 * lo) * bins
    return np.clip(pos, 0, bins, out=pos)


def _cpu_counts(a: np.ndarray, bins: int, lo: float, hi: float, work: _Workspace) -> tuple[np.ndarray, float, float]:
    """CPU: the counts (as :func:`_bin_counts`), the sum and the sum of squares of ``a`` (all finite, 1-D).

    ``a`` is read from memory once more (after the min / max pass), in chunks of ``_CHUNK`` values that
    stay in the L2 cache for the rest of the work on them. Per chunk: ``pos = (a - lo) * (bins / (hi - lo))``
    into a reused buffer (numpy: a third of torch's per-call cost, and the same IEEE operations and
    roundings as ``torch.sub`` / ``mul_`` with float scalars); values are ``>= lo``, so the cast to the
    integer index truncates to the floor (``x == hi`` gives ``bins``, folded into the last bin); the
    chunk's sum and sum of squares (BLAS dots, accumulated in float64 over chunks). The indices of the
    whole tensor (1 byte per value for up to 254 bins) are counted at the end with one bincount.
    """
    n = a.shape[0]
    if n == 0:
        return np.zeros(bins, dtype=np.int64), 0.0, 0.0
    ftype = _cpu_float_type(lo, hi, bins, a.dtype)
    idx = work.get(n, _index_type(bins), "index")
    if ftype is None:
        idx[:] = _extreme_positions(a, bins, lo, hi)  # assignment casts unsafely: truncation
        return (_count_indices(idx, bins), *_wide_sums(a))
    lo_f, scale_f = ftype(lo), ftype(bins / (hi - lo))
    size = min(n, _CHUNK)
    pos, ones = work.get(size, ftype), work.get(size, ftype, "ones")
    wide = work.get(size, ftype, "wide") if a.dtype != ftype else None  # float32 data with a float64 range
    total = squares = 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # a float32 sum of squares may overflow: redone below
        for start in range(0, n, _CHUNK):
            chunk = a[start : start + _CHUNK]
            m = chunk.shape[0]
            if wide is not None:
                np.copyto(wide[:m], chunk)
                chunk = wide[:m]
            p = pos if m == size else pos[:m]
            np.subtract(chunk, lo_f, out=p)
            np.multiply(p, scale_f, out=p)
            idx[start : start + m] = p  # float -> integer assignment truncates (values >= 0: the floor)
            total += float(chunk.dot(ones if m == size else ones[:m]))  # methods: no dispatch layer
            squares += float(chunk.dot(chunk))
    if not (math.isfinite(total) and math.isfinite(squares)):  # |values| above ~1e19 in float32
        total, squares = _wide_sums(a)
    return _count_indices(idx, bins), total, squares


def _wide_sums(a: np.ndarray) -> tuple[float, float]:
    """Sum and sum of squares in float64 (for float32 data whose float32 sums overflow)."""
    wide = a.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(wide.sum()), float(np.dot(wide, wide))


_Result = tuple[list[float], tuple[float, float], np.ndarray, int, tuple[int, int, int] | None]
"""(min, max, sum, sum of squares), bin range, counts, number of finite values, (NaN, +Inf, -Inf) or None."""


def _cpu_histogram(x: torch.Tensor, bins: int, work: _Workspace) -> _Result:
    """One CPU tensor: min / max (one pass), then :func:`_cpu_counts` while the tensor is still in the L3 cache."""
    n = x.numel()
    if n == 0:
        return [0.0, 0.0, 0.0, 0.0], (0.0, 1.0), np.zeros(bins, dtype=np.int64), 0, None
    mn_t, mx_t = torch.aminmax(x)  # NaN-propagating: finite min and max <=> every value finite
    mn, mx = mn_t.item(), mx_t.item()
    nonfinite = None
    if not (math.isfinite(mn) and math.isfinite(mx)):
        stacked = torch.stack([torch.isnan(x).sum(), (x == math.inf).sum(), (x == -math.inf).sum()])
        nan, posinf, neginf = stacked.tolist()
        nonfinite = (nan, posinf, neginf)
        x = x[torch.isfinite(x)]
        n = x.numel()
        if n == 0:
            return [0.0, 0.0, 0.0, 0.0], (0.0, 1.0), np.zeros(bins, dtype=np.int64), 0, nonfinite
        mn_t, mx_t = torch.aminmax(x)
        mn, mx = mn_t.item(), mx_t.item()
    lo, hi = _bin_range(mn, mx)
    counts, total, squares = _cpu_counts(x.numpy(), bins, lo, hi, work)
    return [mn, mx, total, squares], (lo, hi), counts, n, nonfinite


def _batched_small(xs: Sequence[np.ndarray], bins: int) -> list[_Result | None]:
    """Histograms of many small CPU arrays of one dtype with a few numpy calls for all of them.

    Per tensor, the calls of the general path cost tens of µs of overhead -- more than the binning of a
    few thousand values. Here the values are concatenated once and reduced per segment (``reduceat``);
    the bin index is the same float expression as in :func:`_cpu_counts` (same dtype, same scalars), so
    the counts are identical. ``None`` for an array with a non-finite value or a range the float type of
    the array cannot scale: the general path handles those.
    """
    k = len(xs)
    sizes = np.fromiter((x.shape[0] for x in xs), dtype=np.intp, count=k)
    starts = np.zeros(k, dtype=np.intp)
    np.cumsum(sizes[:-1], out=starts[1:])
    cat = np.concatenate(xs)
    with np.errstate(all="ignore"):  # NaN / Inf values: their arrays are flagged below and redone
        mins = np.minimum.reduceat(cat, starts)
        maxs = np.maximum.reduceat(cat, starts)
        wide = cat.astype(np.float64, copy=False)
        sums = np.add.reduceat(wide, starts)
        squares = np.add.reduceat(wide * wide, starts)
    rows = np.stack([mins.astype(np.float64), maxs.astype(np.float64), sums, squares], axis=1).tolist()
    good = (np.isfinite(mins) & np.isfinite(maxs)).tolist()
    ranges: list[tuple[float, float]] = []
    los, scales = np.zeros(k, dtype=cat.dtype), np.zeros(k, dtype=cat.dtype)
    for i, row in enumerate(rows):
        if not good[i]:
            ranges.append((0.0, 1.0))
            continue
        lo, hi = _bin_range(row[0], row[1])
        ranges.append((lo, hi))
        if _cpu_float_type(lo, hi, bins, cat.dtype) is not cat.dtype.type:
            good[i] = False
            continue
        los[i], scales[i] = lo, bins / (hi - lo)  # rounded to the array's float type, as numpy does with scalars
    with np.errstate(all="ignore"):
        pos = np.subtract(cat, np.repeat(los, sizes))
        np.multiply(pos, np.repeat(scales, sizes), out=pos)
        idx = pos.astype(np.intp)
    np.clip(idx, 0, bins, out=idx)  # only flagged arrays have values outside
    idx += np.repeat(np.arange(0, k * (bins + 1), bins + 1, dtype=np.intp), sizes)
    counts = np.bincount(idx, minlength=k * (bins + 1)).reshape(k, bins + 1)
    counts[:, bins - 1] += counts[:, bins]
    counts = np.ascontiguousarray(counts[:, :bins])
    return [(rows[i], ranges[i], counts[i], int(sizes[i]), None) if good[i] else None for i in range(k)]


def _small_batches(keys: list[int], sizes: list[int]) -> list[list[int]]:
    """``keys`` in consecutive batches of at most ``_BATCH_NUMEL`` values."""
    batches: list[list[int]] = [[]]
    total = 0
    for key, size in zip(keys, sizes):
        if total + size > _BATCH_NUMEL and batches[-1]:
            batches.append([])
            total = 0
        batches[-1].append(key)
        total += size
    return batches


def _cpu_workers(flats: Sequence[torch.Tensor], keys: Sequence[int]) -> int:
    """Threads for the large CPU tensors: torch's intra-op thread count, at most one per tensor; 1 (serial)
    when they hold fewer than ``_PARALLEL_NUMEL`` values (starting threads would cost more than they save)."""
    if sum(flats[i].numel() for i in keys) < _PARALLEL_NUMEL:
        return 1
    return max(1, min(torch.get_num_threads(), len(keys)))


def _cpu_histograms(flats: Sequence[torch.Tensor], keys: Sequence[int], bins: int, results: list[_Result | None]) -> None:
    """:func:`_cpu_histogram` of ``flats[i]`` for every ``i`` in ``keys``, into ``results[i]``.

    With one worker (:func:`_cpu_workers`): in order, in this thread. With ``k > 1``: ``k`` threads (this
    one and ``k - 1`` of a pool) take the tensors largest first from a shared queue, each with its own
    :class:`_Workspace`; meanwhile torch runs one intra-op thread (aminmax / bincount would otherwise each
    start a team of threads in every worker) and this thread waits for every worker before restoring it,
    also when one raises (the others then stop after their current tensor). numpy ufuncs, BLAS dots and
    torch ops release the GIL. Either way numpy's BLAS runs one thread (:func:`~lightning_introspect._torch.guards.one_blas_thread`), and
    each tensor's result is computed by the same code, so it is the same bit for bit.
    """
    workers = _cpu_workers(flats, keys)
    with one_blas_thread(), torch_threads(1):
        if workers <= 1:
            work = _Workspace()
            for i in keys:
                results[i] = _cpu_histogram(flats[i], bins, work)
            return
        pending = iter(sorted(keys, key=lambda i: flats[i].numel(), reverse=True))
        lock, failed = threading.Lock(), threading.Event()

        def drain() -> None:
            work = _Workspace()
            while not failed.is_set():
                with lock:
                    i = next(pending, None)
                if i is None:
                    return
                try:
                    results[i] = _cpu_histogram(flats[i], bins, work)
                except BaseException:
                    failed.set()
                    raise

        with ThreadPoolExecutor(workers - 1, thread_name_prefix="introspect-histograms") as pool:
            futures = [pool.submit(drain) for _ in range(workers - 1)]
            drain()  # leaving the pool's block waits for the workers (then torch's threads are restored)
        for future in futures:
            future.result()  # a worker's exception


def _device_histograms(xs: Sequence[torch.Tensor], bins: int) -> list[_Result]:
    """Histograms of tensors on one accelerator: two phases, each ending in one transfer to the CPU.

    (1) min, max, sum, sum of squares of every tensor; (2) the bin counts. Tensors with a NaN or Inf
    value take a slower path (boolean masking) that counts them separately.
    """
    device = xs[0].device
    acc = _acc_dtype(device)
    rows = []
    for x in xs:
        if x.numel() == 0:
            rows.append(torch.zeros(4, dtype=acc, device=device))
            continue
        mn, mx = torch.aminmax(x)
        rows.append(torch.stack([mn, mx, x.sum(), torch.dot(x, x)]).to(acc))
    stats = torch.stack(rows).cpu().double().tolist()
    xs = list(xs)
    nonfinite: list[tuple[int, int, int] | None] = [None] * len(xs)
    for i, (mn, mx, _, _) in enumerate(stats):
        if math.isfinite(mn) and math.isfinite(mx):
            continue
        x = xs[i]
        n_nan, n_pos_inf, n_neg_inf = torch.stack([torch.isnan(x).sum(), (x == math.inf).sum(), (x == -math.inf).sum()]).tolist()
        nonfinite[i] = (int(n_nan), int(n_pos_inf), int(n_neg_inf))
        finite = x[torch.isfinite(x)]
        xs[i] = finite
        if finite.numel():
            fmn, fmx = torch.aminmax(finite)
            stats[i] = torch.stack([fmn, fmx, finite.sum(), torch.dot(finite, finite)]).cpu().double().tolist()
        else:
            stats[i] = [0.0, 0.0, 0.0, 0.0]
    ranges = [_bin_range(s[0], s[1]) if x.numel() else (0.0, 1.0) for s, x in zip(stats, xs)]
    counts = torch.stack([_bin_counts(x, bins, *r) for x, r in zip(xs, ranges)]).cpu().numpy()
    return [(s, r, c, x.numel(), nf) for s, r, c, x, nf in zip(stats, ranges, counts, xs, nonfinite)]


@overload
def histograms(tensors: Mapping[K, torch.Tensor], *, bins: int = ...) -> dict[K, HistogramStats]: ...
@overload
def histograms(tensors: Sequence[torch.Tensor], *, bins: int = ...) -> dict[int, HistogramStats]: ...
def histograms(
    tensors: Mapping[Any, torch.Tensor] | Sequence[torch.Tensor], *, bins: int = 32
) -> dict[Any, HistogramStats]:
    """Histograms of many tensors, each over its own finite value range, computed on their devices.

    On an accelerator: two phases, each ending in one small device-to-CPU transfer per device: (1) min,
    max, sum, sum of squares of every tensor; (2) the bin counts. On the CPU each tensor is read from
    memory twice in all: one min / max pass, then cache-sized chunks for everything else (bin indices,
    sum, sum of squares); small CPU tensors (up to 2048 values: biases, norm layers) are concatenated and
    binned together, a few numpy calls for all of them, with the same counts and float64 sums. Tensors
    with a NaN or Inf value take a slower path (boolean masking) that counts them separately.

    Threads (CPU): the larger CPU tensors are binned by ``torch.get_num_threads()`` threads at once (the
    calling thread and a pool started for the call, which waits for them), largest tensor first, when
    there are several and they hold at least ``2**20`` values in all; otherwise one after the other in the
    calling thread. While they are binned, torch's intra-op thread count is set to 1 (each binning thread
    keeps one core busy; with one binning thread too, as an OpenMP team woken for every tensor's min / max
    mostly spin-waits on a busy machine, ~5x slower there) and numpy's BLAS (OpenBLAS / MKL, through
    threadpoolctl when installed) to one thread, process-wide; both are restored before returning, also
    on error. Every result is the same bit for bit whatever the thread count.

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
    flats = [_flat_float(t) for _, t in items]
    numels = [x.numel() for x in flats]
    results: list[_Result | None] = [None] * len(flats)

    with torch.no_grad():
        small: dict[torch.dtype, list[int]] = {}
        large: list[int] = []
        by_device: dict[torch.device, list[int]] = {}
        for i, x in enumerate(flats):
            if not x.is_cpu:
                by_device.setdefault(x.device, []).append(i)
            elif 0 < numels[i] <= _SMALL_NUMEL:
                small.setdefault(x.dtype, []).append(i)
            else:
                large.append(i)
        # small CPU tensors (biases, norms): a few batched numpy calls instead of ~10 each
        for keys in small.values():
            for batch in _small_batches(keys, [numels[i] for i in keys]):
                for i, done in zip(batch, _batched_small([flats[i].numpy() for i in batch], bins)):
                    if done is None:
                        large.append(i)
                    results[i] = done
        if large:
            _cpu_histograms(flats, large, bins, results)
        for keys in by_device.values():
            for i, done in zip(keys, _device_histograms([flats[i] for i in keys], bins)):
                results[i] = done

    # every tensor's edges in one call (row i equals np.linspace(lo_i, hi_i, bins + 1) bit for bit)
    done_results: list[_Result] = results  # type: ignore[assignment]  # every slot was filled above
    bounds = np.array([r[1] for r in done_results], dtype=np.float64).reshape(-1, 2)
    with np.errstate(over="ignore", invalid="ignore"):
        edge_rows = np.linspace(bounds[:, 0], bounds[:, 1], bins + 1, axis=-1)
        beyond = ~np.isfinite(bounds[:, 1] - bounds[:, 0])  # float64 data more than DBL_MAX wide: halve, space, double
    if beyond.any():
        edge_rows[beyond] = 2 * np.linspace(bounds[beyond, 0] / 2, bounds[beyond, 1] / 2, bins + 1, axis=-1)
    all_edges = torch.from_numpy(edge_rows).unbind(0)
    out: dict[Any, HistogramStats] = {}
    for (key, _), numel, edges, (row, _, counts, num, nonfinite) in zip(items, numels, all_edges, done_results):
        nan, posinf, neginf = nonfinite or (0, 0, 0)
        out[key] = HistogramStats(
            counts=torch.from_numpy(counts),
            edges=edges,
            min=row[0] if num else 0.0,
            max=row[1] if num else 0.0,
            num=num,
            sum=row[2],
            sum_squares=row[3],
            nan=nan,
            posinf=posinf,
            neginf=neginf,
            numel=numel,
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
@functools.lru_cache(maxsize=256)
def _sample_index(numel: int, max_samples: int, seed: int) -> torch.Tensor | None:
    """Fixed random positions (with replacement) from a private generator; ``None``: use every value.

    Cached (the same arguments always give the same positions): a callback asks for the same ones at
    every evaluation. The tensor is shared: callers index with it and never modify it.
    """
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


def _cpu_drift_row(a: np.ndarray, b: np.ndarray, max_samples: int, seed: int) -> list[float]:
    """``[||a - b||, ||a||, ||b||, W1(a, b)]`` of two flat CPU arrays of one dtype, in numpy.

    A few BLAS dots and two sorts per tensor: the same maths as the torch path, without torch's per-call
    overhead (which made most of the drift's cost on small models). Dots accumulate in the arrays'
    precision (float64 where float32 squares overflow); the mean of ``|sort(a) - sort(b)|`` in float64.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # NaN / Inf weights give NaN / Inf, as in torch
        diff = a - b
        squares = [float(diff.dot(diff)), float(a.dot(a)), float(b.dot(b))]
    if a.dtype != np.float64 and any(math.isinf(v) for v in squares):  # |values| above ~1e19 in float32
        wide_a, wide_b = a.astype(np.float64), b.astype(np.float64)
        diff = wide_a - wide_b
        with np.errstate(over="ignore", invalid="ignore"):
            squares = [float(diff.dot(diff)), float(wide_a.dot(wide_a)), float(wide_b.dot(wide_b))]
    idx = _sample_index(a.shape[0], max_samples, seed)
    if idx is not None:
        positions = idx.numpy()
        a, b = a[positions], b[positions]
    with np.errstate(over="ignore", invalid="ignore"):
        w1 = float(np.abs(np.sort(a) - np.sort(b)).mean(dtype=np.float64))
    return [math.sqrt(v) for v in squares] + [w1]


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
    current: Mapping[K, torch.Tensor],
    initial: Mapping[K, torch.Tensor],
    *,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
) -> dict[K, DriftStats]:
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

    raw: dict[K, list[float]] = {}
    by_device: dict[torch.device, list[K]] = {}
    for key, w in current.items():
        by_device.setdefault(w.device, []).append(key)
    with torch.no_grad():
        for device, keys in by_device.items():
            if device.type == "cpu":  # numpy: a fraction of torch's per-call cost, which dominates small layers
                for key in keys:
                    a = _flat_float(current[key])
                    b = _flat_float(initial[key]).to(device)
                    dtype = torch.promote_types(a.dtype, b.dtype)
                    a, b = a.to(dtype), b.to(dtype)
                    raw[key] = _cpu_drift_row(a.numpy(), b.numpy(), max_samples, _key_seed(seed, key)) if a.numel() else [0.0] * 4
                continue
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

    out: dict[K, DriftStats] = {}
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
