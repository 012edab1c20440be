"""The Attributions callback: what it logs, when, on which samples; tabular / other inputs; non-interference."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect._lightning import LightningModule, pl
from lightning_introspect.callbacks.attributions import Attributions
from lightning_introspect.demo import DigitsCNN, DigitsDataModule
from lightning_introspect.methods.attribution import attribute
from tests.helpers import quick_trainer, read_events


class _Recording(Attributions):
    """Keeps a copy of every run's maps and of the model weights the run saw."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.runs = []

    def _log(self, trainer, pl_module, epoch):
        super()._log(trainer, pl_module, epoch)
        self.runs.append({"maps": dict(self.maps), "class_maps": copy.deepcopy(self.class_maps),
                          "weights": copy.deepcopy(pl_module.state_dict())})


def _small_dm():
    dm = DigitsDataModule(batch_size=32, limit=96, seed=0)
    dm.setup("fit")
    return dm


def test_logs_each_method_per_class_from_the_untrained_model_on(tmp_path):
    pl.seed_everything(0, verbose=False)
    dm = _small_dm()
    methods = ["saliency", "guided_backprop", "grad_cam", "lrp"]
    cb = _Recording(methods=methods, targets=[3, 8], mean=dm.mean, std=dm.std, num_samples=6, on_error="raise")
    model = DigitsCNN()
    init = copy.deepcopy(model.state_dict())
    trainer = quick_trainer(tmp_path, [cb], epochs=2)
    trainer.fit(model, datamodule=dm)

    steps_per_epoch = trainer.num_training_batches
    expected_steps = [0, steps_per_epoch, 2 * steps_per_epoch]
    events = read_events(str(tmp_path))
    for m in methods:
        assert events["images"][f"introspect/attributions/{m}"] == expected_steps
        for name in ("3", "8"):
            assert events["images"][f"introspect/attributions/{m}/class_{name}"] == expected_steps
    assert events["images"]["introspect/attributions/inputs"] == [0]
    # a class grid is captioned and titled like the main grid: the same layout, so the same image size
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)[0], size_guidance={"images": 0})
    acc.Reload()
    main = acc.Images("introspect/attributions/grad_cam")[-1]
    for name in ("3", "8"):
        grid = acc.Images(f"introspect/attributions/grad_cam/class_{name}")[-1]
        assert (grid.width, grid.height) == (main.width, main.height)
    assert [s for s, _ in events["scalars"]["introspect/attributions/seconds"]] == expected_steps
    assert any(tag.startswith("introspect/attributions/layer") for tag in events["text"])
    assert cb.resolved_cam_layer == "features.9"
    assert [h["epoch"] for h in cb.history] == [-1, 0, 1]

    # the first log shows the untrained model; the same fixed samples are explained every time
    x, _ = cb.fixed_samples(trainer)
    assert x.shape[0] == 6
    for key, value in init.items():
        assert torch.equal(cb.runs[0]["weights"][key], value)
    untrained = DigitsCNN()
    untrained.load_state_dict(init)
    pred = untrained.eval()(x).argmax(1)
    want = attribute(untrained, x, pred, methods, layer="features.9")
    for m in methods:
        torch.testing.assert_close(cb.runs[0]["maps"][m], want[m])
        assert cb.maps[m].shape[0] == 6
    want_class = attribute(untrained, x, 8, ["grad_cam"], layer="features.9")["grad_cam"]
    torch.testing.assert_close(cb.runs[0]["class_maps"]["grad_cam"][8], want_class)
    # training changes what the maps show
    assert not torch.allclose(cb.runs[0]["maps"]["grad_cam"], cb.runs[-1]["maps"]["grad_cam"])
    assert cb.summary_lines() and "features.9" in " ".join(cb.summary_lines())


def _fit_digits(tmp_path, callbacks):
    pl.seed_everything(0, verbose=False)
    dm = _small_dm()
    model = DigitsCNN()
    trainer = quick_trainer(tmp_path, callbacks, epochs=2)
    trainer.fit(model, datamodule=dm)
    return model, trainer


