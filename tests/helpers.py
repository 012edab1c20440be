"""Test helpers: read back what was logged from the TensorBoard event files, build tiny fits."""

from __future__ import annotations

import glob
import os
from typing import Any

import torch

from lightning_introspect._lightning import Trainer, pl


def read_events(log_dir: str) -> dict[str, Any]:
    """Everything in the event files under ``log_dir``: ``{"scalars": {tag: [(step, value)]},
    "images": {tag: [step]}, "histograms": {tag: [(step, counts)]}, "text": {tag: [step]}, "tags": {...}}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no event files under {log_dir}"
    out: dict[str, Any] = {"scalars": {}, "images": {}, "histograms": {}, "text": {}}
    for path in files:
        acc = EventAccumulator(path, size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            out["scalars"].setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in tags.get("images", []):
            out["images"].setdefault(tag, []).extend(e.step for e in acc.Images(tag))
        for tag in tags.get("histograms", []):
            out["histograms"].setdefault(tag, []).extend(
                (e.step, list(e.histogram_value.bucket)) for e in acc.Histograms(tag)
            )
        for tag in tags.get("tensors", []):
            out["text"].setdefault(tag, []).extend(e.step for e in acc.Tensors(tag))
    return out


def tb_logger(path: str, name: str = "run") -> Any:
    loggers = __import__(f"{pl.__name__}.loggers", fromlist=["TensorBoardLogger"])
    return loggers.TensorBoardLogger(str(path), name=name)


def quick_trainer(tmp_path: Any, callbacks: list[Any], *, epochs: int = 2, logger: Any = "tb", **kwargs: Any) -> Trainer:
    """A CPU trainer for tiny fits: no checkpoints, no progress bar, TensorBoard under tmp_path."""
    if logger == "tb":
        logger = tb_logger(tmp_path)
    opts: dict[str, Any] = dict(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    opts.update(kwargs)
    return Trainer(**opts)


def train_digits_cnn(epochs: int = 8, seed: int = 0, **model_kwargs: Any) -> tuple[Any, Any]:
    """A DigitsCNN trained on the full digits set (about 10 s on 2 cores); returns (model, datamodule)."""
    from lightning_introspect.demo import DigitsCNN, DigitsDataModule

    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(seed=seed)
    model = DigitsCNN(**model_kwargs)
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    model.eval()
    return model, dm


def val_tensors(dm: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = dm.val_set.tensors
    return x, y
