"""NaN / Inf in what Attributions, FeatureVisualization and Misclassifications compute: one clear warning per
kind, a note under ``introspect/<name>/warnings`` instead of a NaN picture, training goes on, the callback
stays on (and logs again once the values are finite).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_introspect._lightning import Callback, LightningModule, pl
from lightning_introspect.callbacks.attributions import Attributions
from lightning_introspect.callbacks.feature_visualization import FeatureVisualization
from lightning_introspect.callbacks.misclassifications import Misclassifications
from lightning_introspect.demo import DigitsDataModule
from tests.helpers import quick_trainer, read_events


class FrozenNet(LightningModule):
    """A tiny CNN whose weights stay exactly as set: the optimizer holds only an unused parameter, so a NaN
    put into a weight before the fit stays there (and only there) for the whole fit."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8, 10)
        self.spare = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.spare], lr=0.1)


class Heal(Callback):
    """At the end of training epoch ``epoch`` (after the callbacks listed before it): restore a weight."""

    def __init__(self, param: torch.Tensor, value: torch.Tensor, epoch: int = 0) -> None:
        self.param, self.value, self.epoch = param, value, epoch

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                self.param.copy_(self.value)


def small_dm() -> DigitsDataModule:
    """64 train / 64 validation digits at 16 x 16, batches of 32: 2 training steps per epoch."""
    dm = DigitsDataModule(batch_size=32, size=16, limit=64, seed=0)
    dm.setup("fit")
    return dm


def model_with(where: str | None) -> FrozenNet:
    """``"conv"``: a NaN in the first conv's weight (everything downstream is NaN); ``"bias3"``: the classifier's
    bias of class 3 is NaN (the logit of class 3 is NaN, input gradients of any class stay finite)."""
    pl.seed_everything(0, verbose=False)
    model = FrozenNet()
    with torch.no_grad():
        if where == "conv":
            model.features[0].weight[0, 0, 0, 0] = float("nan")
        elif where == "bias3":
            model.classifier.bias[3] = float("nan")
    return model


def fit(tmp_path: Any, model: FrozenNet, callbacks: list[Any], dm: Any = None, epochs: int = 2) -> tuple[Any, list[str], dict[str, Any]]:
    """Fit; return the trainer, every warning message, and the event files read back (text tags as written)."""
    trainer = quick_trainer(tmp_path, callbacks, epochs=epochs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm or small_dm())
    assert trainer.state.finished and trainer.global_step == 2 * epochs  # training went on
    events = read_events(trainer.logger.log_dir)
    events["text"] = {tag.removesuffix("/text_summary"): steps for tag, steps in events["text"].items()}
    return trainer, [str(w.message) for w in caught], events


def starting(messages: list[str], prefix: str) -> list[str]:
    return [m for m in messages if m.startswith(prefix)]


CAUSE = "Likely cause: non-finite weights or inputs (see WeightHistograms' `introspect/weights/nonfinite` counts"


# ------------------------------------------------------------------------------------------ Attributions
def test_attributions_with_nan_weights_warns_once_skips_the_grids_and_logs_again_once_finite(tmp_path: Any) -> None:
    model = model_with("conv")
    clean = model.features[0].weight.detach().clone()
    clean[0, 0, 0, 0] = 0.1
    cb = Attributions(methods=["saliency", "grad_cam"], num_samples=4, every_n_epochs=1, at=[0.0], on_error="raise")
    _, messages, events = fit(tmp_path, model, [cb, Heal(model.features[0].weight, clean, epoch=0)])

    (msg,) = starting(messages, "Attributions: non-finite")  # 2 broken runs (steps 0 and 2), one warning
    assert msg.startswith("Attributions: non-finite values (NaN / Inf) in the model's outputs on the 4 fixed samples "
                          "and the maps of saliency, grad_cam at step 0.")
    assert CAUSE in msg and "torch.autograd.detect_anomaly()" in msg
    assert "Not logged: saliency, grad_cam; a note goes to `introspect/attributions/warnings`" in msg
    assert not starting(messages, "Attributions failed")
    # no NaN picture: the grids exist only from the healed epoch on; the note marks the broken steps
    assert events["images"]["introspect/attributions/saliency"] == [4]
    assert events["images"]["introspect/attributions/grad_cam"] == [4]
    assert events["text"]["introspect/attributions/warnings"] == [0, 2]
    assert not cb.disabled and len(cb.history) == 3 and cb.nonfinite == []
    assert torch.isfinite(cb.maps["saliency"]).all()


