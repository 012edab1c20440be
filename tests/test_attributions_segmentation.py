"""Attributions on segmentation models: class regions explained (not the background), Grad-CAM's automatic
layer before the output head, localisation against the true masks as a training curve (known answers),
training unchanged."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect._lightning import LightningDataModule, LightningModule, pl
from lightning_introspect.callbacks.attributions import Attributions
from lightning_introspect.errors import IntrospectionInputError
from lightning_introspect.methods.attribution import auto_layer
from lightning_introspect.methods.attribution_runs import localization_scores, region_pairs
from lightning_introspect.segmentation_demo import ShapesUNet
from tests.helpers import quick_trainer, read_events
from tests.zoo import Segmenter, TinyUNet, shapes_dm


# ------------------------------------------------------------------ a segmenter whose maps are known
class Threshold(LightningModule):
    """Per-pixel logits ``[0, 4 x^2 - 2]``: class 1 wherever ``|x|`` exceeds 0.71, a 1x1 convolution of the
    squared input, so the gradient of class 1's whole-image score is ``8 x``: non-zero exactly on the
    pixels that are not 0. Never trained (SGD with ``lr=0``)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(1, 2, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([0.0, 4.0]).view(2, 1, 1, 1))
            self.head.bias.copy_(torch.tensor([0.0, -2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x * x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class Squares(LightningDataModule):
    """8x8 images that are exactly their mask: one square of class 1 on a background of class 0; in the
    last image the model also sees a bright spot with no object in the mask (a false positive)."""

    def __init__(self) -> None:
        super().__init__()
        masks = torch.zeros(6, 8, 8, dtype=torch.long)
        for i in range(6):
            masks[i, i : i + 3, 1 : 1 + 2 + i % 3] = 1
        x = masks.float().unsqueeze(1)
        x[5, 0, 7, 7] = 1.0  # predicted as class 1, absent from the true mask
        self.data = TensorDataset(x, masks)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=6)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=6)


def _fit(tmp_path: Any, cb: Attributions, model: LightningModule, dm: LightningDataModule, epochs: int = 1) -> Any:
    pl.seed_everything(0, verbose=False)
    trainer = quick_trainer(tmp_path, [cb], epochs=epochs)
    trainer.fit(model, datamodule=dm)
    return trainer


def test_localisation_of_a_segmenter_with_known_gradients(tmp_path: Any) -> None:
    cb = Attributions(methods=["saliency"], num_samples=6, at=(0.0,), on_error="raise")
    _fit(tmp_path, cb, Threshold(), Squares())
    last = cb.history[-1]
    assert cb.resolved_task == "segmentation" and last["region"] == "pred"
    assert set(last["explained"]) == {1}  # the squares, never the background
    scores = last["localization"]["saliency"]
    # class 1's whole-image gradient is 8 on each square and 0 elsewhere, except the last image's bright
    # spot outside its square: there the maximum is shared with a pixel off the object (a miss) and 1 of
    # area + 1 units of mass lies outside
    truth = Squares().data.tensors[1]
    areas = truth.flatten(1).sum(1).float()
    assert scores["pointing_game"] == pytest.approx(5 / 6)
    expected_energy = torch.ones(6)
    expected_energy[5] = areas[5] / (areas[5] + 1)
    assert scores["energy_in_mask"] == pytest.approx(float(expected_energy.mean()))
    assert scores["chance"] == pytest.approx(float((areas / 64).mean()))
    assert scores["pairs"] == 6 and scores["skipped"] == 0
    events = read_events(str(tmp_path))
    for k in ("pointing_game", "energy_in_mask", "chance"):
        assert dict(events["scalars"][f"introspect/attributions/localization/saliency/{k}"])[0] == pytest.approx(scores[k])
    assert "introspect/attributions/localization/text_summary" in events["text"]


def test_localisation_is_scored_even_when_the_prediction_misses_every_object(tmp_path: Any) -> None:
    """An untrained model that predicts no object still gets a localisation point (the start of the curve):
    the true objects' classes are explained, whatever the model predicts."""
    model = Threshold()
    with torch.no_grad():
        model.head.bias[1] = -100.0  # never predicts class 1
    cb = Attributions(methods=["saliency"], num_samples=6, at=(0.0,), on_error="raise")
    _fit(tmp_path, cb, model, Squares())
    last = cb.history[-1]
    assert set(last["explained"]) == {0}  # the grid: each sample shows only background, so it explains that
    assert last["localization"]["saliency"]["pairs"] == 6
    # a class absent from a sample's true mask has no object to point at: left out, never scored a miss
    truth = torch.zeros(1, 4, 4, dtype=torch.long)
    pairs = region_pairs(torch.ones(1, 4, 4, dtype=torch.long), "all", background=None)
    alone = localization_scores(torch.rand(1, 4, 4), pairs, truth)
    assert alone == {"pointing_game": None, "energy_in_mask": None, "chance": None, "pairs": 0, "skipped": 1}


def test_grad_cam_auto_layer_of_an_encoder_decoder_is_the_stage_before_the_head() -> None:
    assert auto_layer(ShapesUNet(), torch.zeros(1, 3, 32, 32)) == "dec1"
    assert auto_layer(Segmenter(TinyUNet()), torch.zeros(1, 1, 16, 16)) == "net.dec1"
    # a classifier's choice is unchanged: the last conv feature map
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 2))
    assert auto_layer(net, torch.zeros(1, 1, 8, 8)) == "1"


