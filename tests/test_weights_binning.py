"""``methods.weights`` CPU internals: the chunked numpy binning equals the documented float formula bit for bit,
small tensors binned together equal the per-tensor path, the numpy drift equals the torch formulas."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from lightning_introspect._torch import guards
from lightning_introspect.methods import weights
from lightning_introspect.methods.weights import drift, histogram, histograms


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "bias": torch.randn(64, generator=g) * 0.1,
        "thirds": torch.randint(-7, 9, (300,), generator=g).float() / 3,  # many values on or near edges
        "ints": torch.randint(-5, 5, (50,), generator=g),
        "const": torch.full((7,), 0.25),
        "f64": torch.randn(1000, generator=g, dtype=torch.float64),
        "half": torch.randn(500, generator=g).half(),
        "one": torch.tensor([3.0]),
        "big": torch.randn(20_000, generator=g),  # general path either way
        "nan": torch.tensor([1.0, float("nan"), 2.0, float("inf"), 0.5]),  # falls back to the general path
        "empty": torch.empty(0),
        "at_limit": torch.randn(weights._SMALL_NUMEL, generator=g),
    }


@pytest.mark.parametrize("bins", [1, 7, 32, 300])
def test_batched_small_tensors_equal_the_per_tensor_path(bins, monkeypatch):
    tensors = _tensors()
    before = {k: v.clone() for k, v in tensors.items()}
    batched = histograms(tensors, bins=bins)
    monkeypatch.setattr(weights, "_SMALL_NUMEL", 0)  # every tensor through the general path
    single = histograms(tensors, bins=bins)
    for key in tensors:
        a, b = batched[key], single[key]
        assert a.counts.tolist() == b.counts.tolist(), key
        assert a.edges.tolist() == b.edges.tolist(), key
        assert (a.min, a.max, a.num, a.numel, a.nan, a.posinf, a.neginf) == (
            b.min, b.max, b.num, b.numel, b.nan, b.posinf, b.neginf
        ), key
        assert a.sum == pytest.approx(b.sum, rel=1e-5, abs=1e-5) and a.sum_squares == pytest.approx(b.sum_squares, rel=1e-5)
        torch.testing.assert_close(tensors[key], before[key], rtol=0, atol=0, equal_nan=True, msg=f"{key} was modified")
    assert (batched["nan"].nan, batched["nan"].posinf, batched["nan"].num) == (1, 1, 3)


def test_batched_sums_are_float64_exact_enough():
    x = torch.randn(2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = histogram(x, bins=16)
    assert h.sum == pytest.approx(float(x.sum()), rel=1e-12, abs=1e-12)
    assert h.sum_squares == pytest.approx(float((x * x).sum()), rel=1e-12)
    counts, edges = np.histogram(x.numpy(), bins=16)
    assert np.abs(h.counts.numpy() - counts).sum() <= 2
    np.testing.assert_array_equal(h.edges.numpy(), np.linspace(float(x.min()), float(x.max()), 17))


@pytest.mark.parametrize("n", [5, 50_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_tensors_of_huge_values_do_not_divide_by_zero(n, dtype):
    for v in (1e17, -3e20, 3e38):
        h = histogram(torch.full((n,), v, dtype=dtype), bins=4)
        assert int(h.counts.sum()) == n and h.edges[0] < v < h.edges[-1]
        assert all(math.isfinite(e) for e in h.edges.tolist())


def test_many_batches_and_mixed_dtypes(monkeypatch):
    monkeypatch.setattr(weights, "_BATCH_NUMEL", 1000)  # forces several batches
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(int(n), generator=g) for n in torch.randint(1, 600, (30,), generator=g)]
    tensors += [t.double() for t in tensors[:5]]
    out = histograms(tensors, bins=8)
    for i, t in enumerate(tensors):
        counts, _ = np.histogram(t.double().numpy(), bins=8)
        assert np.abs(out[i].counts.numpy() - counts).sum() <= 2, i
        assert out[i].num == t.numel()


# ------------------------------------------------------------------- the chunked CPU path vs a reference
def _reference(x: torch.Tensor, bins: int) -> tuple[list[int], tuple[int, int, int], float, float]:
    """The documented formula, written plainly in torch: floor((x - lo) * (bins / (hi - lo))) in the tensor's
    float precision (float64 for a float32 range wider than float32 can scale), top edge in the last bin."""
    x = x.detach().reshape(-1)
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    nonfinite = (int(torch.isnan(x).sum()), int((x == math.inf).sum()), int((x == -math.inf).sum()))
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        return [0] * bins, nonfinite, 0.0, 1.0
    lo, hi = weights._bin_range(float(x.min()), float(x.max()))
    if not math.isfinite(hi - lo):  # float64 data more than DBL_MAX wide: halves
        pos = (x.double() / 2 - lo / 2) / (hi / 2 - lo / 2) * bins
    elif not math.isfinite(bins / (hi - lo)):  # a denormal width: divide first
        pos = (x.double() - lo) / (hi - lo) * bins
    else:
        wide = weights._needs_float64(lo, hi) or bins / (hi - lo) > weights._F32_MAX
        pos = (x.to(torch.float64 if wide else x.dtype) - lo) * (bins / (hi - lo))
    idx = pos.to(torch.int64).clamp_(0, bins)
    counts = torch.bincount(idx, minlength=bins + 1)
    counts[bins - 1] += counts[bins]
    return counts[:bins].tolist(), nonfinite, lo, hi


def _edge_cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    n = 3 * 1000 + 17  # several chunks (the chunk size is made small below) and a partial last one
    return {
        "normal": torch.randn(n, generator=g),
        "uniform_f64": torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2,
        "on_edges": torch.linspace(-1.0, 1.0, 32 * 50 + 1).repeat(3),  # every bin edge of 32 bins, many times
        "thirds": torch.randint(-9, 10, (n,), generator=g).float() / 3,
        "constant": torch.full((n,), -0.7),
        "huge_f32": torch.randn(n, generator=g) * 3e37,  # range beyond float32 scaling: float64 positions
        "huge_const": torch.full((n,), 3e38),
        "large_squares": torch.randn(n, generator=g) * 1e25,  # float32 squares overflow: sums redone in float64
        "denormal_range": torch.tensor([0.0, 1e-45, 1e-45, 3e-45] * 800),  # bins / width overflows float32
        "f64_extreme": torch.tensor([-1e308, 0.0, 1e308, 5e307] * 800, dtype=torch.float64),  # width overflows
        "f64_denormal": torch.tensor([0.0, 5e-324, 1e-323] * 900, dtype=torch.float64),  # bins / width overflows
        "nonfinite": torch.cat([torch.randn(n, generator=g), torch.tensor([math.nan, math.inf, -math.inf, math.nan])]),
        "all_nan": torch.full((3000,), math.nan),
        "ints": torch.randint(-300, 300, (n,), generator=g, dtype=torch.int32),
        "half": torch.randn(n, generator=g).half(),
        "strided": torch.randn(2 * n, generator=g)[::2],
    }


@pytest.mark.parametrize("bins", [1, 2, 32, 254, 255, 1000])
def test_chunked_cpu_binning_equals_the_reference_formula(bins, monkeypatch):
    monkeypatch.setattr(weights, "_CHUNK", 1000)
    tensors = _edge_cases()
    out = histograms(tensors, bins=bins)
    for key, x in tensors.items():
        counts, (nan, posinf, neginf), lo, hi = _reference(x, bins)
        h = out[key]
        assert h.counts.tolist() == counts, key
        assert (h.nan, h.posinf, h.neginf, h.num, h.numel) == (nan, posinf, neginf, sum(counts), x.numel()), key
        assert h.edges[0].item() == lo and h.edges[-1].item() == hi, key
        finite = x.double().reshape(-1)
        finite = finite[torch.isfinite(finite)]
        if finite.numel():
            assert (h.min, h.max) == (float(finite.min()), float(finite.max())), key
        if finite.numel() and key != "f64_extreme":  # its sums overflow float64 whatever the order
            assert h.sum == pytest.approx(float(finite.sum()), rel=1e-5, abs=1e-6 * float(finite.abs().sum())), key
            assert h.sum_squares == pytest.approx(float((finite * finite).sum()), rel=1e-5), key  # inf only if it is


def test_values_on_edges_land_where_numpy_puts_them():
    # exactly representable edges (multiples of 1/4 over [-4, 4] with 32 bins): no rounding anywhere
    x = torch.arange(-16, 17, dtype=torch.float32).repeat_interleave(5) / 4
    h = histogram(x, bins=32)
    counts, edges = np.histogram(x.numpy(), bins=32)
    assert h.counts.tolist() == counts.tolist() and h.edges.tolist() == edges.tolist()
    assert h.counts.tolist() == [5] * 31 + [10]  # the top edge belongs to the last bin


def test_extreme_ranges_give_sensible_bins():
    h = histogram(torch.tensor([-1e308, 0.0, 1e308, 5e307], dtype=torch.float64), bins=4)
    assert h.counts.tolist() == [1, 0, 1, 2]  # edges -1e308, -5e307, 0, 5e307, 1e308: 0 and 5e307 open bins 2 and 3
    h = histogram(torch.tensor([0.0, 5e-324, 1e-323], dtype=torch.float64), bins=2)
    assert h.counts.tolist() == [1, 2]
    h = histogram(torch.tensor([1e25, -1e25, 3e25]), bins=2)
    assert h.sum == pytest.approx(3e25, rel=1e-6) and h.sum_squares == pytest.approx(11e50, rel=1e-6)


def test_one_bin_holds_every_finite_value():
    x = torch.cat([torch.randn(70_000, generator=torch.Generator().manual_seed(8)), torch.tensor([math.inf])])
    h = histogram(x, bins=1)
    assert h.counts.tolist() == [70_000] and h.posinf == 1


def test_a_reused_workspace_does_not_leak_between_tensors():
    g = torch.Generator().manual_seed(9)
    tensors = {"big": torch.randn(50_000, generator=g), "small_after": torch.rand(4_000, generator=g) + 5}
    together = histograms(tensors, bins=16)
    for key, x in tensors.items():
        assert together[key].counts.tolist() == histogram(x, bins=16).counts.tolist() == _reference(x, 16)[0], key


# ----------------------------------------------------------------------------- the numpy drift path
def _torch_drift(w: torch.Tensor, w0: torch.Tensor, max_samples: int, seed: int) -> tuple[float, float, float, float]:
    a, b = w.double().reshape(-1), w0.double().reshape(-1)
    d, n, n0 = (float(torch.linalg.vector_norm(v)) for v in (a - b, a, b))
    idx = weights._sample_index(a.numel(), max_samples, seed)
    if idx is not None:
        a, b = a[idx], b[idx]
    return d, n, n0, float((a.sort().values - b.sort().values).abs().mean())


def test_cpu_drift_equals_the_torch_formulas():
    g = torch.Generator().manual_seed(10)
    initial = {
        "conv": torch.randn(32, 16, 3, 3, generator=g) * 0.05,  # 4608 values: every value
        "fc": torch.randn(200, 100, generator=g) * 0.02,  # 20000 > max_samples: fixed sample positions
        "f64": torch.randn(300, generator=g, dtype=torch.float64),
        "half": torch.randn(50, generator=g).half(),
    }
    current = {k: (v.double() * 1.1 + 0.01).to(v.dtype) for k, v in initial.items()}
    out = drift(current, initial, max_samples=8192, seed=3)
    for key in initial:
        d, n, n0, w1 = _torch_drift(current[key], initial[key], 8192, weights._key_seed(3, key))
        s = out[key]
        assert (s.distance, s.norm, s.initial_norm) == pytest.approx((d, n, n0), rel=1e-5), key
        assert s.wasserstein == pytest.approx(w1, rel=1e-5), key
        assert s.relative_change == pytest.approx(d / n0, rel=1e-5), key


def test_sample_positions_are_cached_and_fixed():
    fresh = torch.randint(20_000, (8192,), generator=torch.Generator().manual_seed(5))
    first = weights._sample_index(20_000, 8192, 5)
    assert torch.equal(first, fresh) and weights._sample_index(20_000, 8192, 5) is first
    assert weights._sample_index(100, 8192, 5) is None


# ------------------------------------------------------------------------------ threads (CPU)
@pytest.fixture
def torch_threads():
    """Sets torch's intra-op thread count for a test and restores the previous one."""
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


