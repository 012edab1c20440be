"""Verdicts with uncertainty (bootstrap intervals, relative thresholds, inconclusive), eMPRT and its entropy,
checked against scipy / numpy and on models built so the verdict is known."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.stats import bootstrap, entropy
from torch import nn

from lightning_introspect.methods.emprt import emprt, map_entropy
from lightning_introspect.methods.randomization import layer_seed, reinitialize_
from lightning_introspect.methods.sanity_report import run_sanity_checks
from lightning_introspect.methods.verdicts import Verdict, bootstrap_interval, decide, reference_similarities


def gradient(model, inputs, target, layer=None):
    x = inputs.detach().clone().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(out.gather(1, torch.as_tensor(target).view(-1, 1)).sum(), x)
    return g.detach()


# ------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_interval_agrees_with_scipy_percentile_bootstrap():
    data = np.random.default_rng(0).normal(0.3, 0.2, size=24)
    ours = bootstrap_interval(torch.from_numpy(data), generator=torch.Generator().manual_seed(1), resamples=20000)
    ref = bootstrap((data,), np.mean, n_resamples=20000, method="percentile", confidence_level=0.95, random_state=2)
    # two Monte Carlo estimates of the same quantiles: they agree to the resampling error
    assert ours[0] == pytest.approx(ref.confidence_interval.low, abs=0.006)
    assert ours[1] == pytest.approx(ref.confidence_interval.high, abs=0.006)
    # the same resamples as a by-hand percentile bootstrap with numpy's percentile (linear interpolation)
    gen = torch.Generator().manual_seed(3)
    low, high = bootstrap_interval(torch.from_numpy(data), generator=gen, resamples=500, confidence=0.9)
    index = torch.randint(0, 24, (500, 24), generator=torch.Generator().manual_seed(3)).numpy()
    means = data[index].mean(1)
    assert (low, high) == pytest.approx((np.percentile(means, 5), np.percentile(means, 95)), abs=1e-12)


def test_bootstrap_over_repeats_resamples_samples_with_their_repeats():
    values = torch.tensor([[0.1, 0.5, 0.3, 0.9], [0.3, 0.7, 0.1, 0.5]])  # (repeats, samples)
    a = bootstrap_interval(values, generator=torch.Generator().manual_seed(0))
    b = bootstrap_interval(values.mean(0), generator=torch.Generator().manual_seed(0))
    assert a == pytest.approx(b, abs=1e-7)
    assert bootstrap_interval(torch.tensor([0.4]), generator=torch.Generator()) == (pytest.approx(0.4), pytest.approx(0.4))
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_interval(values, generator=torch.Generator(), resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(values, generator=torch.Generator(), confidence=1.0)


def test_decide_reads_the_interval_against_the_threshold():
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    low = decide(torch.full((8,), 0.2) + 0.01 * torch.arange(8.0), 0.5, generator=gen(), metric="spearman")
    high = decide(torch.full((8,), 0.8) + 0.01 * torch.arange(8.0), 0.5, generator=gen(), metric="spearman")
    straddle = decide(torch.tensor([0.2, 0.8, 0.3, 0.7, 0.4, 0.6]), 0.5, generator=gen(), metric="spearman")
    assert (low.verdict, high.verdict, straddle.verdict) == ("pass", "fail", "inconclusive")
    assert straddle.low < 0.5 <= straddle.high
    assert decide(torch.tensor([float("nan")]), 0.5, generator=gen(), metric="spearman").verdict == "inconclusive"
    assert Verdict.from_dict(low.to_dict()) == low


def test_references_a_random_map_is_near_zero_and_an_edge_map_matches_itself():
    from lightning_introspect.methods.faithfulness import edge_map

    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    refs = reference_similarities(edge_map(x), x, ["spearman_abs"], generator=torch.Generator().manual_seed(1))
    assert torch.allclose(refs["edge"]["spearman_abs"], torch.ones(6), atol=1e-6)
    assert refs["random"]["spearman_abs"].abs().max() < 0.3
    assert "edge" not in reference_similarities(torch.rand(6, 5), torch.rand(6, 5), ["spearman"], generator=torch.Generator())


# ----------------------------------------------------------------------------------------- eMPRT
def test_map_entropy_equals_numpy_histogram_and_scipy_entropy():
    maps = torch.randn(5, 3, 9, 7, generator=torch.Generator().manual_seed(0))
    maps[1] = 0.0  # constant: entropy 0
    for absolute in (True, False):
        ours = map_entropy(maps, bins=100, absolute=absolute)
        for i in range(5):
            m = maps[i].abs().sum(0) if absolute else maps[i].sum(0)
            counts, _ = np.histogram(m.double().numpy(), bins=100)
            assert ours[i].item() == pytest.approx(entropy(counts), abs=1e-10)
    assert ours[1].item() == 0.0


def test_emprt_equals_a_brute_force_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(7)
    res = emprt(model, x, "pred", {"gradient": gradient}, generator=gen)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # by hand: the seed is one number drawn from the generator; every layer re-initialised with its own seed
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(7)).item())
    pred = model(x).argmax(1)
    randomised = copy.deepcopy(model)
    for name in ("0", "3"):
        reinitialize_(dict(randomised.named_modules())[name], seed=layer_seed(seed, name))
    for i in range(6):
        h0 = entropy(np.histogram(gradient(model, x[i : i + 1], pred[i : i + 1]).abs().sum(1).double().numpy(), bins=100)[0])
        h1 = entropy(np.histogram(gradient(randomised, x[i : i + 1], pred[i : i + 1]).abs().sum(1).double().numpy(), bins=100)[0])
        assert res.trained_entropy["gradient"][i].item() == pytest.approx(h0, abs=1e-6)
        assert res.random_entropy["gradient"][i].item() == pytest.approx(h1, abs=1e-6)
        assert res.scores["gradient"][i].item() == pytest.approx((h1 - h0) / h0, abs=1e-6)
    assert res.mean["gradient"] == pytest.approx(float(res.scores["gradient"].mean()), abs=1e-9)
    assert res.layers == ["3", "0"]
    again = emprt(model, x, "pred", {"gradient": gradient}, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again.scores["gradient"], res.scores["gradient"])


# ------------------------------------------------------------------------------ verdicts on models
def _linear(seed: int = 0) -> nn.Module:
    """One linear layer: its gradient is the target's weight row; randomising it draws a new, unrelated row."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()


