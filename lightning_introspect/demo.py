"""The demo task: a small CNN on scikit-learn's bundled digits, upsampled to 32x32 in torch.

Also the tiny model and data the tests and examples use (nothing is downloaded: the digits ship
with scikit-learn).

Example:
    >>> dm = DigitsDataModule(batch_size=32)
    >>> dm.setup("fit")
    >>> x, y = next(iter(dm.val_dataloader()))  # validation batches are 4x the batch size
    >>> x.shape, y.dtype
    (torch.Size([128, 1, 32, 32]), torch.int64)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect._lightning import LightningDataModule, LightningModule

DIGIT_NAMES = [str(i) for i in range(10)]
#: what ``run_demo(task=...)`` / ``lightning-introspect demo --task`` train
DEMO_TASKS = ("classification", "segmentation", "text", "vit")


def load_digits_tensors(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(N, 1, size, size)`` floats in [0, 1] (bilinear upsampling) and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(digits.target, dtype=torch.long)


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train / validation indices with the same class proportions, from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        k = max(1, round(val_fraction * idx.numel()))
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


class DigitsDataModule(LightningDataModule):
    """scikit-learn digits as a Lightning data module, normalised with the training mean / std.

    Args:
        batch_size: batch size of both loaders.
        size: image side after upsampling.
        val_fraction: stratified validation share.
        seed: seed of the split and of the training shuffle.
        limit: keep only the first ``limit`` samples of each split (for fast tests).
    """

    def __init__(self, batch_size: int = 64, size: int = 32, val_fraction: float = 0.3, seed: int = 0, limit: int | None = None) -> None:
        super().__init__()
        self.batch_size, self.size, self.val_fraction, self.seed, self.limit = batch_size, size, val_fraction, seed, limit
        self.mean = 0.0
        self.std = 1.0
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits_tensors(self.size)
        tr, va = stratified_split(y, self.val_fraction, self.seed)
        if self.limit is not None:
            tr, va = tr[: self.limit], va[: self.limit]
        self.mean = float(x[tr].mean())
        self.std = float(x[tr].std())
        x = (x - self.mean) / self.std
        self.train_set = TensorDataset(x[tr], y[tr])
        self.val_set = TensorDataset(x[va], y[va])

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self._dataset("train"), batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("val"), batch_size=self.batch_size * 4)

    def _dataset(self, split: str) -> TensorDataset:
        dataset = self.train_set if split == "train" else self.val_set
        if dataset is None:
            raise RuntimeError(f"Call `{type(self).__name__}.setup()` before asking for the {split} loader.")
        return dataset


class CrossEntropyClassifier(LightningModule):
    """Cross-entropy training on ``(inputs, labels)`` batches (labels per sample or per pixel);
    ``validation_step`` logs ``val_loss`` and the accuracy (:attr:`accuracy_name`) and returns the logits.
    Every demo's model subclasses it."""

    #: the name the validation accuracy is logged under
    accuracy_name: ClassVar[str] = "val_acc"

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log(self.accuracy_name, (logits.argmax(1) == y).float().mean(), prog_bar=True)
        return logits


class DigitsCNN(CrossEntropyClassifier):
    """A small CNN for 1x32x32 digits: three conv-BN-ReLU stages, global average pooling, a linear head.

    Layer names: ``features.0`` ... ``features.10``, ``pool``, ``flatten`` and ``classifier``;
    ``features.8`` is the last conv and ``features.9`` its ReLU (8x8 maps at 32 px, the Grad-CAM layer).
    """

    def __init__(self, num_classes: int = 10, width: int = 16, lr: float = 3e-3, batchnorm: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), norm(w), nn.ReLU(), nn.MaxPool2d(2),  # 0-3: 16x16
            nn.Conv2d(w, 2 * w, 3, padding=1), norm(2 * w), nn.ReLU(), nn.MaxPool2d(2),  # 4-7: 8x8
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8-10: 8x8, then 4x4
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(4 * w, num_classes)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def demo_config(*, fast: bool = False, mean: float = 0.0, std: float = 1.0, defaults: bool = False) -> dict[str, Any]:
    """The introspection config of the demo: every callback that exists, on, sized for 2 CPU cores.

    Args:
        fast: tiny settings for tests (seconds).
        mean: the data's normalisation mean, to show inputs as they are.
        std: the data's normalisation std.
        defaults: every callback with its own default options plus only what the task requires
            (number of classes, normalisation): what ``benchmarks/`` measures as "the default set".
    """
    from lightning_introspect.config import CALLBACKS

    if defaults:
        config: dict[str, Any] = {
            "per_class_metrics": {"num_classes": 10},
            "misclassifications": {"mean": mean, "std": std},
            "attributions": {"mean": mean, "std": std},
            "feature_visualization": {"mean": mean, "std": std, "value_range": [0.0, 1.0]},
        }
        return {k: v for k, v in config.items() if k in CALLBACKS} | {k: {} for k in CALLBACKS if k not in config}
    config = {
        "per_class_metrics": {"num_classes": 10, "class_names": DIGIT_NAMES, "every_n_epochs": 1},
        "misclassifications": {
            "every_n_epochs": 3,
            "top_k": 16,
            "num_samples": 200,
            "mean": mean,
            "std": std,
            "class_names": DIGIT_NAMES,
            "noise_stds": [0.05, 0.1, 0.25],
            "color_strengths": [0.05, 0.1, 0.25],
        },
        "weight_histograms": {"bins": 32, "include_gradients": True},
        "linear_probes": {"max_samples": 2000},
        "attributions": {
            "methods": ["saliency", "guided_backprop", "grad_cam", "lrp"],
            "targets": [3, 8],
            "per_class": 1,
            "every_n_epochs": 2,
            "mean": mean,
            "std": std,
        },
        "feature_visualization": {
            "mean": mean,
            "std": std,
            "value_range": [0.0, 1.0],
            "steps": 32,
            "num_channels": 3,
            "classes": "auto",
            "at": [0.5],
        },
        "sanity_checks": {
            "methods": ["saliency", "guided_backprop", "grad_cam", "input_x_gradient", "guided_grad_cam"],
            "num_samples": 8,
            "repeats": 2,
        },
    }
    if fast:
        config["misclassifications"].update(num_samples=64, every_n_epochs=None)
        config["attributions"].update(every_n_epochs=1, per_class=None, num_samples=4)
        config["feature_visualization"].update(steps=6, num_channels=2, classes=[0, 1, 2])
        config["sanity_checks"].update(methods=["saliency", "guided_backprop", "grad_cam"], num_samples=4, layers=1, repeats=1)
    return {k: v for k, v in config.items() if k in CALLBACKS}


