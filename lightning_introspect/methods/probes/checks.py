"""What the probes accept: a choice among named options, one class id per sample, integer masks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def check_choice(value: Any, argument: str, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``argument`` and the valid ``choices`` when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"Expected `{argument}` to be one of {', '.join(repr(c) for c in choices)}, but got {value!r}.")


def check_probe_labels(labels: Any) -> torch.Tensor:
    """``labels`` as a detached ``(N,)`` integer tensor: one class id per sample, as a probe needs.

    Raises:
        ValueError: labels of another shape (dense masks) or floating-point labels.

    Example:
        >>> check_probe_labels([0, 2, 1])
        tensor([0, 2, 1])
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(
            f"Expected one integer label per sample (shape (N,)), but got {labels.dtype} labels of shape "
            f"{tuple(labels.shape)}; use `target_transform` to map a batch to class ids."
        )
    return labels.detach()


def check_probe_masks(masks: Any) -> torch.Tensor:
    """``masks`` as detached integer masks ``(N, H, W)`` (``(N, 1, H, W)`` accepted), as per-pixel probes need.

    Raises:
        ValueError: labels of another shape or floating-point labels with fractions.

    Example:
        >>> check_probe_masks(torch.zeros(2, 1, 4, 4)).shape
        torch.Size([2, 4, 4])
    """
    masks = torch.as_tensor(masks).detach()
    dense = masks.ndim == 3 or (masks.ndim == 4 and masks.shape[1] == 1)
    integer = not masks.is_floating_point() and masks.dtype != torch.bool
    if masks.is_floating_point() and dense:
        integer = bool(torch.equal(masks, masks.round()))
    if not dense or not integer:
        raise ValueError(
            f"Expected integer masks (N, H, W) for per-pixel probes (task='segmentation'), but got {masks.dtype} "
            f"labels of shape {tuple(masks.shape)}."
        )
    return masks[:, 0].long() if masks.ndim == 4 else masks.long()


def probe_label_problem(labels: torch.Tensor | None, source: str = "validation") -> str | None:
    """Why the labels of example batches cannot serve a probe, or ``None`` when they can.

    Args:
        labels: the labels of an example batch as the data gives them (``None``: the batches carry none).
        source: where the batches come from, as the message names it.

    Example:
        >>> probe_label_problem(torch.tensor([0, 1])) is None
        True
        >>> probe_label_problem(torch.zeros(2, 8, 8)).split(";")[0]
        'the labels have shape (2, 8, 8) (dense masks, as in segmentation), and a probe needs one class id per sample'
    """
    if labels is None:
        return (
            f"it needs labels, but the {source} batches carry none. Pass `probe_dataloader` (a labelled DataLoader) "
            "or `target_transform` (batch -> labels)."
        )
    if labels.ndim > 1:
        return (
            f"the labels have shape {tuple(labels.shape)} (dense masks, as in segmentation), and a probe needs one "
            "class id per sample; the model's output is not per-pixel logits of the masks' size, so per-pixel probes "
            "were not chosen: pass `task='segmentation'` for per-pixel probes, or `target_transform` (batch -> one "
            "label per sample)."
        )
    return None