def _rank_one(seed: int = 0) -> nn.Module:
    """A 1-unit bottleneck: the gradient of class c is ``w2[c] * w1``, so re-initialising the top layer (or
    asking another class) only rescales the map: ``|map|`` keeps its ranking exactly."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 1), nn.Linear(1, 10)).eval()


class TwoPaths(nn.Module):
    """``skip(x) + head(body(x))``: the top block (``head``, run last) holds only part of the gradient; ``scale``
    sets how much of the map survives the top block's re-initialisation (0: none)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.skip = nn.Linear(64, 10, bias=False)
        self.body = nn.Linear(64, 16, bias=False)
        self.head = nn.Linear(16, 10, bias=False)
        with torch.no_grad():
            self.skip.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.skip(x) + self.head(self.body(x))


def _check(model, x, **kwargs):
    options = dict(methods={"gradient": gradient}, warn=False, run_emprt=False, seed=0)
    return run_sanity_checks(model, x, **{**options, **kwargs})


def test_verdicts_do_not_flip_with_the_number_of_samples():
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = {"linear": set(), "rank_one": set(), "class": set()}
    for n in (8, 12, 16, 24, 32, 48, 64):
        linear = _check(_linear(), x[:n])
        seen["linear"].add(linear.verdicts["gradient"])
        seen["class"].add(linear.class_sensitivity_verdicts["gradient"])
        seen["rank_one"].add(_check(_rank_one(), x[:n], class_check=False).verdicts["gradient"])
        detail = linear.details["randomization"]["gradient"]
        assert detail.low <= detail.score <= detail.high and detail.samples == n
    assert seen == {"linear": {"pass"}, "rank_one": {"fail"}, "class": {"pass"}}


def test_a_model_built_at_the_threshold_is_inconclusive():
    """The share of the gradient the top block holds moves the score continuously from about 0 (pass) to
    about 1 (fail); at the crossing the interval straddles the threshold."""
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def margin(scale):
        detail = _check(TwoPaths(scale), x, class_check=False).details["randomization"]["gradient"]
        return detail.score - detail.threshold, detail

    assert margin(0.0)[1].verdict == "pass" and margin(20.0)[1].verdict == "fail"
    lo, hi = 0.0, 20.0
    for _ in range(20):  # bisection on the scale: the score crosses its threshold
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if margin(mid)[0] < 0 else (lo, mid)
    detail = margin((lo + hi) / 2)[1]
    assert detail.verdict == "inconclusive" and detail.low < detail.threshold <= detail.high


def test_class_sensitivity_fails_only_when_other_classes_look_like_the_same_class():
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    linear = _check(_linear(), x)  # different weight rows per class, the same map under noise: pass
    assert linear.class_same["gradient"]["spearman"] == pytest.approx(1.0, abs=1e-6)
    assert linear.details["class_least"]["gradient"].references["same_class"] == pytest.approx(1.0, abs=1e-6)
    assert linear.class_sensitivity_verdicts["gradient"] == "pass"
    assert linear.details["class_second"]["gradient"].verdict == "pass"
    assert linear.classes["least"] == _linear()(x).argmin(1).tolist()


def test_the_report_carries_bottom_up_and_emprt_and_round_trips():
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    report = run_sanity_checks(_linear(), x, methods={"gradient": gradient}, order="both", warn=False, seed=3)
    assert set(report.curves) == {"cascading", "bottom_up"}
    assert set(report.details) == {"randomization", "bottom_up", "class_least", "class_second"}
    assert set(report.emprt["gradient"]) == {"score", "low", "high", "trained_entropy", "random_entropy"}
    text = report.markdown()
    assert "| gradient | pass" in text and "References" in text and "eMPRT" in text
    from lightning_introspect.methods.sanity_report import SanityReport

    assert SanityReport.from_dict(report.to_dict()).to_dict() == report.to_dict()
    assert run_sanity_checks(_linear(), x, methods={"gradient": gradient}, order="both", warn=False, seed=3).to_dict() == report.to_dict()
