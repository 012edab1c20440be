"""The whole callback set on the setups real users have, not only the digits demo.

Every callback is on (``on_error="raise"``, so nothing is hidden by the warn-and-disable policy) with
light sizes; each setup must finish and give the results it can give, or fail before the first
training step with a message that says what to change:

* models: tabular MLP ``(N, F)``, 1-D convolutions ``(N, C, L)``, one binary logit, a forward that
  returns a tuple or a dict, a ``torch.compile``-d submodule;
* trainers: no validation data, ``limit_val_batches=0``, ``EarlyStopping``, ``check_val_every_n_epoch``,
  ``val_check_interval``, gradient accumulation + clipping, ``fast_dev_run``, no logger, ``precision="64-true"``
  and ``"bf16-true"``, batches with extra fields and a second validation loader;
* a torchvision-style model (GroupNorm, SiLU, in-place ReLU, Dropout, LayerNorm) that LRP has no rule for.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect._lightning import LightningModule, Trainer, pl
from lightning_introspect._torch.hooks import output_as_tensor
from lightning_introspect.callbacks.base import IntrospectionInputError
from lightning_introspect.config import introspection_callbacks
from lightning_introspect.methods import attribute
from lightning_introspect.methods.lrp import lrp
from tests.helpers import read_events, tb_logger

LIGHT = {
    "misclassifications": {"num_samples": 32},
    "attributions": {"num_samples": 4},
    "feature_visualization": {"steps": 3, "num_channels": 1, "num_layers": 1},
    "sanity_checks": {"num_samples": 4, "repeats": 1, "layers": 2, "progress": False},
}


def cnn(channels: int = 3, outputs: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, outputs),
    )


class TupleOut(nn.Module):
    """A network that returns ``(logits, features)``, like models with auxiliary outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = cnn()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x), x.mean((1, 2, 3))


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = cnn()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": self.net(x), "aux": x.mean()}


class Seq1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 5, padding=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean(-1))


