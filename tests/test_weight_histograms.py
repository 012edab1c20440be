"""``WeightHistograms`` on short digits fits: event files, drift, not-learning flags, NaN, resume, non-interference."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_introspect._lightning import pl
from lightning_introspect.callbacks.weight_histograms import WeightHistograms, write_histograms
from lightning_introspect.demo import DigitsCNN, DigitsDataModule
from tests.helpers import quick_trainer, read_events

CONV_LINEAR = ["features.0", "features.4", "features.8", "classifier"]
EPOCHS = 2  # 128 training samples / batch 32 = 4 steps per epoch


def _model(seed: int = 0) -> DigitsCNN:
    """DigitsCNN with a frozen conv (``features.4``) and an unused layer holding a NaN and an Inf."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    model.features[4].weight.requires_grad_(False)
    model.features[4].bias.requires_grad_(False)
    model.unused = nn.Linear(4, 3)
    with torch.no_grad():
        model.unused.weight[0, 0] = float("nan")
        model.unused.weight[1, 1] = float("inf")
    return model


def _fit(tmp_path, callbacks, *, epochs=EPOCHS, model=None, ckpt_path=None, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32, limit=128, seed=0)
    dm.setup("fit")
    model = _model() if model is None else model
    trainer = quick_trainer(tmp_path, callbacks, epochs=epochs, **trainer_kwargs)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, trainer


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """One fit with every option on, shared by the tests that read what it logged."""
    tmp = tmp_path_factory.mktemp("weights")
    cb = WeightHistograms(every_n_steps=5, include_bias=True, include_gradients=True, on_error="raise")
    with pytest.warns(UserWarning, match="non-finite"):
        model, trainer = _fit(tmp, [cb])
    return cb, model, trainer, read_events(str(tmp)), tmp


def test_histograms_for_every_conv_and_linear_layer_in_event_files(watched):
    cb, _, _, events, _ = watched
    hist_tags = set(events["histograms"])
    for layer in CONV_LINEAR + ["features.1", "features.5"]:  # BatchNorm weights are tracked too
        assert f"introspect/weights/{layer}" in hist_tags
        assert f"introspect/weights/bias/{layer}" in hist_tags
        assert f"introspect/weights/drift/{layer}" in events["scalars"]
        assert f"introspect/weights/cosine/{layer}" in events["scalars"]
        assert f"introspect/weights/wasserstein/{layer}" in events["scalars"]
    for layer in ["features.0", "features.8", "classifier"]:
        assert f"introspect/weights/grad/{layer}" in hist_tags
    assert "introspect/weights/grad/features.4" not in hist_tags  # frozen: no gradient to show
    assert {"introspect/weights/drift_by_depth", "introspect/weights/initial_vs_current"} <= set(events["images"])
    assert len(events["images"]["introspect/weights/drift_by_depth"]) == EPOCHS
    assert any(t.startswith("introspect/weights/summary") for t in events["text"])
    # evaluations: fit start (step 0), every 5 steps, every epoch end (steps 4, 8)
    assert cb.steps == [0, 4, 5, 8]
    assert [s for s, _ in events["histograms"]["introspect/weights/features.8"]] == cb.steps
    assert cb.layers[: len(CONV_LINEAR) + 2] == ["features.0", "features.1", "features.4", "features.5", "features.8", "classifier"]


def test_logged_counts_equal_numpy_histogram_of_the_final_weights(watched):
    cb, model, _, events, _ = watched
    for layer in ["features.8", "classifier"]:
        w = dict(model.named_modules())[layer].weight.detach().double().numpy().ravel()
        step, buckets = events["histograms"][f"introspect/weights/{layer}"][-1]
        assert step == 8
        counts, _ = np.histogram(w, bins=cb.bins, range=(w.min(), w.max()))
        assert len(buckets) == cb.bins == 32
        assert np.abs(np.asarray(buckets) - counts).sum() <= 2, layer


def test_drift_grows_from_zero(watched):
    cb, _, _, events, _ = watched
    for layer in ["features.0", "features.8", "classifier"]:
        values = cb.drift[layer]
        assert values[0] == 0.0 and cb.cosine[layer][0] == pytest.approx(0.0, abs=1e-6)
        assert values[-1] > values[1] > 0.0, (layer, values)
        assert values[-1] > 0.01
        assert all(b >= a * 0.9 for a, b in zip(values[1:], values[2:])), values  # grows (Adam, few steps)
        scalars = dict(events["scalars"][f"introspect/weights/drift/{layer}"])
        assert scalars[0] == 0.0 and scalars[8] == pytest.approx(values[-1], rel=1e-5)


