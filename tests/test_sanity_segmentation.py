"""Sanity checks on segmentation models: region targets (the largest predicted object), class sensitivity over
the same region, a randomisation curve with a known answer, and the callback on the zoo's U-Net."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_introspect._lightning import pl
from lightning_introspect.callbacks.sanity_checks import SanityChecks
from lightning_introspect.errors import IntrospectionInputError
from lightning_introspect.methods.class_check import class_sensitivity, region_classes
from lightning_introspect.methods.sanity_report import (
    PREDICTED_OBJECTS,
    TRUE_OBJECTS,
    SanityReport,
    run_sanity_checks,
)
from lightning_introspect.methods.targets import object_targets
from tests.helpers import quick_trainer, read_events
from tests.zoo import Segmenter, TinyUNet, shapes, shapes_dm


class OneChannelUNet(nn.Module):
    """A small U-Net (transposed conv, skip concatenation) whose decoder ends in ONE channel before the 1x1
    head. Every class's logit map is that channel times the class's weight plus its bias, so the gradient
    of any class over any region is the same map up to a factor: re-initialising the head leaves the ranking
    of ``|map|`` exactly as it was, and every class gives the same ``|map|`` over one region."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(8, 1, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(1, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc(x)
        return self.head(self.dec(torch.cat([self.up(self.down(skip)), skip], dim=1)))


def _unet_and_images(n: int = 4) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = OneChannelUNet().eval()
    x, _ = shapes(n, seed=3)
    with torch.no_grad():  # class 2 where the last channel is in its top fifth, class 0 elsewhere, never class 1
        f = model.dec(torch.cat([model.up(model.down(model.enc(x))), model.enc(x)], dim=1))
        t = float(f.quantile(0.8))
        model.head.weight.copy_(torch.tensor([-1.0, 0.5, 1.0]).view(3, 1, 1, 1))
        model.head.bias.copy_(torch.tensor([t, -0.5 * t - 0.1, -t]))
    return model, x


GRADIENT_METHODS = ["saliency", "input_x_gradient"]


def test_randomising_the_head_of_a_one_channel_unet_keeps_every_map_and_deeper_layers_change_them() -> None:
    model, x = _unet_and_images()
    report = run_sanity_checks(model, x, methods=GRADIENT_METHODS, metrics=["spearman_abs"], warn=False, class_check=False)
    assert report.task == "segmentation" and report.target == PREDICTED_OBJECTS
    assert report.layers == ["head", "dec.0", "up", "down.1", "enc.0"]
    for method in GRADIENT_METHODS:
        curve = report.curve(method, "spearman_abs")
        assert curve[0] == pytest.approx(1.0, abs=1e-6)  # the head only rescales the map: the known answer
        assert max(curve[1:]) < 0.95  # a real layer below it does change the map
        assert report.verdicts[method] == "fail"


def test_class_sensitivity_compares_classes_over_the_same_region() -> None:
    model, x = _unet_and_images()
    with torch.no_grad():
        out = model(x)
    region = object_targets(out.argmax(1))
    assert (region.class_id == 2).all()  # the largest non-background predicted object of each image
    result = class_sensitivity(model, x, GRADIENT_METHODS, metrics=["spearman_abs"], region=region, others=["least", "second", "random"])
    # Over one region, every class's map is the same map times the class's head weight: |map| ranks agree.
    for method in GRADIENT_METHODS:
        for other in ("least", "second", "random"):
            assert result.similarity[method][other]["spearman_abs"] == pytest.approx(1.0, abs=1e-6)
    # the least likely class: the smallest logit sum over the region
    sums = (out * region.mask.unsqueeze(1).float()).sum((2, 3))
    assert result.classes["least"] == sums.argmin(1).tolist()
    assert result.classes["pred"] == [2] * len(x)