def test_attributions_with_nan_logits_drops_the_main_grids_but_keeps_finite_class_grids(tmp_path: Any) -> None:
    cb = Attributions(methods=["saliency"], targets=[3, 8], num_samples=4, every_n_epochs=1, at=[0.0], on_error="raise")
    _, messages, events = fit(tmp_path, model_with("bias3"), [cb], epochs=1)

    (msg,) = starting(messages, "Attributions: non-finite")
    assert "in the model's outputs on the 4 fixed samples at step 0." in msg and "Not logged: saliency;" in msg
    assert cb.nonfinite == ["outputs"]  # the maps (input gradients) are finite: a NaN bias has no gradient
    assert "introspect/attributions/saliency" not in events["images"]  # its captions / "pred" rest on NaN logits
    assert events["images"]["introspect/attributions/saliency/class_3"] == [0, 2]
    assert events["images"]["introspect/attributions/saliency/class_8"] == [0, 2]
    assert events["text"]["introspect/attributions/warnings"] == [0, 2]


# ---------------------------------------------------------------------------------- FeatureVisualization
def test_feature_visualization_skips_only_the_non_finite_unit(tmp_path: Any) -> None:
    cb = FeatureVisualization(layers=["features.2"], channels=[0], classes=[0, 3], regularizers=[], compare=False,
                              steps=3, every_n_epochs=1, at=[0.0], num_samples=8, on_error="raise")
    _, messages, events = fit(tmp_path, model_with("bias3"), [cb])

    (msg,) = starting(messages, "FeatureVisualization: non-finite")  # 3 runs, one warning
    assert msg.startswith("FeatureVisualization: non-finite values (NaN / Inf) in the optimised images or final "
                          "objective of class/3 (none) at step 0.")
    assert CAUSE in msg and "a note goes to `introspect/featviz/warnings`" in msg
    images, scalars = events["images"], events["scalars"]
    assert "introspect/featviz/class/3" not in images
    assert images["introspect/featviz/class/0"] == images["introspect/featviz/features.2/0"] == [0, 2, 4]
    assert "introspect/featviz/objective/none/class/3" not in scalars
    assert [s for s, _ in scalars["introspect/featviz/objective/none/class/0"]] == [0, 2, 4]
    assert all(v == v for _, v in scalars["introspect/featviz/hf_fraction/none"])  # the mean leaves NaN out
    assert events["text"]["introspect/featviz/warnings"] == [0, 2, 4]
    assert cb.nonfinite == {"class/3": ["none"]} and not cb.disabled


def test_feature_visualization_does_not_keep_auto_channels_chosen_from_nan_activations(tmp_path: Any) -> None:
    cb = FeatureVisualization(layers=["features.2"], channels="auto", num_channels=2, classes=None, regularizers=[],
                              steps=2, every_n_epochs=None, at=[0.0], num_samples=8, on_error="raise")
    _, messages, events = fit(tmp_path, model_with("conv"), [cb], epochs=1)

    (msg,) = starting(messages, "FeatureVisualization: non-finite")
    assert "features.2/" in msg
    assert not any(tag.startswith("introspect/featviz/features.2") for tag in events["images"])
    assert cb.chosen == {}  # chosen again at the next run, from finite activations


