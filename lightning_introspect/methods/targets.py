"""What to explain: every target kind normalised, in one place, to one differentiable score per sample.

Accepted targets (every method accepts every kind):

* ``int`` -- the same class for every sample;
* a sequence / 1-D tensor of ``N`` class ids -- one per sample (never only the first sample);
* ``"pred"`` -- each sample's own arg-max class;
* a callable ``f(output) -> Tensor[N]`` -- any differentiable score;
* :class:`RegionTarget` -- segmentation: a class id (or one per sample) plus a pixel mask; the score is
  that class's logits summed over the mask.

For an ``(N, C, H, W)`` output (segmentation) a plain class id sums that class's logits over all pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import overload

import torch


@dataclass(frozen=True)
class RegionTarget:
    """A class over a pixel region, for segmentation models with ``(N, C, H, W)`` outputs.

    Args:
        class_id: one class id, or one per sample (sequence / tensor of length N).
        mask: ``(H, W)`` or ``(N, H, W)`` bool or float weights over the output's pixels.

    Example:
        >>> out = torch.zeros(2, 3, 4, 4, requires_grad=True)
        >>> mask = torch.zeros(4, 4, dtype=torch.bool); mask[:2, :2] = True
        >>> target_scores(out + 1, RegionTarget(class_id=1, mask=mask)).tolist()
        [4.0, 4.0]
    """

    class_id: int | Sequence[int] | torch.Tensor
    mask: torch.Tensor


Target = int | Sequence[int] | torch.Tensor | str | Callable[[torch.Tensor], torch.Tensor] | RegionTarget


def model_logits(output: object) -> torch.Tensor:
    """The logits in what a model returned: a tensor ``(N, C, ...)``, a dict's ``"logits"``, an output object's
    ``.logits`` (Hugging Face's ``ModelOutput``) or a tuple's / list's first tensor -- what the callbacks accept.

    Example:
        >>> model_logits({"logits": torch.zeros(2, 3), "loss": torch.tensor(1.0)}).shape
        torch.Size([2, 3])
        >>> model_logits((torch.zeros(2, 3), torch.zeros(2, 5))).shape
        torch.Size([2, 3])

    Raises:
        ValueError: when none of those holds a tensor.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits  # type: ignore[attr-defined]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(
        "Expected the model to return logits: a tensor (N, C, ...), a dict with a 'logits' tensor, an object with a "
        f"`.logits` tensor or a tuple whose first item is a tensor, but got {type(output).__name__}."
    )


def _class_ids(output: torch.Tensor, target: object, argument: str) -> torch.Tensor:
    n, num_classes = output.shape[0], output.shape[1]
    if isinstance(target, str):
        if target != "pred":
            raise ValueError(f"Expected `{argument}` to be 'pred', a class id, a list of ids, a callable or a RegionTarget, but got {target!r}.")
        flat = output.detach().flatten(2).sum(-1) if output.ndim > 2 else output.detach()
        return flat.argmax(dim=1)
    if isinstance(target, bool):
        raise ValueError(f"Expected `{argument}` to be a class id (int), but got a bool {target!r}.")
    if isinstance(target, int):
        ids = torch.full((n,), target, dtype=torch.long, device=output.device)
    else:
        try:
            ids = torch.as_tensor(target, device=output.device)
        except (TypeError, ValueError) as err:
            raise ValueError(f"Expected `{argument}` to be a class id, a list / tensor of ids, a callable or a RegionTarget, but got {type(target).__name__}.") from err
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"Expected `{argument}` to hold integer class ids, but got dtype {ids.dtype}.")
        ids = ids.long().flatten() if ids.ndim <= 1 else ids
        if ids.ndim != 1 or ids.numel() not in (1, n):
            raise ValueError(f"Expected `{argument}` to hold 1 or N={n} class ids (one per sample), but got shape {tuple(torch.as_tensor(target).shape)}.")
        ids = ids.expand(n) if ids.numel() == 1 else ids
    bad = (ids < 0) | (ids >= num_classes)
    if bad.any():
        raise ValueError(
            f"Expected `{argument}` class ids in [0, {num_classes - 1}] (the model outputs {num_classes} classes), "
            f"but got {ids[bad].unique().tolist()}."
        )
    return ids


@overload
def target_indices(
    output: torch.Tensor, target: int | Sequence[int] | torch.Tensor | str | RegionTarget, *, argument: str = ...
) -> torch.Tensor: ...
@overload
def target_indices(output: torch.Tensor, target: Target, *, argument: str = ...) -> torch.Tensor | None: ...
def target_indices(output: torch.Tensor, target: Target, *, argument: str = "target") -> torch.Tensor | None:
    """The per-sample class ids a target stands for, or ``None`` for callables."""
    if callable(target) and not isinstance(target, (torch.Tensor, RegionTarget)):
        return None
    if isinstance(target, RegionTarget):
        return _class_ids(output, target.class_id, argument)
    return _class_ids(output, target, argument)