def _large_mix() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = {f"w{i}": torch.randn(40_000 + 9_000 * i, generator=g) * 10.0**-i for i in range(5)}
    nonfinite = torch.randn(30_000, generator=g)
    nonfinite[::997], nonfinite[5::1999], nonfinite[7::2999] = float("nan"), float("inf"), -float("inf")
    out.update(
        nonfinite=nonfinite,
        only_nan=torch.full((3_000,), float("nan")),
        const=torch.full((25_000,), -1.5),
        ints=torch.randint(-1000, 1000, (50_000,), generator=g),
        half=torch.randn(60_000, generator=g).half(),
        f64=torch.randn(70_000, generator=g, dtype=torch.float64) * 1e3,
        thirds=torch.randint(-7, 9, (20_000,), generator=g).float() / 3,  # values on the edges
        bias=torch.randn(64, generator=g),  # small: batched, not threaded
    )
    return out


def _spy(monkeypatch, *, barrier: threading.Barrier | None = None, fail_in: str | None = None) -> list[tuple[str, int]]:
    """Wraps ``_cpu_histogram``: records (thread name, torch threads) per call and checks that numpy's BLAS
    runs one thread; ``barrier``: each of the
    first two threads waits at its first call until the other arrives (both surely bin a tensor);
    ``fail_in``: raise in the pool's worker thread (``"worker"``) or in the calling one (``"caller"``)."""
    calls: list[tuple[str, int]] = []
    seen: set[str] = set()
    lock = threading.Lock()
    original = weights._cpu_histogram

    def spy(x, bins, work):  # noqa: ANN001, ANN202
        name = threading.current_thread().name
        with lock:
            first = name not in seen
            seen.add(name)
            calls.append((name, torch.get_num_threads()))
            blas = guards._blas_controller()
            assert blas is None or all(lib.num_threads == 1 for lib in blas.lib_controllers)
        if barrier is not None and first and len(seen) <= 2:
            barrier.wait(timeout=20)
        is_worker = name.startswith("introspect-histograms")
        if fail_in is not None and is_worker == (fail_in == "worker"):
            raise RuntimeError(f"boom in {fail_in}")
        return original(x, bins, work)

    monkeypatch.setattr(weights, "_cpu_histogram", spy)
    return calls


