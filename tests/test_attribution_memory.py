"""The Attributions callback's extra passes on large inputs: chunks sized to a memory budget, the same numbers.

The explanations, the deletion / insertion curves and eMPRT run a few samples at a time once a pass of all
of them would exceed :data:`~lightning_introspect.methods.chunks.DEFAULT_MEMORY_BUDGET`; every chunked result
must be bitwise the unchunked one. The models are float64: float64 CPU convolutions compute each sample on
its own whatever the batch size (some float32 kernels differ in the last bits between batch sizes, which
says nothing about the chunking). The grids draw large images at the tiles' size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_introspect._lightning import pl
from lightning_introspect.callbacks import attribution_classes, attribution_scores
from lightning_introspect.callbacks.attributions import Attributions
from lightning_introspect.methods import faithfulness
from lightning_introspect.methods.attribution import attribute
from lightning_introspect.methods.attribution_runs import attribute_targets
from lightning_introspect.methods.chunks import activation_bytes
from lightning_introspect.methods.faithfulness import faithfulness_curves, perturbation_rows
from lightning_introspect.methods.targets import RegionTarget
from lightning_introspect.render.grid import SHOWN_SIDE, shown_size, shrink_images
from tests.helpers import quick_trainer, read_events
from tests.test_attributions_callback import _Generic


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).double().eval()


def _batch_sizes(model: nn.Module) -> list[int]:
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _module, args: sizes.append(int(args[0].shape[0])))
    return sizes


# ----------------------------------------------------------------------------------- faithfulness curves
def test_perturbation_rows_follow_the_budget():
    net, x = _classifier(), torch.zeros(5, 3, 16, 16, dtype=torch.float64)
    row = activation_bytes(net, x[:1]) + 3 * 3 * 16 * 16 * 8 + 16 * 16 * 5  # activations, 3 copies, order + mask
    assert perturbation_rows(net, x, memory_budget=10 * row) == 10
    assert perturbation_rows(net, x, memory_budget=10 * row - 1) == 9
    assert perturbation_rows(net, x, memory_budget=1) == 1


@pytest.mark.parametrize("segmentation", [False, True])
def test_chunked_curves_are_bitwise_the_unchunked_ones(segmentation):
    torch.manual_seed(2)
    if segmentation:
        net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 3, padding=1)).double().eval()
        target = RegionTarget(class_id=torch.tensor([0, 2, 1, 2, 0]), mask=torch.rand(5, 12, 12) > 0.5)
    else:
        net, target = _classifier(), torch.tensor([0, 1, 2, 3, 1])
    x = torch.randn(5, 3, 12, 12, dtype=torch.float64)
    maps = {"a": torch.randn(5, 3, 12, 12, dtype=torch.float64), "b": torch.rand(5, 12, 12, dtype=torch.float64)}
    whole = faithfulness_curves(net, x, maps, target, steps=6, memory_budget=None)
    rows = perturbation_rows(net, x, memory_budget=2**16)
    assert 1 < rows < 5 * 5 * 2 * 2  # the budget does cut the run into several forwards
    sizes = _batch_sizes(net)
    chunked = faithfulness_curves(net, x, maps, target, steps=6, memory_budget=2**16)
    assert max(sizes[2:]) == rows and len(sizes) > 3  # the first forward: the measurement; the second: the inputs
    for name in maps:
        for kind in ("deletion", "insertion"):
            assert torch.equal(whole[name][kind].curve, chunked[name][kind].curve), (name, kind)


def test_the_default_budget_cuts_large_images_only():
    net = _classifier()
    small, large = torch.zeros(4, 3, 16, 16, dtype=torch.float64), torch.zeros(4, 3, 384, 384, dtype=torch.float64)
    assert perturbation_rows(net, small) > 128  # small images: the 128 per forward of before
    assert perturbation_rows(net, large) < 128


# --------------------------------------------------------------------------------------- explanations
def test_attribute_targets_below_the_samples_is_bitwise_one_pass():
    net, x = _classifier(), torch.randn(7, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    targets = [torch.tensor([0, 1, 2, 3, 0, 1, 2]), torch.full((7,), 3)]
    seen: list[int] = []

    def explain(xs, t):
        seen.append(int(xs.shape[0]))
        return attribute(net, xs, t, ["saliency", "guided_backprop", "grad_cam"])

    whole = attribute_targets(explain, x, targets, max_batch=14)
    assert seen == [14]
    seen.clear()
    chunked = attribute_targets(explain, x, targets, max_batch=3)
    assert seen == [3, 3, 1, 3, 3, 1]
    for m in whole:
        assert torch.equal(whole[m], chunked[m]), m


# ------------------------------------------------------------------------------------------ the callback
def _module() -> _Generic:
    """The float64 classifier on 32 fixed samples, trained and validated on them (16 a batch)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(32, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (32,), generator=gen)
    return _Generic(_classifier().train(), x, y)


