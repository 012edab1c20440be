"""Which task a model solves, read once from its output and labels: whole-image classification or
segmentation (pure torch; no Lightning).

A model is a *segmentation* model when its output is dense, per-pixel logits ``(N, C, H, W)``, and its
labels (where there are any) are integer masks ``(N, H, W)`` (or ``(N, 1, H, W)``) of the output's
spatial size. Everything else is *classification*. An explicit ``task`` argument overrides the guess,
and is checked against the shapes so a wrong one is refused with the shapes named.

Example:
    >>> import torch
    >>> detect_task(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long))
    'segmentation'
    >>> detect_task(torch.zeros(2, 10), torch.tensor([1, 2]))
    'classification'
    >>> resolve_task("auto", torch.zeros(2, 3, 8, 8), None)
    'segmentation'
"""

from __future__ import annotations

import torch

from lightning_introspect.errors import IntrospectionInputError

__all__ = ["TASK_KINDS", "as_masks", "detect_task", "resolve_task"]

#: the values of every callback's ``task`` argument: ``"auto"`` detects the task at setup
TASK_KINDS = ("auto", "classification", "segmentation")


def _integer_valued(t: torch.Tensor) -> bool:
    if not t.is_floating_point():
        return t.dtype != torch.bool
    return bool(torch.equal(t, t.round()))


def as_masks(target: torch.Tensor) -> torch.Tensor:
    """Integer masks ``(N, H, W)`` from ``(N, H, W)`` or single-channel ``(N, 1, H, W)`` labels (long dtype).

    Example:
        >>> as_masks(torch.zeros(2, 1, 4, 4)).shape
        torch.Size([2, 4, 4])
    """
    if target.ndim == 4 and target.shape[1] == 1:
        target = target[:, 0]
    return target.long()


def detect_task(output: torch.Tensor, target: torch.Tensor | None = None) -> str:
    """``"segmentation"`` for dense logits ``(N, C, H, W)`` whose labels (if given) are integer masks of the
    output's spatial size; ``"classification"`` otherwise."""
    if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.ndim != 4:
        return "classification"
    if target is None:
        return "segmentation"
    if not isinstance(target, torch.Tensor) or not _integer_valued(target):
        return "classification"
    masks = target[:, 0] if target.ndim == 4 and target.shape[1] == 1 else target
    ok = masks.ndim == 3 and masks.shape[0] == output.shape[0] and masks.shape[-2:] == output.shape[-2:]
    return "segmentation" if ok else "classification"


def resolve_task(task: str, output: torch.Tensor, target: torch.Tensor | None, *, argument: str = "task") -> str:
    """The task to use: ``task`` itself when explicit (checked against the shapes), else :func:`detect_task`.

    Raises:
        IntrospectionInputError: ``task="segmentation"`` for an output that is not ``(N, C, H, W)`` or labels
            that are not masks of its spatial size, or ``task="classification"`` for dense logits whose
            labels are per-pixel masks.
    """
    if task not in TASK_KINDS:
        raise ValueError(f"Expected `{argument}` to be one of {', '.join(map(repr, TASK_KINDS))}, but got {task!r}.")
    detected = detect_task(output, target)
    if task == "auto" or task == detected:
        return detected
    shapes = f"output {tuple(output.shape)}" + ("" if target is None else f", labels {tuple(target.shape)}")
    if task == "segmentation":
        raise IntrospectionInputError(
            f"`{argument}='segmentation'` needs per-pixel logits (N, C, H, W) and integer masks (N, H, W) of the "
            f"same height and width, but got {shapes}; pass `{argument}='classification'` or 'auto'."
        )
    if target is not None and target.ndim >= 3:
        raise IntrospectionInputError(
            f"`{argument}='classification'` needs one label per sample, but got {shapes} (per-pixel masks); "
            f"pass `{argument}='segmentation'` or 'auto'."
        )
    return task
