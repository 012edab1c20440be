"""Segmentation review: per-image mean IoU, the worst images kept in a bounded buffer, pixel confusion at
class boundaries vs in class interiors, and mean IoU per class under perturbations (pure torch; no
Lightning).

* :func:`per_image_miou`: each image's mean IoU over the classes present in its truth or its prediction;
* :func:`boundary_mask`: the pixels within ``width`` pixels of a class change in the true mask;
* :func:`pixel_confusion`, :func:`iou_from_confusion`, :func:`class_error_rates`, :func:`top_confusions`;
* :class:`SegmentationReviewBuffer`: what one review gathers batch by batch, bounded in memory;
* :func:`perturbation_iou`: IoU per class of a segmentation model under blur, noise and a colour filter.

Pixels labelled ``ignore_index`` are left out of every count.

Example:
    >>> import torch
    >>> truth = torch.tensor([[[0, 0, 1, 1]], [[0, 0, 0, 0]]])
    >>> pred = torch.tensor([[[0, 1, 1, 1]], [[0, 0, 0, 0]]])
    >>> [round(v, 4) for v in per_image_miou(pred, truth, num_classes=2).tolist()]  # (1/2 + 2/3) / 2; all right
    [0.5833, 1.0]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lightning_introspect.errors import IntrospectionInputError
from lightning_introspect.methods.image_stats import (
    PERTURBATIONS,
    image_statistics,
    mean_by_bin,
    perturbation_sweep,
)
from lightning_introspect.methods.per_class import check_label_range
from lightning_introspect.methods.review import keep_most_confident
from lightning_introspect.methods.task import as_masks

__all__ = [
    "IoUPerturbationResult",
    "SegmentationReviewBuffer",
    "boundary_mask",
    "class_error_rates",
    "iou_from_confusion",
    "per_image_miou",
    "perturbation_iou",
    "predicted_classes",
    "pixel_confusion",
    "top_confusions",
]


def _valid(target: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    return torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index


def _counts(index: torch.Tensor, keep: torch.Tensor | None, bins: int) -> torch.Tensor:
    """``bincount`` of ``index`` where ``keep`` (all by default): left-out entries go to one extra bin that is
    dropped, which is several times faster than boolean indexing on large masks."""
    if keep is not None:
        index = torch.where(keep, index, torch.full_like(index, bins))
    return torch.bincount(index.flatten(), minlength=bins + 1)[:bins]


def predicted_classes(logits: torch.Tensor) -> torch.Tensor:
    """``(N, H, W)`` class ids from ``(N, C, H, W)`` logits (the first of tied maxima, as ``argmax``).

    ``max(dim=1).indices``: on CPU several times faster than ``argmax(dim=1)`` over the channel dimension.

    Example:
        >>> predicted_classes(torch.tensor([[[[0.0]], [[2.0]], [[2.0]]]])).tolist()
        [[[1]]]
    """
    return logits.detach().max(dim=1).indices


def per_image_miou(
    pred: torch.Tensor, target: torch.Tensor, *, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """Each image's mean IoU ``(N,)``: the mean over the classes present in its truth or its prediction
    (pixels labelled ``ignore_index`` left out) of ``|truth & pred| / |truth | pred|``; ``NaN`` for an image
    without a labelled pixel.

    ``pred`` and ``target`` are ``(N, H, W)`` class ids. Batched: three ``bincount`` calls of ``N * C`` bins,
    no per-image loop. Equals ``sklearn.metrics.jaccard_score(t, p, average="macro", labels=present)`` per image.

    Example:
        >>> t = torch.tensor([[[0, 0], [1, 1]]])
        >>> per_image_miou(torch.zeros(1, 2, 2, dtype=torch.long), t, num_classes=2).tolist()  # 2/4 and 0/2
        [0.25]
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"Expected `pred` and `target` of one shape (N, H, W), but got {tuple(pred.shape)} and {tuple(target.shape)}.")
    n, c = int(target.shape[0]), int(num_classes)
    valid = None if ignore_index is None else target != ignore_index
    image = torch.arange(n, device=target.device).view(-1, 1, 1) * c
    t, p = target.long(), pred.long()
    if valid is not None:  # ignored labels may be out of range: give them a class id that is never counted
        t = t.masked_fill(~valid, 0)
    area_true = _counts(image + t, valid, n * c).view(n, c)
    area_pred = _counts(image + p, valid, n * c).view(n, c)
    right = t == p if valid is None else (t == p) & valid
    inter = _counts(image + t, right, n * c).view(n, c)
    union = (area_true + area_pred - inter).double()
    present = union > 0
    iou = torch.where(present, inter.double() / union.clamp_min(1), torch.zeros_like(union))
    count = present.sum(dim=1)
    miou = iou.sum(dim=1) / count.clamp_min(1)
    return torch.where(count > 0, miou, torch.full_like(miou, float("nan"))).float()