def _fit(tmp_path, monkeypatch, rows: int | None) -> tuple[Attributions, list[int]]:
    sizes: list[int] = []
    if rows is not None:  # the chunk sizes a budget gives large images, forced on small ones
        monkeypatch.setattr(attribution_classes, "explanation_rows", lambda *_a, **_k: rows)
        monkeypatch.setattr(attribution_scores, "explanation_rows", lambda *_a, **_k: rows)
        monkeypatch.setattr(faithfulness, "perturbation_rows", lambda *_a, **_k: rows)
    cb = Attributions(methods=["saliency", "guided_backprop", "grad_cam"], targets=[1, 2], num_samples=6, at=[0.0],
                      faithfulness_steps=5, on_error="raise")
    real = cb._attribute

    def recording(model, x, target, methods):
        sizes.append(int(x.shape[0]))
        return real(model, x, target, methods)

    cb._attribute = recording  # type: ignore[method-assign]
    pl.seed_everything(0, verbose=False)
    quick_trainer(tmp_path, [cb], epochs=1).fit(_module())
    monkeypatch.undo()
    return cb, sizes


def test_the_callback_in_chunks_logs_bitwise_the_same(tmp_path, monkeypatch):
    whole, whole_sizes = _fit(tmp_path / "whole", monkeypatch, None)
    chunked, chunked_sizes = _fit(tmp_path / "chunked", monkeypatch, 4)
    assert max(whole_sizes) == 18 and max(chunked_sizes) == 4  # 6 samples x 3 targets in one pass / chunks of 4
    assert len(whole.history) == len(chunked.history) == 2
    for a, b in zip(whole.history, chunked.history):
        assert a["faithfulness"] == b["faithfulness"] and a["faithfulness"]
        assert a["emprt"] == b["emprt"] and a["emprt"]
    for m in whole.maps:
        assert torch.equal(whole.maps[m], chunked.maps[m]), m
        for c in (1, 2):
            assert torch.equal(whole.class_maps[m][c], chunked.class_maps[m][c]), (m, c)


# ---------------------------------------------------------------------------------------------- display
def test_large_images_are_drawn_at_the_tile_size():
    assert shown_size(384, 384) == (SHOWN_SIDE, SHOWN_SIDE) and shown_size(384, 192) == (128, 64)
    assert shown_size(100, 40) == (100, 40)
    checks = ((torch.arange(12).view(-1, 1) + torch.arange(12)) % 2).double().view(1, 1, 12, 12)
    # antialiased: a pixel-sized checkerboard shrunk 3 times is grey, not every third pixel (all 0 or all 1)
    shown = shrink_images(checks, (4, 4))
    assert shown.shape == (1, 1, 4, 4) and float((shown - 0.5).abs().max()) < 0.15
    plain = F.interpolate(checks, size=(4, 4), mode="bilinear", align_corners=False)
    assert float((plain - 0.5).abs().min()) == 0.5  # what the tiles would show without the antialiasing
    assert torch.allclose(shrink_images(torch.full((2, 3, 384, 256), 0.25), (128, 85)), torch.tensor(0.25))
    assert shrink_images(checks, (12, 12)) is checks


def test_grids_of_large_images_are_logged_small(tmp_path):
    module = _module()
    gen = torch.Generator().manual_seed(5)
    module.x = torch.randn(32, 3, 192, 192, generator=gen, dtype=torch.float64)
    cb = Attributions(methods=["saliency"], num_samples=4, at=[0.0], faithfulness=False, run_emprt=False, on_error="raise")
    quick_trainer(tmp_path, [cb], epochs=1).fit(module)
    assert cb.maps["saliency"].shape == (4, 3, 192, 192)  # the maps themselves keep the input's size
    assert "introspect/attributions/saliency" in read_events(str(tmp_path))["images"]
    sizes = _image_sizes(tmp_path)
    # the inputs: 4 tiles of 128 px in one row (padding 2); the captioned grid: 4 tiles of at most 128 px a row
    assert sizes["introspect/attributions/inputs"] == (4 * 130 + 2, 132)
    assert sizes["introspect/attributions/saliency"][0] < 4 * 192


def _image_sizes(log_dir) -> dict[str, tuple[int, int]]:
    """``{tag: (width, height)}`` of the last image of each tag."""
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True):
        acc = EventAccumulator(path, size_guidance={"images": 0})
        acc.Reload()
        for tag in acc.Tags().get("images", []):
            last = acc.Images(tag)[-1]
            out[tag] = (last.width, last.height)
    return out
