"""PerClassMetrics: snapshots vs sklearn, logging, resume, early end, input errors, non-interference, DDP."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import precision_recall_fscore_support
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect._lightning import Callback, LightningDataModule, LightningModule, pl
from lightning_introspect.callbacks.misclassifications import Misclassifications
from lightning_introspect.callbacks.per_class_metrics import PerClassMetrics
from lightning_introspect.demo import DigitsDataModule
from tests.helpers import quick_trainer, read_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------- tiny fixtures
class TinyDigits(LightningModule):
    """An MLP with dropout on 8x8 digits: trains to ~0.9 validation accuracy in 3 tiny epochs."""

    def __init__(self, lr: float = 2e-2, returns: str = "logits", num_classes: int = 10, in_features: int = 64) -> None:
        super().__init__()
        self.lr, self.returns = lr, returns
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        logits = self(x)
        self.log("val_acc", (logits.argmax(1) == y).float().mean())
        if self.returns == "none":
            return None
        if self.returns == "dict":
            return {"loss": F.cross_entropy(logits, y), "logits": logits}
        if self.returns == "tuple":
            return (F.cross_entropy(logits, y), logits)
        return logits

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits8(limit: int = 256, batch_size: int = 16, seed: int = 0) -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=batch_size, limit=limit, size=8, seed=seed)
    dm.setup("fit")
    return dm


class GlobalShuffleDM(LightningDataModule):
    """Training shuffle from the global RNG (no private generator): any stray draw of ours would show."""

    def __init__(self, base: DigitsDataModule) -> None:
        super().__init__()
        self.base = base

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.base.train_set, batch_size=self.base.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.base.val_dataloader()


def predictions(model: nn.Module, dm: DigitsDataModule) -> tuple[Any, Any]:
    x, y = dm.val_set.tensors
    was = model.training
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    model.train(was)
    return y.numpy(), pred.numpy()


def assert_matches_sklearn(snapshot: dict[str, list[Any]], y: Any, pred: Any, num_classes: int = 10) -> None:
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=list(range(num_classes)), zero_division=0)
    for i in range(num_classes):
        if s[i] == 0:
            assert snapshot["recall"][i] is None
            continue
        assert snapshot["precision"][i] == pytest.approx(p[i], abs=1e-6)
        assert snapshot["recall"][i] == pytest.approx(r[i], abs=1e-6)
        assert snapshot["f1"][i] == pytest.approx(f[i], abs=1e-6)
        assert snapshot["accuracy"][i] == pytest.approx(r[i], abs=1e-6)  # multiclass per-class accuracy = recall
    assert snapshot["support"] == [int(v) for v in s]


# ------------------------------------------------------------------------------------- tests
def test_start_is_chance_end_is_trained_and_both_match_sklearn(tmp_path: Any) -> None:
    pl.seed_everything(0, verbose=False)
    dm = digits8()
    model = TinyDigits()
    initial = copy.deepcopy(model)
    cb = PerClassMetrics(num_classes=10, every_n_epochs=1, on_error="raise")
    trainer = quick_trainer(tmp_path, [cb], epochs=3)
    trainer.fit(model, datamodule=dm)

    assert list(cb.snapshots) == ["start", "middle", "end"]
    assert cb.snapshot_epochs["start"] == {"epoch": -1, "step": 0}
    assert cb.snapshot_epochs["middle"]["epoch"] == 1 and cb.snapshot_epochs["end"]["epoch"] == 2
    assert_matches_sklearn(cb.snapshots["start"], *predictions(initial, dm))
    assert_matches_sklearn(cb.snapshots["end"], *predictions(model, dm))

    def mean_recall(key: str) -> float:
        return sum(cb.snapshots[key]["recall"]) / 10

    assert mean_recall("start") < 0.3  # untrained: near chance (0.1)
    assert mean_recall("end") > 0.75 and mean_recall("end") > mean_recall("start") + 0.5
    assert [h["epoch"] for h in cb.history] == [0, 1, 2]
    assert sum(sum(r) for r in cb.confusion["end"]) == len(dm.val_set)

    events = read_events(trainer.logger.log_dir)
    end_step = cb.snapshot_epochs["end"]["step"]
    for metric in ("precision", "recall", "f1", "accuracy"):
        for c in range(10):
            points = dict(events["scalars"][f"introspect/per_class/{metric}/{c}"])
            assert 0 in points and end_step in points
            assert points[end_step] == pytest.approx(cb.snapshots["end"][metric][c], abs=1e-6)
            assert all(math.isfinite(v) for v in points.values())
    assert len(events["images"]["introspect/per_class/confusion"]) == 3  # at the snapshots only
    assert 0 in events["images"]["introspect/per_class/bars"]
    assert {0, end_step} <= set(events["text"]["introspect/per_class/table/text_summary"])
    assert "introspect/per_class/summary/text_summary" in events["text"]
    assert "| 0 | " in cb.table_markdown() and "(+" in cb.table_markdown()
    assert len(cb.least_improved_classes()) == 3
    assert cb.summary_lines()[0].startswith("mean per-class precision")


def test_resume_keeps_the_start_snapshot(tmp_path: Any) -> None:
    pl.seed_everything(0, verbose=False)
    dm = digits8(limit=96)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    cb = PerClassMetrics(num_classes=10, confusion_matrix=False, bar_chart=False, on_error="raise")
    first = quick_trainer(tmp_path, [cb, ckpt_cb, StopAfter(1)], epochs=4, logger=False, enable_checkpointing=True)
    first.fit(TinyDigits(), datamodule=dm)  # stops after epoch 1 of 4, as if the job had been killed
    assert cb.snapshot_epochs["end"]["epoch"] == 1
    start = copy.deepcopy(cb.snapshots["start"])
    path = str(tmp_path / "ckpt" / "last.ckpt")
    ckpt = torch.load(path, weights_only=True)  # only plain types in our state
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("PerClassMetrics")]
    assert state["snapshots"]["start"] == start

    resumed = PerClassMetrics(num_classes=10, confusion_matrix=False, bar_chart=False, on_error="raise")
    resume_step = int(ckpt["global_step"])
    trainer = quick_trainer(tmp_path / "resumed", [resumed], epochs=4, enable_checkpointing=True)
    trainer.fit(TinyDigits(), datamodule=dm, ckpt_path=path)
    # no start pass again: nothing is written at the step the fit resumed from, only at later epoch ends
    recall = read_events(str(tmp_path / "resumed"))["scalars"]["introspect/per_class/recall/0"]
    assert recall and all(step > resume_step for step, _ in recall)
    assert resumed.snapshots["start"] == start
    assert resumed.snapshot_epochs["middle"] == cb.snapshot_epochs["middle"]  # epoch 1, taken before the stop
    assert resumed.snapshot_epochs["end"]["epoch"] == 3


def test_introspection_does_not_change_training_bitwise(tmp_path: Any) -> None:
    def fit(callbacks: list[Any]) -> dict[str, torch.Tensor]:
        pl.seed_everything(0, verbose=False)
        model = TinyDigits()
        dm = GlobalShuffleDM(digits8(limit=128))
        quick_trainer(tmp_path, callbacks, epochs=2, logger=False).fit(model, datamodule=dm)
        assert not model._forward_hooks and model.training
        return {k: v.clone() for k, v in model.state_dict().items()}

    plain = fit([])
    watched = fit([
        PerClassMetrics(num_classes=10, every_n_epochs=1, bar_chart=False, on_error="raise"),
        Misclassifications(top_k=4, num_samples=32, blur_sigmas=[1.0], noise_stds=[0.5], color_strengths=[0.5],
                           every_n_epochs=2, figures=False, on_error="raise"),
    ])
    assert plain.keys() == watched.keys()
    for k in plain:
        assert torch.equal(plain[k], watched[k]), k


class StopAfter(Callback):
    def __init__(self, epoch: int, interrupt: bool = False) -> None:
        self.epoch, self.interrupt = epoch, interrupt

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch == self.epoch and not self.interrupt:
            trainer.should_stop = True

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch == self.epoch + 1 and self.interrupt:
            raise KeyboardInterrupt


def test_unbounded_fit_stopped_early_uses_the_last_validation_as_end(tmp_path: Any) -> None:
    pl.seed_everything(0, verbose=False)
    dm = digits8(limit=64)
    cb = PerClassMetrics(num_classes=10, confusion_matrix=False, bar_chart=False, on_error="raise")
    trainer = quick_trainer(tmp_path, [cb, StopAfter(1)], epochs=-1, max_steps=-1)
    with pytest.warns(UserWarning, match=r"fraction 0.5 in `at` cannot be placed"):
        trainer.fit(TinyDigits(), datamodule=dm)
    assert list(cb.snapshots) == ["start", "end"]
    assert cb.snapshot_epochs["end"] == {"epoch": 1, "step": trainer.global_step}
    assert "end (epoch 1" in cb.summary_markdown()
    events = read_events(trainer.logger.log_dir)
    assert trainer.global_step in dict(events["scalars"]["introspect/per_class/recall/0"])


def test_keyboard_interrupt_still_records_end(tmp_path: Any) -> None:
    pl.seed_everything(0, verbose=False)
    dm = digits8(limit=64)
    cb = PerClassMetrics(num_classes=10, confusion_matrix=False, bar_chart=False, on_error="raise")
    trainer = quick_trainer(tmp_path, [cb, StopAfter(0, interrupt=True)], epochs=5)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning shuts down gracefully, then exits
            trainer.fit(TinyDigits(), datamodule=dm)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert cb.snapshot_epochs["end"]["epoch"] == 0
    assert cb.snapshots["end"]["support"] == cb.snapshots["start"]["support"]
    assert not trainer.lightning_module._forward_hooks


@pytest.mark.parametrize("returns", ["none", "dict", "tuple"])
def test_logits_from_dict_tuple_or_forward_hook(tmp_path: Any, returns: str) -> None:
    pl.seed_everything(0, verbose=False)
    dm = digits8(limit=64)
    model = TinyDigits(returns=returns)
    transform = (lambda out: out[1] if isinstance(out, tuple) else out) if returns == "tuple" else None
    cb = PerClassMetrics(num_classes=10, at=(1.0,), confusion_matrix=False, bar_chart=False, output_transform=transform, on_error="raise")
    quick_trainer(tmp_path, [cb], epochs=1, logger=False).fit(model, datamodule=dm)
    assert_matches_sklearn(cb.snapshots["end"], *predictions(model, dm))
    assert not model._forward_hooks


def test_wrong_num_classes_is_a_clear_error_before_any_step(tmp_path: Any) -> None:
    trainer = quick_trainer(tmp_path, [PerClassMetrics(num_classes=7)], epochs=1, logger=False)  # on_error="warn"
    with pytest.raises(ValueError, match=r"`num_classes`=7.*shape \(\d+, 10\)"):
        trainer.fit(TinyDigits(), datamodule=digits8(limit=32))
    assert trainer.global_step == 0


def test_labels_out_of_range_is_a_clear_error(tmp_path: Any) -> None:
    cb = PerClassMetrics(num_classes=10, at=(1.0,), target_transform=lambda batch: batch[1] + 5)
    trainer = quick_trainer(tmp_path, [cb], epochs=1, logger=False)
    with pytest.raises(ValueError, match=r"Labels out of range.*\[0, 9\].*max 14"):
        trainer.fit(TinyDigits(), datamodule=digits8(limit=32))


def test_absent_class_is_marked_no_support_without_nan(tmp_path: Any) -> None:
    pl.seed_everything(0, verbose=False)
    dm = digits8(limit=128)
    x, y = dm.val_set.tensors
    keep = y != 9
    dm.val_set = TensorDataset(x[keep], y[keep])
    cb = PerClassMetrics(num_classes=10, at=(0.0, 1.0), confusion_matrix=False, on_error="raise")
    trainer = quick_trainer(tmp_path, [cb], epochs=1)
    trainer.fit(TinyDigits(), datamodule=dm)
    for key in ("start", "end"):
        assert cb.snapshots[key]["support"][9] == 0
        assert all(cb.snapshots[key][m][9] is None for m in cb.metrics)
        assert all(v is None or math.isfinite(v) for m in cb.metrics for v in cb.snapshots[key][m])
    assert "no support" in cb.table_markdown() and "**No support**" in cb.summary_markdown()
    events = read_events(trainer.logger.log_dir)
    tags = [t for t in events["scalars"] if t.startswith("introspect/per_class/") and not t.endswith("seconds")]
    assert tags and not any(t.endswith("/9") for t in tags)
    assert all(math.isfinite(v) for t in tags for _, v in events["scalars"][t])


def test_single_validation_batch_and_no_validation(tmp_path: Any) -> None:
    dm = digits8(limit=64)
    cb = PerClassMetrics(num_classes=10, confusion_matrix=False, bar_chart=False, on_error="raise")
    quick_trainer(tmp_path, [cb], epochs=1, logger=False, limit_val_batches=1).fit(TinyDigits(), datamodule=dm)
    assert sum(cb.snapshots["start"]["support"]) == sum(cb.snapshots["end"]["support"]) == 64  # one batch of 4 x 16

    off = PerClassMetrics(num_classes=10, on_error="raise")
    with pytest.warns(UserWarning, match="limit_val_batches=0"):
        quick_trainer(tmp_path, [off], epochs=1, logger=False, limit_val_batches=0).fit(TinyDigits(), datamodule=dm)
    assert off.snapshots == {} and off.summary_lines() == ["no snapshot taken"]


class Tabular(LightningModule):
    def __init__(self, out: int) -> None:
        super().__init__()
        self.net = nn.Linear(6, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        if out.shape[1] == 1:
            return F.binary_cross_entropy_with_logits(out.flatten(), y.float())
        return F.binary_cross_entropy_with_logits(out, y.float())

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("task", ["multilabel", "binary"])
def test_multilabel_and_binary_match_sklearn(tmp_path: Any, task: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=gen)
    y = (x[:, :3] + 0.3 * torch.randn(96, 3, generator=gen) > 0).long()
    if task == "binary":
        y = y[:, 0]
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    pl.seed_everything(0, verbose=False)
    model = Tabular(3 if task == "multilabel" else 1)
    cb = PerClassMetrics(task=task, num_classes=3 if task == "multilabel" else 2, at=(1.0,), bar_chart=False, on_error="raise")
    quick_trainer(tmp_path, [cb], epochs=1, logger=False).fit(model, loader, loader)
    with torch.no_grad():
        pred = (model(x) > 0).long().numpy()
    truth = y.numpy()
    if task == "binary":
        pred = pred[:, 0]
        p, r, f, s = precision_recall_fscore_support(truth, pred, labels=[0, 1], zero_division=0)
        pairs = [(0, 0), (1, 1)]
    else:
        pairs = [(i, i) for i in range(3)]
    snap = cb.snapshots["end"]
    for i, _ in pairs:
        if task == "multilabel":
            p, r, f, s = precision_recall_fscore_support(truth[:, i], pred[:, i], labels=[1], zero_division=0)
            j = 0
        else:
            j = i
        assert snap["precision"][i] == pytest.approx(p[j], abs=1e-6)
        assert snap["recall"][i] == pytest.approx(r[j], abs=1e-6)
        assert snap["f1"][i] == pytest.approx(f[j], abs=1e-6)
        assert snap["support"][i] == int(s[j])
    assert len(cb.confusion["end"]) == (3 if task == "multilabel" else 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "regression"}, "`task`.*'multiclass'"),
        ({"metrics": ["precision", "auc"]}, "`metrics`.*'recall'"),
        ({"metrics": []}, "`metrics`"),
        ({"num_classes": 0}, "`num_classes`"),
        ({"num_classes": 3, "class_names": ["a", "b"]}, "`class_names`"),
        ({"task": "binary", "num_classes": 5}, "`num_classes`"),
        ({"threshold": 1.5}, "`threshold`"),
        ({"at": [0.0, 2.0]}, "`at`"),
        ({"every_n_epochs": 0}, "`every_n_epochs`"),
        ({"output_transform": "logits"}, "`output_transform`"),
        ({"least_improved": 0}, "`least_improved`"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PerClassMetrics(**kwargs)


# ------------------------------------------------------------------------------------------ DDP
_DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    from lightning_introspect._lightning import Trainer, pl
    from lightning_introspect.callbacks.misclassifications import Misclassifications
    from lightning_introspect.callbacks.per_class_metrics import PerClassMetrics
    from tests.test_per_class_metrics import TinyDigits, digits8

    pl.seed_everything(0, verbose=False)
    model = TinyDigits()
    cb = PerClassMetrics(num_classes=10, confusion_matrix=False, bar_chart=False, on_error="raise")
    mis = Misclassifications(top_k=4, every_n_epochs=2, statistics=["sharpness"], perturbations=["blur"],
                             blur_sigmas=[1.0], num_samples=32, figures=False, on_error="raise")  # rank zero only
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_train_batches=4, callbacks=[cb, mis])
    trainer.fit(model, datamodule=digits8(limit=128, batch_size=16))
    if trainer.is_global_zero:
        torch.save(model.state_dict(), sys.argv[1] + ".pt")
        with open(sys.argv[1], "w") as fh:
            json.dump(dict(snapshots=cb.snapshots, epochs=cb.snapshot_epochs, world=trainer.world_size,
                           reviewed=mis.report["num_samples"]), fh)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_a_single_process(tmp_path: Any) -> None:
    """Two CPU processes (gloo): synced metrics equal one process over the whole validation set (128 = 2 x 64)."""
    script = tmp_path / "ddp_per_class.py"
    script.write_text(_DDP_SCRIPT.format(root=ROOT))
    out = tmp_path / "result.json"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "PYTHONPATH": ROOT}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=240,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2
    assert result["reviewed"] == 64  # Misclassifications runs on rank zero only: its half of the 128 samples
    dm = digits8(limit=128, batch_size=16)
    pl.seed_everything(0, verbose=False)
    initial = TinyDigits()  # the same seed: the weights every rank started from
    final = TinyDigits()
    final.load_state_dict(torch.load(str(out) + ".pt", weights_only=True))
    snaps = result["snapshots"]
    assert sum(snaps["start"]["support"]) == sum(snaps["end"]["support"]) == len(dm.val_set)  # both shards counted
    assert_matches_sklearn(snaps["start"], *predictions(initial, dm))
    assert_matches_sklearn(snaps["end"], *predictions(final, dm))
    # and exactly the numbers of this callback in one process from the same start
    single = PerClassMetrics(num_classes=10, at=(0.0,), confusion_matrix=False, bar_chart=False, on_error="raise")
    pl.seed_everything(0, verbose=False)
    quick_trainer(tmp_path, [single], epochs=1, logger=False, limit_train_batches=1).fit(TinyDigits(), datamodule=dm)
    assert single.snapshots["start"] == snaps["start"]


def test_segmentation_logits_count_pixels_and_skip_ignore_index() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 5, generator=gen)
    mask = torch.randint(0, 3, (2, 5, 5), generator=gen)
    mask[0, 0, :] = 255
    cb = PerClassMetrics(num_classes=3, ignore_index=255)
    cb._update(logits, (torch.zeros(2, 1, 5, 5), mask))
    values, table = cb._compute()
    keep = mask != 255
    truth, pred = mask[keep].numpy(), logits.argmax(1)[keep].numpy()
    p, r, f, s = precision_recall_fscore_support(truth, pred, labels=[0, 1, 2], zero_division=0)
    assert values["recall"] == pytest.approx(list(r), abs=1e-6)
    assert values["precision"] == pytest.approx(list(p), abs=1e-6)
    assert values["support"] == [int(v) for v in s] and sum(map(sum, table)) == int(keep.sum())
    with pytest.raises(ValueError, match=r"Expected labels of shape \(2, 5, 5\)"):
        cb._update(logits, (torch.zeros(2, 1, 5, 5), mask[:, :4]))


# ------------------------------------------------------------------------------------ rendering
def test_confusion_image_colours_cells_by_row_share_and_prints_counts() -> None:
    import matplotlib
    import numpy as np

    from lightning_introspect.render.charts import confusion_image

    table = [[9, 1, 0], [0, 10, 0], [2, 3, 5]]
    image = confusion_image(table, ["a", "b", "c"], title="end")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    colours = {tuple(c) for c in image.reshape(-1, 3).tolist()}
    blues = matplotlib.colormaps["Blues"]
    for share in (0.9, 0.1, 1.0, 0.2, 0.3, 0.5, 0.0):  # every row share is a cell colour in the image
        assert tuple(int(v * 255.0 + 0.5) for v in blues(share)[:3]) in colours, share
    # a single-cell block of the "1.0" colour is a square of `cell` pixels with a count printed on it
    dark = np.all(image == np.array([int(v * 255.0 + 0.5) for v in blues(1.0)[:3]], dtype=np.uint8), axis=-1)
    assert 0.5 * 44 * 44 < dark.sum() < 44 * 44  # the white "10" covers part of the cell
    multilabel = confusion_image([[5, 1, 2, 3]], ["x"], multilabel=True)
    assert multilabel.shape[1] > multilabel.shape[0]  # four columns (TN / FP / FN / TP), one row
    with pytest.raises(ValueError, match="table"):
        confusion_image([], ["a"])


def test_bars_chart_groups_the_snapshots_per_class_and_marks_missing_support() -> None:
    from lightning_introspect.render.charts import bars_chart

    snaps = {"start": {"f1": [0.1, None], "recall": [0.2, 0.3]}, "end": {"f1": [0.8, None], "recall": [0.9, 0.4]}}
    chart = bars_chart(snaps, ["f1", "recall"], ["a", "b"], column=str.upper)
    assert chart.labels() == ["START", "END"]
    f1, recall = chart.panels
    start, end = f1.series
    assert start.x == pytest.approx((-0.2, 0.8)) and end.x == pytest.approx((0.2, 1.2))  # side by side per class
    assert start.y[0] == 0.1 and math.isnan(start.y[1]) and recall.series[1].y == (0.9, 0.4)
    assert [n[2] for n in f1.notes] == ["no support"] and not recall.notes
    assert [t for _, t in f1.xticks] == ["a", "b"] and f1.ylabel == "f1"
    assert chart.render().shape[2] == 3
    many = bars_chart({"end": {"f1": [0.5] * 1000}}, ["f1"], [f"class {i}" for i in range(1000)])
    assert many.width == 4000 and len(many.panels[0].xticks) == 100 and many.panels[0].xticks[1] == (10, "class 10")
    assert many.render().shape[1] == 4000  # 1000 classes: thinner bars, not a 50,000-pixel image


# ------------------------------------------------------------------------------- pure per-class pieces
def test_prepared_predictions_give_sklearns_per_class_numbers_without_a_callback() -> None:
    from lightning_introspect.methods.per_class import build_metrics, per_class_values, prepare_predictions

    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(60, 4, generator=gen), torch.randint(0, 3, (60,), generator=gen)  # class 3: no support
    preds, target, n = prepare_predictions(logits, labels, task="multiclass", num_classes=None)
    collection = build_metrics("multiclass", ["precision", "recall", "f1"], n)
    collection.update(preds, target)
    values, table = per_class_values(collection.compute(), "multiclass", ["precision", "recall", "f1"])
    p, r, f, s = precision_recall_fscore_support(labels.numpy(), logits.argmax(1).numpy(), labels=[0, 1, 2, 3], zero_division=0)
    assert n == 4 and values["support"] == [int(v) for v in s] and values["recall"][3] is None
    assert values["recall"][:3] == pytest.approx(list(r[:3])) and values["f1"][:3] == pytest.approx(list(f[:3]))
    assert sum(map(sum, table)) == 60
    with pytest.raises(ValueError, match="`class_names` to have one entry per class \\(4"):
        prepare_predictions(logits, labels, task="multiclass", num_classes=None, class_names=["a", "b"])
    with pytest.raises(ValueError, match="`num_classes`=5 columns"):
        prepare_predictions(logits, labels, task="multiclass", num_classes=5)


def test_least_improved_and_due_snapshots_known_answers() -> None:
    from lightning_introspect.methods.per_class import (
        due_snapshots,
        least_improved,
        snapshot_fraction,
        snapshot_label,
    )

    first, last = {"f1": [0.2, 0.5, None, 0.1]}, {"f1": [0.8, 0.5, 0.9, 0.2]}
    assert least_improved(first, last, "f1", ["a", "b", "c", "d"], 2) == [("b", 0.5, 0.5), ("d", 0.1, 0.2)]
    assert due_snapshots({0.0: 0, 0.25: 1, 0.5: 2, 1.0: 3}, 2, taken={"start", "at_0.25"}) == ["middle"]
    assert due_snapshots({0.5: -1, 1.0: 3}, 3, taken=set()) == ["end"]
    assert [snapshot_fraction(snapshot_label(f)) for f in (0.0, 0.25, 0.5, 1.0)] == [0.0, 0.25, 0.5, 1.0]
