"""Everyday setups that must never end a fit, hang, or silently measure the wrong thing.

One focused test per setup a new user meets in the first hour: validation steps that return the loss or
class ids, a segmentation output, an augmenting dataset, ``trainer.validate()`` around ``fit``, callbacks
reused for a second fit, deep copies and pickles, a full disk, a forward that normalises its input in
place, ResNet blocks that call one ReLU twice, NaN weights, a head replaced mid-fit, ``at=0.5``, odd class
names, two instances of one callback class, string import paths in a YAML config, and a fault on one DDP
rank. Each asserts what the user should see; the callbacks run at their defaults unless the setup is
about an option.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import textwrap
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_introspect._lightning import Callback, pl
from lightning_introspect.callbacks.attributions import Attributions
from lightning_introspect.callbacks.base import IntrospectionFailureWarning, IntrospectionSkipWarning
from lightning_introspect.callbacks.feature_visualization import FeatureVisualization
from lightning_introspect.callbacks.linear_probes import LinearProbes
from lightning_introspect.callbacks.misclassifications import Misclassifications
from lightning_introspect.callbacks.per_class_metrics import PerClassMetrics
from lightning_introspect.callbacks.weight_histograms import WeightHistograms
from lightning_introspect.config import CALLBACKS, callback_class, introspection_callbacks
from lightning_introspect.loggers.adapter import TensorBoardWriter
from tests.helpers import quick_trainer, read_events
from tests.test_ddp_full import ROOT, ddp_env, run_isolated
from tests.test_nonfinite_outputs import model_with
from tests.zoo import (
    AugmentingDataset,
    Classifier,
    LossAndPredsValidation,
    LossOnlyValidation,
    Segmenter,
    TinyResNet,
    TinyUNet,
    blobs_dm,
    digits,
    digits_dm,
    shapes_dm,
    small_cnn,
)


# --------------------------------------------------------------------------------------------- helpers
def fit_recording(trainer: Any, model: Any, *args: Any, **kwargs: Any) -> list[warnings.WarningMessage]:
    """``trainer.fit`` recording every warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, *args, **kwargs)
    return list(caught)


def failures(caught: list[warnings.WarningMessage]) -> list[str]:
    """The contained crashes among the warnings (a callback that failed and disabled itself)."""
    return [str(w.message) for w in caught
            if issubclass(w.category, IntrospectionFailureWarning) or "failed and is disabled" in str(w.message)]


def skips_of(caught: list[warnings.WarningMessage], name: str) -> list[str]:
    return [str(w.message) for w in caught
            if issubclass(w.category, IntrospectionSkipWarning) and str(w.message).startswith(f"{name} is skipped")]


def by_name(callbacks: list[Any]) -> dict[str, Any]:
    return {type(cb).__name__: cb for cb in callbacks}


def val_logits_error(model: Classifier, dm: Any) -> float:
    """The model's error rate on the whole validation set (eval mode, its own logits)."""
    x, y = dm.val_set.tensors
    model.eval()
    with torch.no_grad():
        pred = model.logits(model(x)).argmax(1)
    return float((pred != y).float().mean())


class DisabledAtFirstStep(Callback):
    """Records which of ``callbacks`` were already disabled when the first training batch starts (a refusal
    must come before training, not after an epoch of it)."""

    def __init__(self, callbacks: list[Any]) -> None:
        self.callbacks = callbacks
        self.disabled: dict[str, bool] | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.disabled is None:
            self.disabled = {type(cb).__name__: cb.disabled for cb in self.callbacks}


# ----------------------------------------------------------------------------- validation step outputs
def test_validation_step_returning_only_the_loss_is_served_by_the_metric_callbacks(tmp_path: Any) -> None:
    model, dm = LossOnlyValidation(small_cnn()), digits_dm()
    callbacks = introspection_callbacks({})
    trainer = quick_trainer(tmp_path, callbacks)
    caught = fit_recording(trainer, model, datamodule=dm)
    assert trainer.state.finished
    assert not failures(caught), failures(caught)
    cbs = by_name(callbacks)
    assert not cbs["PerClassMetrics"].disabled and not cbs["Misclassifications"].disabled
    end = cbs["PerClassMetrics"].snapshots["end"]
    assert len(end["recall"]) == 10 and sum(end["support"]) == len(dm.val_set)
    assert cbs["Misclassifications"].report["error_rate"] == pytest.approx(val_logits_error(model, dm), abs=1e-6)


