"""Resume with the full callback set: stop mid-way, resume from the checkpoint in a NEW process.

The uninterrupted run ``A`` fits 3 epochs with every callback on (demo fast options) and writes a
checkpoint after each epoch. A new Python process ``B`` starts from ``A``'s checkpoint after epoch 1 (the
file is all a run killed right after it would leave behind) and fits to the end. Then:

* what only the first part of the fit could measure survives in ``B`` although ``B`` never ran it:
  the "start" and "middle" per-class snapshots, the initial weights ``W0`` of the drift measure, the
  probe history of epochs 0-1 and the "init" / "input" baselines, and the fixed sample sets (``B`` does
  not draw them again: ``draw_samples`` is spied on in ``B``);
* the end report of ``B`` equals ``A``'s. "End report" here means everything deterministic the callbacks
  keep, compared exactly (``==`` / ``torch.equal``; only wall times are left out):

  - ``PerClassMetrics``: ``snapshots`` (start / middle / end), ``snapshot_epochs``, ``confusion``, ``history``;
  - ``WeightHistograms``: ``initial`` (W0), ``steps``, ``epochs``, ``drift``, ``cosine``, ``wasserstein``
    (one value per evaluation, from W0) and the final ``summary`` (not-learning flags, latest drift);
  - ``LinearProbes``: ``history`` and ``macro_f1`` (keys and values), ``best_layer`` and the final probe
    coefficients (the warm start each epoch's fit begins from);
  - ``Misclassifications``: ``history`` (error rates, the top-K wrong rows, statistic bins, perturbation
    accuracies); ``Attributions``: ``history`` (explained / predicted classes and confidences per run);
  - ``FeatureVisualization``: ``chosen`` and ``history`` (objectives, high-frequency fractions);
  - ``SanityChecks``: the fit-end ``report`` (verdicts, scores, curves).

  This holds because ``B`` trains exactly as ``A`` did from epoch 2 on: model, optimizer and loop state come
  from the checkpoint, and the training data order is a function of the epoch (the sampler below), not of
  a generator's state: Lightning does not checkpoint a ``DataLoader``'s shuffling generator, so with a
  plain ``shuffle=True`` loader the resumed epochs would see another order and every number measured
  after the resume would differ for reasons that have nothing to do with the callbacks.
* every checkpoint loads with ``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Sampler

from lightning_introspect._lightning import Trainer, pl
from lightning_introspect.config import introspection_callbacks
from lightning_introspect.demo import DigitsCNN, DigitsDataModule, demo_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3
RESUME_AFTER = 1  # the checkpoint written at the end of epoch 1 (the "middle" snapshot is in it)
TIMEOUT_S = 300


class EpochSeededShuffle(Sampler):
    """A shuffle that depends only on ``seed + epoch``; Lightning calls ``set_epoch`` before each epoch."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())


class ResumableDigits(DigitsDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=EpochSeededShuffle(len(self.train_set)))


def fit_full(root: str, resume: str | None = None) -> tuple[Any, list[Any]]:
    """Fit DigitsCNN with the full fast callback set (``on_error="raise"``), a checkpoint after every epoch."""
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    dm = ResumableDigits(batch_size=32, limit=64, seed=0)
    dm.setup("fit")
    callbacks = introspection_callbacks(demo_config(fast=True, mean=dm.mean, std=dm.std), budget=False)
    for cb in callbacks:
        cb.on_error = "raise"
        if hasattr(cb, "progress"):
            cb.progress = False
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), filename="{epoch}", save_top_k=-1)
    trainer = Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[*callbacks, checkpoints],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )
    trainer.fit(DigitsCNN(), datamodule=dm, ckpt_path=resume)
    return trainer, callbacks


def report_of(callbacks: list[Any]) -> dict[str, Any]:
    """The deterministic end report of every callback, as plain data (see the module docstring)."""
    cbs = {type(cb).__name__: cb for cb in callbacks}
    pcm, wh, lp = cbs["PerClassMetrics"], cbs["WeightHistograms"], cbs["LinearProbes"]
    return {
        "PerClassMetrics": {
            "snapshots": pcm.snapshots, "snapshot_epochs": pcm.snapshot_epochs, "confusion": pcm.confusion,
            "history": pcm.history,
        },
        "WeightHistograms": {
            "initial": wh.initial, "steps": wh.steps, "epochs": wh.epochs, "drift": wh.drift, "cosine": wh.cosine,
            "wasserstein": wh.wasserstein, "summary": wh.summary,
        },
        "LinearProbes": {
            "history": [[k, v] for k, v in lp.history.items()], "macro_f1": [[k, v] for k, v in lp.macro_f1.items()],
            "best_layer": lp.best_layer, "coef": {n: torch.as_tensor(s["coef"]) for n, s in lp._evaluations.warm.items()},
        },
        "Misclassifications": {"history": cbs["Misclassifications"].history},
        "Attributions": {"history": [{k: v for k, v in h.items() if k != "seconds"} for h in cbs["Attributions"].history]},
        "FeatureVisualization": {"chosen": cbs["FeatureVisualization"].chosen, "history": cbs["FeatureVisualization"].history},
        "SanityChecks": {"report": cbs["SanityChecks"].report.to_dict()},
        "samples": {name: list(cb._samples) for name, cb in cbs.items() if cb._samples is not None},
    }


