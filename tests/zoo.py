"""A zoo of small, ordinary models and their data, for running the callbacks at default settings.

Every entry is a tiny version of a model people train every day (a few seconds per fit on 2 CPU
cores), with data made here: scikit-learn's bundled digits (upsampled to 16x16) or synthetic tensors
(shapes with known masks, token ids, Gaussian blobs). Nothing is downloaded.

Each :class:`ZooEntry` names the model, builds a fresh ``(LightningModule, LightningDataModule)`` and
says what the callbacks should see: the task (``"classification"`` or ``"segmentation"``), the kind of
input (``"image"``, ``"tokens"`` or ``"tabular"``) and the number of classes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_introspect._lightning import LightningDataModule, LightningModule

IMAGE_SIZE = 16
NUM_DIGITS = 10


# -------------------------------------------------------------------------------------------- data
class TensorDataModule(LightningDataModule):
    """Train / validation datasets as a data module; the training shuffle has its own seeded generator.

    Args:
        train: the training dataset.
        val: the validation dataset, or ``None`` for a fit without validation data.
        batch_size: batch size of both loaders.
        seed: seed of the training shuffle.
    """

    def __init__(self, train: Dataset, val: Dataset | None, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.train_set, self.val_set, self.batch_size, self.seed = train, val, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> Any:
        return [] if self.val_set is None else DataLoader(self.val_set, batch_size=self.batch_size)


def split(x: torch.Tensor, y: torch.Tensor, n_train: int) -> tuple[TensorDataset, TensorDataset]:
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def digits(n_train: int = 128, n_val: int = 64, size: int = IMAGE_SIZE) -> tuple[TensorDataset, TensorDataset]:
    """Digits as ``(N, 1, size, size)`` standardised floats and int64 labels, in a fixed shuffled order."""
    from lightning_introspect.demo import load_digits_tensors

    x, y = load_digits_tensors(size)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: n_train + n_val]
    x, y = x[order], y[order]
    x = (x - x[:n_train].mean()) / x[:n_train].std()
    return split(x, y, n_train)


def digits_dm(batch_size: int = 32, **kwargs: Any) -> TensorDataModule:
    return TensorDataModule(*digits(**kwargs), batch_size=batch_size)


def shapes(n: int = 160, size: int = IMAGE_SIZE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Segmentation data: noisy ``(N, 1, size, size)`` images holding a square (class 1) and a disk
    (class 2) at random places, and the exact masks ``(N, size, size)`` (0: background)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(size).view(-1, 1).float()
    cols = torch.arange(size).view(1, -1).float()
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        side = int(torch.randint(3, 6, (1,), generator=gen))
        r, c = (int(v) for v in torch.randint(0, size - side, (2,), generator=gen))
        masks[i, r : r + side, c : c + side] = 1
        radius = float(torch.randint(2, 4, (1,), generator=gen))
        cr, cc = (float(v) for v in torch.randint(3, size - 3, (2,), generator=gen))
        disk = (rows - cr) ** 2 + (cols - cc) ** 2 <= radius**2
        masks[i][disk & (masks[i] == 0)] = 2
    x = masks.float().unsqueeze(1) + 0.3 * torch.randn(n, 1, size, size, generator=gen)
    return x, masks


def shapes_dm(batch_size: int = 32) -> TensorDataModule:
    x, masks = shapes()
    return TensorDataModule(*split(x, masks, 112), batch_size=batch_size)


def tokens(n: int = 192, length: int = 12, vocab: int = 60, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(N, length)`` (int64) whose class is the block of the vocabulary most of them come from."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    block = vocab // classes
    own = y.view(-1, 1) * block + torch.randint(0, block, (n, length), generator=gen)
    noise = torch.randint(0, vocab, (n, length), generator=gen)
    keep = torch.rand(n, length, generator=gen) < 0.6
    return torch.where(keep, own, noise), y


def tokens_dm(batch_size: int = 32) -> TensorDataModule:
    x, y = tokens()
    return TensorDataModule(*split(x, y, 128), batch_size=batch_size)


def blobs(n: int = 192, features: int = 20, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tabular data: Gaussian blobs ``(N, features)`` around one random centre per class."""
    gen = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, features, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return centres[y] + torch.randn(n, features, generator=gen), y


