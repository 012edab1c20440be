"""LinearProbes in real fits: probe curves, baselines, tags, background fits, bounded memory, state,
non-interference and errors."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect._lightning import LightningModule, pl
from lightning_introspect._torch.layers import trace_module_calls
from lightning_introspect.callbacks.base import IntrospectionSkipWarning
from lightning_introspect.callbacks.linear_probes import LinearProbes, auto_probe_layers
from lightning_introspect.demo import DigitsCNN, DigitsDataModule, load_digits_tensors
from lightning_introspect.methods.probes import fit_probe
from tests.helpers import quick_trainer, read_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SpyCNN(DigitsCNN):
    """DigitsCNN that records how many forward hooks exist whenever a training step runs."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hooks_seen_in_training: list[int] = []

    def training_step(self, batch, batch_idx):
        self.hooks_seen_in_training.append(sum(len(m._forward_hooks) for m in self.modules()))
        return super().training_step(batch, batch_idx)


def forward_hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def small_fit(tmp_path, callbacks, *, epochs=2, seed=0, model_cls=SpyCNN, limit=128, **trainer_kwargs):
    """A seeded fit on a few digits: 128 training samples (4 batches), one validation batch of 128."""
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(batch_size=32, limit=limit, seed=seed)
    model = model_cls()
    trainer = quick_trainer(tmp_path, callbacks, epochs=epochs, **trainer_kwargs)
    trainer.fit(model, datamodule=dm)
    return model, trainer


# ------------------------------------------------------------------------- a real fit, torch solver
@pytest.fixture(scope="module")
def digits_fit(tmp_path_factory):
    """All digits (16 px to keep it quick), 2 epochs, probes with the torch solver on the auto layers."""
    tmp = tmp_path_factory.mktemp("probes_digits")
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64, seed=0, size=16)
    probes = LinearProbes(solver="torch", on_error="raise")
    trainer = quick_trainer(tmp, [probes], epochs=2)
    trainer.fit(DigitsCNN(), datamodule=dm)
    return probes, trainer, read_events(trainer.logger.log_dir)


def test_auto_layers_are_blocks_in_execution_order():
    x = torch.zeros(2, 1, 32, 32)
    assert auto_probe_layers(DigitsCNN(), x) == ["features.2", "features.6", "features.9", "flatten"]


@pytest.mark.slow
def test_trained_deep_layers_beat_their_init_probes(digits_fit):
    probes, trainer, _ = digits_fit
    assert probes.layer_names == ["features.2", "features.6", "features.9", "flatten"]
    assert set(probes.history) == {"input", "init", 0, 1}
    last, init = probes.history[1], probes.history["init"]
    assert last["flatten"] > init["flatten"] + 0.03  # the deepest layers became more linearly separable
    assert last["features.9"] > init["features.9"] + 0.03
    assert last["flatten"] > last["features.2"] + 0.1  # separability rises with depth after training
    assert probes.best_layer in ("features.9", "flatten")
    assert 0.5 < probes.history["input"]["input"] <= 1.0
    assert all(0.0 <= v <= 1.0 for v in probes.macro_f1[1].values())
    assert "best layer" in probes.summary_lines()[0]
    assert probes.timings["fit_inline"] > 0 and probes.timings["submit"] == 0  # torch runs inline
    assert forward_hook_count(trainer.lightning_module) == 0


@pytest.mark.slow
def test_tags_read_back_at_epoch_steps(digits_fit):
    probes, trainer, events = digits_fit
    steps_per_epoch = trainer.num_training_batches
    epoch_steps = [steps_per_epoch * (e + 1) for e in range(2)]
    scalars = events["scalars"]
    for layer in probes.layer_names:
        acc = scalars[f"introspect/probes/{layer}/accuracy"]
        assert [s for s, _ in acc] == [0, *epoch_steps]  # init at step 0, then every epoch
        assert acc[-1][1] == pytest.approx(probes.history[1][layer], abs=1e-6)
        assert acc[0][1] == pytest.approx(probes.history["init"][layer], abs=1e-6)
        assert len(scalars[f"introspect/probes/{layer}/macro_f1"]) == 3
    assert [s for s, _ in scalars["introspect/probes/input/accuracy"]] == [0]
    assert events["images"]["introspect/probes/accuracy_vs_depth"] == epoch_steps
    assert events["text"]["introspect/probes/table/text_summary"] == epoch_steps
    assert "introspect/probes/fit_seconds" in scalars and "introspect/probes/seconds" in scalars
    table = probes.table()
    assert "| `flatten`" in table and "input (baseline)" in table