def test_unet_defaults_explain_objects_log_localisation_curves_and_leave_training_unchanged(tmp_path: Any) -> None:
    def fit(callbacks: list[Any], path: Any) -> LightningModule:
        pl.seed_everything(0, verbose=False)
        model = Segmenter(TinyUNet())
        quick_trainer(path, callbacks, epochs=2).fit(model, datamodule=shapes_dm())
        return model

    cb = Attributions(methods=["saliency", "guided_backprop", "grad_cam"], on_error="raise")
    with_cb = fit([cb], tmp_path / "on")
    without = fit([], tmp_path / "off")
    for a, b in zip(with_cb.state_dict().values(), without.state_dict().values()):
        assert torch.equal(a, b)
    assert cb.resolved_cam_layer == "net.dec1"
    assert len(cb.history) == 3  # fit start, half way, last epoch
    for run in cb.history:
        samples = torch.tensor(run["samples"])
        assert run["explained"] and all(c != 0 or (samples == s).sum() == 1 for c, s in zip(run["explained"], run["samples"]))
        assert set(run["localization"]) == {"saliency", "guided_backprop", "grad_cam"}
    assert 0 not in cb.history[-1]["explained"]  # a trained U-Net finds the objects: the background is never explained
    events = read_events(str(tmp_path / "on"))
    curve = events["scalars"]["introspect/attributions/localization/grad_cam/energy_in_mask"]
    assert len(curve) == 3
    assert {"introspect/attributions/saliency", "introspect/attributions/grad_cam"} <= set(events["images"])
    assert "introspect/attributions/layer/text_summary" in events["text"]


def test_listed_classes_get_grids_of_their_own_and_a_wrong_task_is_refused(tmp_path: Any) -> None:
    cb = Attributions(methods=["saliency"], targets=[1, 2], region="true", at=(0.0,), on_error="raise")
    _fit(tmp_path, cb, Segmenter(TinyUNet()), shapes_dm())
    assert set(cb.history[-1]["explained"]) <= {1, 2} and cb.history[-1]["region"] == "true"
    events = read_events(str(tmp_path))
    assert {"introspect/attributions/saliency/class_1", "introspect/attributions/saliency/class_2"} <= set(events["images"])
    refused = Attributions(methods=["saliency"], task="classification", at=(0.0,), on_error="raise")
    with pytest.raises(IntrospectionInputError, match="task='classification'"):
        _fit(tmp_path / "refused", refused, Segmenter(TinyUNet()), shapes_dm())
    with pytest.raises(ValueError, match="Expected `region` to be one of"):
        Attributions(region="mask")