def test_frozen_layer_is_flagged_as_not_learning(watched):
    cb, _, _, _, _ = watched
    assert cb.drift["features.4"] == [0.0] * len(cb.steps)
    assert cb.summary["not_learning"] == ["features.4"]
    assert cb.summary["frozen"] == ["features.4"]
    assert cb.summary["checked"] and cb.summary["epoch"] == EPOCHS - 1
    assert any("not learning" in line and "features.4" in line for line in cb.summary_lines())


def test_nonfinite_weights_are_counted_and_do_not_break_binning(watched):
    cb, _, _, events, _ = watched
    h = cb.histograms["unused"]
    assert (h.nan, h.posinf, h.num) == (1, 1, 10)
    assert cb.summary["nonfinite"] == {"unused": 2}
    assert dict(events["scalars"]["introspect/weights/nonfinite"])[8] == 2.0
    assert dict(events["scalars"]["introspect/weights/nonfinite/unused"])[8] == 2.0
    assert "introspect/weights/unused" in events["histograms"]  # the finite values are still shown
    assert math.isnan(cb.drift["unused"][-1]) and "unused" not in cb.summary["not_learning"]


def test_gradient_histograms_follow_the_schedule(watched):
    cb, _, _, _, _ = watched
    # every 5 steps (0, 5) and the last batch of each epoch (global_step 3 and 7 before their update)
    assert [g["step"] for g in cb.grad_history] == [0, 3, 5, 7]
    assert set(cb.grad_history[0]["weights"]) >= {"features.0", "features.8", "classifier"}
    assert "features.4" not in cb.grad_history[0]["weights"]


def test_training_is_bitwise_unchanged_with_gradients_on(watched, tmp_path):
    _, watched_model, watched_trainer, _, _ = watched
    plain, plain_trainer = _fit(tmp_path, [])
    a, b = plain.state_dict(), watched_model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) or (torch.isnan(a[key]).any() and torch.equal(a[key].nan_to_num(), b[key].nan_to_num())), key
    for (name, p), q in zip(plain.named_parameters(), watched_model.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        assert p.grad is None or torch.equal(p.grad, q.grad), name
    opt_a = plain_trainer.optimizers[0].state_dict()["state"]
    opt_b = watched_trainer.optimizers[0].state_dict()["state"]
    for idx in opt_a:
        for key, value in opt_a[idx].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b[idx][key])), (idx, key)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in watched_model.modules())
    assert [m.training for m in plain.modules()] == [m.training for m in watched_model.modules()]


def test_a_fit_stopped_early_still_gets_its_final_evaluation(tmp_path):
    class StopAfterFirstEpoch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    cb = WeightHistograms(every_n_epochs=None, layers="classifier", on_error="raise")
    _fit(tmp_path, [cb, StopAfterFirstEpoch()], epochs=3, limit_val_batches=0)
    assert cb.steps == [0, 4] and cb.epochs == [-1, 0]  # epoch 0 is not scheduled; on_fit_end evaluates
    assert cb.summary["epoch"] == 0 and cb.summary["step"] == 4 and cb.drift["classifier"][-1] > 0


@pytest.mark.slow
def test_resume_keeps_the_true_initial_weights(tmp_path):
    first = WeightHistograms(on_error="raise", layers=["features.*", "classifier"])
    model, trainer = _fit(tmp_path / "a", [first], epochs=1)
    ckpt = str(tmp_path / "one_epoch.ckpt")
    trainer.save_checkpoint(ckpt)
    init = first.initial
    assert set(init) == {"features.0", "features.1", "features.4", "features.5", "features.8", "classifier"}

    resumed = WeightHistograms(on_error="raise", layers=["features.*", "classifier"])
    other = _model(seed=123)  # different random init; the checkpoint restores the trained weights
    _fit(tmp_path / "b", [resumed], epochs=2, model=other, ckpt_path=ckpt)
    assert set(resumed.initial) == set(init)
    for name, w0 in init.items():
        assert torch.equal(resumed.initial[name], w0), f"{name}: W0 was re-taken on resume"
    assert resumed.steps[: len(first.steps)] == first.steps and resumed.steps[-1] == 8
    assert resumed.drift["features.8"][: len(first.steps)] == first.drift["features.8"]
    # measured from the true init: a fresh snapshot at resume would give a smaller drift than before
    assert resumed.drift["features.8"][-1] > first.drift["features.8"][-1] > 0


