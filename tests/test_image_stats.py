"""Image statistics, perturbations and error rates by bin (pure torch, checked against numpy / scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d

from lightning_introspect.methods.image_stats import (
    brightness,
    color_filter,
    contrast,
    error_rate_by_bin,
    gaussian_blur,
    gaussian_noise,
    image_statistics,
    noise_level,
    per_class_accuracy,
    perturb,
    perturbation_accuracy,
    saturation,
    sharpness,
)


def _images(n: int = 4, c: int = 3, size: int = 24, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=gen)


def test_statistics_match_numpy_and_scipy() -> None:
    x = _images()
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).numpy().astype(np.float64)
    lap = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)
    mask = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
    h, w = gray.shape[1:]
    for i in range(x.shape[0]):
        ref_sharp = convolve2d(gray[i], lap, mode="valid").var()
        ref_noise = math.sqrt(math.pi / 2) / (6 * (w - 2) * (h - 2)) * np.abs(convolve2d(gray[i], mask, mode="valid")).sum()
        assert sharpness(x)[i].item() == pytest.approx(ref_sharp, rel=1e-4)
        assert noise_level(x)[i].item() == pytest.approx(ref_noise, rel=1e-4)
        assert brightness(x)[i].item() == pytest.approx(gray[i].mean(), rel=1e-5)
        assert contrast(x)[i].item() == pytest.approx(gray[i].std(), rel=1e-4)
        xi = x[i].numpy()
        assert saturation(x)[i].item() == pytest.approx((xi.max(0) - xi.min(0)).mean(), rel=1e-5)
    stats = image_statistics(x)
    assert set(stats) == {"sharpness", "noise", "brightness", "contrast", "saturation"}
    assert all(v.shape == (4,) for v in stats.values())


def test_saturation_only_for_colour_and_zero_for_grey() -> None:
    grey = _images(c=1)
    assert "saturation" not in image_statistics(grey)
    rgb_grey = grey.expand(-1, 3, -1, -1)
    assert torch.allclose(saturation(rgb_grey), torch.zeros(4))
    with pytest.raises(ValueError, match="3-channel"):
        saturation(grey)
    # a grey image expanded to RGB has the same grey-level statistics as the original
    for name in ("sharpness", "noise", "brightness", "contrast"):
        assert torch.allclose(image_statistics(rgb_grey)[name], image_statistics(grey)[name], atol=1e-5)


def test_sharpness_falls_monotonically_with_blur() -> None:
    x = _images(c=1, size=32)
    values = [sharpness(gaussian_blur(x, s)) for s in (0.0, 0.5, 1.0, 2.0, 3.0)]
    for a, b in zip(values, values[1:]):
        assert bool((b < a).all())
    assert torch.equal(gaussian_blur(x, 0.0), x)
    flat = torch.full((2, 3, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat, atol=1e-6)  # replicate padding: no dark border
    assert gaussian_blur(x, 2.0).shape == x.shape


def test_noise_estimate_recovers_the_added_sigma() -> None:
    ramp = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(3, 1, 64, 64)  # smooth: no noise of its own
    assert float(noise_level(ramp).max()) < 1e-4
    gen = torch.Generator().manual_seed(1)
    for sigma in (0.02, 0.05, 0.1):
        noisy = ramp + sigma * torch.randn(ramp.shape, generator=gen)
        est = noise_level(noisy)
        assert torch.allclose(est, torch.full_like(est, sigma), rtol=0.1)


def test_gaussian_noise_uses_only_its_private_generator() -> None:
    x = torch.zeros(64, 1, 16, 16)
    state = torch.get_rng_state()
    a = gaussian_noise(x, 0.5, generator=torch.Generator().manual_seed(3))
    b = gaussian_noise(x, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert float(a.std()) == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ValueError, match="generator"):
        perturb(x, "noise", 0.1)


def test_color_filter_fades_contrast_and_colour() -> None:
    x = _images(size=16)
    assert torch.equal(color_filter(x, 0.0), x)
    contrasts = [float(contrast(color_filter(x, s)).mean()) for s in (0.0, 0.25, 0.5, 0.75, 1.0)]
    change = [float((color_filter(x, s) - x).abs().mean()) for s in (0.0, 0.25, 0.5, 0.75, 1.0)]
    warmth = [float((color_filter(x, s)[:, 0] - color_filter(x, s)[:, 2]).mean()) for s in (0.0, 0.5, 1.0)]
    assert all(b < a for a, b in zip(contrasts, contrasts[1:]))
    assert all(b > a for a, b in zip(change, change[1:]))
    assert all(b > a for a, b in zip(warmth, warmth[1:]))  # red up, blue down
    assert float(saturation(color_filter(x, 0.5)).mean()) < float(saturation(x).mean())
    assert contrasts[-1] == pytest.approx(0.0, abs=1e-6)
    grey = _images(c=1)
    assert torch.allclose(brightness(color_filter(grey, 0.5)), brightness(grey), atol=1e-6)  # mean kept
    with pytest.raises(ValueError, match=r"strength.*\[0, 1\]"):
        color_filter(x, 1.5)


def test_error_rate_by_bin_counts_and_rates() -> None:
    values = torch.arange(20.0)
    wrong = values < 4  # all errors in the lowest values
    b = error_rate_by_bin(values, wrong, num_bins=4)
    assert b.counts == [5, 5, 5, 5]
    assert b.errors == [4, 0, 0, 0]
    assert b.rate == [0.8, 0.0, 0.0, 0.0]
    assert b.edges[0] == 0.0 and b.edges[-1] == 19.0
    # ties: a statistic with many equal values merges bins instead of splitting equal values
    tied = torch.tensor([0.0] * 10 + [1.0, 2.0, 3.0, 4.0, 5.0])
    bt = error_rate_by_bin(tied, torch.zeros(15, dtype=torch.bool), num_bins=5)
    assert sum(bt.counts) == 15 and bt.counts[0] == 12  # the ten zeros share one bin (with 1.0 and 2.0)
    assert len(bt.edges) == len(bt.counts) + 1
    constant = error_rate_by_bin(torch.ones(6), torch.tensor([1, 0, 0, 0, 0, 0]).bool())
    assert constant.counts == [6] and constant.rate == [pytest.approx(1 / 6)]
    with pytest.raises(ValueError, match="same length"):
        error_rate_by_bin(torch.ones(3), torch.ones(4).bool())
    with pytest.raises(ValueError, match="num_bins"):
        error_rate_by_bin(torch.ones(3), torch.ones(3).bool(), num_bins=0)


def test_per_class_accuracy_marks_absent_classes() -> None:
    pred = torch.tensor([0, 1, 1, 2])
    target = torch.tensor([0, 1, 2, 2])
    assert per_class_accuracy(pred, target, 4) == [1.0, 1.0, 0.5, None]


def test_perturbation_accuracy_known_answers_and_validation() -> None:
    x = _images(n=12, c=1, size=8)
    y = torch.arange(12) % 3
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    state = torch.get_rng_state()
    res = perturbation_accuracy(net, x, y, num_classes=3, strengths={"noise": [0.5, 0.1], "blur": [1.0]}, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert res["noise"].strengths == [0.0, 0.1, 0.5]
    assert len(res["noise"].per_class) == 3 and len(res["noise"].per_class[0]) == 3
    assert res["blur"].accuracy[0] == res["noise"].accuracy[0]
    # known answers: strength 0 is the clean accuracy; blur is deterministic, so its row is the model's
    # accuracy on the blurred images, overall and per class
    with torch.no_grad():
        clean_pred, blurred_pred = net(x).argmax(1), net(gaussian_blur(x, 1.0)).argmax(1)
    assert res["noise"].accuracy[0] == pytest.approx(float((clean_pred == y).float().mean()))
    assert res["noise"].per_class[0] == per_class_accuracy(clean_pred, y, 3)
    assert res["blur"].strengths == [0.0, 1.0]
    assert res["blur"].accuracy[1] == pytest.approx(float((blurred_pred == y).float().mean()))
    assert res["blur"].per_class[1] == per_class_accuracy(blurred_pred, y, 3)
    again = perturbation_accuracy(net, x, y, num_classes=3, strengths={"noise": [0.5, 0.1]}, seed=0)
    assert again["noise"].accuracy == res["noise"].accuracy  # the same noise every call
    with pytest.raises(ValueError, match="perturbations"):
        perturbation_accuracy(net, x, y, num_classes=3, strengths={"jpeg": [1.0]})
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        perturbation_accuracy(net, x.flatten(1), y, num_classes=3, strengths={})


def test_image_statistics_equal_the_single_functions_bitwise() -> None:
    gen = torch.Generator().manual_seed(3)
    for shape in ((5, 1, 9, 11), (4, 3, 8, 8)):
        x = torch.randn(shape, generator=gen)
        stats = image_statistics(x)
        singles = {"sharpness": sharpness, "noise": noise_level, "brightness": brightness, "contrast": contrast}
        if shape[1] == 3:
            singles["saturation"] = saturation
        assert list(stats) == [n for n in ("sharpness", "noise", "brightness", "contrast", "saturation") if n in singles]
        for name, fn in singles.items():
            assert torch.equal(stats[name], fn(x)), name
        assert list(image_statistics(x, ["contrast", "sharpness"])) == ["contrast", "sharpness"]