def test_training_is_bitwise_unchanged(tmp_path):
    plain, t_plain = _fit_digits(tmp_path / "plain", [])
    rng_plain = torch.get_rng_state()
    cb = Attributions(methods=["guided_backprop", "grad_cam", "lrp"], targets="all", top_k=4, on_error="raise",
                      num_samples=4)
    watched, t_watched = _fit_digits(tmp_path / "watched", [cb])
    assert len(cb.history) == 3 and len(cb.class_maps["grad_cam"]) == 10
    # the faithfulness curves (on by default) ran at every run: their forwards are part of what is checked
    assert all(list(h["faithfulness"]) == ["guided_backprop", "grad_cam", "lrp", "random", "edges"] for h in cb.history)
    assert torch.equal(rng_plain, torch.get_rng_state())
    a, b = plain.state_dict(), watched.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    opt_a, opt_b = t_plain.optimizers[0].state_dict()["state"], t_watched.optimizers[0].state_dict()["state"]
    for idx in opt_a:
        for name, value in opt_a[idx].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b[idx][name]))
    assert [m.training for m in plain.modules()] == [m.training for m in watched.modules()]
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in watched.modules())


def test_true_targets_and_per_class_samples(tmp_path):
    cb = _Recording(methods=["grad_cam"], targets="true", per_class=1, every_n_epochs=None, at=[0.0], on_error="raise",
                    class_names=[f"digit{i}" for i in range(10)])
    _fit_digits(tmp_path, [cb])
    x, y = cb.fixed_samples(None)  # drawn once; reused
    assert sorted(y.tolist()) == list(range(10))
    assert cb.history[0]["explained"] == y.tolist()
    assert [h["epoch"] for h in cb.history] == [-1, 1]  # at=0.0 and the last epoch


# ------------------------------------------------------------------------------------- other inputs
class _Generic(LightningModule):
    def __init__(self, net, x, y):
        super().__init__()
        self.net, self.x, self.y = net, x, y

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)


def test_tabular_inputs_get_feature_bar_charts(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 7, generator=gen)
    y = (x[:, 2] > 0).long() + (x[:, 5] > 1).long()
    torch.manual_seed(0)
    module = _Generic(nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 3)), x, y)
    cb = Attributions(methods=["saliency", "grad_cam", "lrp"], targets="all", num_samples=8, at=None, on_error="raise")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quick_trainer(tmp_path, [cb], epochs=1).fit(module)
    assert sum("spatial feature map" in str(w.message) for w in caught) == 1  # grad_cam dropped, once
    events = read_events(str(tmp_path))
    tags = set(events["images"])
    want = ["saliency", "lrp"]
    for m in want:
        assert f"introspect/attributions/{m}" in tags
        assert {f"introspect/attributions/{m}/class_{c}" for c in range(3)} <= tags
    assert not any("grad_cam" in t for t in tags)
    assert cb.maps["saliency"].shape == (8, 7)
    # features are removed; a random map is the reference (no edges without pixels)
    assert list(cb.history[-1]["faithfulness"]) == ["saliency", "lrp", "random"]
    assert "introspect/attributions/faithfulness/lrp/deletion_auc" in events["scalars"]


def test_other_input_shapes_are_skipped_with_one_warning(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, 12, generator=gen)
    y = (x.mean((1, 2)) > 0).long()
    module = _Generic(nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(40, 2)), x, y)
    cb = Attributions(methods=["saliency"], on_error="raise")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quick_trainer(tmp_path, [cb], epochs=2).fit(module)
    assert sum("neither images" in str(w.message) for w in caught) == 1
    assert not cb.maps and not cb.history
    events = read_events(str(tmp_path))
    assert not any(t.startswith("introspect/attributions/") for t in events["images"])


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"methods": ["salency"]}, "'saliency'"),
        ({"targets": "predicted"}, "'pred', 'true', 'all'"),
        ({"targets": [1, -2]}, "class ids"),
        ({"normalize": "global"}, "'per_map', 'per_batch'"),
        ({"colormap": "nope"}, "colormap"),
        ({"mean": 0.5}, "together"),
        ({"top_k": 0}, "top_k"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"lrp_rule": "gamma"}, "lrp_rule"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Attributions(**kwargs)