class NetOnlyValidation(Classifier):
    """``validation_step`` calls ``self.net`` (not ``self(...)``) and returns the loss: the callbacks need a
    forward of their own; it counts the forwards made outside training and validation steps."""

    def __init__(self, net: nn.Module, lr: float = 1e-2) -> None:
        super().__init__(net, lr=lr)
        self.extra_forwards: list[int] = []

    def forward(self, x: torch.Tensor) -> Any:
        if not self.training and not torch.is_grad_enabled():
            self.extra_forwards.append(int(x.shape[0]))
        return self.net(x)

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return F.cross_entropy(self.net(x), y)


def test_the_metric_callbacks_share_one_extra_forward_per_validation_batch(tmp_path: Any) -> None:
    dm = digits_dm()
    torch.manual_seed(0)  # a linear read-out of the pixels, left as initialised (lr 0): varied predictions
    model = NetOnlyValidation(nn.Sequential(nn.Flatten(), nn.Linear(dm.val_set.tensors[0][0].numel(), 10)), lr=0.0)
    metrics = PerClassMetrics(at=(1.0,), confusion_matrix=False, bar_chart=False, on_error="raise")
    review = Misclassifications(every_n_epochs=1, perturbations=[], figures=False, on_error="raise")
    trainer = quick_trainer(tmp_path, [metrics, review], epochs=1, logger=False)
    trainer.fit(model, datamodule=dm)
    batches = trainer.num_val_batches[0]
    # two preflights (16 samples each), then one forward per validation batch shared by both callbacks
    assert model.extra_forwards[:2] == [16, 16] and len(model.extra_forwards) == 2 + batches
    x, y = dm.val_set.tensors
    model.eval()
    with torch.no_grad():
        pred = model.net(x).argmax(1)
    assert len(pred.unique()) > 2  # predictions that tell the batches apart
    confusion = torch.zeros(10, 10, dtype=torch.long).index_put_((y, pred), torch.ones_like(y), accumulate=True)
    assert metrics.confusion["end"] == confusion.tolist()  # each batch read with its own logits
    assert review.report["error_rate"] == pytest.approx(float((pred != y).float().mean()), abs=1e-6)


def test_validation_step_returning_loss_and_preds_is_not_read_as_logits(tmp_path: Any) -> None:
    model, dm = LossAndPredsValidation(small_cnn()), digits_dm()
    callbacks = introspection_callbacks({})
    trainer = quick_trainer(tmp_path, callbacks)
    caught = fit_recording(trainer, model, datamodule=dm)
    assert trainer.state.finished
    assert not failures(caught), failures(caught)
    cbs = by_name(callbacks)
    end = cbs["PerClassMetrics"].snapshots["end"]
    assert len(end["recall"]) == 10 and sum(end["support"]) == len(dm.val_set)  # not 2 "classes" of 0/1 ids
    assert cbs["Misclassifications"].report["error_rate"] == pytest.approx(val_logits_error(model, dm), abs=1e-6)


def test_a_segmentation_output_never_ends_the_fit_and_any_refusal_comes_before_training(tmp_path: Any) -> None:
    callbacks = introspection_callbacks({})
    probe = DisabledAtFirstStep(callbacks)
    trainer = quick_trainer(tmp_path, [*callbacks, probe])
    caught = fit_recording(trainer, Segmenter(TinyUNet()), datamodule=shapes_dm())
    assert trainer.state.finished and trainer.current_epoch == 2
    assert not failures(caught), failures(caught)
    for cb in callbacks:
        name = type(cb).__name__
        if cb.disabled:  # refused: once, clearly, and before the first training step
            assert len(skips_of(caught, name)) == 1, (name, skips_of(caught, name))
            assert probe.disabled[name], f"{name} was disabled only after training started"
    cbs = by_name(callbacks)
    for cb in callbacks:  # every callback serves segmentation: none refuses it
        assert not cb.disabled, (type(cb).__name__, cb.skip_reason)
    for name in ("PerClassMetrics", "Misclassifications", "Attributions", "LinearProbes", "FeatureVisualization", "SanityChecks"):
        assert getattr(cbs[name], "resolved_task", None) == "segmentation", name
    assert set(cbs["PerClassMetrics"].snapshots) == {"start", "middle", "end"}  # per pixel
    assert sum(cbs["PerClassMetrics"].snapshots["end"]["support"]) > 0