def boundary_mask(masks: torch.Tensor, width: int = 2, *, ignore_index: int | None = None) -> torch.Tensor:
    """``(N, H, W)`` bool: the pixels within ``width`` pixels (a ``(2 width + 1)`` square window) of a class
    change in the true ``masks``, on both sides of the change.

    Batched with the max-pool trick: a pixel is on a boundary where the largest and the smallest label in
    its window differ. Pixels labelled ``ignore_index`` are neutral (they neither make a class change nor
    hide one); the image border is not a class change.

    Example:
        >>> m = torch.tensor([[[0, 0, 0, 1, 1, 1]]])
        >>> boundary_mask(m, 1)[0, 0].int().tolist()
        [0, 0, 1, 1, 0, 0]
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"Expected `width` to be a positive int, but got {width!r}.")
    m = masks.unsqueeze(1).float()
    high, low = m, m
    if ignore_index is not None:
        ignored = masks.unsqueeze(1) == ignore_index
        high = m.masked_fill(ignored, float("-inf"))
        low = m.masked_fill(ignored, float("inf"))
    k = 2 * width + 1
    largest = F.max_pool2d(high, k, stride=1, padding=width)  # max-pool pads with -inf: borders are no change
    smallest = -F.max_pool2d(-low, k, stride=1, padding=width)
    return (largest != smallest)[:, 0]


def pixel_confusion(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, *, where: torch.Tensor | None = None,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """``(C, C)`` pixel counts, rows the true class and columns the predicted one, over the pixels in ``where``
    (all by default) not labelled ``ignore_index``.

    Example:
        >>> pixel_confusion(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), 2).tolist()
        [[1, 1], [0, 1]]
    """
    keep, t = where, target.long()
    if ignore_index is not None:
        labelled = target != ignore_index
        keep = labelled if keep is None else keep & labelled
        t = t.masked_fill(~labelled, 0)  # an ignored label may be out of range: never counted
    c = int(num_classes)
    return _counts(t * c + pred.long(), keep, c * c).view(c, c)


def iou_from_confusion(confusion: torch.Tensor) -> list[float | None]:
    """Per-class IoU ``TP / (TP + FP + FN)`` from a ``(C, C)`` confusion matrix; ``None`` for a class neither
    present nor predicted.

    Example:
        >>> iou_from_confusion(torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]]))
        [0.75, 0.6666666666666666, None]
    """
    conf = confusion.double()
    inter = conf.diagonal()
    union = conf.sum(dim=1) + conf.sum(dim=0) - inter
    return [None if float(u) == 0 else float(i) / float(u) for i, u in zip(inter, union)]


def class_error_rates(confusion: torch.Tensor) -> list[float | None]:
    """The share of each true class's pixels predicted as another class (``None`` without pixels).

    Example:
        >>> class_error_rates(torch.tensor([[3, 1], [0, 0]]))
        [0.25, None]
    """
    conf = confusion.double()
    total = conf.sum(dim=1)
    return [None if float(t) == 0 else 1.0 - float(d) / float(t) for d, t in zip(conf.diagonal(), total)]


def top_confusions(confusion: torch.Tensor, k: int = 5) -> list[dict[str, Any]]:
    """The ``k`` largest off-diagonal cells as ``{"true", "pred", "pixels", "share"}`` (``share``: of the true
    class's pixels), most pixels first.

    Example:
        >>> top_confusions(torch.tensor([[6, 2], [1, 1]]), k=1)
        [{'true': 0, 'pred': 1, 'pixels': 2, 'share': 0.25}]
    """
    conf = confusion.detach().cpu().long()
    off = conf.clone()
    off.fill_diagonal_(0)
    total = conf.sum(dim=1)
    flat = off.flatten()
    order = sorted((i for i in range(flat.numel()) if int(flat[i]) > 0), key=lambda i: (-int(flat[i]), i))[:k]
    c = conf.shape[0]
    return [
        {"true": i // c, "pred": i % c, "pixels": int(flat[i]), "share": int(flat[i]) / int(total[i // c])}
        for i in order
    ]


def _most_confused(confusion: torch.Tensor) -> list[int | None]:
    off = confusion.detach().cpu().long().clone()
    off.fill_diagonal_(0)
    best = off.argmax(dim=1)
    return [int(b) if int(off[i, b]) > 0 else None for i, b in enumerate(best)]


# ------------------------------------------------------------------------------------------ the buffer
class SegmentationReviewBuffer:
    """What one segmentation review gathers from its batches, bounded in memory.

    Per image only its mean IoU and statistics are kept; the image, true mask and prediction only for the
    ``top_k`` images of lowest mean IoU (ties: the earlier image first); pixels go into two ``(C, C)``
    confusion matrices, at class boundaries and in class interiors.

    Args:
        top_k: the images of lowest mean IoU kept (with image and masks) for the gallery.
        boundary_width: a pixel within this many pixels of a class change in the true mask is "boundary".
        ignore_index: a mask label left out of every count.
        statistics: the :data:`~lightning_introspect.methods.image_stats.STATISTICS` measured per image.

    Attributes:
        seen: images added, the left-out ones included (the indices of :meth:`worst_rows` count them).
        nonfinite: images left out because their logits hold NaN / Inf.
        unlabelled: images left out because every pixel is labelled ``ignore_index``.
        num_classes: the logits' channel count (``None`` before the first batch).
        worst: the kept rows (``"conf"`` = minus the mean IoU, ``"index"``, ``"image"``, ``"mask"``, ``"pred"``).
        boundary, interior: the ``(C, C)`` pixel confusion matrices (rows: true class).

    Example:
        >>> buffer = SegmentationReviewBuffer(top_k=1, boundary_width=1)
        >>> masks = torch.tensor([[[0, 0, 1, 1]], [[0, 0, 0, 0]]])
        >>> logits = torch.nn.functional.one_hot(masks, 2).permute(0, 3, 1, 2).float()
        >>> logits[0, :, 0, 1] = torch.tensor([0.0, 1.0])  # one pixel of image 0 wrong, at the boundary
        >>> buffer.add(logits, masks)
        >>> [(row["index"], round(row["miou"], 4)) for row in buffer.worst_rows()]
        [(0, 0.5833)]
        >>> buffer.boundary_errors()["boundary_error"]  # class 0's one boundary pixel is wrong
        [1.0, 0.0]
    """

    def __init__(
        self, *, top_k: int, boundary_width: int = 2, ignore_index: int | None = None, statistics: Sequence[str] = ()
    ) -> None:
        self.top_k, self.boundary_width, self.ignore_index = top_k, boundary_width, ignore_index
        self.statistics = list(statistics)
        self.seen = 0
        self.nonfinite = 0
        self.unlabelled = 0
        self.num_classes: int | None = None
        self.miou: list[torch.Tensor] = []
        self.stats: dict[str, list[torch.Tensor]] = {}
        self.worst: dict[str, Any] | None = None
        self.boundary: torch.Tensor | None = None
        self.interior: torch.Tensor | None = None

    def _checked(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 4:
            raise IntrospectionInputError(f"Expected per-pixel logits of shape (N, C, H, W), but got {tuple(logits.shape)}.")
        masks = as_masks(target)
        n, c, h, w = logits.shape
        if tuple(masks.shape) != (n, h, w):
            raise IntrospectionInputError(
                f"Expected masks of shape ({n}, {h}, {w}) for logits of shape {tuple(logits.shape)}, but got "
                f"{tuple(target.shape)}."
            )
        if self.num_classes is None:
            self.num_classes = c
        elif c != self.num_classes:
            raise IntrospectionInputError(f"The logits' channel count changed from {self.num_classes} to {c} between batches.")
        masks = masks.to(logits.device)
        check_label_range(masks, c, self.ignore_index)
        return masks

    def add(
        self, logits: torch.Tensor, target: torch.Tensor, images: Callable[[], torch.Tensor | None] | None = None
    ) -> None:
        """Add one batch: ``logits`` ``(N, C, H, W)`` and ``target`` masks ``(N, H, W)`` (or ``(N, 1, H, W)``).

        ``images`` returns the batch's images ``(N, C', H, W)`` as they are to be measured and shown, or
        ``None``; it is called only when the batch has an image with finite logits.

        Raises:
            IntrospectionInputError: masks of another shape, labels out of range, or the channel count changed.
        """
        masks = self._checked(logits, target)
        n, c = int(logits.shape[0]), int(logits.shape[1])
        index = torch.arange(self.seen, self.seen + n)
        self.seen += n
        keep = torch.isfinite(logits.detach()).flatten(1).all(dim=1)
        self.nonfinite += int((~keep).sum())
        pred = predicted_classes(logits)
        miou = per_image_miou(pred, masks, num_classes=c, ignore_index=self.ignore_index)
        labelled = ~torch.isnan(miou)
        self.unlabelled += int((keep & ~labelled).sum())
        keep = keep & labelled
        if not bool(keep.any()):
            return
        pred, masks, miou, index = pred[keep], masks[keep], miou[keep], index[keep.cpu()]
        valid = _valid(masks, self.ignore_index)
        edge = boundary_mask(masks, self.boundary_width, ignore_index=self.ignore_index)
        boundary = pixel_confusion(pred, masks, c, where=valid & edge).cpu()
        interior = pixel_confusion(pred, masks, c, where=valid & ~edge).cpu()
        self.boundary = boundary if self.boundary is None else self.boundary + boundary
        self.interior = interior if self.interior is None else self.interior + interior
        scores = miou.cpu()
        self.miou.append(scores)
        raw = images() if images is not None else None
        if raw is not None:
            raw = raw[keep.to(raw.device)]
            for key, value in image_statistics(raw, self.statistics).items():
                self.stats.setdefault(key, []).append(value.cpu())
        # this batch's worst first (on the device), so only up to `top_k` images per batch move to the CPU
        order = sorted(range(int(scores.numel())), key=lambda i: (float(scores[i]), int(index[i])))[: self.top_k]
        sel = torch.tensor(order, dtype=torch.long)
        on_device = sel.to(pred.device)
        rows = {
            "conf": -scores[sel],
            "index": index[sel],
            "image": raw[sel.to(raw.device)].detach().cpu() if raw is not None else None,
            "mask": masks[on_device].cpu(),
            "pred": pred[on_device].cpu(),
        }
        self.worst = keep_most_confident(self.worst, rows, self.top_k)

    @property
    def empty(self) -> bool:
        """Whether no image with finite logits and a labelled pixel was added."""
        return not self.miou

    def mean_miou(self) -> float:
        """The mean over the reviewed images of their mean IoU."""
        return float(torch.cat(self.miou).double().mean())

    def worst_rows(self) -> list[dict[str, Any]]:
        """The kept images as ``{"index", "miou"}``, lowest mean IoU first."""
        if self.worst is None:
            return []
        return [{"index": int(i), "miou": -float(c)} for i, c in zip(self.worst["index"], self.worst["conf"])]

    def class_iou(self) -> list[float | None]:
        """Each class's IoU over every reviewed pixel (boundary and interior together)."""
        if self.boundary is None or self.interior is None:
            return []
        return iou_from_confusion(self.boundary + self.interior)

    def boundary_errors(self, k: int = 5) -> dict[str, Any]:
        """Per true class the error rate at boundaries and in interiors, their pixel counts and the class each
        is most often mistaken for (``None``: never wrong), the overall rates, and the ``k`` most confused
        ``(true, pred)`` pairs in each region (:func:`top_confusions`)."""
        if self.boundary is None or self.interior is None:
            return {}

        def overall(conf: torch.Tensor) -> float | None:
            total = int(conf.sum())
            return None if total == 0 else 1.0 - int(conf.diagonal().sum()) / total

        return {
            "width": self.boundary_width,
            "boundary_error": class_error_rates(self.boundary),
            "interior_error": class_error_rates(self.interior),
            "boundary_pixels": self.boundary.sum(dim=1).tolist(),
            "interior_pixels": self.interior.sum(dim=1).tolist(),
            "boundary_confused_with": _most_confused(self.boundary),
            "interior_confused_with": _most_confused(self.interior),
            "overall": {"boundary": overall(self.boundary), "interior": overall(self.interior)},
            "confusions": {"boundary": top_confusions(self.boundary, k), "interior": top_confusions(self.interior, k)},
        }

    def bins(self, num_bins: int) -> dict[str, dict[str, Any]]:
        """``{statistic: {"edges", "counts", "miou"}}``: the mean of the images' mean IoU per quantile bin."""
        miou = torch.cat(self.miou)
        out = {}
        for stat, chunks in self.stats.items():
            binned = mean_by_bin(torch.cat(chunks), miou, num_bins=num_bins)
            out[stat] = {"edges": binned.edges, "counts": binned.counts, "miou": binned.mean}
        return out