def run_demo(
    *,
    task: str = "classification",
    out: str = "introspect_runs",
    name: str | None = None,
    epochs: int = 6,
    seed: int = 0,
    accelerator: str = "cpu",
    fast: bool = False,
    precision: str = "32-true",
) -> dict[str, Any]:
    """Train :class:`DigitsCNN` on digits (``task="classification"``) or
    :class:`~lightning_introspect.segmentation_demo.ShapesUNet` on generated shapes
    (``task="segmentation"``) or :class:`~lightning_introspect.text_demo.SentenceTransformer` on generated
    sentences (``task="text"``) or :class:`~lightning_introspect.vit_demo.DigitsViT` on digits at 16x16
    (``task="vit"``) with every introspection callback on; return what they found.

    ``name`` defaults to ``"digits"`` / ``"shapes"`` / ``"sentences"`` / ``"digits_vit"``. Returns a dict with
    ``log_dir``, ``callbacks`` (the instances, results on them), ``summary`` (text lines) and ``seconds``.
    """
    import time

    from lightning_introspect._lightning import Trainer, pl
    from lightning_introspect.callbacks.summary import introspection_summary
    from lightning_introspect.config import introspection_callbacks

    loggers = __import__(f"{pl.__name__}.loggers", fromlist=["TensorBoardLogger"])
    if task not in DEMO_TASKS:
        raise ValueError(f"Expected `task` to be one of {', '.join(map(repr, DEMO_TASKS))}, but got {task!r}.")
    pl.seed_everything(seed, verbose=False)
    dm: LightningDataModule
    model: LightningModule
    if task == "segmentation":
        from lightning_introspect.segmentation_demo import ShapesDataModule, ShapesUNet, segmentation_config

        dm, model = ShapesDataModule(seed=seed, train_size=64 if fast else 512, val_size=32 if fast else 128), ShapesUNet()
        config = segmentation_config(fast=fast)
    elif task == "text":
        from lightning_introspect.text_demo import SentencesDataModule, SentenceTransformer, text_config

        dm, model = SentencesDataModule(seed=seed, train_size=192 if fast else 768, val_size=64 if fast else 192), SentenceTransformer()
        config = text_config(fast=fast)
    elif task == "vit":
        from lightning_introspect.vit_demo import IMAGE_SIZE, DigitsViT, vit_config

        # the whole training split also with --fast: a transformer needs more digits than a CNN to learn them;
        # batches of 32 give it twice the CNN's steps per epoch (about 0.95 validation accuracy after 6 epochs
        # instead of 0.89-0.93 with 64)
        dm = DigitsDataModule(seed=seed, size=IMAGE_SIZE, batch_size=32)
        dm.setup("fit")
        model = DigitsViT()
        config = vit_config(fast=fast, mean=dm.mean, std=dm.std)
    else:
        dm = DigitsDataModule(seed=seed, limit=256 if fast else None, batch_size=64)
        dm.setup("fit")
        model = DigitsCNN()
        config = demo_config(fast=fast, mean=dm.mean, std=dm.std)
    callbacks = introspection_callbacks(config)
    name = name or {"segmentation": "shapes", "text": "sentences", "vit": "digits_vit"}.get(task, "digits")
    logger = loggers.TensorBoardLogger(out, name=name)
    trainer = Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=1,
        precision=precision,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not fast,
        log_every_n_steps=5,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    metric = "val_pixel_acc" if task == "segmentation" else "val_acc"
    summary = [f"{metric} {float(trainer.callback_metrics.get(metric, float('nan'))):.3f} after {epochs} epochs ({seconds:.1f} s)"]
    summary.extend(introspection_summary(callbacks))
    return {"log_dir": logger.log_dir, "root": out, "callbacks": callbacks, "summary": summary, "seconds": seconds, "trainer": trainer, "model": model}