class Net(LightningModule):
    """Any ``body`` trained with cross-entropy (or BCE for one logit); logits from a tuple / dict output."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> Any:
        return self.body(x)

    @staticmethod
    def logits(out: Any) -> torch.Tensor:
        return out[0] if isinstance(out, tuple) else out["scores"] if isinstance(out, dict) else out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        z = self.logits(self(x))
        loss = F.binary_cross_entropy_with_logits(z.squeeze(1), y.float()) if z.shape[1] == 1 else F.cross_entropy(z, y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loaders(shape: tuple[int, ...], classes: int = 3, n: int = 96) -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = torch.randn(n, *shape, generator=gen) + y.view(-1, *[1] * len(shape)).float()
    cut = n * 2 // 3
    train = DataLoader(TensorDataset(x[:cut], y[:cut]), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    return train, DataLoader(TensorDataset(x[cut:], y[cut:]), batch_size=16)


def fit(tmp_path: Any, body: nn.Module, shape: tuple[int, ...], *, classes: int = 3, config: dict[str, Any] | None = None,
        val: bool = True, logger: Any = "tb", callbacks: tuple[Any, ...] = (), introspect: bool = True,
        **trainer_kwargs: Any) -> tuple[Trainer, dict[str, Any], list[str]]:
    """Fit ``body`` with every callback on (none with ``introspect=False``); return the trainer, the
    callbacks by class name and our warnings."""
    torch.manual_seed(0)
    sections = {"per_class_metrics": {"num_classes": classes}} | LIGHT
    for section, options in (config or {}).items():
        sections[section] = {**sections.get(section, {}), **options}
    ours = introspection_callbacks(sections) if introspect else []
    for cb in ours:
        cb.on_error = "raise"
    train, val_loader = loaders(shape, classes)
    opts: dict[str, Any] = dict(
        max_epochs=2, accelerator="cpu", devices=1, callbacks=[*ours, *callbacks], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
        default_root_dir=str(tmp_path), logger=tb_logger(tmp_path) if logger == "tb" else logger,
    )
    trainer = Trainer(**(opts | trainer_kwargs))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Net(body), train, val_loader if val else None)
    names = ("PerClass", "Misclass", "Weight", "Probes", "Attributions", "Feature", "Sanity")
    messages = [str(w.message) for w in caught if any(n in str(w.message) for n in names)]
    return trainer, {type(cb).__name__: cb for cb in ours}, messages


def assert_everything_ran(cbs: dict[str, Any], epochs: int = 2) -> None:
    assert not [name for name, cb in cbs.items() if cb.disabled]
    assert set(cbs["PerClassMetrics"].snapshots) == {"start", "middle", "end"}
    assert [k for k in cbs["LinearProbes"].history if isinstance(k, int)] == list(range(epochs))
    assert cbs["Attributions"].maps and cbs["SanityChecks"].report is not None
    assert cbs["Misclassifications"].history and cbs["FeatureVisualization"].history


# ------------------------------------------------------------------------------------------ models
def test_tabular_model_gets_what_applies_and_skips_the_rest_with_one_warning_each(tmp_path: Any) -> None:
    body = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
    _, cbs, messages = fit(tmp_path, body, (20,))
    assert cbs["FeatureVisualization"].disabled and not cbs["FeatureVisualization"].history  # nothing to visualise
    assert any(m.startswith("FeatureVisualization is skipped for this fit: the inputs of shape") and "are not images" in m
               for m in messages)
    assert "grad_cam" not in cbs["Attributions"].maps and "saliency" in cbs["Attributions"].maps
    report = cbs["SanityChecks"].report  # used to fail at fit end: Grad-CAM has no feature map here
    assert report is not None and "grad_cam" not in report.verdicts and "saliency" in report.verdicts
    assert any("SanityChecks: ['grad_cam'] need a spatial feature map" in m for m in messages)
    assert set(cbs["PerClassMetrics"].snapshots) == {"start", "middle", "end"} and cbs["LinearProbes"].history


def test_sequence_inputs_skip_the_image_callbacks_and_keep_the_rest(tmp_path: Any) -> None:
    _, cbs, messages = fit(tmp_path, Seq1d(), (4, 32))
    assert cbs["SanityChecks"].report is None and cbs["Attributions"].maps == {}
    assert any(m.startswith("SanityChecks is skipped for this fit: the inputs of shape (4, 4, 32) are neither images")
               for m in messages)
    assert set(cbs["PerClassMetrics"].snapshots) == {"start", "middle", "end"}
    assert [k for k in cbs["LinearProbes"].history if isinstance(k, int)] == [0, 1]
    assert cbs["SanityChecks"].skip_reason and cbs["Attributions"].skip_reason  # skipped with a reason, not failed


def test_one_binary_logit_works_with_task_binary(tmp_path: Any) -> None:
    _, cbs, messages = fit(tmp_path, cnn(1, 1), (1, 12, 12), classes=2, config={"per_class_metrics": {"task": "binary"}})
    assert_everything_ran(cbs)
    assert cbs["SanityChecks"].report.class_sensitivity == {}  # no other class to compare with: skipped, said so
    assert any("the model has one output (a binary logit)" in m for m in messages)


def test_one_binary_logit_with_num_classes_2_fails_before_training_and_names_the_fix(tmp_path: Any) -> None:
    with pytest.raises(IntrospectionInputError, match="pass `task='binary'`") as info:
        fit(tmp_path, cnn(1, 1), (1, 12, 12), classes=2)
    assert "shape (16, 1)" in str(info.value)


def test_a_forward_returning_a_tuple_is_explained_through_its_first_tensor(tmp_path: Any) -> None:
    _, cbs, _ = fit(tmp_path, TupleOut(), (3, 12, 12))
    assert_everything_ran(cbs)
    assert {"saliency", "grad_cam", "lrp"} <= set(cbs["Attributions"].maps)


def test_a_dict_output_with_output_transform_everywhere(tmp_path: Any) -> None:
    pick = {"output_transform": lambda out: out["scores"]}
    config = {k: pick for k in ("per_class_metrics", "misclassifications", "attributions", "sanity_checks", "feature_visualization")}
    _, cbs, messages = fit(tmp_path, DictOut(), (3, 12, 12), config=config)
    assert_everything_ran(cbs)
    assert "lrp" not in cbs["Attributions"].maps  # LRP cannot apply a transform: skipped with a warning
    assert any("cannot apply `output_transform`; 'lrp' is skipped" in m for m in messages)


def test_output_as_tensor_and_lrp_see_the_same_logits_as_a_plain_model() -> None:
    torch.manual_seed(0)
    model = TupleOut().eval()
    x = torch.randn(3, 3, 12, 12)
    with output_as_tensor(model, Net.logits):
        ours = attribute(model, x, "pred", ["saliency", "grad_cam"], layer="net.4")
    plain = attribute(model.net, x, "pred", ["saliency", "grad_cam"], layer="4")
    for method in ours:
        torch.testing.assert_close(ours[method], plain[method])
    assert not model._forward_hooks  # removed again
    torch.testing.assert_close(lrp(model, x, target=1), lrp(model.net, x, target=1))


def test_output_as_tensor_without_logits_names_output_transform() -> None:
    class Strings(nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            return ("no", "tensors")

    model = Strings()
    with pytest.raises(ValueError, match="pass `output_transform`"), output_as_tensor(model, Net.logits):
        model(torch.zeros(1))
    assert not model._forward_hooks


def test_a_compiled_submodule_is_introspected_eagerly(tmp_path: Any) -> None:
    # Lightning's sanity steps compile the eval-mode graph before any hook of ours exists; hooks added
    # later do not fire in a cached graph. Every pass of ours runs eagerly (`eager_mode`), LinearProbes
    # takes its activations from such a pass instead of hooking the compiled validation, LRP traces `_orig_mod`.
    body = torch.compile(cnn(), backend="eager")
    _, cbs, messages = fit(tmp_path, body, (3, 12, 12), num_sanity_val_steps=2)
    assert_everything_ran(cbs)
    assert any(m.startswith("LinearProbes: the model contains torch.compile-d modules") for m in messages)
    assert {"grad_cam", "lrp"} <= set(cbs["Attributions"].maps)
    assert cbs["LinearProbes"].layer_names and all(len(cbs["LinearProbes"].history[e]) == len(cbs["LinearProbes"].layer_names) for e in (0, 1))


def test_a_torchvision_style_model_with_groupnorm_silu_inplace_relu_and_dropout(tmp_path: Any) -> None:
    body = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(inplace=True), nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 3),
    )
    _, cbs, messages = fit(tmp_path, body, (3, 12, 12))
    assert_everything_ran(cbs)
    # no LRP rule for GroupNorm: known before training, so dropped with one warning (not a failure, also with "raise")
    assert "lrp" not in cbs["Attributions"].maps and "lrp" not in cbs["SanityChecks"].report.verdicts
    assert any(m.startswith("Attributions: 'lrp' is skipped for this model: LRP has no rule for module 'body.4'") for m in messages)
    assert any("[inplace_relu]" in m for m in messages) and any("[non_relu_activation]" in m for m in messages)


def test_batches_with_extra_fields_and_a_second_validation_loader(tmp_path: Any) -> None:
    class WithNames(torch.utils.data.Dataset):
        def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
            self.x, self.y = x, y

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
            return self.x[i], self.y[i], f"image_{i}.png"

    class TwoLoaders(Net):
        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
            return self(batch[0])

    train, val = loaders((3, 12, 12))
    x, y = val.dataset.tensors
    ours = introspection_callbacks({"per_class_metrics": {"num_classes": 3}} | LIGHT)
    for cb in ours:
        cb.on_error = "raise"
    trainer = Trainer(max_epochs=2, accelerator="cpu", devices=1, callbacks=ours, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    val_loaders = [DataLoader(WithNames(x, y), batch_size=16), DataLoader(TensorDataset(x[:8], y[:8]), batch_size=4)]
    trainer.fit(TwoLoaders(cnn()), train, val_loaders)
    cbs = {type(cb).__name__: cb for cb in ours}
    assert_everything_ran(cbs)
    assert sum(cbs["PerClassMetrics"].snapshots["end"]["support"]) == len(x)  # the first validation loader only


def test_a_frozen_backbone_under_no_grad_skips_the_gradient_callbacks_with_the_reason(tmp_path: Any) -> None:
    class FrozenBackbone(nn.Module):  # transfer learning: the feature extractor runs under no_grad
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
            self.backbone.requires_grad_(False)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                features = self.backbone(x)
            return self.head(features)

    _, cbs, messages = fit(tmp_path, FrozenBackbone(), (3, 12, 12))
    for name in ("Attributions", "FeatureVisualization", "SanityChecks"):
        assert any(m.startswith(f"{name} is skipped for this fit: autograd does not connect the model's output to its input")
                   for m in messages), name
    assert cbs["Attributions"].maps == {} and cbs["SanityChecks"].report is None and cbs["FeatureVisualization"].disabled
    assert set(cbs["PerClassMetrics"].snapshots) == {"start", "middle", "end"} and cbs["Misclassifications"].history
    assert [k for k in cbs["LinearProbes"].history if isinstance(k, int)] == [0, 1]


def test_token_ids_get_the_metrics_probes_and_token_attributions_and_a_reason_for_the_rest(tmp_path: Any) -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.hidden, self.out = nn.Embedding(50, 16), nn.Linear(16, 32), nn.Linear(32, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(F.relu(self.hidden(self.embed(ids).mean(1))))

    class TokenNet(Net):
        pass

    train, val = loaders((12,))
    as_ids = [DataLoader(TensorDataset((dl.dataset.tensors[0].abs() * 10).long().clamp(0, 49), dl.dataset.tensors[1]),
                         batch_size=16) for dl in (train, val)]
    ours = introspection_callbacks({"per_class_metrics": {"num_classes": 3}} | LIGHT)
    for cb in ours:
        cb.on_error = "raise"
    trainer = Trainer(max_epochs=2, accelerator="cpu", devices=1, callbacks=ours, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TokenNet(Tokens()), *as_ids)
    messages = [str(w.message) for w in caught]
    cbs = {type(cb).__name__: cb for cb in ours}
    # token ids: attributions and the sanity check on the embedding output (one score per token)
    assert not any(m.startswith("SanityChecks is skipped") for m in messages)
    assert not cbs["Attributions"].disabled and cbs["Attributions"].maps
    assert all(m.shape == (cbs["Attributions"].num_samples, 12) for m in cbs["Attributions"].maps.values())
    report = cbs["SanityChecks"].report
    assert report is not None and report.input_kind == "token_ids" and report.embedding_layer == "body.embed"
    assert cbs["FeatureVisualization"].disabled
    assert set(cbs["PerClassMetrics"].snapshots) == {"start", "middle", "end"}
    assert [k for k in cbs["LinearProbes"].history if isinstance(k, int)] == [0, 1]


# ---------------------------------------------------------------------------------------- trainers
@pytest.mark.parametrize("how", ["no_loader", "limit_val_batches_0"])
def test_no_validation_data_warns_instead_of_failing(tmp_path: Any, how: str) -> None:
    kwargs = {"val": False} if how == "no_loader" else {"limit_val_batches": 0}
    _, cbs, messages = fit(tmp_path, cnn(), (3, 12, 12), **kwargs)
    assert not [name for name, cb in cbs.items() if cb.disabled]
    assert cbs["LinearProbes"].history == {}
    assert any("LinearProbes probes the validation pass, but this fit has no validation data" in m for m in messages)
    assert cbs["Attributions"].maps and cbs["SanityChecks"].report is not None  # they fall back to training samples


def test_early_stopping_still_gets_the_final_runs(tmp_path: Any) -> None:
    stop = pl.callbacks.EarlyStopping(monitor="train_loss", patience=0, min_delta=100.0)  # stops after epoch 1
    trainer, cbs, _ = fit(tmp_path, cnn(), (3, 12, 12), callbacks=(stop,), max_epochs=10)
    last, step = 1, trainer.global_step
    assert trainer.current_epoch == 2 and cbs["PerClassMetrics"].snapshot_epochs["end"]["epoch"] == last
    assert [h["epoch"] for h in cbs["Misclassifications"].history][-1] == last
    assert cbs["Attributions"].history[-1]["step"] == step and cbs["Attributions"].history[-1]["epoch"] == last
    assert {h["step"] for h in cbs["FeatureVisualization"].history} == {step}
    assert {h["epoch"] for h in cbs["FeatureVisualization"].history} == {last}
    events = read_events(str(tmp_path))
    for tag in ("introspect/probes/accuracy_vs_depth", "introspect/misclassifications/gallery",
                "introspect/weights/drift_by_depth", "introspect/attributions/grad_cam"):
        assert step in events["images"][tag], tag


@pytest.mark.parametrize(
    "kwargs",
    [
        {"check_val_every_n_epoch": 2, "max_epochs": 4},
        {"val_check_interval": 0.5},
        {"accumulate_grad_batches": 2, "gradient_clip_val": 0.5},
        {"logger": False},
        {"precision": "64-true"},
        {"precision": "bf16-true"},
    ],
    ids=["val_every_2_epochs", "val_twice_an_epoch", "accumulate_and_clip", "no_logger", "float64_model", "bfloat16_model"],
)
def test_trainer_options_complete_with_every_callback(tmp_path: Any, kwargs: dict[str, Any]) -> None:
    _, cbs, _ = fit(tmp_path, cnn(), (3, 12, 12), **kwargs)
    assert not [name for name, cb in cbs.items() if cb.disabled]
    assert set(cbs["PerClassMetrics"].snapshots) == {"start", "middle", "end"}
    assert cbs["Attributions"].maps and cbs["SanityChecks"].report is not None and cbs["FeatureVisualization"].history


def test_fast_dev_run_completes(tmp_path: Any) -> None:
    trainer, cbs, _ = fit(tmp_path, cnn(), (3, 12, 12), fast_dev_run=True)
    assert trainer.global_step == 1 and not [name for name, cb in cbs.items() if cb.disabled]
    assert cbs["SanityChecks"].report is not None


def test_validate_test_and_predict_after_the_fit_leave_the_fit_results_alone(tmp_path: Any) -> None:
    class AllSteps(Net):
        def test_step(self, batch: Any, batch_idx: int) -> Any:
            return self(batch[0])

        def predict_step(self, batch: Any, batch_idx: int) -> Any:
            return self(batch[0])

    train, val = loaders((3, 12, 12))
    ours = introspection_callbacks({"per_class_metrics": {"num_classes": 3}} | LIGHT)
    for cb in ours:
        cb.on_error = "raise"
    trainer = Trainer(max_epochs=2, accelerator="cpu", devices=1, callbacks=ours, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    model = AllSteps(cnn())
    trainer.fit(model, train, val)
    cbs = {type(cb).__name__: cb for cb in ours}
    probes = {k: dict(v) for k, v in cbs["LinearProbes"].history.items()}
    trainer.validate(model, val, verbose=False)
    trainer.test(model, val, verbose=False)
    trainer.predict(model, val)
    assert cbs["LinearProbes"].history == probes  # no probe for an "epoch 2" that never trained
    assert not [name for name, cb in cbs.items() if cb.disabled]


@pytest.mark.parametrize("setup", ["compiled_submodule", "tuple_output_early_stop", "float64_model"])
def test_these_setups_train_bitwise_the_same_with_and_without_introspection(tmp_path: Any, setup: str) -> None:
    def run(introspect: bool) -> tuple[dict[str, torch.Tensor], Any]:
        torch.manual_seed(0)
        body, kwargs = {
            "compiled_submodule": (lambda: torch.compile(cnn(), backend="eager"), {"num_sanity_val_steps": 2}),
            "tuple_output_early_stop": (TupleOut, {"callbacks": (pl.callbacks.EarlyStopping(monitor="train_loss", patience=0, min_delta=100.0),), "max_epochs": 10}),
            "float64_model": (cnn, {"precision": "64-true"}),
        }[setup]
        trainer, _, _ = fit(tmp_path / str(introspect), body(), (3, 12, 12), introspect=introspect, **kwargs)
        module = trainer.lightning_module
        return {k: v.detach().clone() for k, v in module.state_dict().items()}, trainer.optimizers[0].state_dict()["state"]

    (weights_a, opt_a), (weights_b, opt_b) = run(False), run(True)
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i] if isinstance(opt_a[i][k], torch.Tensor))


def test_per_batch_work_in_the_trainers_validation_counts_in_the_callbacks_own_time(tmp_path: Any) -> None:
    """``seconds_total`` (what the overhead benchmark reads) includes the work done per validation batch
    outside ``run``: metric updates, the review's collection, the probes' activation hooks. A slow
    ``target_transform`` (a public option, called once per batch inside that work) makes it measurable."""
    pause = 0.02
    calls = {"PerClassMetrics": 0, "Misclassifications": 0, "LinearProbes": 0}
    during = dict.fromkeys(calls, 0.0)  # own time spent between validation-epoch start and the last batch end
    window: dict[str, Any] = {}

    def slow_labels(key: str) -> Any:
        def labels(batch: Any) -> torch.Tensor:
            if window:
                calls[key] += 1
            time.sleep(pause)
            return batch[1]

        return labels

    class Window(pl.Callback):  # after ours: sees their epoch start and each batch end already done
        def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            window.update({type(cb).__name__: cb.seconds_total for cb in trainer.callbacks if type(cb).__name__ in calls})

        def on_validation_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
            window["last"] = {type(cb).__name__: cb.seconds_total for cb in trainer.callbacks if type(cb).__name__ in calls}

        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            for name in calls:
                during[name] += window["last"][name] - window[name]
            window.clear()

    config = {
        "per_class_metrics": {"target_transform": slow_labels("PerClassMetrics")},
        "misclassifications": {"target_transform": slow_labels("Misclassifications"), "every_n_epochs": 1},
        "linear_probes": {"target_transform": slow_labels("LinearProbes"), "include_input": False, "include_init": False},
    }
    fit(tmp_path, cnn(), (3, 12, 12), config=config, callbacks=(Window(),))
    assert calls["PerClassMetrics"] >= 4 and calls["Misclassifications"] >= 2 and calls["LinearProbes"] >= 4
    for name, n in calls.items():
        assert during[name] >= pause * n, name
