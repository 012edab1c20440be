"""Misclassification review: class probabilities from logits, and a bounded buffer that gathers, batch by
batch, each sample's confidence, prediction and label, its image statistics and the images of the most
confidently wrong samples (pure torch; no Lightning).

Memory stays bounded: per sample only three numbers and the statistics are kept; images only for the
``top_k`` most confidently wrong samples overall and ``per_class`` per true class, and those (optionally)
shrunk to the size they are shown at once their statistics are measured.

Example:
    >>> import torch
    >>> buffer = ReviewBuffer(top_k=2)
    >>> probs = class_probabilities(torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 0.0]]))
    >>> buffer.add(probs, torch.tensor([1, 1, 0]))
    >>> round(buffer.errors()["error_rate"], 3), [row["index"] for row in buffer.wrong_rows()]
    (0.333, [0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_introspect.errors import IntrospectionInputError
from lightning_introspect.methods.image_stats import error_rate_by_bin, image_statistics

#: one kept row per sample: confidence, prediction, label, index in the review and (optionally) its image
Rows = dict[str, Any]


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` class probabilities: the softmax of ``(N, C)`` logits; one binary logit (or probability,
    when every value is in [0, 1]) per sample becomes two columns ``[1 - p, p]``.

    Example:
        >>> class_probabilities(torch.tensor([0.25, 1.0])).tolist()
        [[0.75, 0.25], [0.0, 1.0]]
    """
    logits = logits.detach().float()
    if logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1):
        p = logits.flatten()
        if (p < 0).any() or (p > 1).any():
            p = p.sigmoid()
        return torch.stack([1 - p, p], dim=1)
    if logits.ndim != 2:
        raise ValueError(f"Expected classification logits of shape (N, C), but got {tuple(logits.shape)}.")
    return logits.softmax(dim=1)


def keep_most_confident(buffer: Rows | None, rows: Rows, k: int) -> Rows:
    """The ``k`` most confident rows of ``buffer`` and ``rows`` together (ties: the earlier sample first).

    Rows are dicts of equally long tensors (``"conf"``, ``"index"`` and any others; an entry ``None``
    stays ``None``).

    Example:
        >>> rows = {"conf": torch.tensor([0.6, 0.9]), "index": torch.tensor([0, 1]), "image": None}
        >>> kept = keep_most_confident({"conf": torch.tensor([0.9]), "index": torch.tensor([5]), "image": None}, rows, 2)
        >>> kept["index"].tolist(), kept["image"]
        ([1, 5], None)
    """
    if buffer is not None:
        rows = {key: (torch.cat([buffer[key], v]) if v is not None else None) for key, v in rows.items()}
    order = sorted(range(rows["conf"].numel()), key=lambda i: (-float(rows["conf"][i]), int(rows["index"][i])))[:k]
    idx = torch.tensor(order, dtype=torch.long)
    return {key: (v[idx] if v is not None else None) for key, v in rows.items()}