@pytest.mark.slow
def test_solvers_agree_on_the_cached_real_features(digits_fit):
    probes = digits_fit[0]
    cache = probes._cache
    assert cache.size == len(digits_fit[1].datamodule.val_set)  # the whole validation set fits
    for layer in probes.layer_names:
        x, y = cache.features(layer), cache.labels
        sk, th = fit_probe(x, y, solver="sklearn"), fit_probe(x, y, solver="torch")
        assert abs(sk.accuracy - th.accuracy) <= 0.02, layer
        assert th.accuracy == pytest.approx(probes.history[1][layer], abs=0.02)  # cold vs warm-started fit


@pytest.mark.slow
def test_state_dict_round_trip_and_resume_keeps_history(digits_fit, tmp_path):
    probes = digits_fit[0]
    buffer = io.BytesIO()
    torch.save(probes.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = LinearProbes(layers=["features.2", "features.6", "features.9", "flatten"], solver="torch", on_error="raise")
    restored.load_state_dict(state)
    assert restored.history == probes.history and restored.macro_f1 == probes.macro_f1
    assert restored.best_layer == probes.best_layer
    # A fit resumed from a real checkpoint keeps the history and does not redo the init / input baselines
    # (Lightning restores the callback state after `setup`, which starts every fit clean).
    ckpt = str(tmp_path / "two_epochs.ckpt")
    digits_fit[1].save_checkpoint(ckpt)
    resumed = LinearProbes(solver="torch", on_error="raise")  # configured as in `digits_fit`: same state key
    pl.seed_everything(0, verbose=False)
    trainer = quick_trainer(tmp_path, [resumed], epochs=3, limit_train_batches=2)
    trainer.fit(DigitsCNN(), datamodule=DigitsDataModule(batch_size=64, seed=0, size=16), ckpt_path=ckpt)
    assert resumed.timings["baseline_pass"] == 0.0
    assert {k: resumed.history[k] for k in probes.history} == probes.history and 2 in resumed.history


# ------------------------------------------------- background sklearn path and non-interference
@pytest.fixture(scope="module")
def small_fits(tmp_path_factory):
    """The same seeded 2-epoch fit without probes, with background sklearn probes, with torch probes."""
    out = {}
    out["none"] = small_fit(tmp_path_factory.mktemp("none"), [], limit_train_batches=3)
    sk = LinearProbes(solver="sklearn", on_error="raise")
    out["sklearn"] = (*small_fit(tmp_path_factory.mktemp("sk"), [sk], limit_train_batches=3), sk)
    th = LinearProbes(solver="torch", pooling="avgmax", on_error="raise")
    out["torch"] = (*small_fit(tmp_path_factory.mktemp("th"), [th], limit_train_batches=3), th)
    return out


def test_probes_never_change_training(small_fits):
    ref_model = small_fits["none"][0]
    reference = ref_model.state_dict()
    for kind in ("sklearn", "torch"):
        model = small_fits[kind][0]
        assert set(model.state_dict()) == set(reference)
        for name, value in model.state_dict().items():
            assert torch.equal(value, reference[name]), f"{kind}: {name} differs"
        for p, q in zip(model.parameters(), ref_model.parameters()):  # the last step's gradients too
            assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad))
        assert all(m.training for m in model.modules())  # modes restored


def test_hooks_exist_only_during_validation(small_fits):
    for kind in ("none", "sklearn", "torch"):
        model = small_fits[kind][0]
        assert model.hooks_seen_in_training and max(model.hooks_seen_in_training) == 0
        assert forward_hook_count(model) == 0


