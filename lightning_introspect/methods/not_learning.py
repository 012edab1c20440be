"""Which layers are not learning: the verdict drawn from the drift of their weights from initialisation.

A layer whose relative change ``||W - W0|| / ||W0||`` stays below a threshold has barely moved. The
verdict is only given once training had a chance to move the weights: from the second epoch on, or at
the last epoch of a shorter fit. Pure Python (no torch, no Lightning).

Example:
    >>> s = not_learning_summary({"a": [0.0, 0.2], "b": [0.0, 1e-5]}, {"a": True, "b": True}, threshold=1e-3,
    ...                          epoch=1, step=20)
    >>> s["not_learning"], s["checked"]
    (['b'], True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def verdict_due(epoch: int, total_epochs: int | None) -> bool:
    """Whether the not-learning verdict is given at ``epoch``: from the second epoch on, or at the last
    epoch of a fit that has fewer (``total_epochs``: ``None`` when unbounded).

    Example:
        >>> verdict_due(0, 5), verdict_due(1, 5), verdict_due(0, 1)
        (False, True, True)
    """
    return epoch >= 1 or (total_epochs is not None and epoch >= total_epochs - 1)


def not_learning_summary(
    drift: Mapping[str, Sequence[float]],
    trainable: Mapping[str, bool],
    *,
    threshold: float,
    epoch: int,
    step: int,
    total_epochs: int | None = None,
    nonfinite: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The summary of one evaluation: the latest drift per layer and the layers that are not learning.

    Args:
        drift: ``{layer: [relative change per evaluation]}``; layers with no value yet are left out.
        trainable: ``{layer: requires_grad}`` of every tracked layer, in depth order (frozen: ``False``).
        threshold: relative change under which a layer counts as not learning.
        epoch: the epoch of the evaluation.
        step: its global step.
        total_epochs: epochs of the whole fit (``None``: unbounded); see :func:`verdict_due`.
        nonfinite: ``{tensor: count}`` of non-finite values (tensors with none may be left out).

    Returns:
        ``{"epoch", "step", "checked", "threshold", "not_learning": [...], "frozen": [...],
        "latest_drift": {layer: value}, "nonfinite": {tensor: count}}``.
    """
    checked = verdict_due(epoch, total_epochs)
    latest = {n: drift[n][-1] for n in trainable if drift.get(n)}
    return {
        "epoch": epoch,
        "step": step,
        "checked": checked,
        "threshold": threshold,
        "not_learning": [n for n, v in latest.items() if checked and v < threshold],
        "frozen": [n for n, grad in trainable.items() if not grad],
        "latest_drift": latest,
        "nonfinite": {k: v for k, v in (nonfinite or {}).items() if v},
    }
