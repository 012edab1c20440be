"""What the segmentation analyses cost, in units of one validation pass, on the demo U-Net and a 128 px one.

Two fits of :class:`~lightning_introspect.segmentation_demo.ShapesUNet` on generated shapes with
Misclassifications and Attributions at their defaults (the task is detected from the per-pixel output):

* the demo: 32x32 images, 512 training / 128 validation images, 2 epochs;
* a bigger one: 128x128 images, 128 training / 64 validation images, 2 epochs.

For each, the script prints the wall time of the segmentation review (a Misclassifications run), of an
Attributions run, and of the localisation scoring inside it, each divided by one forward pass over the
validation images measured in the same process:

    python benchmarks/bench_segmentation.py [--threads 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
import warnings
from typing import Any

import torch

from lightning_introspect import Attributions, Misclassifications
from lightning_introspect._lightning import Trainer, pl
from lightning_introspect.callbacks import base
from lightning_introspect.methods import localization
from lightning_introspect.segmentation_demo import ShapesDataModule, ShapesUNet

SETUPS = {"demo (32 px)": (32, 512, 128), "128 px": (128, 128, 64)}


def validation_pass(model: ShapesUNet, dm: ShapesDataModule, device: str) -> float:
    """Seconds of one eval-mode forward over every validation image (after one warm-up batch)."""
    model = model.eval().to(device)
    with torch.no_grad():
        batches = [x.to(device) for x, _ in dm.val_dataloader()]
        model(batches[0])
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for x in batches:
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start


def timed_fit(size: int, train: int, val: int, device: str) -> tuple[float, dict[str, list[float]]]:
    """(one validation pass in seconds, {"<Callback>.<run>" | "localization": [seconds per call]})."""
    runs: dict[str, list[float]] = collections.defaultdict(list)
    original_run = base.IntrospectionCallback.run
    scores = {name: getattr(localization, name) for name in localization.__all__}

    def timed_run(self: base.IntrospectionCallback, trainer: object, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original_run(self, trainer, fn, *args, **kwargs)
        finally:
            if kwargs.get("log_seconds", True):
                runs[f"{type(self).__name__}.{getattr(fn, '__name__', 'run')}"].append(time.perf_counter() - start)

    def timed_score(fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                runs["localization"].append(time.perf_counter() - start)

        return wrapper

    pl.seed_everything(0, verbose=False)
    dm = ShapesDataModule(train_size=train, val_size=val, size=size, batch_size=32)
    dm.setup("fit")
    callbacks = [Misclassifications(), Attributions()]
    base.IntrospectionCallback.run = timed_run  # type: ignore[method-assign]
    for name, fn in scores.items():
        setattr(localization, name, timed_score(fn))
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loggers = __import__(f"{pl.__name__}.loggers", fromlist=["TensorBoardLogger"])
            trainer = Trainer(max_epochs=2, accelerator="gpu" if device == "cuda" else "cpu", devices=1, callbacks=callbacks,
                              logger=loggers.TensorBoardLogger(tmp), enable_checkpointing=False, enable_progress_bar=False,
                              enable_model_summary=False, num_sanity_val_steps=0)
            model = ShapesUNet()
            trainer.fit(model, datamodule=dm)
    finally:
        base.IntrospectionCallback.run = original_run  # type: ignore[method-assign]
        for name, fn in scores.items():
            setattr(localization, name, fn)
    return validation_pass(model, dm, device), dict(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'setup':14s} {'val pass s':>10s} {'review s':>9s} {'/ val':>7s} {'attrib. s':>9s} {'/ val':>7s} {'locali. s':>9s} {'/ val':>7s}")
    for label, (size, train, val) in SETUPS.items():
        val_pass, runs = timed_fit(size, train, val, args.device)
        review = max((max(t) for k, t in runs.items() if k.startswith("Misclassifications.")), default=0.0)
        attributions = max((max(t) for k, t in runs.items() if k.startswith("Attributions.")), default=0.0)
        attribution_runs = max((len(t) for k, t in runs.items() if k.startswith("Attributions.")), default=1)
        local = sum(runs.get("localization", [0.0])) / max(attribution_runs, 1)
        print(f"{label:14s} {val_pass:10.3f} {review:9.2f} {review / val_pass:7.1f} {attributions:9.2f} "
              f"{attributions / val_pass:7.1f} {local:9.3f} {local / val_pass:7.2f}")
        key = "demo" if size == 32 else f"{size}px"
        print(f"RATIO segmentation_review_per_val_pass_{key} {review / val_pass:.1f}")
        print(f"RATIO attributions_run_per_val_pass_{key} {attributions / val_pass:.1f}")
        print(f"RATIO localization_per_val_pass_{key} {local / val_pass:.2f}")


if __name__ == "__main__":
    main()
