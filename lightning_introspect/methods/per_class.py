"""Per-class classification metrics: logits and labels checked and put in the form torchmetrics expects,
the torchmetrics collection (``average=None``), its result as plain lists, and the classes that improved
least between two snapshots (pure torch + torchmetrics; no Lightning).

A *snapshot* is ``{metric: [value per class], "support": [count per class]}``; a value is ``None`` for
a class with no support (no sample of that class), so no NaN ever reaches a table or a chart.

Example:
    >>> import torch
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    >>> preds, target, n = prepare_predictions(logits, torch.tensor([0, 1, 1]), task="multiclass", num_classes=None)
    >>> n, target.tolist()
    (2, [0, 1, 1])
    >>> collection = build_metrics("multiclass", ["recall"], n)
    >>> collection.update(preds, target)
    >>> values, table = per_class_values(collection.compute(), "multiclass", ["recall"])
    >>> values, table
    ({'recall': [1.0, 0.5], 'support': [1, 2]}, [[1, 0], [1, 1]])
"""

from __future__ import annotations

import math
from collections.abc import Container, Mapping, Sequence
from typing import Any

import torch

from lightning_introspect.errors import IntrospectionInputError
from lightning_introspect.methods.task import as_masks, detect_task
from lightning_introspect.methods.task import resolve_task as resolve_task_kind

#: ``"auto"`` is resolved from the first logits and labels (:func:`resolve_task`)
TASKS = ("auto", "multiclass", "multilabel", "binary", "segmentation")
METRICS = ("precision", "recall", "f1", "accuracy", "specificity", "iou", "dice")
#: derived from the (synced) confusion matrix rather than kept as torchmetrics states of their own
OVERLAP_METRICS = ("iou", "dice")
#: the name under which :func:`build_metrics` adds the confusion matrix to the collection
CONFUSION = "_confusion"
_NAMED_FRACTIONS = {0.0: "start", 0.5: "middle", 1.0: "end"}


def snapshot_label(fraction: float) -> str:
    """``0.0`` -> ``"start"``, ``0.5`` -> ``"middle"``, ``1.0`` -> ``"end"``, others ``"at_0.25"``.

    Example:
        >>> snapshot_label(0.5), snapshot_label(0.25)
        ('middle', 'at_0.25')
    """
    return _NAMED_FRACTIONS.get(float(fraction), f"at_{float(fraction):g}")


def snapshot_fraction(label: str) -> float:
    """The fraction of training a :func:`snapshot_label` stands for (2.0 for a label it did not make).

    Example:
        >>> snapshot_fraction("end"), snapshot_fraction("at_0.25"), snapshot_fraction("other")
        (1.0, 0.25, 2.0)
    """
    named = {name: fraction for fraction, name in _NAMED_FRACTIONS.items()}
    if label in named:
        return named[label]
    return float(label[3:]) if label.startswith("at_") else 2.0


def due_snapshots(fraction_epochs: Mapping[float, int], epoch: int, taken: Container[str]) -> list[str]:
    """The labels of the snapshots due at the validation of ``epoch`` (0-based) and not ``taken`` yet.

    ``fraction_epochs`` maps each fraction of training to the epoch it falls on (negative: it cannot be
    placed); the start snapshot (0.0) is taken before training, never here.

    Example:
        >>> due_snapshots({0.0: 0, 0.5: 2, 1.0: 4}, 3, taken={"start"})
        ['middle']
    """
    due = []
    for fraction, target_epoch in sorted(fraction_epochs.items()):
        key = snapshot_label(fraction)
        if fraction == 0.0 or target_epoch < 0 or key in taken or epoch < target_epoch:
            continue
        due.append(key)
    return due


def main_metric(metrics: Sequence[str]) -> str:
    """The metric summaries rank classes by: ``"f1"`` if asked for, otherwise the first of ``metrics``.

    Example:
        >>> main_metric(["recall", "f1"]), main_metric(["precision", "recall"])
        ('f1', 'precision')
    """
    return "f1" if "f1" in metrics else metrics[0]


