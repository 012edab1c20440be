"""``methods.weights``: histograms vs numpy, non-finite values, drift maths vs float64 references, W1 vs scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from lightning_introspect.methods.weights import (
    cosine_distance,
    drift,
    histogram,
    histograms,
    relative_change,
    wasserstein_1d,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _numpy_hist(x: torch.Tensor, bins: int) -> tuple[np.ndarray, np.ndarray]:
    v = x.detach().double().numpy().ravel()
    v = v[np.isfinite(v)]
    return np.histogram(v, bins=bins, range=(v.min(), v.max()))


@pytest.mark.parametrize("n, bins", [(1, 8), (17, 5), (1000, 64), (200_000, 64), (50_000, 300)])
def test_counts_match_numpy_histogram(n, bins):
    x = torch.randn(n, generator=_gen(n)) * 0.05 + 0.01
    h = histogram(x, bins=bins)
    counts, edges = _numpy_hist(x, bins)
    if n == 1:  # numpy widens a degenerate range to [v - 0.5, v + 0.5]; so do we
        counts, edges = np.histogram(x.numpy(), bins=bins)
    # float32 bin arithmetic: a value within rounding of an edge may land next door (a handful at most)
    assert np.abs(h.counts.numpy() - counts).sum() <= 2 + 2e-5 * n
    assert int(h.counts.sum()) == n == h.num == h.numel
    np.testing.assert_allclose(h.edges.numpy(), edges, rtol=0, atol=1e-7 * max(1.0, float(np.abs(edges).max())))
    assert h.min == pytest.approx(float(x.min())) and h.max == pytest.approx(float(x.max()))
    assert h.sum == pytest.approx(float(x.double().sum()), rel=1e-4, abs=1e-4)
    assert h.sum_squares == pytest.approx(float((x.double() ** 2).sum()), rel=1e-4)
    assert h.std == pytest.approx(float(x.double().std(unbiased=False)), rel=1e-3, abs=1e-9)


def test_counts_exact_on_values_away_from_edges():
    # integers 0..99 with 10 bins over [0, 99]: no value sits near an interior edge -> exact equality
    x = torch.arange(100, dtype=torch.float32).reshape(10, 10)
    h = histogram(x, bins=10)
    counts, _ = np.histogram(x.numpy(), bins=10, range=(0, 99))
    assert h.counts.tolist() == counts.tolist()


def test_nonfinite_values_are_counted_and_left_out():
    x = torch.randn(1000, generator=_gen(1))
    x[3] = float("nan")
    x[10] = float("nan")
    x[20] = float("inf")
    x[30] = -float("inf")
    h = histogram(x, bins=16)
    assert (h.nan, h.posinf, h.neginf, h.nonfinite) == (2, 1, 1, 4)
    assert h.num == 996 and int(h.counts.sum()) == 996 and h.numel == 1000
    counts, edges = _numpy_hist(x, 16)
    assert np.abs(h.counts.numpy() - counts).sum() <= 2
    assert math.isfinite(h.sum) and math.isfinite(h.sum_squares) and math.isfinite(h.mean)


def test_all_nonfinite_empty_constant_and_extreme_tensors_do_not_crash():
    nan = histogram(torch.full((4, 4), float("nan")), bins=8)
    assert nan.num == 0 and nan.nan == 16 and nan.counts.sum() == 0 and len(nan.edges) == 9
    assert math.isnan(nan.mean)
    empty = histogram(torch.empty(0, 3), bins=8)
    assert empty.num == 0 and empty.numel == 0 and empty.counts.tolist() == [0] * 8
    const = histogram(torch.ones(5), bins=4)
    counts, edges = np.histogram(np.ones(5), bins=4)
    assert const.counts.tolist() == counts.tolist() and const.edges.tolist() == edges.tolist()
    wide = histogram(torch.tensor([-3e38, 0.0, 3e38]), bins=4)
    assert wide.counts.tolist() == [1, 0, 1, 1]


def test_many_tensors_at_once_equal_one_at_a_time_and_inputs_untouched():
    g = _gen(2)
    tensors = {
        "conv": torch.randn(8, 3, 3, 3, generator=g),
        "fc": torch.nn.Parameter(torch.randn(10, 20, generator=g)),
        "int": torch.randint(-5, 5, (50,), generator=g),
        "half": torch.randn(30, generator=g).half(),
        "bf16": torch.randn(30, generator=g).bfloat16(),
        "f64": torch.randn(30, generator=g, dtype=torch.float64),
    }
    before = {k: v.detach().clone() for k, v in tensors.items()}
    batched = histograms(tensors, bins=12)
    assert list(batched) == list(tensors)
    for key, t in tensors.items():
        single = histogram(t, bins=12)
        assert batched[key].counts.tolist() == single.counts.tolist(), key
        assert batched[key].edges.tolist() == single.edges.tolist(), key
        assert torch.equal(t.detach(), before[key]), f"{key} was modified"
    assert tensors["fc"].grad is None
    as_list = histograms(list(tensors.values()), bins=12)
    assert as_list[1].counts.tolist() == batched["fc"].counts.tolist()


def test_histogram_argument_errors():
    with pytest.raises(ValueError, match="`bins`"):
        histogram(torch.ones(3), bins=0)
    with pytest.raises(ValueError, match="`tensors`"):
        histograms({"a": [1.0, 2.0]})  # type: ignore[dict-item]


# ----------------------------------------------------------------------------------------- drift
def _reference(w: torch.Tensor, w0: torch.Tensor) -> tuple[float, float]:
    a, b = w.double().flatten().numpy(), w0.double().flatten().numpy()
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    # 1 - cos in a cancellation-free form: ||a/|a| - b/|b|||^2 / 2
    cos = float(np.sum((a / np.linalg.norm(a) - b / np.linalg.norm(b)) ** 2) / 2)
    return float(rel), cos


@pytest.mark.parametrize("scale", [1e-5, 1e-3, 0.3, 3.0])
def test_relative_change_and_cosine_match_float64_reference(scale):
    g = _gen(3)
    w0 = torch.randn(64, 32, 3, 3, generator=g) * 0.05
    w = w0 + scale * 0.05 * torch.randn(w0.shape, generator=g)
    rel, cos = _reference(w, w0)
    assert relative_change(w, w0) == pytest.approx(rel, rel=1e-4)
    # the cosine distance keeps its precision when W is close to W0 (1e-5 step -> 1 - cos ~ 5e-11)
    assert cosine_distance(w, w0) == pytest.approx(cos, rel=2e-2, abs=1e-12)
    d = drift({"w": w}, {"w": w0})["w"]
    assert d.relative_change == pytest.approx(rel, rel=1e-4)
    assert d.cosine_distance == pytest.approx(cos, rel=2e-2, abs=1e-12)


def test_drift_special_cases():
    w0 = torch.randn(100, generator=_gen(4))
    same = drift({"a": w0.clone()}, {"a": w0})["a"]
    assert same.relative_change == 0.0 and same.wasserstein == 0.0 and same.cosine_distance == pytest.approx(0.0, abs=1e-7)
    doubled = drift({"a": 2 * w0}, {"a": w0})["a"]
    assert doubled.relative_change == pytest.approx(1.0, rel=1e-6)
    assert doubled.cosine_distance == pytest.approx(0.0, abs=1e-6)
    assert doubled.wasserstein == pytest.approx(float(w0.abs().mean()), rel=1e-5)
    flipped = drift({"a": -w0}, {"a": w0})["a"]
    assert flipped.cosine_distance == pytest.approx(2.0, abs=1e-6)
    ortho = cosine_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0]))
    assert ortho == pytest.approx(1.0, abs=1e-6)
    zero_init = drift({"b": torch.ones(3)}, {"b": torch.zeros(3)})["b"]
    assert zero_init.relative_change == math.inf and math.isnan(zero_init.cosine_distance)
    both_zero = drift({"b": torch.zeros(3)}, {"b": torch.zeros(3)})["b"]
    assert both_zero.relative_change == 0.0
    nan = drift({"c": torch.tensor([float("nan"), 1.0])}, {"c": torch.tensor([1.0, 1.0])})["c"]
    assert math.isnan(nan.relative_change)  # reported, not raised


def test_drift_argument_errors_name_the_problem():
    with pytest.raises(ValueError, match="same shape"):
        drift({"fc": torch.ones(2, 3)}, {"fc": torch.ones(3, 2)})
    with pytest.raises(ValueError, match="lacks"):
        drift({"fc": torch.ones(2)}, {})
    with pytest.raises(ValueError, match="`max_samples`"):
        drift({"fc": torch.ones(2)}, {"fc": torch.ones(2)}, max_samples=0)


def test_wasserstein_matches_scipy():
    g = _gen(5)
    a = torch.randn(500, generator=g)
    b = torch.randn(500, generator=g) * 1.5 + 0.3
    assert wasserstein_1d(a, b) == pytest.approx(scipy.stats.wasserstein_distance(a.numpy(), b.numpy()), rel=1e-5)
    c = torch.randn(700, generator=g) + 0.3
    assert wasserstein_1d(a, c) == pytest.approx(scipy.stats.wasserstein_distance(a.numpy(), c.numpy()), rel=2e-2)


def test_wasserstein_on_subsamples_of_large_tensors():
    g = _gen(6)
    a = torch.randn(200_000, generator=g)
    # a shift moves every quantile by the same amount: exact on any paired subsample
    assert wasserstein_1d(a + 0.25, a, max_samples=4096) == pytest.approx(0.25, rel=1e-5)
    # a rescaling: W1(2a, a) = E|a| = sqrt(2 / pi) for a standard normal (sampling error ~ 1-2 %)
    assert wasserstein_1d(2 * a, a, max_samples=8192) == pytest.approx(math.sqrt(2 / math.pi), rel=0.05)
    exact = scipy.stats.wasserstein_distance((2 * a).numpy(), a.numpy())
    assert wasserstein_1d(2 * a, a, max_samples=8192, seed=1) == pytest.approx(exact, rel=0.05)


def test_deterministic_counting_path_equals_bincount():
    from lightning_introspect.methods.weights import _counts_by_sorting

    idx = torch.randint(0, 7, (1000,), generator=_gen(7))
    assert _counts_by_sorting(idx, 9).tolist() == torch.bincount(idx, minlength=9).tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_histograms_and_drift_match_cpu(deterministic):
    g = _gen(8)
    cpu = {"a": torch.randn(300_000, generator=g), "b": torch.randn(64, 3, 3, 3, generator=g), "c": torch.ones(7)}
    cpu["a"][5] = float("nan")
    cuda = {k: v.cuda() for k, v in cpu.items()}
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        on_gpu = histograms(cuda, bins=64)
        d_gpu = drift({k: 1.1 * v for k, v in cuda.items()}, cpu)
    finally:
        torch.use_deterministic_algorithms(previous)
    on_cpu = histograms(cpu, bins=64)
    d_cpu = drift({k: 1.1 * v for k, v in cpu.items()}, cpu)
    for key in cpu:
        assert np.abs(on_gpu[key].counts.numpy() - on_cpu[key].counts.numpy()).sum() <= 4, key
        assert on_gpu[key].nan == on_cpu[key].nan
        assert on_gpu[key].edges.tolist() == on_cpu[key].edges.tolist()
    for key in ("b", "c"):
        assert d_gpu[key].relative_change == pytest.approx(d_cpu[key].relative_change, rel=1e-4)
        assert d_gpu[key].wasserstein == pytest.approx(d_cpu[key].wasserstein, rel=1e-4)
