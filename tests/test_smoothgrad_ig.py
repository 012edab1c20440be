"""SmoothGrad and integrated gradients on floating inputs: captum agreement with the same noise / the same
quadrature, completeness, batching, targets, the shared `attribute` pass and argument errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_introspect.methods.attribution import (
    IG_METHODS,
    METHODS,
    SIGNED_METHODS,
    attribute,
    ig_alphas,
    integrated_gradients,
    saliency,
    smoothgrad,
)
from lightning_introspect.methods.targets import RegionTarget

captum_attr = pytest.importorskip("captum.attr")


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.Tanh(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 3),
    ).eval()


def _smooth_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 3)).eval()


def _close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 1e-5) -> None:
    assert ours.shape == theirs.shape
    scale = float(theirs.detach().abs().max().clamp_min(1e-12))
    torch.testing.assert_close(ours, theirs.detach().to(ours.dtype), rtol=rtol, atol=1e-6 * scale)


def _our_noise(x: torch.Tensor, samples: int, noise: float, seed: int) -> torch.Tensor:
    """The documented draw: for s = 0 .. samples-1, randn(x.shape) from the generator, times noise * range."""
    gen = torch.Generator().manual_seed(seed)
    sigma = noise * (x.flatten(1).max(1).values - x.flatten(1).min(1).values).view(-1, *([1] * (x.ndim - 1)))
    return torch.stack([sigma * torch.randn(x.shape, generator=gen) for _ in range(samples)])  # (S, N, ...)


@pytest.mark.parametrize("abs_", [True, False])
@pytest.mark.parametrize("batch_size", [128, 5])  # all copies in one pass / a pass per copy of the batch
def test_smoothgrad_equals_captum_noise_tunnel_with_the_same_noise(monkeypatch, abs_, batch_size):
    net, x, target = _cnn(), torch.randn(4, 1, 8, 8), [0, 2, 1, 2]
    samples, level = 6, 0.2
    ours = smoothgrad(net, x, target, samples=samples, noise=level, abs=abs_, generator=torch.Generator().manual_seed(7), batch_size=batch_size)
    noise = _our_noise(x, samples, level, 7)
    per_row = noise.transpose(0, 1).reshape(-1, *x.shape[1:])  # captum's layout: sample i's copies are rows i*S .. i*S+S-1
    monkeypatch.setattr(captum_attr.NoiseTunnel, "_add_noise_to_input", staticmethod(lambda inp, stdev, k: inp.repeat_interleave(k, 0) + per_row))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = captum_attr.NoiseTunnel(captum_attr.Saliency(net)).attribute(
            x, nt_type="smoothgrad", nt_samples=samples, stdevs=1.0, target=target, abs=abs_
        )
    _close(ours, theirs)
    assert not ours.requires_grad and ours.shape == x.shape


def test_smoothgrad_noise_is_a_fraction_of_each_samples_range_and_uses_only_its_generator():
    net = _smooth_mlp()
    x = torch.randn(3, 5) * torch.tensor([[1.0], [10.0], [0.1]])  # three very different ranges
    no_noise = smoothgrad(net, x, 0, samples=3, noise=0.0, abs=False)
    torch.testing.assert_close(no_noise, saliency(net, x, 0, abs=False))  # sigma 0: the plain gradient
    rng = torch.get_rng_state()
    a = smoothgrad(net, x, 0, samples=4, noise=0.1, generator=torch.Generator().manual_seed(3))
    b = smoothgrad(net, x, 0, samples=4, noise=0.1, generator=torch.Generator().manual_seed(3))
    c = smoothgrad(net, x, 0, samples=4, noise=0.1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # brute force: the mean |gradient| over the documented noisy copies
    noise = _our_noise(x, 4, 0.1, 3)
    brute = torch.stack([saliency(net, x + noise[s], 0) for s in range(4)]).mean(0)
    _close(a, brute)


@pytest.mark.parametrize("method", IG_METHODS)
def test_integrated_gradients_equals_captum_for_every_quadrature(method):
    net, x = _cnn(), torch.randn(3, 1, 8, 8)
    steps = 7
    ours = integrated_gradients(net, x, [1, 0, 2], steps=steps, method=method, batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = captum_attr.IntegratedGradients(net).attribute(x, target=[1, 0, 2], n_steps=steps, method=method)
    if method == "riemann_trapezoid":  # captum weighs the same points 1/n (halved ends): its sum is (n-1)/n, ours 1
        theirs = theirs * steps / (steps - 1)
    _close(ours, theirs)


@pytest.mark.parametrize("baseline", ["scalar", "channel_tensor", "per_sample_tensor"])
def test_integrated_gradients_baselines_equal_captum(baseline):
    net, x = _cnn(), torch.randn(2, 1, 8, 8)
    base = {"scalar": -0.5, "channel_tensor": torch.full((1, 1, 1), 0.3), "per_sample_tensor": torch.randn(2, 1, 8, 8)}[baseline]
    ours = integrated_gradients(net, x, 2, steps=10, baseline=base, method="riemann_right")
    captum_base = torch.broadcast_to(torch.as_tensor(base), x.shape).clone() if baseline != "scalar" else base
    theirs = captum_attr.IntegratedGradients(net).attribute(x, baselines=captum_base, target=2, n_steps=10, method="riemann_right")
    _close(ours, theirs)


def test_integrated_gradients_is_complete_and_exact_on_a_linear_model():
    net, x = _smooth_mlp(), torch.randn(4, 5)
    base = torch.randn(5)
    ig = integrated_gradients(net, x, [0, 1, 2, 0], steps=64, baseline=base)
    out, out_base = net(x), net(base.expand(4, 5))
    gap = out.gather(1, torch.tensor([[0], [1], [2], [0]])).squeeze(1) - out_base.gather(1, torch.tensor([[0], [1], [2], [0]])).squeeze(1)
    torch.testing.assert_close(ig.sum(1), gap.detach(), atol=2e-4, rtol=1e-3)
    # a linear model: any quadrature gives (x - x') * w exactly, even with 2 points
    lin = nn.Linear(5, 2)
    exact = (x - base) * lin.weight[1].detach()
    for method in IG_METHODS:
        torch.testing.assert_close(integrated_gradients(lin, x, 1, steps=2, baseline=base, method=method), exact)


def test_ig_alphas_weights_sum_to_one_and_points_lie_on_the_path():
    for method in IG_METHODS:
        alphas, weights = ig_alphas(9, method)
        assert len(alphas) == len(weights) == 9 and abs(sum(weights) - 1) < 1e-12
        assert all(0.0 <= a <= 1.0 for a in alphas)


def test_batching_does_not_change_the_results():
    net, x = _cnn(), torch.randn(3, 1, 8, 8)
    one = integrated_gradients(net, x, "pred", steps=9, batch_size=1000)
    many = integrated_gradients(net, x, "pred", steps=9, batch_size=1)  # one path point per pass
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-7)
    a = smoothgrad(net, x, "pred", samples=5, batch_size=1000)
    b = smoothgrad(net, x, "pred", samples=5, batch_size=4)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_pred_is_the_prediction_on_the_clean_input():
    net, x = _cnn(), torch.randn(4, 1, 8, 8)
    pred = net(x).argmax(1)
    torch.testing.assert_close(integrated_gradients(net, x, "pred", steps=5), integrated_gradients(net, x, pred, steps=5))
    torch.testing.assert_close(smoothgrad(net, x, "pred", samples=3, noise=0.5), smoothgrad(net, x, pred.tolist(), samples=3, noise=0.5))


def test_region_target_per_sample_masks_equal_captum_on_the_region_score():
    torch.manual_seed(0)
    seg = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 1)).eval()
    x = torch.randn(2, 1, 6, 6)
    masks = torch.zeros(2, 6, 6, dtype=torch.bool)
    masks[0, :3, :3] = True
    masks[1, 2:, 3:] = True
    target = RegionTarget(class_id=[1, 2], mask=masks)

    class RegionScore(nn.Module):  # captum needs a (N, C) output: the region score as the only class
        def __init__(self, mask: torch.Tensor, ids: list[int]) -> None:
            super().__init__()
            self.mask, self.ids = mask, ids

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            out = seg(inp)
            k = inp.shape[0] // 2  # captum stacks the path points step-major: sample i is row s * 2 + i
            mask, ids = self.mask.repeat(k, 1, 1), torch.tensor(self.ids).repeat(k)
            picked = out[torch.arange(out.shape[0]), ids]
            return (picked * mask).flatten(1).sum(1, keepdim=True)

    ours = integrated_gradients(seg, x, target, steps=6, batch_size=4, method="riemann_middle")
    theirs = captum_attr.IntegratedGradients(RegionScore(masks, [1, 2])).attribute(x, target=0, n_steps=6, method="riemann_middle")
    _close(ours, theirs)


def test_attribute_serves_the_path_methods_with_the_shared_prediction():
    net, x = _cnn(), torch.randn(3, 1, 8, 8)
    opts = {"smoothgrad": {"samples": 3, "noise": 0.1}, "integrated_gradients": {"steps": 5, "method": "riemann_middle"}}
    got = attribute(net, x, "pred", ["saliency", "smoothgrad", "integrated_gradients"], options=opts)
    assert list(got) == ["saliency", "smoothgrad", "integrated_gradients"]
    torch.testing.assert_close(got["saliency"], saliency(net, x, "pred"))
    torch.testing.assert_close(got["smoothgrad"], smoothgrad(net, x, "pred", samples=3, noise=0.1))
    torch.testing.assert_close(got["integrated_gradients"], integrated_gradients(net, x, "pred", steps=5, method="riemann_middle"))
    alone = attribute(net, x, [0, 1, 2], ["integrated_gradients"], options={"integrated_gradients": {"steps": 4}})
    torch.testing.assert_close(alone["integrated_gradients"], integrated_gradients(net, x, [0, 1, 2], steps=4))
    assert "integrated_gradients" in SIGNED_METHODS and "smoothgrad" not in SIGNED_METHODS
    assert METHODS["smoothgrad"] is smoothgrad and METHODS["integrated_gradients"] is integrated_gradients


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda net, x: integrated_gradients(net, x, 0, steps=1), "`steps`"),
        (lambda net, x: integrated_gradients(net, x, 0, method="simpson"), "`method`.*riemann_trapezoid"),
        (lambda net, x: integrated_gradients(net, x, 0, baseline=torch.zeros(3)), "`baseline`"),
        (lambda net, x: smoothgrad(net, x, 0, samples=0), "`samples`"),
        (lambda net, x: smoothgrad(net, x, 0, noise=-0.1), "`noise`"),
        (lambda net, x: smoothgrad(net, x, 0, batch_size=0), "`batch_size`"),
        (lambda net, x: smoothgrad(net, x, [0, 1]), "N=4"),
        (lambda net, x: attribute(net, x, 0, ["smoothgrad"], options={"smoothgrad": {"sigma": 1}}), "sigma"),
    ],
)
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call(_smooth_mlp(), torch.randn(4, 5))


def test_attributions_callback_logs_the_path_methods_as_grids(tmp_path):
    from lightning_introspect.callbacks.attributions import Attributions
    from tests.helpers import quick_trainer, read_events
    from tests.zoo import Classifier, digits_dm, small_cnn

    torch.manual_seed(0)
    cb = Attributions(methods=["smoothgrad", "integrated_gradients"], num_samples=4, targets=[1], faithfulness=False, on_error="raise")
    quick_trainer(tmp_path, [cb], epochs=1, limit_train_batches=2).fit(Classifier(small_cnn()), datamodule=digits_dm())
    images = read_events(str(tmp_path))["images"]
    for method in ("smoothgrad", "integrated_gradients"):
        assert f"introspect/attributions/{method}" in images and f"introspect/attributions/{method}/class_1" in images
        assert cb.maps[method].shape == (4, 1, 16, 16) and torch.isfinite(cb.maps[method]).all()
    assert bool((cb.maps["smoothgrad"] >= 0).all())