@pytest.mark.parametrize("kwargs, match", [({"cam_layer": "features.99"}, "features.9"), ({"targets": [12]}, r"\[0, 9\]")])
def test_model_dependent_errors_raise_before_the_first_training_step(tmp_path, kwargs, match):
    cb = Attributions(methods=["grad_cam"], **kwargs)
    model = DigitsCNN()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        quick_trainer(tmp_path, [cb], epochs=1).fit(model, datamodule=_small_dm())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_lrp_failing_on_a_model_is_dropped_and_the_rest_goes_on(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=gen)
    y = (x.mean((1, 2, 3)) > 0).long()
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(1, 4), nn.Flatten(), nn.Linear(256, 2))  # no LRP rule for GroupNorm
    cb = Attributions(methods=["saliency", "lrp"], num_samples=4, every_n_epochs=1, at=None)  # on_error="warn"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quick_trainer(tmp_path, [cb], epochs=2).fit(_Generic(net, x, y))
    # known before training (the model has no rule for GroupNorm): dropped at the first resolution, one warning
    assert sum("'lrp' is skipped for this model: LRP has no rule for module 'net.1'" in str(w.message) for w in caught) == 1
    assert not cb.disabled and len(cb.history) == 2 and list(cb.maps) == ["saliency"]


def test_lrp_unsupported_model_is_dropped_at_setup_even_with_on_error_raise(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=gen)
    y = (x.mean((1, 2, 3)) > 0).long()
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 2))
    cb = Attributions(methods=["saliency", "lrp"], num_samples=4, every_n_epochs=1, at=[0.0], on_error="raise")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quick_trainer(tmp_path, [cb], epochs=1).fit(_Generic(net, x, y))
    assert any("LRP has no rule for module 'net.1' of type torch.nn.GroupNorm" in str(w.message) for w in caught)
    assert [h["epoch"] for h in cb.history] == [-1, 0] and list(cb.maps) == ["saliency"]


def test_attribute_targets_in_chunks_equals_one_call_per_target():
    """Repeating the samples per target and explaining them in chunks gives each target's own maps."""
    from lightning_introspect.methods.attribution_runs import attribute_targets

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(4, 5)
    targets = [torch.tensor([0, 1, 2, 0]), torch.full((4,), 1), torch.full((4,), 2)]
    got = attribute_targets(lambda xs, t: attribute(model, xs, t, ["saliency", "input_x_gradient"]), x, targets, max_batch=8)
    assert got["saliency"].shape == (12, 5)
    for j, t in enumerate(targets):
        one = attribute(model, x, t, ["saliency", "input_x_gradient"])
        for m in one:
            assert torch.allclose(got[m].split(4)[j], one[m], atol=1e-6), (m, j)


def test_nonfinite_grids_and_the_grids_left_out():
    from lightning_introspect.methods.attribution_runs import nonfinite_grids, skipped_grids
    from lightning_introspect.render.attributions import grid_list

    nan = float("nan")
    flat = {"saliency": torch.tensor([[1.0], [nan], [2.0], [3.0]]), "lrp": torch.ones(4, 1)}
    assert nonfinite_grids(torch.ones(2, 3), flat, ["cat"]) == ["saliency"]
    assert nonfinite_grids(torch.full((2, 3), nan), flat, ["cat"]) == ["outputs", "saliency"]
    assert skipped_grids(["outputs", "saliency"], ["saliency", "lrp"]) == ["lrp", "saliency"]
    assert grid_list(["saliency", "saliency/class_cat", "lrp"], {"saliency": 1, "lrp": 1}) == "saliency (all grids), lrp"
