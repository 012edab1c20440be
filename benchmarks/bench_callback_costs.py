"""What each callback's runs cost on a bigger model than the demo, in units of its training epoch.

The digits demo's CNN is tiny, so its one-off costs look small in seconds. Here a ResNet-style CNN
(four residual stages, 1.2M parameters) trains on synthetic 64x64 RGB images (10 classes, 512 training
/ 256 validation samples) for 2 epochs with every callback at its defaults, and the script prints the
time of each callback run (wall, inside the callback) beside one training epoch of the fit without
callbacks and one forward pass over the 256 validation images, all measured in this run:

    python benchmarks/bench_callback_costs.py [--size 64] [--threads 2] [--device cpu|cuda]

Most one-off costs grow with the model's forward / backward cost and the fixed sample counts
(``num_samples``, ``steps``, ``repeats``), not with the dataset: on a dataset whose epoch is 100x
longer, the same runs are 100x smaller as a share of an epoch.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect._lightning import LightningModule, Trainer, pl
from lightning_introspect.callbacks import base
from lightning_introspect.config import introspection_callbacks


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.shortcut = (
            nn.Sequential()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ResNetish(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layer1, self.layer2 = Block(32, 32, 1), Block(32, 64, 2)
        self.layer3, self.layer4 = Block(64, 128, 2), Block(128, 256, 2)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))).flatten(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class EpochClock(pl.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.starts.append(time.perf_counter())

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.starts.append(time.perf_counter())  # epoch time = training part only (up to validation)


def data(size: int) -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (768,), generator=gen)
    x = torch.randn(768, 3, size, size, generator=gen) * 0.5 + y.view(-1, 1, 1, 1) / 10
    train = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    return train, DataLoader(TensorDataset(x[512:], y[512:]), batch_size=128)


def fit(size: int, with_callbacks: bool, device: str = "cpu") -> tuple[float, list[float], dict[str, list[float]]]:
    """(fit seconds, training-part seconds per epoch, {callback.method: [seconds per run]})."""
    runs: dict[str, list[float]] = collections.defaultdict(list)
    original = base.IntrospectionCallback.run

    def timed(self: base.IntrospectionCallback, trainer: object, fn: object, *args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return original(self, trainer, fn, *args, **kwargs)
        finally:
            if kwargs.get("log_seconds", True):
                runs[f"{type(self).__name__}.{getattr(fn, '__name__', 'run')}"].append(time.perf_counter() - start)

    pl.seed_everything(0, verbose=False)
    callbacks = introspection_callbacks({"per_class_metrics": {"num_classes": 10}, "sanity_checks": {"progress": False}}) if with_callbacks else []
    clock = EpochClock()
    train, val = data(size)
    base.IntrospectionCallback.run = timed  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loggers = __import__(f"{pl.__name__}.loggers", fromlist=["TensorBoardLogger"])
            trainer = Trainer(max_epochs=2, accelerator="gpu" if device == "cuda" else "cpu", devices=1, callbacks=[*callbacks, clock], logger=loggers.TensorBoardLogger(tmp),
                              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
            start = time.perf_counter()
            trainer.fit(ResNetish(), train, val)
            seconds = time.perf_counter() - start
    finally:
        base.IntrospectionCallback.run = original  # type: ignore[method-assign]
    epochs = [b - a for a, b in zip(clock.starts[::2], clock.starts[1::2])]
    return seconds, epochs, dict(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = ResNetish().eval().to(args.device)
    x = torch.randn(256, 3, args.size, args.size, device=args.device)
    with torch.no_grad():
        model(x[:32])
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(x)
        if args.device == "cuda":
            torch.cuda.synchronize()
        val_pass = time.perf_counter() - start
    plain, epochs, _ = fit(args.size, False, args.device)
    full, _, runs = fit(args.size, True, args.device)
    epoch = min(epochs)
    params = sum(p.numel() for p in model.parameters())
    print(f"ResNet-style CNN, {params / 1e6:.1f}M parameters, {args.size}x{args.size} RGB, {args.device}, {args.threads} torch threads")
    print(f"training part of one epoch (512 images, no callbacks): {epoch:.2f} s; forward over 256 validation images: {val_pass:.2f} s")
    print(f"fit seconds, 2 epochs: none {plain:.1f}, every callback at its defaults {full:.1f} ({full / plain:.2f}x)")
    print(f"{'callback run':45s} {'runs':>4s} {'s / run':>8s} {'/ epoch':>8s} {'/ val pass':>10s}")
    for name, times in sorted(runs.items(), key=lambda kv: -sum(kv[1])):
        per_run = sum(times) / len(times)
        if per_run < 0.01:
            continue
        print(f"{name:45s} {len(times):4d} {per_run:8.2f} {per_run / epoch:8.2f} {per_run / val_pass:10.2f}")
    review = runs.get("Misclassifications.call") or runs.get("Misclassifications._finish") or [0.0]
    print(f"RATIO misclassification_review_per_epoch {max(review) / epoch:.2f}")
    print(f"RATIO feature_visualization_run_per_epoch {max(runs.get('FeatureVisualization.visualize', [0.0])) / epoch:.2f}")
    print(f"RATIO sanity_check_per_epoch {max(runs.get('SanityChecks._check_trainer', [0.0])) / epoch:.2f}")


if __name__ == "__main__":
    main()
