"""Feature visualisation for segmentation: the dense class objective (a class's mean logit over the centre of
a per-pixel output) and FeatureVisualization's class images for a U-Net with ``classes="auto"``."""

from __future__ import annotations

import glob
import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect._lightning import LightningModule
from lightning_introspect.callbacks.base import IntrospectionInputError
from lightning_introspect.callbacks.feature_visualization import FeatureVisualization
from lightning_introspect.methods.featviz import (
    central_region,
    class_logit,
    dense_class_logit,
    visualize_features,
)
from lightning_introspect.methods.featviz_plan import check_units
from tests.helpers import quick_trainer, read_events
from tests.zoo import Classifier, Segmenter, TinyUNet, digits_dm, shapes_dm, small_cnn


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ================================================================================ the objective
def test_dense_class_logit_is_the_hand_computed_mean_over_the_central_half():
    out = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    # central half: rows 2..5 (4 of 8), columns 1..3 (3 of 6, centred as far as an odd split allows)
    expected = torch.stack([out[0, 1, 2:6, 1:4].mean(), out[1, 2, 2:6, 1:4].mean()])
    value = dense_class_logit([1, 2])({}, out)
    assert torch.allclose(value, expected, atol=1e-6)
    assert torch.allclose(class_logit([1, 2])({}, out), expected, atol=1e-6)  # the same objective on a dense output
    assert torch.allclose(dense_class_logit(0, region=1.0)({}, out), out[:, 0].mean((1, 2)), atol=1e-6)
    mask = torch.zeros(8, 6, dtype=torch.bool)
    mask[0, 0] = mask[7, 5] = True
    assert torch.allclose(dense_class_logit(2, region=mask)({}, out), (out[:, 2, 0, 0] + out[:, 2, 7, 5]) / 2, atol=1e-6)
    # the mean, not the sum: the same logit everywhere gives that logit at any output size
    for size in [(4, 4), (16, 12)]:
        assert dense_class_logit(1)({}, torch.full((1, 3, *size), 2.5)).tolist() == [2.5]
    assert int(central_region((8, 6)).sum()) == 12


def test_dense_class_logit_refuses_bad_regions_and_outputs_clearly():
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="`region`"):
            dense_class_logit(0, region=bad)
    with pytest.raises(ValueError, match="bool mask"):
        dense_class_logit(0, region=torch.ones(4, 4))
    with pytest.raises(ValueError, match="at least one pixel"):
        dense_class_logit(0, region=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"match the output's size \(8, 8\)"):
        dense_class_logit(0, region=torch.ones(4, 4, dtype=torch.bool))({}, torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*class_logit"):
        dense_class_logit(0)({}, torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"`class_id` in \[0, 1\]"):
        dense_class_logit(3)({}, torch.zeros(1, 2, 4, 4))


def test_dense_objective_on_a_linear_segmenter_finds_the_known_optimum():
    """A 1x1-conv "segmenter": the class-1 logit at each pixel is w . x + b. The optimised image must raise the
    central mean of that function, push every central pixel's channels towards the sign of w, leave the
    pixels outside the region exactly as they started (no gradient reaches them), and report as its
    objective the central mean computed by hand on the returned image."""
    net = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.5, 0.5, 0.5], [2.0, -1.0, 0.5]]).view(2, 3, 1, 1))
        net.bias.copy_(torch.tensor([0.0, 0.3]))
    w, b = net.weight[1, :, 0, 0].detach(), float(net.bias[1].detach())
    kwargs = {"shape": (1, 3, 8, 8), "value_range": (0.0, 1.0), "steps": 40, "lr": 0.2, "seed": 0}
    res = visualize_features(net, dense_class_logit(1), **kwargs)
    img = res.images[0]
    inside = central_region((8, 8))
    by_hand = float(((w.view(3, 1, 1) * img).sum(0) + b)[inside].mean())
    assert float(res.objective[0]) == pytest.approx(by_hand, abs=1e-5)
    assert float(res.objective[0]) > float(res.initial_objective[0]) + 0.5
    best = float(w.clamp_min(0).sum()) + b  # every central pixel at 1 where w > 0 and at 0 where w < 0
    assert float(res.objective[0]) > 0.9 * best
    central = img[:, inside]  # (3, pixels)
    assert bool((central[0] > 0.9).all() and (central[1] < 0.1).all() and (central[2] > 0.9).all())
    # outside the region: after one step exactly the starting noise of 40 steps ago (same seed)...
    one_step = visualize_features(net, dense_class_logit(1), **{**kwargs, "steps": 1})
    assert torch.equal(one_step.images[0][:, ~inside], img[:, ~inside])
    # ...which the whole-output objective (region=1.0) does move
    whole = visualize_features(net, dense_class_logit(1, region=1.0), **{**kwargs, "steps": 1})
    assert not torch.equal(whole.images[0][:, ~inside], img[:, ~inside])