# ------------------------------------------------------------------------------------ Misclassifications
def test_misclassifications_with_nan_weights_logs_only_the_note(tmp_path: Any) -> None:
    cb = Misclassifications(top_k=4, perturbations=["blur"], blur_sigmas=[1.0], num_samples=16, figures=False,
                            every_n_epochs=1, at=None, on_error="raise")
    _, messages, events = fit(tmp_path, model_with("conv"), [cb])

    (msg,) = starting(messages, "Misclassifications: ")  # 2 broken reviews, one warning
    assert msg.startswith("Misclassifications: the model's outputs (probabilities) are non-finite (NaN / Inf) for 64 of "
                          "64 validation samples at step 2.")
    assert CAUSE in msg and "Nothing of this review is logged" in msg
    assert "a note goes to `introspect/misclassifications/warnings`" in msg
    assert not any(t.startswith("introspect/misclassifications/") for t in events["images"])
    assert not any(t.startswith("introspect/misclassifications/error_rate") or "perturbation" in t for t in events["scalars"])
    written = {tag: steps for tag, steps in events["text"].items() if tag.startswith("introspect/")}
    assert written == {"introspect/misclassifications/warnings": [2, 4]}  # no table either
    assert cb.report is None and cb.history == [] and not cb.disabled


def test_misclassifications_leaves_out_samples_with_nan_inputs(tmp_path: Any) -> None:
    dm = small_dm()
    dm.val_set.tensors[0][:5] = float("nan")  # 5 broken validation images; the fixed subset holds them too
    cb = Misclassifications(top_k=4, perturbations=["blur"], blur_sigmas=[1.0], num_samples=64, figures=False,
                            every_n_epochs=1, at=None, on_error="raise")
    _, messages, events = fit(tmp_path, model_with(None), [cb], dm=dm)

    (val_msg,) = starting(messages, "Misclassifications: the model's outputs (probabilities) are non-finite")
    assert "for 5 of 64 validation samples at step 2." in val_msg and "Those samples are left out of the review" in val_msg
    (pert_msg,) = starting(messages, "Misclassifications: the model's outputs (probabilities) in the perturbation test")
    assert "for up to 5 of its 64 fixed samples" in pert_msg and "accuracies are not logged" in pert_msg
    report = cb.report
    assert report["nonfinite"] == 5 and report["num_samples"] == 59 and report["perturbations"] == {}
    assert all(row["index"] >= 5 for row in report["wrong"]) and torch.isfinite(cb.wrong_images).all()
    assert all(sum(b["counts"]) == 59 for b in report["bins"].values())
    assert events["images"]["introspect/misclassifications/gallery"] == [2, 4]
    assert [s for s, _ in events["scalars"]["introspect/misclassifications/error_rate/overall"]] == [2, 4]
    assert not any("perturbation" in t for t in events["scalars"])
    assert events["text"]["introspect/misclassifications/warnings"] == [2, 2, 4, 4]  # validation + perturbation notes


# ------------------------------------------------------------------------------------------ finite model
def test_a_finite_model_gives_no_nonfinite_warning(tmp_path: Any) -> None:
    callbacks = [
        Attributions(methods=["saliency", "grad_cam"], targets=[3], num_samples=4, every_n_epochs=1, at=None, on_error="raise"),
        FeatureVisualization(layers=["features.2"], channels=[0], classes=[3], regularizers=[], steps=2,
                             every_n_epochs=1, at=None, num_samples=8, on_error="raise"),
        Misclassifications(top_k=4, perturbations=["blur"], blur_sigmas=[1.0], num_samples=16, figures=False,
                           every_n_epochs=1, at=None, on_error="raise"),
    ]
    _, messages, events = fit(tmp_path, model_with(None), callbacks, epochs=1)

    assert not [m for m in messages if "non-finite" in m]
    assert not any(tag.endswith("/warnings") for tag in events["text"])
    assert {"introspect/attributions/saliency", "introspect/attributions/grad_cam/class_3", "introspect/featviz/class/3",
            "introspect/misclassifications/gallery"} <= set(events["images"])
    assert "introspect/misclassifications/perturbation/blur/1" in events["scalars"]
    assert callbacks[0].nonfinite == [] and callbacks[1].nonfinite == {} and callbacks[2].report["nonfinite"] == 0