def same_state(a: Any, b: Any) -> bool:
    """Checkpoint states equal in value: tensors by ``torch.equal``, containers item by item."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN equals NaN here


# ------------------------------------------------------------------------------ non-interference
def _augmenting_fit(tmp_path: Any, callbacks: list[Any], with_val: bool) -> tuple[Any, Any]:
    (train_x, train_y), (val_x, val_y) = (ds.tensors for ds in digits(n_train=64, n_val=32))
    pl.seed_everything(0, verbose=False)
    model = Classifier(small_cnn())
    train = DataLoader(AugmentingDataset(train_x, train_y), batch_size=32, shuffle=True)  # global-RNG shuffle too
    val = DataLoader(AugmentingDataset(val_x, val_y), batch_size=32) if with_val else None
    trainer = quick_trainer(tmp_path, callbacks, epochs=2, **({} if with_val else {"limit_val_batches": 0}))
    fit_recording(trainer, model, train, val)
    assert trainer.state.finished
    return model, trainer


AUGMENTING_SETS = {
    "every_callback": lambda: introspection_callbacks({}),
    "Misclassifications": lambda: [Misclassifications()],
    "LinearProbes": lambda: [LinearProbes()],
    "Attributions": lambda: [Attributions()],
    "FeatureVisualization": lambda: [FeatureVisualization()],
}


@pytest.mark.parametrize("with_val", [True, False], ids=["validation_data", "training_data_only"])
@pytest.mark.parametrize("which", list(AUGMENTING_SETS))
def test_an_augmenting_dataset_drawing_from_the_global_rng_trains_bitwise_the_same(tmp_path: Any, which: str, with_val: bool) -> None:
    plain, plain_trainer = _augmenting_fit(tmp_path / "plain", [], with_val)
    rng_plain = torch.get_rng_state()
    watched, watched_trainer = _augmenting_fit(tmp_path / "watched", AUGMENTING_SETS[which](), with_val)
    rng_watched = torch.get_rng_state()
    a, b = plain.state_dict(), watched.state_dict()
    assert a.keys() == b.keys()
    differ = [key for key in a if not torch.equal(a[key], b[key])]
    assert not differ, f"training changed by introspection: {differ}"
    opt_a, opt_b = (t.optimizers[0].state_dict()["state"] for t in (plain_trainer, watched_trainer))
    for idx in opt_a:
        for name, value in opt_a[idx].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b[idx][name])), f"optimizer {idx}.{name}"
    assert torch.equal(rng_plain, rng_watched), "global torch RNG drifted"


# ------------------------------------------------------------------------- trainer entry points, reuse
def test_validate_before_and_after_fit_leaves_attributions_working(tmp_path: Any) -> None:
    model, dm = Classifier(small_cnn()), digits_dm()
    cb = Attributions()
    trainer = quick_trainer(tmp_path, [cb])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(model, datamodule=dm, verbose=False)
        trainer.fit(model, datamodule=dm)
        steps = [h["step"] for h in cb.history]
        trainer.validate(model, datamodule=dm, verbose=False)
    assert not failures(list(caught)), failures(list(caught))
    assert not cb.disabled
    assert trainer.global_step == 8
    assert steps and steps[-1] == 8 and "saliency" in cb.maps  # the fit's runs all happened
    assert "introspect/attributions/saliency" in read_events(str(tmp_path))["images"]


def test_the_same_callback_objects_serve_a_second_fit_on_other_data(tmp_path: Any) -> None:
    callbacks = introspection_callbacks({})
    cbs = by_name(callbacks)
    # fit 1: tabular data (nothing to visualise: FeatureVisualization is off for that fit)
    torch.manual_seed(0)
    first = quick_trainer(tmp_path / "one", callbacks)
    fit_recording(first, Classifier(nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))), datamodule=blobs_dm())
    assert first.state.finished and cbs["FeatureVisualization"].disabled
    # fit 2: images, another model, 10 classes
    torch.manual_seed(0)
    second = quick_trainer(tmp_path / "two", callbacks)
    caught = fit_recording(second, Classifier(small_cnn()), datamodule=digits_dm())
    assert second.state.finished
    assert not failures(caught), failures(caught)
    assert not [type(cb).__name__ for cb in callbacks if cb.disabled]
    assert cbs["FeatureVisualization"].history and not skips_of(caught, "FeatureVisualization")
    assert cbs["Attributions"].maps["saliency"].shape[1:] == (1, 16, 16)  # samples redrawn from the digits
    x, _ = cbs["Attributions"].fixed_samples(second)
    assert x.shape[1:] == (1, 16, 16)
    assert len(cbs["PerClassMetrics"].snapshots["end"]["recall"]) == 10
    assert {h["epoch"] for h in cbs["Misclassifications"].history if h["step"] > 0} <= {0, 1}


def test_every_callback_deep_copies_and_pickles_after_a_tensorboard_fit(tmp_path: Any) -> None:
    callbacks = introspection_callbacks({})
    trainer = quick_trainer(tmp_path, callbacks)
    fit_recording(trainer, Classifier(small_cnn()), datamodule=digits_dm())
    assert trainer.state.finished
    for cb in callbacks:
        name = type(cb).__name__
        clone = copy.deepcopy(cb)
        restored = pickle.loads(pickle.dumps(cb))
        for other in (clone, restored):
            assert same_state(other.state_dict(), cb.state_dict()), name


# ------------------------------------------------------------------------------------------- faults
def test_a_write_error_in_the_log_dir_never_ends_the_fit(tmp_path: Any, monkeypatch: Any) -> None:
    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    for method in ("flush", "scalars", "image", "text", "histograms", "histogram"):
        monkeypatch.setattr(TensorBoardWriter, method, disk_full)
    callbacks = introspection_callbacks({})
    trainer = quick_trainer(tmp_path, callbacks)
    caught = fit_recording(trainer, Classifier(small_cnn()), datamodule=digits_dm())
    assert trainer.state.finished and trainer.global_step == 8
    assert any("No space left on device" in str(w.message) for w in caught)  # the user is told


class InPlaceNormalisation(Classifier):
    """Normalises its input in place in ``forward``: fine in training, impossible with input gradients."""

    def forward(self, x: torch.Tensor) -> Any:
        x.sub_(0.1).div_(1.1)
        return self.net(x)


def test_a_forward_that_fails_only_with_input_gradients_does_not_end_the_fit(tmp_path: Any) -> None:
    cb = Attributions()  # default on_error="warn"
    trainer = quick_trainer(tmp_path, [cb])
    caught = fit_recording(trainer, InPlaceNormalisation(small_cnn()), datamodule=digits_dm())
    assert trainer.state.finished and trainer.global_step == 8
    mine = [str(w.message) for w in caught if str(w.message).startswith("Attributions")]
    assert len(mine) == 1, mine
    assert cb.disabled


# ------------------------------------------------------------------------ modules that run twice
def calls_per_module(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    counts: dict[str, int] = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: counts.__setitem__(n, counts.get(n, 0) + 1))
               for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return counts


def test_auto_probe_layers_are_modules_that_run_once_per_forward(tmp_path: Any) -> None:
    model, dm = Classifier(TinyResNet()), digits_dm()
    counts = calls_per_module(model.eval(), dm.val_set.tensors[0][:4])
    reused = {name for name, n in counts.items() if n > 1}
    assert "net.layer1.0.relu" in reused  # the setup: torchvision's BasicBlock calls its relu twice
    cb = LinearProbes(on_error="raise")
    trainer = quick_trainer(tmp_path, [cb], epochs=1, logger=False)
    trainer.fit(model.train(), datamodule=dm)
    assert cb.layer_names and not set(cb.layer_names) & reused, cb.layer_names


def test_naming_a_module_that_runs_twice_per_forward_is_refused_at_setup(tmp_path: Any) -> None:
    cb = LinearProbes(layers=["net.layer1.0.relu"])
    trainer = quick_trainer(tmp_path, [cb], epochs=1, logger=False)
    with pytest.raises(ValueError, match=r"net\.layer1\.0\.relu"):
        trainer.fit(Classifier(TinyResNet()), datamodule=digits_dm())
    assert trainer.global_step == 0


def test_feature_visualization_auto_layers_skip_the_1x1_shortcut_conv(tmp_path: Any) -> None:
    cb = FeatureVisualization(steps=2, on_error="raise")
    trainer = quick_trainer(tmp_path, [cb], epochs=2, logger=False)
    trainer.fit(Classifier(TinyResNet()), datamodule=digits_dm())
    assert cb.chosen and not [layer for layer in cb.chosen if "downsample" in layer], sorted(cb.chosen)


# -------------------------------------------------------------------------- NaN, replaced modules
def test_nan_weights_with_four_feature_visualization_units_give_the_documented_warning(tmp_path: Any) -> None:
    from tests.test_nonfinite_outputs import small_dm

    cb = FeatureVisualization(layers=["features.2"], channels=[0, 1, 2, 3], classes=None, steps=3, at=[0.0],
                              num_samples=8)
    trainer = quick_trainer(tmp_path, [cb])
    caught = fit_recording(trainer, model_with("conv"), datamodule=small_dm())
    messages = [str(w.message) for w in caught]
    assert trainer.state.finished
    assert not failures(caught), failures(caught)
    nonfinite = [m for m in messages if m.startswith("FeatureVisualization: non-finite values (NaN / Inf)")]
    assert len(nonfinite) == 1, messages
    assert not cb.disabled


class ReplaceHead(Callback):
    """At the end of the first training epoch, replace the classifier's last layer (a new head, as in
    fine-tuning), with weights all equal to 0.5 so they are told apart from the old ones."""

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch == 0:
            head = nn.Linear(16, 10)
            nn.init.constant_(head.weight, 0.5)
            pl_module.net[8] = head


def test_weight_histograms_follow_a_module_replaced_mid_fit(tmp_path: Any) -> None:
    cb = WeightHistograms()
    trainer = quick_trainer(tmp_path, [ReplaceHead(), cb], epochs=2)
    caught = fit_recording(trainer, Classifier(small_cnn()), datamodule=digits_dm())
    assert trainer.state.finished and not failures(caught)
    last = cb.history[-1]["weights"]
    assert "net.8" in last and last["net.8"]["mean"] == pytest.approx(0.5), last.get("net.8")


def test_weight_histograms_summary_survives_a_checkpoint_resume(tmp_path: Any) -> None:
    cb = WeightHistograms()
    trainer = quick_trainer(tmp_path, [cb], epochs=2)
    trainer.fit(Classifier(small_cnn()), datamodule=digits_dm())
    assert cb.summary
    path = str(tmp_path / "last.ckpt")
    trainer.save_checkpoint(path)
    resumed = WeightHistograms()
    again = quick_trainer(tmp_path / "resumed", [resumed], epochs=2)
    again.fit(Classifier(small_cnn()), datamodule=digits_dm(), ckpt_path=path)
    assert resumed.summary == cb.summary


# ------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("section", list(CALLBACKS))
def test_at_as_a_bare_float_is_a_value_error_naming_at(section: str) -> None:
    with pytest.raises(ValueError, match="`at`"):
        callback_class(section)(at=0.5)


def test_a_long_and_a_multiline_class_name_disable_no_callback(tmp_path: Any) -> None:
    names = [str(i) for i in range(10)]
    names[3], names[4] = "x" * 300, "two\nlines"
    options = {"class_names": names}
    callbacks = introspection_callbacks({"per_class_metrics": options, "misclassifications": options, "attributions": options})
    trainer = quick_trainer(tmp_path, callbacks)
    caught = fit_recording(trainer, Classifier(small_cnn()), datamodule=digits_dm())
    assert trainer.state.finished
    assert not failures(caught), failures(caught)
    assert not [type(cb).__name__ for cb in callbacks if cb.disabled]
    recall = [t for t in read_events(str(tmp_path))["scalars"] if t.startswith("introspect/per_class/recall/")]
    assert len(recall) == 10 and not [t for t in recall if "\n" in t], recall


def test_two_differently_configured_instances_of_one_callback_keep_their_own_state(tmp_path: Any) -> None:
    first, second = WeightHistograms(layers="net.0"), WeightHistograms(layers="net.8", bins=16)
    assert first.state_key != second.state_key
    trainer = quick_trainer(tmp_path, [first, second], epochs=2)
    caught = fit_recording(trainer, Classifier(small_cnn()), datamodule=digits_dm())
    assert trainer.state.finished and not failures(caught)
    assert list(first.drift) == ["net.0"] and list(second.drift) == ["net.8"]
    path = str(tmp_path / "two.ckpt")
    trainer.save_checkpoint(path)
    states = torch.load(path, weights_only=True)["callbacks"]
    assert first.state_key in states and second.state_key in states
    loaded = [WeightHistograms(layers="net.0"), WeightHistograms(layers="net.8", bins=16)]
    for cb in loaded:
        cb.load_state_dict(states[cb.state_key])
    assert list(loaded[0].initial) == ["net.0"] and list(loaded[1].initial) == ["net.8"]
    assert torch.equal(loaded[1].initial["net.8"], second.initial["net.8"])


def test_a_string_import_path_in_a_yaml_config_is_refused(tmp_path: Any, monkeypatch: Any) -> None:
    called = []
    monkeypatch.setattr(os, "getcwd", lambda: called.append(1) or "/")
    path = tmp_path / "introspect.yaml"
    path.write_text('feature_visualization:\n  prior: "os:getcwd"\n')
    with pytest.raises(ValueError, match="prior"):
        introspection_callbacks(str(path))
    assert not called


# --------------------------------------------------------------------------------------------- DDP
_DDP_FAULT_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    from lightning_introspect._lightning import Trainer, pl
    from lightning_introspect.callbacks.per_class_metrics import PerClassMetrics
    from lightning_introspect.demo import DigitsCNN, DigitsDataModule
    from lightning_introspect.loggers import adapter

    out = sys.argv[1]
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    if rank == 0:  # rank zero's image and figure writing fails (a full disk there); rank one is fine
        def broken(*args, **kwargs):
            raise OSError(28, "No space left on device")
        for cls in (adapter.FileWriter, adapter.TensorBoardWriter):
            cls.image = broken
            cls.figure = broken

    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=16, limit=64, seed=0)
    cb = PerClassMetrics(num_classes=10, every_n_epochs=1)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                      default_root_dir=os.path.join(out, f"rank{{rank}}"), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[cb])
    trainer.fit(DigitsCNN(), datamodule=dm)
    with open(os.path.join(out, f"result_rank{{trainer.global_rank}}.json"), "w") as fh:
        json.dump(dict(global_step=trainer.global_step, disabled=cb.disabled), fh)
    """
)


@pytest.mark.slow
def test_ddp_with_a_fault_on_rank_zero_only_completes_without_a_hang(tmp_path: Any) -> None:
    script = tmp_path / "ddp_fault.py"
    script.write_text(_DDP_FAULT_SCRIPT.format(root=ROOT))
    env = ddp_env()
    proc = run_isolated([str(script), str(tmp_path)], cwd=str(tmp_path), env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "No space left on device" in proc.stderr  # the fault did happen on rank zero, and the user was told
    results = [json.loads((tmp_path / f"result_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in results] == [4, 4]
    assert results[0]["disabled"] == results[1]["disabled"]  # decided together, or the ranks would part ways