def test_background_results_arrive_with_their_epoch_step(small_fits):
    _, trainer, probes = small_fits["sklearn"]
    assert probes._evaluations.solver == "sklearn"
    assert set(probes.history) == {"input", "init", 0, 1} and not probes._evaluations.jobs and probes._evaluations.executor is None
    assert probes.timings["submit"] > 0 and probes.timings["fit_inline"] == 0
    events = read_events(trainer.logger.log_dir)
    steps = [trainer.num_training_batches * (e + 1) for e in range(2)]
    for layer in probes.layer_names:
        logged = events["scalars"][f"introspect/probes/{layer}/accuracy"]
        assert [s for s, _ in logged] == [0, *steps]
        assert [v for _, v in logged] == pytest.approx(
            [probes.history[k][layer] for k in ("init", 0, 1)], abs=1e-6
        )
    assert events["images"]["introspect/probes/accuracy_vs_depth"] == steps


@pytest.mark.parametrize(("figures_every_n_epochs", "figure_epochs"), [(None, [1, 2]), (1, [0, 1, 2])])
def test_figure_at_fractions_and_last_epoch_scalars_every_epoch(tmp_path, figures_every_n_epochs, figure_epochs):
    # 3 epochs: the default `at=(0.5,)` is epoch 1; the last epoch (2) always draws
    probes = LinearProbes(solver="torch", figures_every_n_epochs=figures_every_n_epochs, on_error="raise")
    _, trainer = small_fit(tmp_path, [probes], epochs=3, limit_train_batches=2)
    events = read_events(trainer.logger.log_dir)
    steps = [2 * (e + 1) for e in range(3)]
    assert [s for s, _ in events["scalars"][f"introspect/probes/{probes.layer_names[0]}/accuracy"]] == [0, *steps]
    assert events["text"]["introspect/probes/table/text_summary"] == steps
    assert events["images"]["introspect/probes/accuracy_vs_depth"] == [2 * (e + 1) for e in figure_epochs]


def test_background_results_logged_before_fit_end_when_ready(tmp_path):
    """A finished background fit is logged by the next training hook, not only at fit end."""
    probes = LinearProbes(solver="sklearn", layers=["features.9"], include_input=False, on_error="raise")
    logged_during_training: list[set] = []

    class Watch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                for _, _, future in probes._evaluations.jobs:
                    future.result()  # make sure epoch 0's fit is done before the next batches
        def on_train_epoch_end(self, trainer, pl_module):
            logged_during_training.append(set(probes.history))

    small_fit(tmp_path, [probes, Watch()], epochs=2, limit_train_batches=1)
    assert 0 in logged_during_training[1]  # logged by a hook of epoch 1, before fit end
    assert set(probes.history) == {"init", 0, 1}


# ------------------------------------------------------------------------------- bounded memory
def test_cache_bounded_when_raw_activations_exceed_it(tmp_path):
    probes = LinearProbes(
        layers=["features.0", "features.4"], pooling="flatten", max_samples=50, max_features=32,
        solver="torch", include_init=False, include_input=False, on_error="raise",
        target_transform=lambda batch: batch[1] % 2,
    )
    small_fit(tmp_path, [probes], epochs=1, limit_train_batches=1, limit=256)
    cache = probes._cache
    raw_bytes = 256 * (16 * 32 * 32 + 32 * 16 * 16) * 4  # what caching raw activations would take: 24 MiB
    assert cache.seen == 256 and cache.size == 50
    assert cache.features("features.0").shape == (50, 32) and cache.features("features.4").shape == (50, 32)
    assert cache.nbytes <= 50 * 32 * 4 * 2 + 50 * 8 < raw_bytes / 1000
    assert probes._projections["features.0"].in_features == 16 * 32 * 32  # flattened maps, projected to 32
    result = probes.results[0]["features.0"]
    assert result.n_classes == 2 and result.n_features == 32  # target_transform labels, projected width


# ------------------------------------------------------------------------- probe_dataloader path
class TinyAutoencoder(LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 64))

    def forward(self, x):
        return self.decoder(self.encoder(x))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return F.mse_loss(self(x), x)

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.log("val_mse", F.mse_loss(self(x), x))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _unlabelled_loaders():
    x, y = load_digits_tensors(size=8)
    x = x.flatten(1)
    unlabelled = DataLoader(TensorDataset(x[:512]), batch_size=64)
    labelled = DataLoader(TensorDataset(x[512:900], y[512:900]), batch_size=128)
    return unlabelled, labelled