def resolve_task(task: str, logits: torch.Tensor, target: torch.Tensor) -> str:
    """The task a ``PerClassMetrics`` ``task`` stands for on these logits and labels: ``"auto"`` becomes
    ``"segmentation"`` for per-pixel logits ``(N, C, H, W)`` with integer masks of their size (see
    :func:`lightning_introspect.methods.task.detect_task`), else ``"multiclass"``; an explicit
    ``"segmentation"`` is checked against the shapes.

    Example:
        >>> resolve_task("auto", torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
        'segmentation'
        >>> resolve_task("auto", torch.zeros(2, 3), torch.tensor([0, 2]))
        'multiclass'
    """
    if task == "auto":
        return "segmentation" if detect_task(logits, target) == "segmentation" else "multiclass"
    if task == "segmentation":
        resolve_task_kind("segmentation", logits, target)
    return task


def metrics_for(task: str, metrics: Sequence[str]) -> list[str]:
    """The metrics kept for a resolved ``task``: ``metrics``, plus ``"iou"`` and ``"dice"`` for segmentation.

    Example:
        >>> metrics_for("segmentation", ["recall"]), metrics_for("multiclass", ["recall"])
        (['recall', 'iou', 'dice'], ['recall'])
    """
    extra = [m for m in OVERLAP_METRICS if m not in metrics] if task == "segmentation" else []
    return [*metrics, *extra]


def mean_iou(values: Mapping[str, Sequence[Any]]) -> float | None:
    """The mean IoU over the classes with support (the segmentation headline), or ``None`` without any.

    Example:
        >>> mean_iou({"iou": [0.5, None, 1.0]})
        0.75
    """
    ious = [v for v in values.get("iou", []) if v is not None]
    return sum(ious) / len(ious) if ious else None


def check_label_range(target: torch.Tensor, num_classes: int, ignore_index: int | None = None) -> None:
    """Raise :class:`IntrospectionInputError` unless every label (but ``ignore_index``) is in ``[0, num_classes)``.

    Example:
        >>> check_label_range(torch.tensor([0, 255, 1]), 2, ignore_index=255)
        >>> check_label_range(torch.tensor([0, 2]), 2)
        Traceback (most recent call last):
        ...
        lightning_introspect.errors.IntrospectionInputError: Labels out of range: expected values in [0, 1] (num_classes=2), but got min 0 and max 2.
    """
    valid = target if ignore_index is None else target[target != ignore_index]
    if valid.numel() and (valid.min() < 0 or valid.max() >= num_classes):
        raise IntrospectionInputError(
            f"Labels out of range: expected values in [0, {num_classes - 1}] (num_classes={num_classes}"
            f"{'' if ignore_index is None else f', ignore_index={ignore_index}'}), but got min "
            f"{int(valid.min())} and max {int(valid.max())}."
        )


def _binary(
    logits: torch.Tensor, target: torch.Tensor, threshold: float, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    if logits.is_floating_point() and logits.ndim == 2 and logits.shape[1] == 2:
        preds = logits.float()
    elif logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1):
        p = logits.float().flatten()
        if (p < 0).any() or (p > 1).any():  # logits, not probabilities (as torchmetrics decides)
            p = p.sigmoid()
        preds = (p >= threshold).long()
    else:
        raise IntrospectionInputError(f"Expected binary logits of shape (N,), (N, 1) or (N, 2), but got {tuple(logits.shape)}.")
    target = target.flatten().long()
    check_label_range(target, 2, ignore_index)
    return preds, target, 2


