"""The full callback set under ``strategy="ddp"`` with 2 CPU processes (gloo).

A small script fits DigitsCNN with every callback on (demo fast options, ``on_error="raise"``) on two
processes, launched as a subprocess in its own session with a hard timeout (the whole process group is
killed if it ever hangs). Checked:

* it completes on both ranks;
* only global rank zero writes: each rank logs to its own directory (``logger=False``, so the file
  fallback writes images, figures, histograms and tables under ``<default_root_dir>/introspect``), and
  rank one's directory stays empty, while rank zero's holds every kind of output; the rank-zero-only
  callbacks did no work at all on rank one;
* ``PerClassMetrics`` snapshots (start, middle, end) and its per-epoch history are the same on both
  ranks (torchmetrics syncs the states) and equal a single-process run of the callback on the same
  weights and the same validation data. The validation set has 64 samples, divisible by 2: the
  ``DistributedSampler`` pads a set that does not divide evenly by repeating samples, which would then
  count twice in the synced metrics.

The single-process reference uses the weights rank zero saved at each validation (and at train start)
and takes the callback's "start" snapshot of them, which is measured before any training step.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch

from lightning_introspect._lightning import pl
from lightning_introspect.callbacks.per_class_metrics import PerClassMetrics
from lightning_introspect.demo import DIGIT_NAMES, DigitsCNN, DigitsDataModule
from tests.helpers import quick_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300

_DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    from lightning_introspect._lightning import Callback, Trainer, pl
    from lightning_introspect.config import introspection_callbacks
    from lightning_introspect.demo import DigitsCNN, DigitsDataModule, demo_config

    out = sys.argv[1]
    rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by Lightning in the process it launches


    class SaveWeights(Callback):
        def on_train_start(self, trainer, pl_module):
            if trainer.is_global_zero:
                torch.save(pl_module.state_dict(), os.path.join(out, "weights_start.pt"))

        def on_validation_epoch_end(self, trainer, pl_module):
            if trainer.is_global_zero:
                torch.save(pl_module.state_dict(), os.path.join(out, f"weights_epoch{{trainer.current_epoch}}.pt"))


    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=16, limit=64, seed=0)  # 64 validation samples: 32 per rank
    dm.setup("fit")
    callbacks = introspection_callbacks(demo_config(fast=True, mean=dm.mean, std=dm.std), budget=False)
    for cb in callbacks:
        cb.on_error = "raise"
        if hasattr(cb, "progress"):
            cb.progress = False
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                      default_root_dir=os.path.join(out, f"rank{{rank}}"), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=[*callbacks, SaveWeights()])
    trainer.fit(DigitsCNN(), datamodule=dm)
    cbs = {{type(cb).__name__: cb for cb in callbacks}}
    pcm = cbs["PerClassMetrics"]
    work = {{  # what each rank-zero-only callback did in this process
        "Misclassifications": len(cbs["Misclassifications"].history),
        "WeightHistograms": len(cbs["WeightHistograms"].steps),
        "LinearProbes": len(cbs["LinearProbes"].history),
        "Attributions": len(cbs["Attributions"].history),
        "FeatureVisualization": len(cbs["FeatureVisualization"].history),
        "SanityChecks": int(cbs["SanityChecks"].report is not None),
    }}
    with open(os.path.join(out, f"result_rank{{trainer.global_rank}}.json"), "w") as fh:
        json.dump(dict(world=trainer.world_size, global_step=trainer.global_step, snapshots=pcm.snapshots,
                       snapshot_epochs=pcm.snapshot_epochs, history=pcm.history, work=work), fh)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_isolated(args: list[str], cwd: str, env: dict[str, str], timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``python args`` in its own session; on timeout kill the whole group (the launched rank too)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"DDP run timed out after {timeout} s (hang?):\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def single_process_snapshot(state: dict[str, torch.Tensor], dm: DigitsDataModule, tmp_path: Any) -> dict[str, Any]:
    """``PerClassMetrics``' "start" snapshot of a model with these weights, one process, all validation data."""
    model = DigitsCNN()
    model.load_state_dict(state)
    cb = PerClassMetrics(num_classes=10, class_names=DIGIT_NAMES, at=(0.0,), confusion_matrix=False, bar_chart=False,
                         on_error="raise")
    quick_trainer(tmp_path, [cb], epochs=1, logger=False, limit_train_batches=1).fit(
        model, datamodule=dm
    )
    return cb.snapshots["start"]


