"""Faults and bad configuration with the full callback set: what the user sees, and that training survives.

Scenarios: a model whose forward raises only inside an introspection pass, NaN
in the weights, a layer that returns a tuple, a KeyboardInterrupt mid-epoch, and configuration errors
(unknown layer, bad target class, wrong number of classes). ``docs/what_happens_when.md`` lists what
the user sees in each case.
"""

from __future__ import annotations

import signal
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_introspect._lightning import Callback, LightningModule, pl
from lightning_introspect.callbacks.attributions import Attributions
from lightning_introspect.callbacks.base import IntrospectionSkipWarning
from lightning_introspect.callbacks.feature_visualization import FeatureVisualization
from lightning_introspect.callbacks.linear_probes import LinearProbes
from lightning_introspect.callbacks.misclassifications import Misclassifications
from lightning_introspect.callbacks.per_class_metrics import PerClassMetrics
from lightning_introspect.callbacks.sanity_checks import SanityChecks
from lightning_introspect.callbacks.weight_histograms import WeightHistograms
from lightning_introspect.config import introspection_callbacks
from lightning_introspect.demo import DIGIT_NAMES, DigitsCNN, DigitsDataModule, demo_config
from lightning_introspect.methods.attribution import grad_cam
from tests.helpers import quick_trainer, read_events

BOOM = "boom: forward called outside training_step / validation_step"


# ------------------------------------------------------------------------------------ fixtures
def small_dm() -> DigitsDataModule:
    """64 train / 64 validation digits, batches of 32: 2 training steps per epoch."""
    dm = DigitsDataModule(batch_size=32, limit=64, seed=0)
    dm.setup("fit")
    return dm


def full_set(dm: DigitsDataModule, on_error: str) -> list[Any]:
    """All seven callbacks with the demo's fast options."""
    callbacks = introspection_callbacks(demo_config(fast=True, mean=dm.mean, std=dm.std), budget=False)
    for cb in callbacks:
        cb.on_error = on_error
        if isinstance(cb, SanityChecks):
            cb.progress = False
    assert len(callbacks) == 7
    return callbacks


def by_name(callbacks: list[Any]) -> dict[str, Any]:
    return {type(cb).__name__: cb for cb in callbacks}


class IntrospectionOnlyFault(DigitsCNN):
    """A DigitsCNN whose forward raises when ``explode`` is set and it is not called by ``training_step`` /
    ``validation_step``: only introspection passes (our own forward calls) fail. Validation cannot be told
    apart by grad mode (Lightning validates under ``no_grad`` during ``fit``), so the steps mark themselves.
    """

    explode = False

    def __init__(self) -> None:
        super().__init__()
        self._in_step = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._in_step = True
        try:
            return super().training_step(batch, batch_idx)
        finally:
            self._in_step = False

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._in_step = True
        try:
            return super().validation_step(batch, batch_idx)
        finally:
            self._in_step = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explode and not self._in_step:
            raise RuntimeError(BOOM)
        return super().forward(x)


class FaultAfterEpoch(Callback):
    """At the end of training epoch ``epoch`` (after every callback listed before it): arm the fault."""

    def __init__(self, fault: str, epoch: int = 0) -> None:
        self.fault, self.epoch = fault, epoch

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch != self.epoch:
            return
        if self.fault == "explode":
            pl_module.explode = True
        elif self.fault == "nan":
            with torch.no_grad():
                pl_module.features[0].weight[0, 0, 0, 0] = float("nan")


