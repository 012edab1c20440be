"""The text demo task: a tiny transformer on generated sentences whose label is decided by known tokens
(nothing is downloaded).

Each sentence is ``length`` tokens of filler words drawn at random, with one or two copies of the
*decisive* word of its class put at random places: ``"red"`` for class 0, ``"green"`` for 1, ``"blue"``
for 2. So the right explanation is known: a faithful attribution gives the decisive words the highest
scores. Everything is drawn from a private generator, so a seed gives the same data on any machine.

Example:
    >>> ids, labels = make_sentences(4, seed=0)
    >>> ids.shape, labels.tolist()[:2], decode(ids[0].tolist())[:3]
    (torch.Size([4, 12]), [2, 1], ['table', 'blue', 'road'])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect._lightning import LightningDataModule
from lightning_introspect.demo import CrossEntropyClassifier

CLASS_NAMES = ["red", "green", "blue"]
#: the decisive word of each class comes first (ids 0, 1, 2), then the filler words
VOCABULARY = CLASS_NAMES + [
    "the", "a", "tree", "stone", "lake", "road", "house", "cloud", "bird", "river", "hill", "door", "light",
    "shadow", "field", "wind", "glass", "paper", "train", "music", "table", "garden", "window", "bridge",
]
DECISIVE = {c: c for c in range(len(CLASS_NAMES))}  # class -> token id of its decisive word


def decode(ids: list[int]) -> list[str]:
    """The words of token ids (what ``Attributions(decode=...)`` and ``Misclassifications(decode=...)`` take)."""
    return [VOCABULARY[i] for i in ids]


def make_sentences(n: int, *, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sentences of token ids ``(n, length)`` and their labels ``(n,)``: filler words with one or two
    copies of the label's decisive word."""
    gen = torch.Generator().manual_seed(seed)
    classes = len(CLASS_NAMES)
    ids = torch.randint(classes, len(VOCABULARY), (n, length), generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    for i in range(n):
        copies = int(torch.randint(1, 3, (1,), generator=gen))
        places = torch.randperm(length, generator=gen)[:copies]
        ids[i, places] = DECISIVE[int(labels[i])]
    return ids, labels


class SentencesDataModule(LightningDataModule):
    """Generated sentences as a Lightning data module (fixed train / validation sets, seeded shuffle)."""

    def __init__(self, train_size: int = 768, val_size: int = 192, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.train_size, self.val_size, self.batch_size, self.seed = train_size, val_size, batch_size, seed

    def setup(self, stage: str | None = None) -> None:
        ids, labels = make_sentences(self.train_size + self.val_size, seed=self.seed)
        self.train_set = TensorDataset(ids[: self.train_size], labels[: self.train_size])
        self.val_set = TensorDataset(ids[self.train_size :], labels[self.train_size :])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class SentenceTransformer(CrossEntropyClassifier):
    """Token and position embeddings, one transformer encoder layer, the mean over tokens, a linear head.

    ``embed`` is the token embedding (where token attributions are taken), ``encoder`` the transformer
    layer, ``head`` the classifier.
    """

    def __init__(self, vocab: int = len(VOCABULARY), length: int = 12, dim: int = 32, classes: int = len(CLASS_NAMES), lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(length, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, classes)
        self.lr = lr

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.encoder(self.embed(ids) + self.position(positions)).mean(1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def text_config(*, fast: bool = False) -> dict[str, Any]:
    """The introspection config of the text demo: every callback that serves token ids, words shown through
    :func:`decode`, sized for 2 CPU cores (feature visualisation has nothing to optimise on token ids and
    skips itself with its reason).

    Args:
        fast: tiny settings for tests (seconds).
    """
    from lightning_introspect.config import CALLBACKS

    config: dict[str, Any] = {
        "common": {"class_names": CLASS_NAMES},
        "per_class_metrics": {"every_n_epochs": 1},
        "misclassifications": {"decode": decode, "every_n_epochs": None},
        "weight_histograms": {"bins": 32},
        "linear_probes": {},
        "attributions": {"decode": decode, "num_samples": 6, "every_n_epochs": 1},
        # every block, given explicitly (a size given is never reduced by the budget): the whole cascade, from
        # the embedding to the head
        "sanity_checks": {"num_samples": 8, "repeats": 1, "layers": "auto"},
    }
    if fast:
        config["attributions"].update(num_samples=3)
        config["sanity_checks"].update(num_samples=4)
    return {k: v for k, v in config.items() if k in CALLBACKS or k == "common"}


__all__ = ["CLASS_NAMES", "VOCABULARY", "SentenceTransformer", "SentencesDataModule", "decode", "make_sentences", "text_config"]