def test_region_classes_pick_a_present_class_else_the_least_likely() -> None:
    out = torch.zeros(2, 4, 4, 4)
    out[:, 0] = 1.0  # background everywhere ...
    out[0, 3, :2, :] = 5.0  # ... a class-3 object (8 pixels) in sample 0,
    out[0, 1, 2:, 2:] = 5.0  # and a smaller class-1 object below it;
    out[1, 2] = 3.0  # sample 1 is class 2 everywhere
    out[1, 3] = -4.0
    region = object_targets(out.argmax(1), background=0)
    classes = region_classes(out, region, ["second", "random", "least"], seed=0)
    assert classes["pred"].tolist() == [3, 2]
    # least likely over the region: sample 0 (rows 0-1): classes 1 and 2 both score 0 there, the first is taken;
    # sample 1: class 3 (-4 everywhere)
    assert classes["least"].tolist() == [1, 3]
    # sample 0: background and class 1 are present; over the object's region background scores 8 x 1.0, class 1 0
    # sample 1: nothing else is predicted: the least likely class over the region is 3
    assert classes["second"].tolist() == [0, 3]
    assert (classes["random"] != classes["pred"]).all()


def test_true_masks_explain_their_largest_objects() -> None:
    model, x = _unet_and_images()
    _, masks = shapes(len(x), seed=3)
    report = run_sanity_checks(model, x, target=masks, methods=["saliency"], metrics=["spearman_abs"], layers=1, warn=False)
    assert report.target == TRUE_OBJECTS
    assert report.classes["pred"] == object_targets(masks).class_id.tolist()
    assert "object regions of the true masks" in report.markdown()
    restored = SanityReport.from_dict(report.to_dict())
    assert (restored.task, restored.target) == ("segmentation", TRUE_OBJECTS)


def test_a_task_the_shapes_contradict_is_refused() -> None:
    model, x = _unet_and_images(2)
    with pytest.raises(IntrospectionInputError, match="`task='classification'`"):
        run_sanity_checks(model, x, target=shapes(2, seed=3)[1], methods=["saliency"], layers=1, warn=False, task="classification")
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(256, 3))
    with pytest.raises(IntrospectionInputError, match="`task='segmentation'`"):
        run_sanity_checks(classifier, x, methods=["saliency"], layers=1, warn=False, task="segmentation")


# ------------------------------------------------------------------------------------------ callback


def _fit(tmp_path, callbacks):
    pl.seed_everything(0, verbose=False)
    model = Segmenter(TinyUNet())
    trainer = quick_trainer(tmp_path, callbacks, epochs=2)
    trainer.fit(model, datamodule=shapes_dm())
    return model


def test_sanity_checks_at_defaults_on_the_zoo_unet(tmp_path):
    plain = _fit(tmp_path / "plain", [])
    cb = SanityChecks(progress=False, on_error="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        watched = _fit(tmp_path / "watched", [cb])
    for key, value in plain.state_dict().items():
        assert torch.equal(value, watched.state_dict()[key]), f"{key} differs"

    assert not cb.disabled and cb.skip_reason is None and cb.resolved_task == "segmentation"
    report = cb.report
    assert report is not None and report.task == "segmentation" and report.target == PREDICTED_OBJECTS
    assert set(report.verdicts) == set(report.methods) == set(report.class_sensitivity_verdicts)
    assert set(report.verdicts.values()) <= {"pass", "fail", "inconclusive"}
    assert set(report.curves) == {"bottom_up"} and report.order == "bottom_up"  # the callback's default order
    # the explained classes are objects, not the background (class 0 covers most pixels of these images)
    assert 0 not in report.classes["pred"]
    assert all(o != p for other in ("least", "second") for o, p in zip(report.classes[other], report.classes["pred"]))
    assert "SanityChecks explained: object regions of the predicted masks" in cb.summary_lines()

    events = read_events(str(tmp_path / "watched"))
    assert any(tag.startswith("introspect/sanity/verdicts") for tag in events["text"])
    assert "introspect/sanity/class_maps" in events["images"]
    for method in report.methods:
        assert f"introspect/sanity/{method}/passed" in events["scalars"]


def test_an_explicit_task_the_data_contradict_refuses_the_fit(tmp_path):
    cb = SanityChecks(task="classification", progress=False, layers=1, repeats=1)
    with pytest.raises(IntrospectionInputError, match="`task='classification'`"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(tmp_path, [cb])