class BatchCounter(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.batches += 1


class InterruptMidEpoch(Callback):
    """Ctrl+C after the first batch of epoch ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            raise KeyboardInterrupt


def fit_recording_warnings(trainer: Any, model: Any, dm: Any) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    return [str(w.message) for w in caught]


def events_of(log_dir: str) -> dict[str, Any]:
    """``read_events`` with text tags as written (TensorBoard stores them as ``<tag>/text_summary``)."""
    events = read_events(log_dir)
    events["text"] = {tag.removesuffix("/text_summary"): steps for tag, steps in events["text"].items()}
    return events


def failure_warnings(messages: list[str], name: str) -> list[str]:
    return [m for m in messages if m.startswith(f"{name} failed and is disabled")]


# ------------------------------------------------------------------- a forward that raises in our passes
@pytest.mark.slow  # the full callback set, 2 epochs
def test_forward_raising_in_introspection_with_warn_disables_those_callbacks_and_training_goes_on(tmp_path: Any) -> None:
    dm = small_dm()
    callbacks = full_set(dm, "warn")
    pl.seed_everything(0, verbose=False)
    model = IntrospectionOnlyFault()
    trainer = quick_trainer(tmp_path / "watched", [*callbacks, FaultAfterEpoch("explode")], epochs=2)
    messages = fit_recording_warnings(trainer, model, dm)

    assert trainer.state.finished and trainer.global_step == 4  # both epochs trained
    cbs = by_name(callbacks)
    # those that run a forward pass of their own after epoch 0 fail once, warn once with the cause, and stop
    failed = {"Misclassifications", "Attributions", "FeatureVisualization", "SanityChecks"}
    assert {n for n, cb in cbs.items() if cb.disabled} == failed
    for name in failed:
        (msg,) = failure_warnings(messages, name)
        assert BOOM in msg and "Traceback" in msg
    # the others work from the trainer's own passes and carry on
    assert cbs["PerClassMetrics"].snapshot_epochs["end"] == {"epoch": 1, "step": 4}
    assert sorted(cbs["LinearProbes"].history, key=str) == [0, 1, "init", "input"]
    assert cbs["WeightHistograms"].steps == [0, 2, 4]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

    # training itself is what it would have been without any introspection
    pl.seed_everything(0, verbose=False)
    plain = IntrospectionOnlyFault()
    quick_trainer(tmp_path / "plain", [FaultAfterEpoch("explode")], epochs=2, logger=False).fit(plain, datamodule=dm)
    for (key, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), key

    # nothing already logged is lost: epoch 0's images and the failing run's first writes are on disk
    events = events_of(trainer.logger.log_dir)
    assert events["images"]["introspect/attributions/grad_cam"] == [0, 2]
    assert events["images"]["introspect/featviz/class/0"] == [2]
    # half way (epoch 0), then the failing run writes its table before its perturbation test raises
    assert events["text"]["introspect/misclassifications/top_wrong"] == [2, 4]
    assert "introspect/sanity/verdicts" not in events["text"]
    assert [s for s, _ in events["scalars"]["introspect/per_class/recall/0"]] == [0, 2, 4]


def _fast(name: str, dm: DigitsDataModule) -> Any:
    (cb,) = [c for c in full_set(dm, "raise") if type(c).__name__ == name]
    return cb


# callback -> its first forward pass of its own (the model raises there)
_EXPLODING_PASS = {
    "PerClassMetrics": lambda dm: _fast("PerClassMetrics", dm),  # the start pass
    "Misclassifications": lambda dm: _fast("Misclassifications", dm),  # the perturbation test
    "LinearProbes": lambda dm: LinearProbes(layers=["features.9"], on_error="raise"),  # the init baseline pass
    "Attributions": lambda dm: _fast("Attributions", dm),  # the at=0.0 maps
    "FeatureVisualization": lambda dm: _fast("FeatureVisualization", dm),  # activation maximisation
    "SanityChecks": lambda dm: _fast("SanityChecks", dm),  # the fit-end check
}


@pytest.mark.parametrize("name", sorted(_EXPLODING_PASS))
def test_forward_raising_in_introspection_with_raise_surfaces_the_models_error(tmp_path: Any, name: str) -> None:
    dm = small_dm()
    cb = _EXPLODING_PASS[name](dm)
    model = IntrospectionOnlyFault()
    model.explode = True  # from the start: each callback's first pass of its own fails
    trainer = quick_trainer(tmp_path, [cb], epochs=1, logger=False)
    with pytest.raises(RuntimeError, match=BOOM) as info:
        trainer.fit(model, datamodule=dm)
    # the model's own exception object, raised from our code (not swallowed, not re-wrapped)
    files = [str(entry.path) for entry in info.traceback]
    assert any("lightning_introspect" in f for f in files)
    assert files[-1].endswith("test_faults.py")
    assert not any(m._forward_hooks for m in model.modules())


def test_auto_probe_layers_skip_a_model_whose_forward_fails_at_setup(tmp_path: Any) -> None:
    dm = small_dm()
    model = IntrospectionOnlyFault()
    model.explode = True
    probes = LinearProbes(layers="auto")  # on_error="warn"
    trainer = quick_trainer(tmp_path, [probes], epochs=1, logger=False)
    with pytest.warns(IntrospectionSkipWarning, match=r"LinearProbes is skipped for this fit: `layers='auto'` runs "
                      r"`model\(inputs\)`.*failed \(RuntimeError: boom"):
        trainer.fit(model, datamodule=dm)
    assert probes.disabled and probes.skip_reason and trainer.global_step == 2  # training went on


def test_feature_visualization_leaves_a_failing_forward_at_setup_to_the_error_policy(tmp_path: Any) -> None:
    model = IntrospectionOnlyFault()
    model.explode = True  # the argument check in `setup` runs the model on two samples: it fails there
    cb = FeatureVisualization(layers=["features.8"], channels=[0], classes=[1], steps=2)  # on_error="warn"
    trainer = quick_trainer(tmp_path, [cb], epochs=1, logger=False)
    with pytest.warns(UserWarning, match=r"FeatureVisualization failed and is disabled(.|\n)*boom"):
        trainer.fit(model, datamodule=small_dm())
    assert cb.disabled and trainer.global_step == 2  # not a configuration error: training went on


def test_weight_histograms_only_needs_a_forward_for_the_depth_order(tmp_path: Any) -> None:
    dm = small_dm()
    (cb,) = [c for c in full_set(dm, "raise") if isinstance(c, WeightHistograms)]
    model = IntrospectionOnlyFault()
    model.explode = True
    trainer = quick_trainer(tmp_path, [cb], epochs=1, logger=False)
    with pytest.warns(UserWarning, match=r"could not trace the execution order \(RuntimeError: boom"):
        trainer.fit(model, datamodule=dm)
    assert cb.steps == [0, 2] and not cb.disabled


# ------------------------------------------------------------------------------------ NaN weights
@pytest.mark.slow  # the full callback set, 2 epochs
def test_nan_weights_with_warn_training_goes_on_and_the_callbacks_say_why(tmp_path: Any) -> None:
    dm = small_dm()
    callbacks = full_set(dm, "warn")
    pl.seed_everything(0, verbose=False)
    model = DigitsCNN()
    trainer = quick_trainer(tmp_path, [*callbacks, FaultAfterEpoch("nan")], epochs=2)
    messages = fit_recording_warnings(trainer, model, dm)

    assert trainer.state.finished and trainer.global_step == 4
    assert not torch.isfinite(model.classifier.weight).all()  # Adam spread the NaN: training really broke
    cbs = by_name(callbacks)
    weights = cbs["WeightHistograms"]
    assert weights.summary["nonfinite"] and not weights.disabled  # reported, not a failure
    assert any("non-finite values" in m and "features.0" in m for m in messages)
    (probe_msg,) = failure_warnings(messages, "LinearProbes")
    assert "hold NaN / Inf values" in probe_msg
    (sanity_msg,) = failure_warnings(messages, "SanityChecks")
    assert "NaN / Inf weights in ['features.0.weight'" in sanity_msg
    assert cbs["SanityChecks"].report is None  # no "pass" verdicts for a broken model
    assert cbs["PerClassMetrics"].snapshot_epochs["end"]["epoch"] == 1

    events = events_of(trainer.logger.log_dir)
    nonfinite = dict(events["scalars"]["introspect/weights/nonfinite"])
    assert nonfinite[2] == 0 and nonfinite[4] > 0  # epoch 0 clean, epoch 1 counted
    assert [s for s, _ in events["scalars"]["introspect/probes/features.9/accuracy"]] == [0, 2]  # kept
    assert events["images"]["introspect/attributions/grad_cam"][:2] == [0, 2]


@pytest.mark.slow  # the full callback set, 2 epochs
def test_nan_weights_with_raise_stop_the_fit_with_the_reason(tmp_path: Any) -> None:
    dm = small_dm()
    callbacks = full_set(dm, "raise")
    pl.seed_everything(0, verbose=False)
    trainer = quick_trainer(tmp_path, [*callbacks, FaultAfterEpoch("nan")], epochs=2, logger=False)
    with pytest.raises(ValueError, match=r"LinearProbes: the activations of \[.*\] hold NaN / Inf values at 1"):
        trainer.fit(DigitsCNN(), datamodule=dm)


def test_sanity_check_refuses_a_model_with_nan_weights() -> None:
    model = DigitsCNN().eval()
    with torch.no_grad():
        model.classifier.bias[3] = float("inf")
    cb = SanityChecks(methods=["saliency"], layers=1, repeats=1, progress=False)
    with pytest.raises(ValueError, match=r"NaN / Inf weights in \['classifier.bias'\]"):
        cb.check(model, torch.randn(2, 1, 32, 32))


# --------------------------------------------------------------------------- a layer returning a tuple
class AuxBlock(nn.Module):
    """A conv block that returns ``(feature map, auxiliary per-channel means)``, like an LSTM's (out, state)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.act(self.conv(x))
        return out, out.mean(dim=(2, 3))


class TupleNet(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block = AuxBlock(8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, _aux = self.block(self.stem(x))
        return self.head(features)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def test_a_layer_returning_a_tuple_is_read_as_its_first_tensor(tmp_path: Any) -> None:
    dm = small_dm()
    probes = LinearProbes(layers=["block", "stem.2"], solver="torch", on_error="raise")
    attributions = Attributions(cam_layer="block", methods=["grad_cam", "guided_grad_cam", "guided_backprop"], top_k=4,
                                num_samples=4, on_error="raise")
    featviz = FeatureVisualization(layers=["block"], channels=[0, 1], classes=None, steps=3, on_error="raise")
    sanity = SanityChecks(cam_layer="block", methods=["grad_cam"], num_samples=2, layers=1, repeats=1, progress=False, on_error="raise")
    pl.seed_everything(0, verbose=False)
    model = TupleNet()
    quick_trainer(tmp_path, [probes, attributions, featviz, sanity], epochs=1, logger=False).fit(model, datamodule=dm)

    assert set(probes.history[0]) == {"block", "stem.2"}
    for method, maps in attributions.maps.items():
        assert maps.shape[0] == 4 and torch.isfinite(maps).all() and maps.abs().sum() > 0, method
    assert sorted(featviz.images) == ["block/0", "block/1"]
    assert sanity.report is not None and "grad_cam" in sanity.report.verdicts
    # Grad-CAM on the tuple's first tensor is Grad-CAM on the module that produces that tensor
    x = dm.val_set.tensors[0][:3]
    assert torch.allclose(grad_cam(model, x, "pred", layer="block"), grad_cam(model, x, "pred", layer="block.act"))


# ------------------------------------------------------------------------------ KeyboardInterrupt
@pytest.mark.slow  # the full callback set, 2 epochs
def test_keyboard_interrupt_mid_epoch_stops_cleanly_and_keeps_what_was_logged(tmp_path: Any) -> None:
    dm = small_dm()
    callbacks = full_set(dm, "warn")
    pl.seed_everything(0, verbose=False)
    model = DigitsCNN()
    trainer = quick_trainer(tmp_path, [*callbacks, InterruptMidEpoch(epoch=1)], epochs=2)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown ends with sys.exit(1)
            trainer.fit(model, datamodule=dm)
    finally:
        signal.signal(signal.SIGINT, previous)  # Lightning ignores further Ctrl+C after the first

    assert trainer.interrupted and trainer.global_step == 3
    cbs = by_name(callbacks)
    pcm = cbs["PerClassMetrics"]
    assert pcm.snapshot_epochs["end"] == {"epoch": 0, "step": 2}  # the last validation of the fit
    assert pcm.snapshots["end"] == pcm.snapshots["middle"]
    assert not any(cb.disabled for cb in callbacks)
    assert cbs["SanityChecks"].report is None  # a fit-end check: not run on an interrupted fit
    assert cbs["LinearProbes"]._evaluations.executor is None  # background worker shut down
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

    events = events_of(trainer.logger.log_dir)
    assert events["text"]["introspect/per_class/table"][-1] == 2  # the "end" table, written on the interrupt
    assert events["images"]["introspect/attributions/grad_cam"] == [0, 2]
    assert [s for s, _ in events["scalars"]["introspect/weights/drift/features.0"]] == [0, 2]


# ------------------------------------------------------------------------------ configuration errors
_CONFIG_ERRORS = [
    # (callback factory, message pattern: names the argument and lists the valid choices)
    ("WeightHistograms-layers", lambda: WeightHistograms(layers=["features.99"]),
     r"`layers`.*'features.99'.*Closest valid names: 'features.9', 'features.8'"),
    ("WeightHistograms-no-weight", lambda: WeightHistograms(layers=["pool"]),
     r"`layers` to name modules with their own `weight`.*'pool'.*Closest layers with weights: "),
    ("LinearProbes-layers", lambda: LinearProbes(layers=["features.9", "clasifier"]),
     r"`layers`.*'clasifier'.*Closest valid names: 'classifier'"),
    ("Attributions-layer", lambda: Attributions(cam_layer="feature.8"),
     r"`cam_layer`.*'feature.8'.*Closest valid names: 'features.8'"),
    ("Attributions-targets", lambda: Attributions(targets=[3, 10]),
     r"`targets` class ids in \[0, 9\] \(the model outputs 10 classes\), but got \[10\]"),
    ("Attributions-class-names", lambda: Attributions(class_names=["a", "b"]),
     r"`class_names` to name all 10 classes, but got 2"),
    ("FeatureVisualization-layers", lambda: FeatureVisualization(layers=["features.x"]),
     r"`layers`.*'features.x'.*Closest valid names:"),
    ("FeatureVisualization-channels", lambda: FeatureVisualization(layers=["features.8"], channels=[64]),
     r"`channels` in \[0, 63\] \(layer 'features.8' has 64 channels\), but got \[64\]"),
    ("FeatureVisualization-classes", lambda: FeatureVisualization(classes=[12]),
     r"`classes` in \[0, 9\] \(the model outputs 10 classes\), but got \[12\]"),
    ("SanityChecks-layer", lambda: SanityChecks(cam_layer="features.80"),
     r"`cam_layer`.*'features.80'.*Closest valid names: 'features.8', 'features.0'"),
    ("SanityChecks-layers", lambda: SanityChecks(layers=["classifer"]),
     r"`layers`.*'classifer'.*Closest valid names: 'classifier'"),
    ("PerClassMetrics-num-classes", lambda: PerClassMetrics(num_classes=5),
     r"`num_classes`=5 columns.*shape \(\d+, 10\); set `num_classes` to 10"),
    ("PerClassMetrics-num-classes-no-start", lambda: PerClassMetrics(num_classes=5, at=(0.5, 1.0)),
     r"`num_classes`=5 columns.*set `num_classes` to 10"),
    ("PerClassMetrics-class-names", lambda: PerClassMetrics(class_names=DIGIT_NAMES[:9]),
     r"`class_names` to have one entry per class \(10 from the logits' width\), but got 9"),
    ("Misclassifications-class-names", lambda: Misclassifications(class_names=DIGIT_NAMES[:9]),
     r"`class_names` to have one entry per class \(10 from the logits' width\), but got 9"),
]


@pytest.mark.parametrize("factory, match", [c[1:] for c in _CONFIG_ERRORS], ids=[c[0] for c in _CONFIG_ERRORS])
def test_configuration_errors_raise_before_any_training_step(tmp_path: Any, factory: Any, match: str) -> None:
    dm = small_dm()
    counter = BatchCounter()
    callback = factory()  # on_error="warn" (the default): configuration errors raise all the same
    assert callback.on_error == "warn"
    trainer = quick_trainer(tmp_path, [callback, counter], epochs=1, logger=False)
    with pytest.raises(ValueError, match=match):
        trainer.fit(DigitsCNN(), datamodule=dm)
    assert counter.batches == 0 and trainer.global_step == 0