def test_bad_layer_names_fail_at_setup_with_close_matches():
    model = DigitsCNN()
    with pytest.raises(ValueError, match="`layers`.*'features.8'"):
        WeightHistograms(layers=["features.88"]).setup(None, model, "fit")
    with pytest.raises(ValueError, match="has none.*features"):
        WeightHistograms(layers="features.2").setup(None, model, "fit")  # a ReLU
    with pytest.raises(ValueError, match="pattern 'pool\\*'"):
        WeightHistograms(layers="pool*").setup(None, model, "fit")
    with pytest.raises(ValueError, match="pattern 'nothing\\*'"):
        WeightHistograms(layers=["nothing*"]).setup(None, model, "fit")
    cb = WeightHistograms(layers=["classifier", "features.[04]"])
    cb.setup(None, model, "fit")
    assert cb.layers == ["features.0", "features.4", "classifier"]  # registration order


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"bins": 0}, "bins"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"drift_threshold": -1.0}, "drift_threshold"),
        ({"drift_threshold": float("nan")}, "drift_threshold"),
        ({"include_gradients": "yes"}, "include_gradients"),
        ({"layers": []}, "layers"),
        ({"layers": [3]}, "layers"),
        ({"on_error": "ignore"}, "on_error"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        WeightHistograms(**kwargs)


def test_constructor_is_keyword_only_with_primitive_defaults():
    params = list(inspect.signature(WeightHistograms.__init__).parameters.values())[1:]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    assert all(isinstance(p.default, (str, int, float, bool, list, tuple, type(None))) for p in params)
    assert WeightHistograms.name == "weights"




@pytest.mark.parametrize(("figures_every_n_epochs", "figure_epochs"), [(None, [1, 3]), (1, [0, 1, 2, 3])])
def test_figures_follow_their_own_schedule_and_histograms_every_epoch(tmp_path, figures_every_n_epochs, figure_epochs):
    # 4 epochs of 2 steps: default figures at the 0.5 fraction (epoch 1) and the last epoch (3)
    cb = WeightHistograms(figures_every_n_epochs=figures_every_n_epochs, on_error="raise")
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32, limit=64, seed=0)
    trainer = quick_trainer(tmp_path, [cb], epochs=4)
    trainer.fit(DigitsCNN(), datamodule=dm)
    events = read_events(str(tmp_path))
    epoch_end_steps = [2 * (e + 1) for e in range(4)]
    assert [s for s, _ in events["histograms"]["introspect/weights/features.8"]] == [0, *epoch_end_steps]
    assert [s for s, _ in events["scalars"]["introspect/weights/drift/features.8"]] == [0, *epoch_end_steps]
    assert len(events["text"]["introspect/weights/summary/text_summary"]) == 4
    for tag in ("drift_by_depth", "initial_vs_current"):
        assert events["images"][f"introspect/weights/{tag}"] == [2 * (e + 1) for e in figure_epochs]


def _summaries(log_dir) -> list[tuple[int, bytes]]:
    """(step, serialized Summary) of every summary event under ``log_dir``, as written."""
    import glob
    import os

    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    paths = glob.glob(os.path.join(str(log_dir), "events.out.tfevents.*"))
    return [(e.step, e.summary.SerializeToString()) for p in paths for e in LegacyEventFileLoader(p).Load() if e.HasField("summary")]


def test_written_histograms_read_back_exactly(tmp_path):
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter

    from lightning_introspect.loggers.adapter import TensorBoardWriter
    from lightning_introspect.methods.weights import histograms

    g = torch.Generator().manual_seed(0)
    tensors = {
        "introspect/weights/conv": torch.randn(64, 3, 3, 3, generator=g) * 0.1,
        "introspect/weights/bias/ünïcode": torch.randn(70_000, generator=g) * 1e-3,  # multi-byte tag
        "introspect/weights/const": torch.full((5,), -0.0),
        "introspect/weights/all_nan": torch.full((4,), math.nan),  # no finite value: skipped
        "introspect/weights/mixed": torch.tensor([1.0, math.inf, -3.0, math.nan]),
    }
    hists = histograms(tensors, bins=200)
    experiment = SummaryWriter(str(tmp_path))
    write_histograms(TensorBoardWriter(experiment), hists, 7)
    experiment.close()
    values = [(step, v) for step, raw in _summaries(tmp_path) for v in Summary.FromString(raw).value]
    assert [v.tag for _, v in values] == [t for t in tensors if t != "introspect/weights/all_nan"]
    for step, v in values:
        h = hists[v.tag]
        assert step == 7
        assert list(v.histo.bucket) == h.counts.tolist() and list(v.histo.bucket_limit) == h.edges.tolist()[1:]
        assert (v.histo.min, v.histo.max, v.histo.num, v.histo.sum) == (h.min, h.max, h.num, h.sum)


