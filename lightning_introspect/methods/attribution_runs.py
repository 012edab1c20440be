"""One attribution run over fixed samples, as numbers: which classes, many targets in few passes, NaN / Inf.

The :class:`~lightning_introspect.callbacks.attributions.Attributions` callback explains the same samples
for their predicted class and for a list of classes at every run; these helpers hold that arithmetic
(no Lightning, no logging): usable in a notebook on any ``explain(inputs, targets) -> {method: maps}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

Explain = Callable[[torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]]


def class_probabilities(out: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities ``(N, C)`` of logits: per sample for ``(N, C)``, and for dense outputs
    ``(N, C, ...)`` (segmentation) the mean per-pixel probability of each class.

    Example:
        >>> class_probabilities(torch.zeros(2, 4)).tolist()[0]
        [0.25, 0.25, 0.25, 0.25]
        >>> class_probabilities(torch.zeros(1, 2, 3, 3)).shape
        torch.Size([1, 2])
    """
    probs = F.softmax(out, dim=1)
    return probs if out.ndim == 2 else probs.flatten(2).mean(-1)


def explained_classes(targets: str | Sequence[int], num_classes: int, max_classes: int) -> list[int]:
    """The classes that get a grid of their own: every class for ``"all"`` (the first ``max_classes``),
    the listed ones for a list, none for ``"pred"`` / ``"true"``.

    Example:
        >>> explained_classes("all", 40, 32)[-1], explained_classes([3, 8], 10, 32), explained_classes("pred", 10, 32)
        (31, [3, 8], [])
    """
    if targets == "all":
        return list(range(min(num_classes, max_classes)))
    if isinstance(targets, str):
        return []
    return list(targets)


def attribute_targets(explain: Explain, x: torch.Tensor, targets: Sequence[torch.Tensor], *, max_batch: int) -> dict[str, torch.Tensor]:
    """Explain the samples ``x`` for each of several targets in as few passes as possible.

    The samples are repeated once per target and explained as one batch of at most ``max_batch``
    items (at least one target per pass); in eval mode the samples are independent, so the maps equal
    one pass per target.

    Args:
        explain: ``(inputs, targets) -> {method: maps}`` with one map per input.
        x: the samples ``(N, ...)``.
        targets: one ``(N,)`` class-id tensor per target.
        max_batch: the most samples x targets explained in one pass.

    Returns:
        ``{method: maps}`` on CPU, ``(len(targets) * N, ...)`` in target order (``.split(N)`` gives one
        block per target); a method that did not give maps for every target is left out.

    Example:
        >>> fake = lambda inputs, t: {"double": 2 * inputs * t.view(-1, 1)}
        >>> got = attribute_targets(fake, torch.ones(2, 1), [torch.tensor([1, 1]), torch.tensor([3, 3])], max_batch=2)
        >>> got["double"].flatten().tolist()
        [2.0, 2.0, 6.0, 6.0]
    """
    n = x.shape[0]
    per_chunk = max(1, max_batch // n)
    pieces: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(targets), per_chunk):
        chunk = targets[i : i + per_chunk]
        got = explain(x.repeat(len(chunk), *([1] * (x.ndim - 1))), torch.cat(list(chunk)))
        for m, v in got.items():
            pieces.setdefault(m, []).append(v.detach().cpu())
    return {m: torch.cat(p) for m, p in pieces.items() if sum(q.shape[0] for q in p) == n * len(targets)}


def nonfinite_grids(probs: torch.Tensor, flat: Mapping[str, torch.Tensor], class_labels: Sequence[str]) -> list[str]:
    """What holds NaN / Inf: one ``isfinite`` check on the probabilities and one per method on its maps.

    Args:
        probs: the model's class probabilities on the ``N`` samples.
        flat: ``{method: maps}`` as :func:`attribute_targets` returns them: the main target's ``N`` maps
            first, then ``N`` per class.
        class_labels: the label of each class block after the main one (for ``class_<label>``).

    Returns:
        ``"outputs"`` when the probabilities are non-finite; ``<method>`` / ``<method>/class_<label>`` for
        non-finite maps (a method's per-target parts are looked at only when its whole batch is not
        finite).

    Example:
        >>> maps = torch.tensor([[1.0], [1.0], [float("nan")], [1.0]])
        >>> nonfinite_grids(torch.ones(2, 3), {"saliency": maps}, ["cat"])
        ['saliency/class_cat']
    """
    n = probs.shape[0]
    broken = [] if bool(torch.isfinite(probs).all()) else ["outputs"]
    for m, maps in flat.items():
        if bool(torch.isfinite(maps).all()):
            continue
        parts = maps.split(n)
        if not bool(torch.isfinite(parts[0]).all()):
            broken.append(m)
        broken += [f"{m}/class_{label}" for label, v in zip(class_labels, parts[1:]) if not bool(torch.isfinite(v).all())]
    return broken


def skipped_grids(broken: Sequence[str], methods: Sequence[str]) -> list[str]:
    """The grids not logged: the non-finite ones, and every main grid when the outputs are non-finite
    (its captions and ``"pred"`` targets rest on them).

    Example:
        >>> skipped_grids(["outputs", "lrp/class_3"], ["saliency", "lrp"])
        ['saliency', 'lrp', 'lrp/class_3']
    """
    return [*(m for m in methods if "outputs" in broken and m not in broken), *(b for b in broken if b != "outputs")]


__all__ = ["Explain", "attribute_targets", "class_probabilities", "explained_classes", "nonfinite_grids", "skipped_grids"]