def target_scores(output: torch.Tensor, target: Target, *, argument: str = "target") -> torch.Tensor:
    """One differentiable score per sample: ``(N,)``.

    Example:
        >>> out = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> target_scores(out, 1).tolist(), target_scores(out, [0, 1]).tolist()
        ([2.0, 4.0], [1.0, 4.0])
    """
    if output.ndim < 2:
        raise ValueError(f"Expected the model output to have shape (N, C, ...), but got {tuple(output.shape)}.")
    n = output.shape[0]
    if isinstance(target, RegionTarget):
        if output.ndim != 4:
            raise ValueError(f"A RegionTarget in `{argument}` needs an (N, C, H, W) output, but the model gave {tuple(output.shape)}.")
        ids = _class_ids(output, target.class_id, argument)
        mask = torch.as_tensor(target.mask, device=output.device)
        if ids.is_inference() or mask.is_inference():  # see below
            with torch.inference_mode(False):
                ids, mask = ids.clone(), mask.clone()
        if mask.shape[-2:] != output.shape[-2:] or mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[0] not in (1, n)):
            raise ValueError(f"Expected the RegionTarget mask of shape (H, W) or (N, H, W) matching the output's {tuple(output.shape[-2:])}, but got {tuple(mask.shape)}.")
        picked = output.gather(1, ids.view(n, 1, 1, 1).expand(n, 1, *output.shape[-2:])).squeeze(1)
        return (picked * mask.to(picked.dtype)).flatten(1).sum(1)
    if callable(target) and not isinstance(target, torch.Tensor):
        scores = target(output)
        if not isinstance(scores, torch.Tensor) or scores.shape != (n,):
            raise ValueError(f"Expected the callable `{argument}` to return one score per sample, shape ({n},), but got {getattr(scores, 'shape', type(scores))}.")
        return scores
    ids = _class_ids(output, target, argument)
    if ids.is_inference():  # made inside a validation hook: autograd cannot save it, an ordinary copy it can
        with torch.inference_mode(False):
            ids = ids.clone()
    picked = output.gather(1, ids.view(n, 1, *([1] * (output.ndim - 2))).expand(n, 1, *output.shape[2:]))
    return picked.flatten(1).sum(1)


# ------------------------------------------------------------------------- segmentation regions
def dominant_class(masks: torch.Tensor, *, ignore_index: int | None = None) -> int:
    """The class covering the most pixels of ``masks`` ``(N, H, W)``: the background of most segmentation
    data, which the callbacks explain last (ties: the lower id).

    Example:
        >>> dominant_class(torch.tensor([[[0, 0], [1, 2]], [[0, 0], [0, 2]]]))
        0
    """
    valid = masks.flatten() if ignore_index is None else masks.flatten()[masks.flatten() != ignore_index]
    valid = valid[valid >= 0]
    return int(torch.bincount(valid.long().cpu()).argmax()) if valid.numel() else 0


def region_targets(
    masks: torch.Tensor,
    *,
    classes: Sequence[int] | None = None,
    min_pixels: int = 1,
    ignore_index: int | None = None,
) -> list[tuple[int, int, torch.Tensor]]:
    """Every ``(sample, class, region)`` present in integer ``masks`` ``(N, H, W)`` (predicted or true),
    in sample order and, within a sample, by class id; ``classes`` keeps only those ids, and a region
    of fewer than ``min_pixels`` pixels is left out. Each region is a bool ``(H, W)`` mask, ready for
    ``RegionTarget(class_id, region)`` on that sample.

    Example:
        >>> m = torch.tensor([[[0, 1], [1, 1]], [[2, 2], [2, 2]]])
        >>> [(i, c, int(r.sum())) for i, c, r in region_targets(m)]
        [(0, 0, 1), (0, 1, 3), (1, 2, 4)]
    """
    keep = None if classes is None else {int(c) for c in classes}
    out = []
    for i in range(masks.shape[0]):
        for c in masks[i].unique().tolist():
            if c == ignore_index or c < 0 or (keep is not None and c not in keep):
                continue
            region = masks[i] == c
            if int(region.sum()) >= min_pixels:
                out.append((i, int(c), region))
    return out


def object_targets(masks: torch.Tensor, *, background: int | None = None, ignore_index: int | None = None) -> RegionTarget:
    """One :class:`RegionTarget` for a batch: per sample, the class with the largest region in ``masks``
    ``(N, H, W)`` other than ``background`` (default: :func:`dominant_class`), over that region; a sample
    showing only the background explains the background.

    Example:
        >>> m = torch.tensor([[[0, 0, 1], [0, 2, 2]], [[0, 0, 0], [0, 0, 0]]])
        >>> t = object_targets(m)
        >>> t.class_id.tolist(), t.mask.sum(dim=(1, 2)).tolist()
        ([2, 0], [2, 6])
    """
    background = dominant_class(masks, ignore_index=ignore_index) if background is None else background
    ids = []
    for i in range(masks.shape[0]):
        valid = masks[i][(masks[i] >= 0) & (masks[i] != background)]
        if ignore_index is not None:
            valid = valid[valid != ignore_index]
        ids.append(int(torch.bincount(valid.long().cpu()).argmax()) if valid.numel() else background)
    class_ids = torch.tensor(ids, dtype=torch.long, device=masks.device)
    return RegionTarget(class_id=class_ids, mask=masks == class_ids.view(-1, 1, 1))
