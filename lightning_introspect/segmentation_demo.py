"""The segmentation demo task: a small U-Net on generated shapes (nothing is downloaded).

Each image is a noisy background with one to three shapes -- squares, discs and triangles -- of random
colour, size and position; the mask gives every pixel its class (0 background, 1 square, 2 disc,
3 triangle). Everything is drawn from a private generator, so a seed gives the same data on any machine.

Example:
    >>> x, y = make_shapes(4, size=32, seed=0)
    >>> x.shape, y.shape, y.dtype, sorted(y.unique().tolist())[0]
    (torch.Size([4, 3, 32, 32]), torch.Size([4, 32, 32]), torch.int64, 0)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect._lightning import LightningDataModule
from lightning_introspect.demo import CrossEntropyClassifier

SHAPE_NAMES = ["background", "square", "disc", "triangle"]


def make_shapes(n: int, *, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 3, size, size)`` in [0, 1] and their masks ``(n, size, size)`` (int64 class ids)."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    images = 0.2 + 0.1 * torch.rand(n, 3, 1, 1, generator=gen) + 0.05 * torch.randn(n, 3, size, size, generator=gen)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            kind = int(torch.randint(1, 4, (1,), generator=gen))
            r = float(torch.empty(1).uniform_(size * 0.12, size * 0.22, generator=gen))
            cy, cx = (float(v) for v in torch.empty(2).uniform_(r, size - r, generator=gen))
            if kind == 1:
                region = ((yy - cy).abs() <= r * 0.85) & ((xx - cx).abs() <= r * 0.85)
            elif kind == 2:
                region = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            else:  # an upward triangle: below the apex, above the base, inside both slanted edges
                top, bottom = cy - r, cy + r
                half = (yy - top) / (2 * r) * r
                region = (yy >= top) & (yy <= bottom) & ((xx - cx).abs() <= half)
            colour = 0.5 + 0.5 * torch.rand(3, 1, 1, generator=gen)
            images[i] = torch.where(region, colour.expand(3, size, size), images[i])
            masks[i][region] = kind
    return images.clamp(0, 1), masks


class ShapesDataModule(LightningDataModule):
    """Generated shapes as a Lightning data module (fixed train / validation sets, seeded shuffle).

    Args:
        train_size: training images.
        val_size: validation images.
        size: image side.
        batch_size: batch size of both loaders.
        seed: seed of the data and of the training shuffle.
    """

    def __init__(self, train_size: int = 512, val_size: int = 128, size: int = 32, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.train_size, self.val_size, self.size, self.batch_size, self.seed = train_size, val_size, size, batch_size, seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = TensorDataset(*make_shapes(self.train_size, size=self.size, seed=self.seed))
            self.val_set = TensorDataset(*make_shapes(self.val_size, size=self.size, seed=self.seed + 1))

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self._dataset(self.train_set, "train"), batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(self.val_set, "val"), batch_size=self.batch_size)

    def _dataset(self, dataset: TensorDataset | None, split: str) -> TensorDataset:
        if dataset is None:
            raise RuntimeError(f"Call `{type(self).__name__}.setup()` before asking for the {split} loader.")
        return dataset


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class ShapesUNet(CrossEntropyClassifier):
    """A two-level U-Net: per-pixel logits ``(N, classes, H, W)`` from ``(N, 3, H, W)``.

    The first decoder stage upsamples with a transposed convolution (``up2``), the second bilinearly
    (``up1``), so both kinds of upsampling are exercised. ``bottleneck`` is the deepest feature map,
    ``dec1`` the last decoder stage and ``head`` the 1x1 classifier.
    """

    accuracy_name = "val_pixel_acc"

    def __init__(self, num_classes: int = len(SHAPE_NAMES), width: int = 16, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        w = width
        self.enc1, self.enc2 = _block(3, w), _block(w, 2 * w)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _block(2 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = _block(4 * w, 2 * w)
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec1 = _block(3 * w, w)
        self.head = nn.Conv2d(w, num_classes, 1)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(self.pool(s1))
        b = self.bottleneck(self.pool(s2))
        d2 = self.dec2(torch.cat([self.up2(b), s2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), s1], dim=1))
        return self.head(d1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def segmentation_config(*, fast: bool = False) -> dict[str, Any]:
    """The introspection config of the segmentation demo: every callback on, the task detected from the
    U-Net's per-pixel output (nothing segmentation-specific to switch on), sized for 2 CPU cores.

    Args:
        fast: tiny settings for tests (seconds).
    """
    from lightning_introspect.config import CALLBACKS

    config: dict[str, Any] = {
        "per_class_metrics": {"class_names": SHAPE_NAMES, "every_n_epochs": 1},
        "misclassifications": {"class_names": SHAPE_NAMES, "every_n_epochs": 3, "top_k": 8, "num_samples": 64},
        "weight_histograms": {"bins": 32},
        "linear_probes": {},
        "attributions": {
            "methods": ["saliency", "guided_backprop", "grad_cam", "lrp"],
            "class_names": SHAPE_NAMES,
            "every_n_epochs": 1,
            "num_samples": 4,
        },
        "feature_visualization": {"value_range": [0.0, 1.0], "steps": 32, "num_channels": 3, "classes": "auto", "at": [0.5]},
        "sanity_checks": {"methods": ["saliency", "guided_backprop", "grad_cam"], "num_samples": 4, "repeats": 1},
    }
    if fast:
        config["misclassifications"].update(num_samples=16, every_n_epochs=None)
        config["attributions"].update(num_samples=2)
        config["feature_visualization"].update(steps=6, num_channels=2)
        config["sanity_checks"].update(num_samples=2, layers=1)
    return {k: v for k, v in config.items() if k in CALLBACKS}