def _stats(h: weights.HistogramStats) -> tuple:
    return (
        h.counts.tolist(), h.edges.tolist(), h.min, h.max, h.num, h.numel, h.nan, h.posinf, h.neginf,
        repr(h.sum), repr(h.sum_squares),  # repr: bit-identical floats (and NaN equals NaN)
    )


@pytest.mark.parametrize("bins", [1, 7, 32, 300])
def test_threaded_binning_equals_the_serial_path_bit_for_bit(bins, monkeypatch, torch_threads):
    tensors = _large_mix()
    before = {k: v.clone() for k, v in tensors.items()}
    torch_threads(2)
    monkeypatch.setattr(weights, "_PARALLEL_NUMEL", 1 << 62)  # serial, torch's 2 threads otherwise
    serial = histograms(tensors, bins=bins)
    monkeypatch.setattr(weights, "_PARALLEL_NUMEL", 0)
    calls = _spy(monkeypatch, barrier=threading.Barrier(2))
    threaded = histograms(tensors, bins=bins)
    assert torch.get_num_threads() == 2
    assert {name.startswith("introspect-histograms") for name, _ in calls} == {True, False}, "both threads binned"
    assert {n for _, n in calls} == {1}, "torch ran one intra-op thread in every worker"
    assert len(calls) == len(tensors) - 1  # every large tensor once; the bias was batched
    for key in tensors:
        assert _stats(threaded[key]) == _stats(serial[key]), key
        torch.testing.assert_close(tensors[key], before[key], rtol=0, atol=0, equal_nan=True, msg=f"{key} was modified")
    h = threaded["nonfinite"]
    assert (h.nan, h.posinf, h.neginf) == (
        int(torch.isnan(tensors["nonfinite"]).sum()), int((tensors["nonfinite"] == math.inf).sum()), int((tensors["nonfinite"] == -math.inf).sum())
    )
    assert threaded["only_nan"].num == 0 and threaded["only_nan"].nan == 3_000
    assert threaded["const"].edges[[0, -1]].tolist() == [-2.0, -1.0]