def ddp_env() -> dict[str, str]:
    """The environment of a two-process CPU DDP script: a free port, this repository importable, and no
    rank variables inherited from an outer launcher."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "PYTHONPATH": ROOT,
           "MPLBACKEND": "Agg"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK"):
        env.pop(key, None)
    return env


def _files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.slow
def test_full_set_under_ddp_two_cpu_processes(tmp_path: Any) -> None:
    script = tmp_path / "ddp_full.py"
    script.write_text(_DDP_SCRIPT.format(root=ROOT))
    env = ddp_env()
    proc = run_isolated([str(script), str(tmp_path)], cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # completed on both ranks
    results = [json.loads((tmp_path / f"result_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in results] == [2, 2]
    assert [r["global_step"] for r in results] == [4, 4]  # 2 epochs x (32 samples per rank / 16)

    # only rank zero wrote, and it wrote every kind of output
    assert _files(str(tmp_path / "rank1")) == []
    written = _files(str(tmp_path / "rank0" / "introspect_runs" / "version_0"))
    kinds = {os.path.splitext(f)[1] for f in written}
    assert kinds == {".png", ".json", ".md", ".csv"}  # images + figures, histograms, tables, scalars
    for expected in (
        "introspect/per_class/confusion/",  # figure
        "introspect/attributions/grad_cam/",  # image
        "introspect/weights/features.0/",  # histogram
        "introspect/featviz/class/0/",  # image
        "introspect/sanity/verdicts/",  # text
        "introspect/probes/accuracy_vs_depth/",  # figure
        "introspect/misclassifications/gallery/",  # image
    ):
        assert any(f.startswith(expected) for f in written), expected
    # the rank-zero-only callbacks did their work on rank zero and none on rank one
    assert all(v > 0 for v in results[0]["work"].values()), results[0]["work"]
    assert all(v == 0 for v in results[1]["work"].values()), results[1]["work"]

    # per-class metrics: synced across ranks, equal to one process on the same weights and data
    assert results[0]["snapshots"] == results[1]["snapshots"]
    assert results[0]["history"] == results[1]["history"]
    snaps, epochs = results[0]["snapshots"], results[0]["snapshot_epochs"]
    assert list(snaps) == ["start", "middle", "end"]
    assert epochs == {"start": {"epoch": -1, "step": 0}, "middle": {"epoch": 0, "step": 2}, "end": {"epoch": 1, "step": 4}}
    dm = DigitsDataModule(batch_size=16, limit=64, seed=0)
    dm.setup("fit")
    assert len(dm.val_set) == 64 and sum(snaps["end"]["support"]) == 64  # both shards counted, none twice
    pl.seed_everything(0, verbose=False)
    reference = {
        "start": single_process_snapshot(torch.load(tmp_path / "weights_start.pt", weights_only=True), dm, tmp_path),
        **{
            key: single_process_snapshot(torch.load(tmp_path / f"weights_epoch{e}.pt", weights_only=True), dm, tmp_path)
            for key, e in (("middle", 0), ("end", 1))
        },
    }
    assert snaps == reference
    history = [{k: v for k, v in h.items() if k not in ("epoch", "step")} for h in results[0]["history"]]
    assert history == [reference["middle"], reference["end"]]


def test_ddp_with_early_stopping_gets_the_final_runs_on_rank_zero_without_a_hang(tmp_path: Any) -> None:
    # The final-model runs at train end (a review with an own validation pass, grids, feature
    # visualisation) happen on rank zero only while rank one goes on to teardown: they must not enter a
    # collective, or the processes would hang.
    script = _DDP_SCRIPT.format(root=ROOT).replace("max_epochs=2, logger=False", "max_epochs=6, logger=False").replace(
        "callbacks=[*callbacks, SaveWeights()])",
        "callbacks=[*callbacks, SaveWeights(), pl.callbacks.EarlyStopping(monitor='val_loss', patience=0, min_delta=100.0)])",
    )
    (tmp_path / "ddp_early.py").write_text(script)
    env = ddp_env()
    proc = run_isolated([str(tmp_path / "ddp_early.py"), str(tmp_path)], cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    zero, one = (json.loads((tmp_path / f"result_rank{r}.json").read_text()) for r in (0, 1))
    assert zero["global_step"] == one["global_step"] == 4  # stopped after epoch 1 of 6
    assert zero["work"]["Misclassifications"] == 1 and zero["work"]["FeatureVisualization"] > 0  # the final runs
    assert set(one["work"].values()) == {0} and set(zero["snapshots"]) == {"start", "end"}