def blobs_dm(batch_size: int = 32) -> TensorDataModule:
    x, y = blobs()
    return TensorDataModule(*split(x, y, 128), batch_size=batch_size)


class AugmentingDataset(Dataset):
    """A map-style dataset whose ``__getitem__`` draws from the GLOBAL torch RNG (random flip and noise),
    as torchvision transforms do: any extra pass over it moves the global RNG."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x + 0.05 * torch.randn_like(x), self.y[i]


# ------------------------------------------------------------------------------------------ models
class Classifier(LightningModule):
    """Any ``net`` trained with cross-entropy; ``validation_step`` returns the forward output as it is.

    ``logits`` picks the logits out of what ``net`` returns (a tensor, a dict or a tuple).
    """

    def __init__(self, net: nn.Module, lr: float = 1e-2) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x: torch.Tensor) -> Any:
        return self.net(x)

    @staticmethod
    def logits(out: Any) -> torch.Tensor:
        if isinstance(out, dict):
            return out["logits"]
        return out[0] if isinstance(out, tuple) else out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.logits(self(x)), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        out = self(x)
        self.log("val_loss", F.cross_entropy(self.logits(out), y))
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class LossOnlyValidation(Classifier):
    """``validation_step`` returns only the loss (the Lightning docs' own example)."""

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.logits(self(x)), y)
        self.log("val_loss", loss)
        return loss


class LossAndPredsValidation(Classifier):
    """``validation_step`` returns ``{"loss": ..., "preds": logits.argmax(1)}``: class ids, not logits."""

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self.logits(self(x))
        loss = F.cross_entropy(logits, y)
        self.log("val_loss", loss)
        return {"loss": loss, "preds": logits.argmax(1)}


def small_cnn(channels: int = 1, classes: int = NUM_DIGITS) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    )


class BasicBlock(nn.Module):
    """torchvision's ResNet ``BasicBlock``: ONE in-place ``relu`` module called twice, BatchNorm, a residual
    sum and a 1x1 convolution shortcut (``downsample``) when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """A two-stage torchvision-style ResNet: stem, ``layer1`` (same width), ``layer2`` (stride 2, shortcut conv)."""

    def __init__(self, channels: int = 1, classes: int = NUM_DIGITS, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class TinyUNet(nn.Module):
    """A one-level U-Net: per-pixel logits ``(N, classes, H, W)`` from ``(N, channels, H, W)``."""

    def __init__(self, channels: int = 1, classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.enc1 = conv_bn_relu(channels, width)
        self.pool = nn.MaxPool2d(2)
        self.enc2 = conv_bn_relu(width, 2 * width)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = conv_bn_relu(2 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc1(x)
        x = self.up(self.enc2(self.pool(skip)))
        return self.head(self.dec1(torch.cat([x, skip], dim=1)))


class TinyViT(nn.Module):
    """A vision transformer: 4x4 patch embedding (conv), a class token, learned positions, one
    ``nn.TransformerEncoderLayer`` and a linear head on the class token."""

    def __init__(self, channels: int = 1, classes: int = NUM_DIGITS, size: int = IMAGE_SIZE, patch: int = 4, dim: int = 32) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (size // patch) ** 2 + 1, dim))
        self.encoder = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.encoder(x))[:, 0])


class Attention(nn.Module):
    """Hand-written single-head self-attention: ``softmax(q k^T / sqrt(d)) v``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return self.proj(weights @ v)