# ------------------------------------------------------------------- replaced modules, state, per-fit
class ReplaceHead(pl.Callback):
    """Puts a fresh classifier into the model at the start of epoch 1 (the optimizer keeps the old one)."""

    def __init__(self):
        self.new_weight = None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            torch.manual_seed(7)
            pl_module.classifier = nn.Linear(pl_module.classifier.in_features, 10)
            self.new_weight = pl_module.classifier.weight.detach().clone()


def test_a_replaced_layer_is_followed_with_its_own_initial_weights(tmp_path):
    cb = WeightHistograms(layers=["features.8", "classifier"], on_error="raise")
    swap = ReplaceHead()
    with pytest.warns(UserWarning, match="'classifier' was replaced") as record:
        model, _ = _fit(tmp_path, [swap, cb], epochs=3)
    assert sum("was replaced" in str(w.message) for w in record) == 1  # said once, evaluated twice after
    assert cb._modules["classifier"] is model.classifier
    assert torch.equal(cb.initial["classifier"], swap.new_weight)  # W0 re-taken from the new module
    # the new head is not in the optimizer: it did not move, and that is what is measured now
    assert cb.drift["classifier"][-1] == 0.0 and cb.drift["classifier"][1] > 0  # epoch 0: the old head trained
    assert "classifier" in cb.summary["not_learning"] and "features.8" not in cb.summary["not_learning"]
    w = model.classifier.weight.detach().double().numpy()
    counts, _ = np.histogram(w, bins=32, range=(w.min(), w.max()))
    assert cb.histograms["classifier"].counts.tolist() == counts.tolist()  # the new module's values


def test_summary_survives_a_real_checkpoint(tmp_path):
    first = WeightHistograms(layers=["features.*", "classifier"], on_error="raise")
    _, trainer = _fit(tmp_path, [first], epochs=1)
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(str(ckpt))
    state = torch.load(ckpt, weights_only=True)
    (key,) = [k for k in state["callbacks"] if k.startswith("WeightHistograms")]
    restored = WeightHistograms(layers=["features.*", "classifier"], on_error="raise")
    restored.load_state_dict(state["callbacks"][key])
    assert first.summary and first.summary["not_learning"] == ["features.4"]  # the frozen conv
    assert restored.summary == first.summary
    assert restored.summary_lines()[1:] == first.summary_lines()[1:]  # the not-learning line (the first counts modules)


class TwoLayerNet(DigitsCNN):
    """Another model for the same data: different layer names."""

    def __init__(self):
        super().__init__()
        del self.features, self.pool, self.classifier
        self.hidden = nn.Linear(32 * 32, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x.flatten(1))))


def test_a_second_fit_starts_clean_and_validate_keeps_the_results(tmp_path):
    cb = WeightHistograms(on_error="raise")
    with pytest.warns(UserWarning, match="non-finite"):
        _fit(tmp_path / "a", [cb], epochs=1)
    assert "features.0" in cb.layers and "features.0" in cb.drift
    model, trainer = _fit(tmp_path / "b", [cb], epochs=2, model=TwoLayerNet())
    assert cb.layers == ["hidden", "out"]
    assert set(cb.initial) == set(cb.drift) == {"hidden", "out"}  # nothing of the first model left
    assert cb.steps == [0, 4, 8] and cb.epochs == [-1, 0, 1]
    before = (list(cb.steps), {k: list(v) for k, v in cb.drift.items()}, dict(cb.summary))
    trainer.validate(model, datamodule=DigitsDataModule(batch_size=32, limit=128, seed=0), verbose=False)
    assert (cb.steps, cb.drift, cb.summary) == before


# --------------------------------------------------------------- pure parts: layers, verdict, rendering
def test_follow_replacements_renews_replaced_and_reshaped_layers_and_drops_removed_ones() -> None:
    from lightning_introspect.methods.weight_layers import follow_replacements, own_weight, weight_layers

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3))
    tracked = weight_layers(net, "auto")
    initial = {n: own_weight(m).detach().clone() for n, m in tracked.items()}
    assert list(tracked) == ["0", "2", "3"] and follow_replacements(net, tracked, initial, "auto") is None
    net[3] = nn.Linear(8, 5)  # a new head
    net[0].weight = nn.Parameter(torch.zeros(6, 4))  # the same module, a weight of another shape
    net[2] = nn.ReLU()  # a layer without a weight now
    changes = follow_replacements(net, tracked, initial, "auto")
    assert changes is not None and list(changes.modules) == ["0", "3"] and changes.modules["3"] is net[3]
    assert changes.gone == ["2"] and changes.renewed == ["0", "3"]