def test_auto_classes_for_segmentation_leave_out_the_background():
    assert check_units({}, (2, 4, 8, 8), "auto", "auto", task="segmentation", background=0) == [1, 2, 3]
    assert check_units({}, (2, 4, 8, 8), "auto", "auto", task="segmentation", background=2) == [0, 1, 3]
    assert check_units({}, (2, 4, 8, 8), "auto", "auto", task="classification") == []  # dense output, not segmentation
    assert check_units({}, (2, 4, 8, 8), "auto", [3], task="segmentation") == [3]
    with pytest.raises(ValueError, match="classifier output"):
        check_units({}, (2, 4, 8, 8), "auto", [3], task="classification")


# ================================================================================= the callback
def _text(log_dir: str, tag: str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts = []
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(path, size_guidance={"tensors": 0})
        acc.Reload()
        if tag in acc.Tags().get("tensors", []):
            texts += [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)]
    return texts


def _fit_unet(tmp_path, callbacks):
    torch.manual_seed(0)
    model = Segmenter(TinyUNet())
    trainer = quick_trainer(tmp_path, callbacks, epochs=2, limit_train_batches=2)
    trainer.fit(model, datamodule=shapes_dm())
    return model, trainer


def test_unet_at_default_settings_logs_class_images_and_leaves_training_unchanged(tmp_path):
    plain, _ = _fit_unet(tmp_path / "plain", [])
    cb = FeatureVisualization(on_error="raise")  # defaults: classes="auto", task="auto", 32 steps, 4 settings
    watched, trainer = _fit_unet(tmp_path / "watched", [cb])
    assert cb.resolved_task == "segmentation" and cb.background == 0
    assert cb.classes_chosen == [1, 2]  # every class but the background
    assert cb.layer_names and "net.head" not in cb.layer_names  # the 1x1 logits conv is what the class images show
    events = read_events(trainer.logger.log_dir)
    for c in (1, 2):
        assert len(events["images"][f"introspect/featviz/class/{c}"]) == 2  # at half of training and at the end
        for s in cb.columns:
            assert f"introspect/featviz/objective/{s}/class/{c}" in events["scalars"]
    table = _text(trainer.logger.log_dir, "introspect/featviz/table/text_summary")
    assert table and "mean logit of the class over the central half" in table[-1] and "background class 0" in table[-1]
    # the logged class objective is the central-half mean logit of the logged image, recomputed here
    img = cb.images["class/1"][cb.columns.index("none")]
    with torch.no_grad():
        out = watched.eval()(img[None])
    assert float(cb.results["none"].objective[cb.unit_keys().index("class/1")]) == pytest.approx(
        float(out[0, 1][central_region(tuple(out.shape[-2:]))].mean()), abs=1e-4
    )
    a, b = plain.state_dict(), watched.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(not m._forward_hooks for m in watched.modules())


def test_an_explicit_task_the_data_contradict_is_refused_before_training(tmp_path):
    cb = FeatureVisualization(task="classification", layers=[], steps=2, on_error="raise")
    torch.manual_seed(0)
    trainer = quick_trainer(tmp_path / "cls", [cb], epochs=1, limit_train_batches=1)
    with pytest.raises(IntrospectionInputError, match="`task='classification'` needs one label per sample"):
        trainer.fit(Segmenter(TinyUNet()), datamodule=shapes_dm())
    assert trainer.global_step == 0
    cb = FeatureVisualization(task="segmentation", layers=[], steps=2, on_error="raise")
    trainer = quick_trainer(tmp_path / "seg", [cb], epochs=1, limit_train_batches=1)
    with pytest.raises(IntrospectionInputError, match="`task='segmentation'` needs per-pixel logits"):
        trainer.fit(Classifier(small_cnn()), datamodule=digits_dm())
    assert trainer.global_step == 0
    with pytest.raises(ValueError, match="`class_region`"):
        FeatureVisualization(class_region=0)
    with pytest.raises(ValueError, match="`task`"):
        FeatureVisualization(task="detection")


class Denoiser(LightningModule):
    """An image-to-image model on unlabelled data: a dense output, but no masks."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self(batch[0])[:, :1], batch[0])

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("task", ["auto", "segmentation"])
def test_unlabelled_dense_outputs_are_segmentation_only_when_said(tmp_path, task):
    loader = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))), batch_size=4)
    cb = FeatureVisualization(task=task, layers=[], steps=2, on_error="raise")
    trainer = quick_trainer(tmp_path, [cb], epochs=1, limit_train_batches=1)
    trainer.fit(Denoiser(), train_dataloaders=loader, val_dataloaders=loader)
    if task == "auto":  # an autoencoder's reconstruction is not per-pixel class logits: no class images
        assert cb.resolved_task == "classification" and cb.classes_chosen == [] and not cb.images
    else:
        assert cb.resolved_task == "segmentation" and cb.background is None and cb.classes_chosen == [0, 1]
        assert sorted(cb.images) == ["class/0", "class/1"]