# ------------------------------------------------------------------------------------- perturbations
@dataclass
class IoUPerturbationResult:
    """Mean IoU under one perturbation at each strength.

    Attributes:
        kind: ``"blur"``, ``"noise"`` or ``"color"``.
        strengths: the strengths, ``0.0`` (clean) first.
        miou: the mean over classes of the per-class IoU at each strength (``None``: no class present).
        per_class: per strength, the IoU of each class over the whole subset (``None``: neither present nor predicted).
    """

    kind: str
    strengths: list[float]
    miou: list[float | None]
    per_class: list[list[float | None]]


@torch.no_grad()
def perturbation_iou(
    predict: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    masks: torch.Tensor,
    *,
    num_classes: int,
    strengths: Mapping[str, Sequence[float]],
    seed: int = 0,
    noise_scale: float = 1.0,
    ignore_index: int | None = None,
    batch_size: int = 32,
) -> dict[str, IoUPerturbationResult]:
    """Per-class IoU of a segmentation model (``predict``: inputs -> logits ``(N, C, H, W)``) on ``x`` and its
    ``masks`` under each perturbation and strength, pixels pooled over the whole subset.

    The perturbations and their randomness are those of
    :func:`~lightning_introspect.methods.image_stats.perturbation_accuracy`: the noise comes from a private
    generator seeded with ``seed`` (the same noise at every call) and is scaled by ``noise_scale``.

    Example:
        >>> net = torch.nn.Conv2d(1, 2, 3, padding=1)
        >>> res = perturbation_iou(net, torch.rand(4, 1, 8, 8), torch.zeros(4, 8, 8, dtype=torch.long),
        ...                        num_classes=2, strengths={"blur": [1.0]})
        >>> res["blur"].strengths, len(res["blur"].per_class[0])
        ([0.0, 1.0], 2)
    """
    masks = as_masks(masks)
    if x.ndim != 4 or tuple(masks.shape) != (x.shape[0], *x.shape[-2:]):
        raise ValueError(f"Expected `masks` of shape (N, H, W) matching `x` {tuple(x.shape)}, but got {tuple(masks.shape)}.")
    bad = [k for k in strengths if k not in PERTURBATIONS]
    if bad:
        raise ValueError(f"Expected `perturbations` entries to be among {', '.join(map(repr, PERTURBATIONS))}, but got {bad}.")

    def iou_of(inputs: torch.Tensor) -> tuple[float | None, list[float | None]]:
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        for start in range(0, inputs.shape[0], batch_size):
            pred = predicted_classes(predict(inputs[start : start + batch_size]))
            part = masks[start : start + batch_size].to(pred.device)
            confusion += pixel_confusion(pred, part, num_classes, ignore_index=ignore_index).cpu()
        per_class = iou_from_confusion(confusion)
        present = [v for v in per_class if v is not None]
        return (sum(present) / len(present) if present else None), per_class

    return {
        kind: IoUPerturbationResult(kind=kind, strengths=[s for s, _ in rows], miou=[r[0] for _, r in rows], per_class=[r[1] for _, r in rows])
        for kind, rows in perturbation_sweep(iou_of, x, strengths, seed=seed, noise_scale=noise_scale).items()
    }