def test_depth_order_follows_the_forward_not_the_registration() -> None:
    from lightning_introspect.methods.weight_layers import depth_order

    class Backwards(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.last = nn.Linear(8, 2)
            self.first = nn.Linear(4, 8)
            self.unused = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.last(self.first(x))

    assert depth_order(Backwards().double(), torch.randn(5, 4), ["unused", "last", "first"]) == ["first", "last", "unused"]


def test_not_learning_needs_a_second_epoch_or_the_last_one() -> None:
    from lightning_introspect.methods.not_learning import not_learning_summary

    drift = {"a": [0.0, 0.5], "b": [0.0, 1e-6], "c": []}
    trainable = {"a": True, "b": True, "c": False}
    first = not_learning_summary(drift, trainable, threshold=1e-3, epoch=0, step=4, total_epochs=3)
    assert not first["checked"] and first["not_learning"] == [] and first["frozen"] == ["c"]
    last = not_learning_summary(drift, trainable, threshold=1e-3, epoch=0, step=4, total_epochs=1, nonfinite={"a": 0, "b": 2})
    assert last["checked"] and last["not_learning"] == ["b"] and last["latest_drift"] == {"a": 0.5, "b": 1e-6}
    assert last["nonfinite"] == {"b": 2}


def test_drift_markdown_and_figures_show_each_layer_by_depth() -> None:
    from lightning_introspect.methods.weights import histogram
    from lightning_introspect.render.weights import (
        drift_by_depth_chart,
        drift_summary_markdown,
        initial_vs_current_chart,
    )

    summary = {"epoch": 2, "step": 8, "checked": True, "threshold": 1e-3, "not_learning": ["b"], "frozen": ["b"],
               "latest_drift": {"a": 0.4, "b": 0.0}, "nonfinite": {}}
    text = drift_summary_markdown(
        summary, {"a": (3, 4), "skipped": (2,), "b": (5,)}, {"a": True, "skipped": True, "b": False},
        drift={"a": [0.1, 0.4], "b": [0.0, 0.0]}, cosine={"a": [0.0, 0.02], "b": [0.0, 0.0]},
        wasserstein={"a": [0.0, 0.01], "b": [0.0, 0.0]},
    )
    assert "**Not learning:** `b`" in text
    assert text.splitlines()[-2:] == [
        "| 0 | `a` | (3, 4) | 0.4 | 0.02 | 0.01 |  |",
        "| 2 | `b` | (5,) | 0 | 0 | 0 | **not learning**, frozen |",
    ]
    chart = drift_by_depth_chart({"a": 0.4, "b": 0.0}, {"a": 0.02, "b": 0.0}, threshold=1e-3, not_learning=["b"])
    relative, threshold, marks = chart.panels[0].series
    assert relative.y == (0.4, 0.0) and chart.panels[1].series[0].y == (0.02, 0.0)
    assert relative.colors == ("#1f77b4", "#d62728") and threshold.y == (1e-3,) and marks.x == (1.0,)
    hists = {str(i): histogram(torch.randn(50)) for i in range(20)}
    overlay = initial_vs_current_chart(hists, hists, {}, max_layers=5)
    rows = [label.split()[0] for _, label in overlay.panels[0].yticks or []]
    assert rows == ["0", "5", "10", "14", "19"]  # spread over depth, first (input side, top row) and last kept
    shapes = overlay.panels[0].series
    assert [s.alpha > 0 for s in shapes] == [True, False] * 5  # per row: the current density filled, the initial outlined
    # each row on its own range [min, max] -> [0, 1], its tallest density 0.85 of a row above the row's base
    pair = initial_vs_current_chart({"w": histogram(torch.ones(4)), "v": histogram(torch.arange(4.0))},
                                    {"w": histogram(torch.tensor([0.0, 2.0, 2.0, 4.0])), "v": histogram(torch.arange(4.0))}, {})
    now_w, init_w, _, init_v = pair.panels[0].series
    assert min(now_w.x) == 0.0 and max(now_w.x) == 1.0 and max(now_w.y) == pytest.approx(1.85)  # top row
    assert list(zip(init_w.x, init_w.y)) == [(0.25, 1.0), (0.25, 1.85)]  # constant W0 = 1 on [0, 4]
    assert max(init_v.y) == pytest.approx(0.85)