class ReviewBuffer:
    """What one review gathers from its batches, bounded in memory.

    Args:
        top_k: the most confidently wrong samples kept (with their images) for the gallery.
        per_class: the most confidently wrong samples kept per true class (0: none).
        statistics: the :data:`~lightning_introspect.methods.image_stats.STATISTICS` measured per image.
        shrink: applied to the images of the wrong samples before they are kept (the statistics are measured
            on the images as given); e.g. a resize to the gallery's tile size. ``None``: kept as given.

    Attributes:
        seen: samples added, the non-finite ones included (the indices of :meth:`wrong_rows` count them).
        nonfinite: samples left out because their probabilities hold NaN / Inf.
        num_classes: the probabilities' width (``None`` before the first batch).
        top: the kept top-K rows (``"conf"``, ``"pred"``, ``"label"``, ``"index"``, ``"image"``) or ``None``.
        top_per_class: ``{true class: rows}``.
    """

    def __init__(
        self, *, top_k: int, per_class: int = 0, statistics: Sequence[str] = (),
        shrink: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.top_k, self.per_class, self.statistics, self.shrink = top_k, per_class, list(statistics), shrink
        self.conf: list[torch.Tensor] = []
        self.pred: list[torch.Tensor] = []
        self.label: list[torch.Tensor] = []
        self.stats: dict[str, list[torch.Tensor]] = {}
        self.seen = 0
        self.nonfinite = 0
        self.num_classes: int | None = None
        self.top: Rows | None = None
        self.top_per_class: dict[int, Rows] = {}

    def _checked_labels(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n, c = probs.shape
        if target.numel() != n:
            raise IntrospectionInputError(f"Expected {n} labels for {n} logits rows, but got labels of shape {tuple(target.shape)}.")
        if self.num_classes is None:
            self.num_classes = c
        elif c != self.num_classes:
            raise IntrospectionInputError(f"The logits' width changed from {self.num_classes} to {c} between batches.")
        target = target.long().to(probs.device)
        if target.numel() and (target.min() < 0 or target.max() >= c):
            raise IntrospectionInputError(
                f"Labels out of range: expected values in [0, {c - 1}] for {c} classes, but got min {int(target.min())} "
                f"and max {int(target.max())}."
            )
        return target

    def add(
        self,
        probs: torch.Tensor,
        target: torch.Tensor,
        images: Callable[[], torch.Tensor | None] | None = None,
        tokens: Callable[[], torch.Tensor | None] | None = None,
    ) -> None:
        """Add one batch: ``probs`` ``(N, C)`` (:func:`class_probabilities`) and ``target`` ``(N,)`` labels.

        ``images`` returns the batch's images ``(N, C, H, W)`` as they are to be measured and shown, or
        ``None``; it is called only when the batch has a sample with finite probabilities, so a batch left
        out entirely is never read. ``tokens`` likewise returns token ids ``(N, T)`` of text inputs (padded
        with -1 to one length for every batch), kept for the confidently wrong rows.

        Raises:
            IntrospectionInputError: the labels do not match the rows, are out of range, or the width changed.
        """
        target = self._checked_labels(probs, target.flatten())
        n = probs.shape[0]
        conf, pred = probs.max(dim=1)
        conf, pred, target = conf.cpu(), pred.cpu(), target.cpu()
        index = torch.arange(self.seen, self.seen + n)
        self.seen += n
        keep = None
        if not bool(torch.isfinite(probs).all()):  # NaN / Inf logits: leave those samples out of the review
            keep = torch.isfinite(probs).all(dim=1).cpu()
            self.nonfinite += int((~keep).sum())
            if not bool(keep.any()):
                return
            conf, pred, target, index = conf[keep], pred[keep], target[keep], index[keep]
        self.conf.append(conf)
        self.pred.append(pred)
        self.label.append(target)
        raw = images() if images is not None else None
        ids = tokens() if tokens is not None else None
        if ids is not None and keep is not None:
            ids = ids[keep.to(ids.device)]
        if raw is not None:
            if keep is not None:
                raw = raw[keep.to(raw.device)]
            for key, value in image_statistics(raw, self.statistics).items():
                self.stats.setdefault(key, []).append(value.cpu())
        wrong = pred != target
        if not bool(wrong.any()):
            return
        sel = wrong.nonzero().flatten()
        kept = raw[sel.to(raw.device)].cpu() if raw is not None else None
        if kept is not None and self.shrink is not None:
            kept = self.shrink(kept)
        rows = {
            "conf": conf[sel],
            "pred": pred[sel],
            "label": target[sel],
            "index": index[sel],
            "image": kept,
            "tokens": ids[sel.to(ids.device)].cpu() if ids is not None else None,
        }
        self.top = keep_most_confident(self.top, rows, self.top_k)
        if self.per_class:
            for cls in target[sel].unique().tolist():
                mask = rows["label"] == cls
                part = {k: (v[mask] if v is not None else None) for k, v in rows.items()}
                self.top_per_class[cls] = keep_most_confident(self.top_per_class.get(cls), part, self.per_class)

    @property
    def empty(self) -> bool:
        """Whether no sample with finite probabilities was added."""
        return not self.conf

    def _wrong(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        conf, pred, label = torch.cat(self.conf), torch.cat(self.pred), torch.cat(self.label)
        return conf, label, pred != label

    def errors(self) -> dict[str, Any]:
        """``num_samples``, ``error_rate``, ``per_class_error`` (``None`` for a class without samples) and the
        mean confidence of the wrong and of the right predictions (``None`` when there are none)."""
        conf, label, wrong = self._wrong()
        n_classes = int(self.num_classes or 0)
        total = torch.bincount(label, minlength=n_classes)
        errors = torch.bincount(label[wrong], minlength=n_classes)
        return {
            "num_samples": int(label.numel()),
            "error_rate": float(wrong.float().mean()),
            "per_class_error": [None if int(t) == 0 else float(e) / float(t) for e, t in zip(errors, total)],
            "confidence_wrong": float(conf[wrong].mean()) if bool(wrong.any()) else None,
            "confidence_right": float(conf[~wrong].mean()) if bool((~wrong).any()) else None,
        }

    def wrong_rows(self) -> list[dict[str, Any]]:
        """The top-K confidently wrong samples as ``{"index", "label", "pred", "confidence"}``, most confident first."""
        top = self.top
        if top is None:
            return []
        return [
            {"index": int(i), "label": int(y), "pred": int(p), "confidence": float(c)}
            for i, y, p, c in zip(top["index"], top["label"], top["pred"], top["conf"])
        ]

    def bins(self, num_bins: int) -> dict[str, dict[str, Any]]:
        """``{statistic: {"edges", "counts", "errors", "rate"}}``: the error rate per quantile bin of each statistic."""
        _, _, wrong = self._wrong()
        out = {}
        for stat, chunks in self.stats.items():
            binned = error_rate_by_bin(torch.cat(chunks), wrong, num_bins=num_bins)
            out[stat] = {"edges": binned.edges, "counts": binned.counts, "errors": binned.errors, "rate": binned.rate}
        return out