def test_probe_dataloader_for_a_model_trained_without_labels(tmp_path):
    unlabelled, labelled = _unlabelled_loaders()
    probes = LinearProbes(layers=["encoder.1", "encoder.3", "decoder.1"], probe_dataloader=labelled, on_error="raise")
    pl.seed_everything(0, verbose=False)
    model = TinyAutoencoder()
    trainer = quick_trainer(tmp_path, [probes], epochs=2, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(model, train_dataloaders=unlabelled, val_dataloaders=unlabelled)
    assert set(probes.history) == {"input", "init", 0, 1}
    assert probes._cache.size == 388 and probes.timings["own_pass"] > 0
    assert probes.history[1]["encoder.1"] > 0.5
    assert forward_hook_count(model) == 0 and model.training
    events = read_events(trainer.logger.log_dir)
    assert len(events["scalars"]["introspect/probes/encoder.3/accuracy"]) == 3


def test_unlabelled_validation_without_probe_dataloader_is_skipped_once_and_training_goes_on(tmp_path):
    unlabelled, _ = _unlabelled_loaders()
    model = TinyAutoencoder()
    probes = LinearProbes(layers=["encoder.1"])
    trainer = quick_trainer(tmp_path, [probes], epochs=1, limit_train_batches=2)
    with pytest.warns(IntrospectionSkipWarning, match="LinearProbes is skipped.*probe_dataloader.*target_transform"):
        trainer.fit(model, train_dataloaders=unlabelled, val_dataloaders=unlabelled)
    assert trainer.global_step == 2 and probes.disabled and probes.history == {}
    assert forward_hook_count(model) == 0


# ---------------------------------------------------------------------------------------- errors
def test_bad_layer_name_raises_at_setup_with_close_matches(tmp_path):
    model = DigitsCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = quick_trainer(tmp_path, [LinearProbes(layers=["features.2", "featurs.9"])], epochs=1)
    with pytest.raises(ValueError, match=r"`layers`.*'featurs.9'.*'features.9'"):
        trainer.fit(model, datamodule=DigitsDataModule(limit=64))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert forward_hook_count(model) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pooling": "mean"}, r"`pooling`.*'avgmax'"),
        ({"solver": "saga"}, r"`solver`.*'auto', 'sklearn', 'torch'"),
        ({"max_samples": 0}, "`max_samples`"),
        ({"max_features": -1}, "`max_features`"),
        ({"test_fraction": 1.5}, "`test_fraction`"),
        ({"C": 0}, "`C`"),
        ({"tol": 0.0}, "`tol`"),
        ({"tol": float("inf")}, "`tol`"),
        ({"cache": "lru"}, r"`cache`.*'reservoir'"),
        ({"layers": 3}, "`layers`"),
        ({"target_transform": "y"}, "`target_transform`"),
        ({"every_n_epochs": 0}, "`every_n_epochs`"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinearProbes(**kwargs)


def test_failures_warn_disable_and_remove_hooks(tmp_path):
    def broken(batch):
        raise RuntimeError("labels unavailable")

    probes = LinearProbes(layers=["features.9"], target_transform=broken, include_init=False, include_input=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = small_fit(tmp_path, [probes], epochs=2, limit_train_batches=1)
    assert probes.disabled and any("disabled" in str(w.message) for w in caught)
    assert forward_hook_count(model) == 0 and max(model.hooks_seen_in_training) == 0


def test_hooks_removed_when_validation_raises(tmp_path):
    class Exploding(SpyCNN):
        def validation_step(self, batch, batch_idx):
            out = super().validation_step(batch, batch_idx)
            if batch_idx == 1:
                raise RuntimeError("boom")
            return out

    probes = LinearProbes(layers=["features.9"], include_init=False, include_input=False, on_error="raise")
    pl.seed_everything(0, verbose=False)
    model = Exploding()
    trainer = quick_trainer(tmp_path, [probes], epochs=1, limit_train_batches=1)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=16, limit=160))
    assert forward_hook_count(model) == 0 and probes._stack is None


def test_without_validation_it_warns_and_probes_nothing(tmp_path):
    probes = LinearProbes(layers=["features.9"], on_error="raise")
    with pytest.warns(UserWarning, match="no validation data"):
        small_fit(tmp_path, [probes], epochs=1, limit_train_batches=1, limit_val_batches=0)
    assert probes.history == {} and probes.timings["baseline_pass"] == 0.0


# ------------------------------------------------------------------------------------------- DDP
_DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    from lightning_introspect._lightning import Trainer, pl
    from lightning_introspect.callbacks.linear_probes import LinearProbes
    from lightning_introspect.demo import DigitsCNN, DigitsDataModule

    pl.seed_everything(0, verbose=False)
    probes = LinearProbes(solver="sklearn", on_error="raise")
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_train_batches=2, callbacks=[probes], default_root_dir=sys.argv[2])
    trainer.fit(DigitsCNN(), datamodule=DigitsDataModule(batch_size=16, limit=128, size=16))
    with open(sys.argv[1] + str(trainer.global_rank), "w") as fh:
        json.dump(dict(keys=sorted(map(str, probes.history)), world=trainer.world_size, layers=probes.layer_names,
                       hooks=sum(len(m._forward_hooks) for m in trainer.lightning_module.modules())), fh)
    """
)


@pytest.mark.slow
def test_ddp_rank_zero_probes_without_collectives(tmp_path):
    """Two CPU processes (gloo): the fit finishes (no deadlock), rank zero probes, rank one does nothing."""
    script = tmp_path / "ddp_probes.py"
    script.write_text(_DDP_SCRIPT.format(root=ROOT))
    out = tmp_path / "result"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": ROOT}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script), str(out), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"result{r}").read_text()) for r in (0, 1))
    assert rank0["world"] == 2
    assert rank0["keys"] == ["0", "1", "init", "input"] and rank1["keys"] == []
    assert rank0["layers"] == ["features.2", "features.6", "features.9", "flatten"]
    assert rank0["hooks"] == rank1["hooks"] == 0


@pytest.mark.parametrize(("inline_limit", "expected"), [(1 << 20, "torch"), (0, "sklearn")])
def test_auto_solver_on_cpu_fits_small_caches_inline_and_large_ones_in_the_background(
    tmp_path, monkeypatch, inline_limit, expected
):
    monkeypatch.setattr("lightning_introspect.methods.probes.evaluations.INLINE_FIT_VALUES", inline_limit)
    probes = LinearProbes(on_error="raise")
    _, trainer = small_fit(tmp_path, [probes], epochs=2, limit_train_batches=2)
    assert probes._evaluations.solver == "auto"
    assert {r.solver for res in probes.results.values() for r in res.values()} == {expected}
    assert (probes.timings["fit_inline"] > 0) == (expected == "torch")
    assert (probes.timings["submit"] > 0) == (expected == "sklearn")
    assert set(probes.history) == {"input", "init", 0, 1}
    assert probes._evaluations.executor is None and not probes._evaluations.jobs
    # warm start carried from epoch 0 to epoch 1 with the solver that fitted them
    assert probes._evaluations.warm and all(state["solver"] == expected for state in probes._evaluations.warm.values())


def test_the_callbacks_tolerance_reaches_the_solver_and_reads_the_same_accuracies(tmp_path):
    # tol=1e-3 (the default) stops earlier than sklearn's 1e-4 and reads the same accuracies within a sample or two
    loose = LinearProbes(solver="torch", include_input=False, on_error="raise")
    strict = LinearProbes(solver="torch", include_input=False, tol=1e-4, on_error="raise")
    small_fit(tmp_path / "loose", [loose], epochs=1, limit_train_batches=2)
    small_fit(tmp_path / "strict", [strict], epochs=1, limit_train_batches=2)
    iters = {name: sum(r[k].n_iter for k in r) for name, r in (("loose", loose.results["init"]), ("strict", strict.results["init"]))}
    assert iters["loose"] < iters["strict"]
    n_test = next(iter(strict.results["init"].values())).n_test
    for key in ("init", 0):
        for layer, acc in strict.history[key].items():
            assert abs(loose.history[key][layer] - acc) <= 2 / n_test + 1e-9


# ------------------------------------------------------------- reused modules, identical outputs, per-fit
class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ``self.relu`` applied twice (after conv1 and after the residual sum)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class DigitsResNet(DigitsCNN):
    """A torchvision-style ResNet for 1-channel digits (stem, two stages of two BasicBlocks, pool, fc)."""

    def __init__(self):
        super().__init__()
        del self.features, self.pool, self.flatten, self.classifier
        self.conv1 = nn.Conv2d(1, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_auto_on_a_resnet_with_reused_relus_probes_each_block_output(tmp_path):
    x = torch.zeros(2, 1, 32, 32)
    model = DigitsResNet()
    names = auto_probe_layers(model, x)
    assert names == ["relu", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "avgpool"]
    counts = trace_module_calls(model, x).counts
    assert counts["layer1.0.relu"] == 2 and all(counts[n] == 1 for n in names)
    probes = LinearProbes(solver="torch", include_init=False, include_input=False, on_error="raise")
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32, limit=128, seed=0)
    trainer = quick_trainer(tmp_path, [probes], epochs=1, limit_train_batches=2)
    trainer.fit(model, datamodule=dm)
    assert probes.layer_names == names and set(probes.history[0]) == set(names)
    # what is probed under "layer1.0" is that block's output (the residual sum after the second ReLU)
    x_val = torch.cat([b[0] for b in dm.val_dataloader()])
    with torch.no_grad():
        model.eval()
        block = model.layer1[0](model.relu(model.bn1(model.conv1(x_val)))).mean((2, 3))
    torch.testing.assert_close(probes._cache.features("layer1.0"), block, rtol=1e-5, atol=1e-5)


def test_a_named_module_that_runs_twice_is_refused_at_setup(tmp_path):
    model = DigitsResNet()
    trainer = quick_trainer(tmp_path, [LinearProbes(layers=["layer1.1", "layer1.0.relu"])], epochs=1)
    with pytest.raises(ValueError, match=r"`layers`.*'layer1.0.relu' runs 2 times.*enclosing block 'layer1.0'"):
        trainer.fit(model, datamodule=DigitsDataModule(limit=64))
    assert forward_hook_count(model) == 0 and trainer.global_step == 0


class TanhHead(nn.Module):
    """A wrapper whose output is its last child's, and an identity after the last activation."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.norm = nn.Identity()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.norm(self.features(x)))


class TwoStageNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.norm = nn.Identity()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.norm(self.stage2(self.stage1(x))))


def test_modules_with_identical_outputs_are_probed_once():
    x = torch.randn(2, 6)
    # fallback to top-level children: `features` and its last child `features.1` give the same tensor
    assert auto_probe_layers(TanhHead(), x) == ["features"]
    # the identity before the head repeats the last ReLU's output: not probed twice
    assert auto_probe_layers(TwoStageNet(), x) == ["stage1.1", "stage2.1"]


def test_a_second_fit_starts_clean_and_validate_keeps_the_results(tmp_path):
    probes = LinearProbes(solver="torch", on_error="raise")
    small_fit(tmp_path / "a", [probes], epochs=1, model_cls=DigitsCNN, limit_train_batches=2)
    assert "features.2" in probes.layer_names and "features.2" in probes.history[0]
    model, trainer = small_fit(tmp_path / "b", [probes], epochs=1, model_cls=DigitsResNet, limit_train_batches=2)
    assert probes.layer_names == ["relu", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "avgpool"]
    assert set(probes.history) == {"init", "input", 0}
    assert all(set(v) <= {*probes.layer_names, "input"} for v in probes.history.values())  # nothing of the CNN
    assert probes.timings["baseline_pass"] > 0  # the new model got its own init / input baselines
    before = {k: dict(v) for k, v in probes.history.items()}
    trainer.validate(model, datamodule=DigitsDataModule(batch_size=32, limit=128, seed=0), verbose=False)
    assert probes.history == before and probes.best_layer in probes.layer_names


def test_auto_layers_at_setup_run_where_the_weights_are():
    """During ``setup`` Lightning already reports the accelerator as ``pl_module.device`` while the weights are still on
    the CPU (seen on CUDA: "Input type (cuda) and weight type (cpu)"); ``layers='auto'`` runs its two samples where
    the weights are. ``meta`` stands in for the accelerator: nothing can run there."""
    from lightning_introspect.callbacks.probe_setup import resolve_probe_setup

    model = DigitsCNN()
    model._device = torch.device("meta")  # what Lightning's setup hook sets before the strategy moves the model
    assert model.device == torch.device("meta")
    x, y = load_digits_tensors()
    loader = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)
    setup = resolve_probe_setup(model, loader, layers="auto", task="auto", token_pooling="auto", target_transform=None,
                                seed=0, source="validation")
    assert setup.task == "classification" and len(setup.modules) >= 2
