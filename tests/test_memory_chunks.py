"""Extra passes in chunks sized to a memory budget: the chunk size follows the budget, no pass holds more
samples than a chunk, and the results are bitwise those of one unchunked pass.

The models here are float64: float64 CPU convolutions compute each sample on its own whatever the batch
size, so the explanations of a chunk are bit for bit those of the same samples in a larger batch (some
float32 CPU kernels differ in the last bits between batch sizes, which says nothing about the chunking).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_introspect.methods.chunks import (
    GRADIENT_FACTOR,
    activation_bytes,
    chunk_slices,
    chunk_target,
    explain_in_chunks,
    explanation_rows,
    forward_rows,
    rows_per_chunk,
)
from lightning_introspect.methods.class_check import class_sensitivity
from lightning_introspect.methods.explainers import DEFAULT_METHODS, Explainer, work_mode
from lightning_introspect.methods.image_stats import (
    PERTURBATION_FACTOR,
    perturbation_accuracy,
    perturbation_batch_size,
    perturbation_sweep,
    perturbed_chunks,
)
from lightning_introspect.methods.randomization import randomization_curves
from lightning_introspect.methods.targets import RegionTarget


def _record_batch_sizes(model: nn.Module) -> list[int]:
    """The batch size of every later forward pass of ``model`` and of its deep copies (the hook travels with
    a copy and appends to the same list); the layer names stay as they are (they seed the re-initialisation)."""
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _module, args: sizes.append(int(args[0].shape[0])))
    return sizes


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )
    with torch.no_grad():  # trained-looking norm statistics, so re-initialising them changes something
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.double().eval()


def _segmenter() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 3, padding=1)).double().eval()


def _images(n: int = 7, side: int = 24) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(2))


def _budget_for(model: nn.Module, x: torch.Tensor, rows: int) -> int:
    """The budget under which ``rows`` samples are explained together (the inputs in the model's dtype, as
    the checks pass them)."""
    return rows * GRADIENT_FACTOR * activation_bytes(model, x[:1].double())


# ------------------------------------------------------------------------------------ the budget
def test_activation_bytes_counts_each_output_once_and_the_chunk_size_follows_the_budget() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 3))
    x = torch.zeros(5, 1, 8, 8)
    # input 64 floats, conv and ReLU 128 each, Flatten a view of ReLU's output (free), logits 3: 4 bytes each
    assert activation_bytes(net, x[:1]) == 4 * (64 + 128 + 128 + 3)
    per_row = GRADIENT_FACTOR * 1292
    assert [explanation_rows(net, x, budget) for budget in (1, per_row, 2 * per_row - 1, 2 * per_row, 10 * per_row)] == [1, 1, 1, 2, 10]
    assert forward_rows(net, x, 4 * 1292) == 4
    assert rows_per_chunk(10, 95) == 9
    assert [(s.start, s.stop) for s in chunk_slices(7, 3)] == [(0, 3), (3, 6), (6, 7)]
    with pytest.raises(ValueError, match="memory_budget"):
        rows_per_chunk(10, 0)
    # a measuring pass leaves no hook behind and the mode as it was
    net.train()
    activation_bytes(net, x[:1])
    assert net.training and not any(m._forward_hooks for m in net.modules())


def test_perturbation_batch_size_follows_the_budget() -> None:
    x = torch.zeros(64, 3, 40, 40)
    row = 3 * 40 * 40 * 4
    assert perturbation_batch_size(x, 5 * PERTURBATION_FACTOR * row) == 5
    assert perturbation_batch_size(x, 5 * PERTURBATION_FACTOR * row - 1) == 4
    assert perturbation_batch_size(x, 1) == 1
    assert perturbation_batch_size(x, 10**12) == 64  # never more than the images


def test_chunk_target_cuts_per_sample_targets_and_keeps_shared_ones() -> None:
    rows = slice(1, 3)
    assert chunk_target(torch.tensor([4, 5, 6]), 3, rows)[1].tolist() == [5, 6]
    assert chunk_target([4, 5, 6], 3, rows) == (True, [5, 6])
    assert chunk_target(2, 3, rows) == (True, 2)
    masks = torch.arange(3 * 4).view(3, 2, 2) > 5
    ok, region = chunk_target(RegionTarget(class_id=torch.tensor([0, 1, 2]), mask=masks), 3, rows)
    assert ok and region.class_id.tolist() == [1, 2] and torch.equal(region.mask, masks[1:3])
    shared = torch.ones(2, 2, dtype=torch.bool)
    ok, region = chunk_target(RegionTarget(class_id=1, mask=shared), 3, rows)
    assert ok and region.mask is shared
    assert not chunk_target(lambda out: out[:, 0], 3, rows)[0]  # a score of the whole output: not cut


# ------------------------------------------------------------------------------- explanations
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_explain_in_chunks_is_bitwise_one_pass(rows: int) -> None:
    net, x = _classifier(), _images()
    explain = Explainer(list(DEFAULT_METHODS))
    target = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    with work_mode(net):
        layer = explain.resolve_layer(net, x[:1].double(), "auto")
        whole = explain(net, x, target, layer)
        sizes = _record_batch_sizes(net)
        chunked = explain_in_chunks(explain, net, x, target, layer, rows=rows)
    assert set(chunked) == set(whole)
    for name in whole:
        assert torch.equal(chunked[name], whole[name]), name
    assert max(sizes) == rows


def test_explain_in_chunks_runs_a_whole_batch_callable_target_in_one_pass() -> None:
    net, x = _classifier(), _images(4)
    sizes = _record_batch_sizes(net)
    maps = explain_in_chunks(Explainer(["saliency"]), net, x, lambda out: out[:, 0], None, rows=1)
    assert maps["saliency"].shape == (4, 3, 24, 24) and sizes == [4]


@pytest.mark.parametrize("mode", ["cascading", "independent"])
def test_randomization_curves_in_chunks_equal_one_pass(mode: str) -> None:
    net, x = _classifier(), _images()
    common = dict(mode=mode, metrics=["spearman_abs", "spearman", "ssim"], keep_maps=3, repeats=2)
    whole = randomization_curves(net, x, **common, memory_budget=10**12)
    budget = _budget_for(net, x, 2)
    sizes = _record_batch_sizes(net)
    chunked = randomization_curves(net, x, **common, memory_budget=budget)
    assert max(sizes[1:]) == 2  # after the one forward pass that fixes the targets: no pass over more than a chunk
    assert chunked.layers == whole.layers and chunked.agreement == whole.agreement
    for method in whole.curves:
        for metric in whole.curves[method]:
            assert list(whole.curves[method][metric].values()) == list(chunked.curves[method][metric].values())
            for (_, a), (_, b) in zip(whole.samples[method][metric].items(), chunked.samples[method][metric].items()):
                assert torch.equal(a, b)
        for (_, a), (_, b) in zip(whole.maps[method].items(), chunked.maps[method].items()):
            assert torch.equal(a, b)


def test_class_sensitivity_in_chunks_equals_one_pass() -> None:
    net, x = _classifier(), _images()
    common = dict(others=["least", "second", "random"], metrics=["spearman_abs", "ssim"], keep_maps=7)
    whole = class_sensitivity(net, x, DEFAULT_METHODS, **common, memory_budget=10**12)
    budget = _budget_for(net, x, 3)
    sizes = _record_batch_sizes(net)
    chunked = class_sensitivity(net, x, DEFAULT_METHODS, **common, memory_budget=budget)
    assert max(sizes[1:]) == 3  # after the one forward pass that ranks the classes
    assert whole.to_dict() == chunked.to_dict()
    for method in whole.samples:
        for other, per_metric in whole.samples[method].items():
            for metric, values in per_metric.items():
                assert torch.equal(values, chunked.samples[method][other][metric])
        for key, maps in whole.maps[method].items():
            assert torch.equal(maps, chunked.maps[method][key])


def test_class_sensitivity_over_regions_in_chunks_equals_one_pass() -> None:
    net, x = _segmenter(), _images(5, 12)
    with torch.no_grad():
        pred = net(x.double()).argmax(1)
    region = RegionTarget(class_id=pred[:, 0, 0], mask=pred == pred[:, :1, :1])
    methods = ["saliency", "input_x_gradient", "guided_backprop"]
    whole = class_sensitivity(net, x, methods, region=region, metrics=["spearman"], memory_budget=10**12)
    budget = _budget_for(net, x, 2)
    sizes = _record_batch_sizes(net)
    chunked = class_sensitivity(net, x, methods, region=region, metrics=["spearman"], memory_budget=budget)
    assert max(sizes[1:]) == 2
    assert whole.to_dict() == chunked.to_dict()
    for method in whole.maps:
        for key, maps in whole.maps[method].items():
            assert torch.equal(maps, chunked.maps[method][key])


# -------------------------------------------------------------------------- perturbation test
@pytest.mark.parametrize(("kind", "strength"), [("blur", 0.5), ("blur", 2.0), ("noise", 0.3), ("color", 0.5)])
def test_perturbed_chunks_are_bitwise_the_whole_batch(kind: str, strength: float) -> None:
    x = torch.rand(12, 3, 100, 100, generator=torch.Generator().manual_seed(3))  # large enough for parallel kernels
    whole = torch.cat(list(perturbed_chunks(x, kind, strength, seed=0, rows=12)))
    swept = perturbation_sweep(lambda t: t, x, {kind: [strength]}, seed=0, noise_scale=1.0)[kind][1][1]
    assert torch.equal(swept, whole)
    for rows in (1, 2, 5):
        assert torch.equal(torch.cat(list(perturbed_chunks(x, kind, strength, seed=0, rows=rows))), whole)
    assert not torch.equal(whole, x)


def test_blur_matches_a_reference_convolution() -> None:
    from scipy.ndimage import correlate1d

    from lightning_introspect.methods.image_stats import gaussian_blur, gaussian_kernel1d

    x = torch.rand(2, 3, 20, 17, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    k = gaussian_kernel1d(1.5).double().numpy()
    expected = correlate1d(correlate1d(x.numpy(), k, axis=3, mode="nearest"), k, axis=2, mode="nearest")
    assert torch.allclose(gaussian_blur(x.float(), 1.5).double(), torch.from_numpy(expected), atol=1e-6)


def test_perturbation_accuracy_in_chunks_equals_one_pass() -> None:
    weights = torch.randn(3, 3 * 24 * 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = torch.randn(10, 3, 24, 24, generator=torch.Generator().manual_seed(6))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    strengths = {"blur": [1.0, 4.0], "noise": [0.5, 4.0], "color": [0.5, 1.0]}
    sizes: list[int] = []

    def predict(inputs: torch.Tensor) -> torch.Tensor:
        sizes.append(int(inputs.shape[0]))
        return inputs.double().flatten(1) @ weights.T  # a linear classifier: every perturbation moves its logits

    whole = perturbation_accuracy(predict, x, y, num_classes=3, strengths=strengths, seed=0, batch_size=10)
    assert len({a for r in whole.values() for a in r.accuracy}) > 1  # the perturbations move predictions
    for rows in (1, 3):
        sizes.clear()
        chunked = perturbation_accuracy(predict, x, y, num_classes=3, strengths=strengths, seed=0, batch_size=rows)
        assert chunked == whole and max(sizes) == rows
    sizes.clear()
    budget = 4 * PERTURBATION_FACTOR * x[:1].numel() * 4
    assert perturbation_accuracy(predict, x, y, num_classes=3, strengths=strengths, seed=0, memory_budget=budget) == whole
    assert max(sizes) == 4


def test_map_entropy_of_large_maps_in_chunks_equals_one_sample_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """eMPRT's entropies hold about five float64 copies of the maps: 3x384x384 maps are counted a few samples
    at a time (the memory budget), and the entropies are those of each sample alone, bitwise."""
    from lightning_introspect.methods import emprt

    maps = torch.randn(9, 3, 384, 384, generator=torch.Generator().manual_seed(7))
    maps[4] = 0.0  # a constant map: entropy 0
    calls: list[int] = []
    counted = emprt._map_entropy
    monkeypatch.setattr(emprt, "_map_entropy", lambda m, bins, absolute: calls.append(int(m.shape[0])) or counted(m, bins, absolute))
    whole = emprt.map_entropy(maps)
    assert len(calls) > 1 and max(calls) < 9 and sum(calls) == 9
    alone = torch.cat([counted(maps[i : i + 1], emprt.DEFAULT_BINS, True) for i in range(9)])
    assert torch.equal(whole, alone) and whole[4] == 0.0


def test_edge_map_of_a_batch_is_each_images_own() -> None:
    """Sobel edges are computed one image at a time (no batch-sized working copies): an image's edges do not
    depend on the batch, and the known answer of a vertical step holds for every image."""
    from lightning_introspect.methods.faithfulness import edge_map

    x = torch.rand(5, 3, 40, 30, generator=torch.Generator().manual_seed(8))
    x[2] = 0.0
    x[2, :, :, 15:] = 1.0  # a vertical step: |gx| = 4 per channel on the two columns around it, 0 elsewhere
    edges = edge_map(x)
    assert edges.shape == (5, 1, 40, 30)
    assert all(torch.equal(edges[i : i + 1], edge_map(x[i : i + 1])) for i in range(5))
    expected = torch.zeros(40, 30)
    expected[:, 14:16] = 12.0
    assert torch.equal(edges[2, 0], expected)