def spy_on_sample_draws() -> list[list[str]]:
    """Record ``[callback class, hook]`` for each fixed sample set drawn (``IntrospectionCallback.fixed_samples``)."""
    import lightning_introspect.callbacks.base as base

    calls: list[list[str]] = []
    real = base.draw_samples

    def spy(*args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1).f_locals.get("self")
        calls.append([type(caller).__name__, sys._getframe(2).f_code.co_name])
        return real(*args, **kwargs)

    base.draw_samples = spy
    return calls


_RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {root!r})
    from tests.test_resume_full import fit_full, report_of, spy_on_sample_draws

    draws = spy_on_sample_draws()
    trainer, callbacks = fit_full(sys.argv[1], resume=sys.argv[2])
    assert trainer.current_epoch == {epochs} and trainer.global_step > 0
    torch.save({{"report": report_of(callbacks), "draws": draws}}, sys.argv[3])
    """
)


def run_isolated(args: list[str], cwd: str, timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``python args`` in its own session; on timeout kill the whole group (never hangs CI)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "MPLBACKEND": "Agg"}
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Exact equality through dicts / lists / tensors (NaN equals NaN), with the path of the first difference."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.slow
def test_resume_in_a_new_process_keeps_state_and_ends_like_an_uninterrupted_fit(tmp_path: Any) -> None:
    # A: uninterrupted, in this process
    trainer_a, callbacks_a = fit_full(str(tmp_path / "a"))
    report_a = report_of(callbacks_a)
    ckpt_dir = tmp_path / "a" / "ckpt"
    checkpoints = sorted(os.listdir(ckpt_dir))
    assert checkpoints == [f"epoch={e}.ckpt" for e in range(EPOCHS)]
    states = {name: torch.load(ckpt_dir / name, weights_only=True) for name in checkpoints}  # plain data only
    mid = states[f"epoch={RESUME_AFTER}.ckpt"]["callbacks"]
    mid = {key.split("{")[0]: state for key, state in mid.items()}
    assert mid["PerClassMetrics"]["snapshot_epochs"] == {"start": {"epoch": -1, "step": 0}, "middle": {"epoch": 1, "step": 4}}
    assert set(mid["WeightHistograms"]["initial"]) == set(report_a["WeightHistograms"]["drift"])
    assert [k for k, _ in mid["LinearProbes"]["history"]] == ["input", "init", 0, 1]
    assert {"Attributions", "FeatureVisualization"} <= {name for name, state in mid.items() if "samples" in state}

    # B: a new process resumes from the checkpoint after epoch 1
    out = tmp_path / "b.pt"
    script = tmp_path / "resume.py"
    script.write_text(_RESUME_SCRIPT.format(root=ROOT, epochs=EPOCHS))
    proc = run_isolated([str(script), str(tmp_path / "b"), str(ckpt_dir / f"epoch={RESUME_AFTER}.ckpt"), str(out)],
                        cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out, weights_only=True)
    report_b = result["report"]

    # what B never measured itself survived the checkpoint ...
    assert report_b["PerClassMetrics"]["snapshots"]["start"] == mid["PerClassMetrics"]["snapshots"]["start"]
    assert report_b["PerClassMetrics"]["snapshots"]["middle"] == mid["PerClassMetrics"]["snapshots"]["middle"]
    pl.seed_everything(0, verbose=False)
    untrained = DigitsCNN().state_dict()
    resumed_from = states[f"epoch={RESUME_AFTER}.ckpt"]["state_dict"]
    for layer, w0 in report_b["WeightHistograms"]["initial"].items():  # W0 = the untrained weights, not re-taken
        assert torch.equal(w0, untrained[f"{layer}.weight"]), layer
        assert not torch.equal(w0, resumed_from[f"{layer}.weight"]), layer
    assert report_b["LinearProbes"]["history"][:4] == mid["LinearProbes"]["history"]
    for name in ("Attributions", "FeatureVisualization"):  # the fixed samples came from the checkpoint:
        # not drawn again, except FeatureVisualization's draw in `setup` (to check its arguments), which
        # happens before Lightning restores the checkpoint and is then replaced by the checkpoint's set
        assert [hook for cb, hook in result["draws"] if cb == name] in ([], ["setup"])
        assert_same(report_b["samples"][name], mid[name]["samples"], f"samples/{name}")
    # ... and the end report is the uninterrupted run's
    for section in report_a:
        assert_same(report_b[section], report_a[section], section)
    assert report_a["PerClassMetrics"]["snapshot_epochs"]["end"] == {"epoch": EPOCHS - 1, "step": 2 * EPOCHS}

    final_b = tmp_path / "b" / "ckpt" / f"epoch={EPOCHS - 1}.ckpt"
    assert torch.load(final_b, weights_only=True)["global_step"] == 2 * EPOCHS