def test_the_serial_path_runs_below_the_threshold_and_with_one_thread(monkeypatch, torch_threads):
    tensors = _large_mix()
    torch_threads(2)
    calls = _spy(monkeypatch)
    histograms(tensors, bins=8)  # ~0.5M values: below _PARALLEL_NUMEL
    assert {name for name, _ in calls} == {threading.current_thread().name}
    assert {n for _, n in calls} == {1}  # torch's OpenMP team is not woken per op
    calls.clear()
    torch_threads(1)
    monkeypatch.setattr(weights, "_PARALLEL_NUMEL", 0)
    histograms(tensors, bins=8)  # one torch thread: serial whatever the size
    assert {name for name, _ in calls} == {threading.current_thread().name}
    assert torch.get_num_threads() == 1


def _blas_threads() -> list[int]:
    threadpoolctl = pytest.importorskip("threadpoolctl")
    return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]


@pytest.mark.parametrize("fail_in", ["worker", "caller"])
def test_thread_counts_are_restored_when_a_worker_raises(fail_in, monkeypatch, torch_threads):
    blas_before = _blas_threads()
    torch_threads(3)
    monkeypatch.setattr(weights, "_PARALLEL_NUMEL", 0)
    calls = _spy(monkeypatch, barrier=threading.Barrier(2), fail_in=fail_in)
    with pytest.raises(RuntimeError, match=f"boom in {fail_in}"):
        histograms(_large_mix(), bins=16)
    assert torch.get_num_threads() == 3
    assert _blas_threads() == blas_before
    assert {n for _, n in calls} == {1}
    assert not [t for t in threading.enumerate() if t.name.startswith("introspect-histograms")], "pool joined"


def test_overlapping_blas_limits_restore_the_original_count_once_the_last_ends():
    # a background probe fit (sklearn) and a histogram pass may hold the limit at the same time, ending in
    # either order: the counted limit must not leave numpy's BLAS at one thread for good
    before = _blas_threads()
    if not before or max(before) <= 1:
        pytest.skip("numpy's BLAS runs one thread here already")
    first, second = guards.one_blas_thread(), guards.one_blas_thread()
    first.__enter__()
    assert set(_blas_threads()) == {1}
    second.__enter__()
    first.__exit__(None, None, None)  # the first user leaves while the second still runs
    assert set(_blas_threads()) == {1}
    second.__exit__(None, None, None)
    assert _blas_threads() == before
