"""``methods.weights`` binning internals: small CPU tensors binned together equal the per-tensor path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_introspect.methods import weights
from lightning_introspect.methods.weights import histogram, histograms


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