class GRUText(nn.Module):
    """Token ids ``(N, T)`` -> embedding -> GRU -> the last hidden state -> logits."""

    def __init__(self, vocab: int = 60, classes: int = 3, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, hidden = self.gru(self.embed(ids))
        return self.head(hidden[-1])


class TransformerText(nn.Module):
    """Token ids ``(N, T)`` -> embedding + positions -> attention block (hand-written) -> mean -> logits."""

    def __init__(self, vocab: int = 60, classes: int = 3, dim: int = 16, length: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, length, dim))
        self.attn = Attention(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        x = self.norm1(x + self.attn(x))
        x = self.norm2(x + self.mlp(x))
        return self.head(x.mean(1))


class DictOutput(nn.Module):
    """A CNN whose forward returns ``{"logits": ..., "embedding": ...}``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_cnn()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = self.net[:-1](x)
        return {"logits": self.net[-1](embedding), "embedding": embedding}


class TupleOutput(nn.Module):
    """A CNN whose forward returns ``(logits, aux)`` (an auxiliary output, as Inception's)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_cnn()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.net[:-1](x)
        return self.net[-1](embedding), embedding.norm(dim=1)


class Segmenter(LightningModule):
    """Per-pixel cross-entropy on ``(N, C, H, W)`` logits and ``(N, H, W)`` masks; ``validation_step``
    returns the logits."""

    def __init__(self, net: nn.Module, lr: float = 1e-2) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, masks = batch
        loss = F.cross_entropy(self(x), masks)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, masks = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, masks))
        return logits

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# ---------------------------------------------------------------------------------------- the zoo
@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One ordinary setup.

    Attributes:
        name: short id (the pytest parameter id).
        build: a fresh ``(LightningModule, LightningDataModule)``, same weights every call.
        task: ``"classification"`` or ``"segmentation"``.
        inputs: ``"image"``, ``"tokens"`` or ``"tabular"``.
        num_classes: the number of classes.
        slow: heavier than the rest (marked ``slow`` in the tests).
    """

    name: str
    build: Callable[[], tuple[LightningModule, LightningDataModule]]
    task: str
    inputs: str
    num_classes: int
    slow: bool = False


def _seeded(factory: Callable[[], tuple[LightningModule, LightningDataModule]]) -> Callable[[], tuple[LightningModule, LightningDataModule]]:
    def build() -> tuple[LightningModule, LightningDataModule]:
        torch.manual_seed(0)
        return factory()

    return build


ZOO: list[ZooEntry] = [
    ZooEntry("resnet", _seeded(lambda: (Classifier(TinyResNet()), digits_dm())), "classification", "image", 10),
    ZooEntry("unet", _seeded(lambda: (Segmenter(TinyUNet()), shapes_dm())), "segmentation", "image", 3),
    ZooEntry("vit", _seeded(lambda: (Classifier(TinyViT(), lr=3e-3), digits_dm())), "classification", "image", 10, slow=True),
    ZooEntry("gru_text", _seeded(lambda: (Classifier(GRUText()), tokens_dm())), "classification", "tokens", 3),
    ZooEntry("transformer_text", _seeded(lambda: (Classifier(TransformerText()), tokens_dm())), "classification", "tokens", 3),
    ZooEntry("tabular_mlp", _seeded(lambda: (
        Classifier(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))), blobs_dm()
    )), "classification", "tabular", 3),
    ZooEntry("dict_output", _seeded(lambda: (Classifier(DictOutput()), digits_dm())), "classification", "image", 10),
    ZooEntry("tuple_output", _seeded(lambda: (Classifier(TupleOutput()), digits_dm())), "classification", "image", 10),
    ZooEntry("val_step_returns_loss", _seeded(lambda: (LossOnlyValidation(small_cnn()), digits_dm())), "classification", "image", 10),
    ZooEntry("val_step_returns_loss_and_preds", _seeded(lambda: (LossAndPredsValidation(small_cnn()), digits_dm())),
             "classification", "image", 10),
]

ZOO_BY_NAME: dict[str, ZooEntry] = {entry.name: entry for entry in ZOO}