def prepare_predictions(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    task: str,
    num_classes: int | None,
    threshold: float = 0.5,
    ignore_index: int | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Check logits and labels against each other and the task; return ``(preds, target, num_classes)`` in
    the form the torchmetrics classification metrics expect.

    Args:
        logits: ``(N, C)`` or per-pixel ``(N, C, ...)`` logits, integer class ids of the labels' shape, or
            for ``task="binary"`` one logit / probability per sample or two logits.
        target: labels ``(N, ...)`` (0/1 of the logits' shape for ``"multilabel"``).
        task: one of :data:`TASKS` but ``"auto"`` (resolve it first: :func:`resolve_task`); ``"segmentation"``
            is multiclass per pixel, with ``(N, 1, H, W)`` masks squeezed to ``(N, H, W)``.
        num_classes: the number of classes, or ``None`` to take it from the logits' width (dim 1).
        threshold: probability threshold of a single binary logit.
        ignore_index: a label value left out of the range check (torchmetrics ignores it too).
        class_names: the display names, checked against a width read from the logits.

    Returns:
        ``(preds, target, num_classes)``; ``num_classes`` is 2 for ``"binary"``.

    Raises:
        IntrospectionInputError: the shapes disagree, the width is not ``num_classes``, the labels are not
            integers or are out of range; each message names the argument that fixes it.
    """
    logits = logits.detach()
    target = target.detach().to(logits.device)
    if logits.shape[0] != target.shape[0]:
        raise IntrospectionInputError(
            f"The logits ({tuple(logits.shape)}) and labels ({tuple(target.shape)}) have different batch sizes; "
            "check `output_transform` / `target_transform`."
        )
    if task == "binary":
        return _binary(logits, target, threshold, ignore_index)
    if task == "segmentation":
        target = as_masks(target) if target.ndim == 4 and target.shape[1] == 1 else target
    width: int | None = None
    if not logits.is_floating_point():
        if logits.shape != target.shape:
            raise IntrospectionInputError(
                f"Integer predictions must have the labels' shape {tuple(target.shape)}, but got {tuple(logits.shape)}."
            )
    elif logits.ndim < 2:
        raise IntrospectionInputError(
            f"Expected logits of shape (N, C) or (N, C, ...), but got {tuple(logits.shape)}; "
            "use `output_transform` to pick the logits out of the model output."
        )
    else:
        width = int(logits.shape[1])
    if num_classes is None:
        if width is None:
            raise IntrospectionInputError("Pass `num_classes`: the model returns class ids, not logits.")
        num_classes = width
        if class_names is not None and len(class_names) != width:
            raise IntrospectionInputError(
                f"Expected `class_names` to have one entry per class ({width} from the logits' width), "
                f"but got {len(class_names)}."
            )
    if width is not None and width != num_classes:
        fix = (
            "for one logit per sample (binary classification) pass `task='binary'`"
            if width == 1 and task == "multiclass"
            else f"set `num_classes` to {width} or fix `output_transform`"
        )
        raise IntrospectionInputError(
            f"Expected logits with `num_classes`={num_classes} columns (dim 1), but got logits of shape "
            f"{tuple(logits.shape)}; {fix}."
        )
    if task == "multilabel":
        if target.shape != logits.shape:
            raise IntrospectionInputError(
                f"Expected multilabel targets of the logits' shape {tuple(logits.shape)}, but got {tuple(target.shape)}."
            )
        target = target.long()
        check_label_range(target, 2, ignore_index)
        return logits.float(), target, num_classes
    if logits.is_floating_point() and target.shape != logits.shape[:1] + logits.shape[2:]:
        raise IntrospectionInputError(
            f"Expected labels of shape {tuple(logits.shape[:1] + logits.shape[2:])} for logits of shape "
            f"{tuple(logits.shape)}, but got {tuple(target.shape)}; use `target_transform`."
        )
    if target.is_floating_point() and not torch.equal(target, target.round()):
        raise IntrospectionInputError("Expected integer class labels, but got non-integer floats.")
    target = target.long()
    check_label_range(target, num_classes, ignore_index)
    return (logits.float() if logits.is_floating_point() else logits.long()), target, num_classes


def build_metrics(
    task: str,
    metrics: Sequence[str],
    num_classes: int,
    *,
    threshold: float = 0.5,
    ignore_index: int | None = None,
    device: torch.device | str | None = None,
) -> Any:
    """A torchmetrics ``MetricCollection`` of the per-class (``average=None``) ``metrics`` and the confusion
    matrix (under :data:`CONFUSION`), for ``"multilabel"`` or otherwise multiclass (binary: two classes;
    segmentation: per pixel).

    Its states sync across processes in ``compute()`` as torchmetrics does it. ``"iou"`` and ``"dice"`` get
    no metric of their own: :func:`per_class_values` derives them from the confusion matrix, which makes
    them exact under DDP (integer counts summed) and costs nothing more per batch.
    """
    from torchmetrics import Metric, MetricCollection
    from torchmetrics import classification as tmc

    common: dict[str, Any] = {"average": None, "ignore_index": ignore_index}
    makers: dict[str, type[Metric]]
    confmat: Metric
    if task == "multilabel":
        common.update(num_labels=num_classes, threshold=threshold)
        makers = {
            "precision": tmc.MultilabelPrecision,
            "recall": tmc.MultilabelRecall,
            "f1": tmc.MultilabelF1Score,
            "accuracy": tmc.MultilabelAccuracy,
            "specificity": tmc.MultilabelSpecificity,
        }
        confmat = tmc.MultilabelConfusionMatrix(num_labels=num_classes, threshold=threshold, ignore_index=ignore_index)
    else:
        common.update(num_classes=num_classes)
        makers = {
            "precision": tmc.MulticlassPrecision,
            "recall": tmc.MulticlassRecall,
            "f1": tmc.MulticlassF1Score,
            "accuracy": tmc.MulticlassAccuracy,
            "specificity": tmc.MulticlassSpecificity,
        }
        confmat = tmc.MulticlassConfusionMatrix(num_classes=num_classes, ignore_index=ignore_index)
    collection = MetricCollection({m: makers[m](**common) for m in metrics if m not in OVERLAP_METRICS})
    collection.add_metrics({CONFUSION: confmat})
    return collection if device is None else collection.to(device)


def per_class_values(
    result: Mapping[str, torch.Tensor], task: str, metrics: Sequence[str]
) -> tuple[dict[str, list[Any]], list[list[int]]]:
    """The computed collection of :func:`build_metrics` as ``(snapshot values, confusion table)``.

    The support of a class is its row sum in the confusion matrix (for multilabel: its positives); a
    class without support, or with a non-finite value, gets ``None``. ``"iou"`` and ``"dice"`` come from
    the confusion matrix (:func:`overlap_scores`). The multilabel table has one row per label:
    ``[tn, fp, fn, tp]``.
    """
    confmat = result[CONFUSION].detach().cpu().long()
    if task == "multilabel":  # (L, 2, 2): [[tn, fp], [fn, tp]]
        support = confmat[:, 1, :].sum(dim=1)
        table = confmat.reshape(confmat.shape[0], 4)
        tp, fp, fn = confmat[:, 1, 1], confmat[:, 0, 1], confmat[:, 1, 0]
    else:
        support = confmat.sum(dim=1)
        table = confmat
        tp = confmat.diagonal()
        fp, fn = confmat.sum(dim=0) - tp, support - tp
    overlap = {"iou": overlap_scores(tp, fp, fn, "iou"), "dice": overlap_scores(tp, fp, fn, "dice")}
    values: dict[str, list[Any]] = {}
    for m in metrics:
        v = (overlap[m] if m in overlap else result[m].detach().float().cpu()).tolist()
        values[m] = [None if int(s) == 0 or not math.isfinite(x) else float(x) for x, s in zip(v, support.tolist())]
    values["support"] = [int(s) for s in support.tolist()]
    return values, table.tolist()


def overlap_scores(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-class IoU (Jaccard) ``tp / (tp + fp + fn)`` or Dice ``2 tp / (2 tp + fp + fn)`` from counts;
    NaN where a class has neither true nor predicted pixels. (Per class, Dice equals F1; it is reported
    under its segmentation name because that is what segmentation papers compare.)

    Example:
        >>> overlap_scores(torch.tensor([2, 0]), torch.tensor([1, 0]), torch.tensor([1, 0]), "iou").tolist()
        [0.5, nan]
    """
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    num, den = (tp, tp + fp + fn) if kind == "iou" else (2 * tp, 2 * tp + fp + fn)
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(den, math.nan))


def least_improved(
    first: Mapping[str, list[Any]], last: Mapping[str, list[Any]], metric: str, names: Sequence[str], k: int
) -> list[tuple[str, float, float]]:
    """``(class, first value, last value)`` of the ``k`` classes whose ``metric`` rose least from the snapshot
    ``first`` to ``last`` (ties: the lower last value first); classes with no support in either are left out.

    Example:
        >>> least_improved({"f1": [0.1, 0.2, None]}, {"f1": [0.9, 0.3, 0.5]}, "f1", ["a", "b", "c"], 2)
        [('b', 0.2, 0.3), ('a', 0.1, 0.9)]
    """
    rows = [(name, a, b) for name, a, b in zip(names, first[metric], last[metric]) if a is not None and b is not None]
    rows.sort(key=lambda r: (r[2] - r[1], r[2]))
    return rows[:k]
