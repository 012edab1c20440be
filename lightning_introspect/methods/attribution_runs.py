"""One attribution run over fixed samples, as numbers: which classes, many targets in few passes, NaN / Inf,
for segmentation which (sample, class, region) triples are explained and how well the maps localise, and
how faithful the maps are (deletion / insertion areas next to a random and an edge-detector map).

The :class:`~lightning_introspect.callbacks.attributions.Attributions` callback explains the same samples
for their predicted class and for a list of classes at every run; these helpers hold that arithmetic
(no Lightning, no logging): usable in a notebook on any ``explain(inputs, targets) -> {method: maps}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lightning_introspect._torch.guards import private_generator
from lightning_introspect.methods import localization
from lightning_introspect.methods.chunks import chunk_slices
from lightning_introspect.methods.faithfulness import edge_map, faithfulness_curves, random_map
from lightning_introspect.methods.targets import RegionTarget

Explain = Callable[[torch.Tensor, Any], Mapping[str, torch.Tensor]]
#: where the explained region of a class comes from: the model's predicted mask or the true mask
REGION_SOURCES = ("pred", "true")


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
    items (at least one target per pass; when ``max_batch`` is below the number of samples, each target
    in consecutive chunks of ``max_batch`` samples); in eval mode the samples are independent, so the maps
    equal one pass per target.

    Args:
        explain: ``(inputs, targets) -> {method: maps}`` with one map per input.
        x: the samples ``(N, ...)``.
        targets: one ``(N,)`` class-id tensor per target.
        max_batch: the most samples x targets explained in one pass (e.g.
            :func:`~lightning_introspect.methods.chunks.explanation_rows` for a memory budget).

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
    pieces: dict[str, list[torch.Tensor]] = {}

    def keep(got: Mapping[str, torch.Tensor]) -> None:
        for m, v in got.items():
            pieces.setdefault(m, []).append(v.detach().cpu())

    if max_batch < n:  # fewer rows than samples per pass (large inputs): each target in chunks of samples
        for t in targets:
            for part in chunk_slices(n, max_batch):
                keep(explain(x[part], t[part]))
    else:
        per_chunk = max(1, max_batch // n)
        for i in range(0, len(targets), per_chunk):
            chunk = targets[i : i + per_chunk]
            keep(explain(x.repeat(len(chunk), *([1] * (x.ndim - 1))), torch.cat(list(chunk))))
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


# ----------------------------------------------------------------------------- segmentation regions
@dataclass(frozen=True)
class RegionPairs:
    """The ``P`` explanations of a segmentation run: sample ``sample[p]`` explained for class ``class_id[p]``
    over the bool region ``masks[p]`` ``(H, W)``, taken from the ``source`` masks (``"pred"`` / ``"true"``)."""

    sample: torch.Tensor
    class_id: torch.Tensor
    masks: torch.Tensor
    source: str

    def __len__(self) -> int:
        return int(self.sample.numel())

    def target(self, start: int = 0, stop: int | None = None) -> RegionTarget:
        """The :class:`RegionTarget` of pairs ``start:stop`` (one class and region per explained input)."""
        return RegionTarget(class_id=self.class_id[start:stop], mask=self.masks[start:stop])


def region_pairs(
    masks: torch.Tensor,
    classes: str | Sequence[int],
    *,
    background: int | None,
    source: str = "pred",
    ignore_index: int | None = None,
    max_per_sample: int = 8,
    min_pixels: int = 1,
) -> RegionPairs:
    """Which class regions of which samples to explain, from integer ``masks`` ``(N, H, W)`` (predicted or true).

    Args:
        masks: the masks the regions are cut from.
        classes: ``"present"`` -- every class present in a sample but ``background`` (a sample showing only
            the background explains the background, so no sample is left without a map); ``"all"`` -- every
            class present, the background too; or a list of class ids -- those present in each sample.
        background: the class the objects stand on (``None``: none is left out).
        source: ``"pred"`` or ``"true"``, recorded with the pairs.
        ignore_index: a label value that is never a region.
        max_per_sample: the most regions per sample (the largest first; order within a sample by class id).
        min_pixels: smaller regions (specks of a few stray pixels) are not explained.

    Returns:
        :class:`RegionPairs` in sample order.

    Example:
        >>> m = torch.tensor([[[0, 1], [1, 2]], [[0, 0], [0, 0]]])
        >>> pairs = region_pairs(m, "present", background=0)
        >>> pairs.sample.tolist(), pairs.class_id.tolist(), pairs.masks.sum(dim=(1, 2)).tolist()
        ([0, 0, 1], [1, 2, 0], [2, 1, 4])
    """
    if isinstance(classes, str) and classes not in ("present", "all"):
        raise ValueError(f"Expected `classes` to be 'present', 'all' or a list of class ids, but got {classes!r}.")
    keep = None if isinstance(classes, str) else {int(c) for c in classes}
    samples: list[int] = []
    ids: list[int] = []
    regions: list[torch.Tensor] = []
    for i in range(masks.shape[0]):
        counts = torch.bincount(masks[i][masks[i] >= 0].flatten().long().cpu()) if masks[i].numel() else torch.zeros(0)
        present = [c for c in range(counts.numel()) if counts[c] >= max(1, min_pixels) and c != ignore_index]
        if keep is not None:
            chosen = [c for c in present if c in keep]
        elif classes == "present":
            chosen = [c for c in present if c != background] or [c for c in present if c == background]
        else:
            chosen = present
        chosen = sorted(sorted(chosen, key=lambda c: -int(counts[c]))[:max_per_sample])
        for c in chosen:
            samples.append(i)
            ids.append(c)
            regions.append(masks[i] == c)
    h, w = masks.shape[-2:]
    return RegionPairs(
        sample=torch.tensor(samples, dtype=torch.long),
        class_id=torch.tensor(ids, dtype=torch.long),
        masks=torch.stack(regions).cpu() if regions else torch.zeros(0, h, w, dtype=torch.bool),
        source=source,
    )


def attribute_pairs(explain: Explain, x: torch.Tensor, pairs: RegionPairs, *, max_batch: int) -> dict[str, torch.Tensor]:
    """Explain every pair of ``pairs`` (input ``x[sample]`` for its class over its region) in batches of
    at most ``max_batch``; ``{method: maps (P, ...)}`` on CPU, in pair order (a method that did not give a
    map for every pair is left out).

    Example:
        >>> fake = lambda inputs, t: {"region_px": t.mask.flatten(1).sum(1, keepdim=True).float() * inputs}
        >>> pairs = region_pairs(torch.tensor([[[0, 1], [1, 1]]]), "all", background=None)
        >>> attribute_pairs(fake, torch.ones(1, 1), pairs, max_batch=1)["region_px"].flatten().tolist()
        [1.0, 3.0]
    """
    pieces: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(pairs), max(1, max_batch)):
        stop = min(start + max(1, max_batch), len(pairs))
        target = RegionTarget(pairs.class_id[start:stop].to(x.device), pairs.masks[start:stop].to(x.device))
        got = explain(x[pairs.sample[start:stop]], target)
        for m, v in got.items():
            pieces.setdefault(m, []).append(v.detach().cpu())
    return {m: torch.cat(p) for m, p in pieces.items() if sum(q.shape[0] for q in p) == len(pairs)}


def region_confidence(out: torch.Tensor, pairs: RegionPairs) -> torch.Tensor:
    """Per pair, the model's mean probability of the explained class over the explained region ``(P,)``.

    Example:
        >>> pairs = region_pairs(torch.tensor([[[0, 1], [1, 1]]]), "all", background=None)
        >>> region_confidence(torch.zeros(1, 2, 2, 2), pairs).tolist()
        [0.5, 0.5]
    """
    if not len(pairs):
        return torch.zeros(0)
    probs = F.softmax(out.detach().float().cpu(), dim=1)[pairs.sample, pairs.class_id]  # (P, H, W)
    area = pairs.masks.flatten(1).sum(1).clamp_min(1)
    return (probs * pairs.masks).flatten(1).sum(1) / area


def localization_pairs(
    true_masks: torch.Tensor,
    num_classes: int,
    *,
    background: int | None,
    ignore_index: int | None = None,
    max_per_sample: int = 8,
    min_pixels: int = 1,
) -> RegionPairs:
    """What the localisation scores explain: each object class of each sample's true mask (not the
    background), for the class's *whole-image* score -- its logits summed over every pixel (``masks`` all
    True) -- so that the target itself does not say where the object is.

    A region target would: the gradient of a score summed over a region lies around that region even for
    a randomly initialised network, so a map of it "localises" by construction. The whole-image score
    leaves the method to find where the evidence for the class is; a map that lands on the true mask
    has found the object. :func:`localization_scores` then scores the maps against the class's true mask.

    Example:
        >>> truth = torch.tensor([[[0, 1], [0, 0]], [[0, 0], [0, 0]]])
        >>> pairs = localization_pairs(truth, 3, background=0)
        >>> pairs.sample.tolist(), pairs.class_id.tolist(), bool(pairs.masks.all())
        ([0], [1], True)
    """
    objects = [c for c in range(num_classes) if c != background]
    pairs = region_pairs(true_masks, objects, background=None, source="true", ignore_index=ignore_index,
                         max_per_sample=max_per_sample, min_pixels=min_pixels)
    return RegionPairs(pairs.sample, pairs.class_id, torch.ones_like(pairs.masks), "whole image")


def concat_pairs(first: RegionPairs, second: RegionPairs) -> RegionPairs:
    """Both sets of pairs in one, for one batched :func:`attribute_pairs` (``.source`` of ``first``).

    Example:
        >>> a = region_pairs(torch.tensor([[[0, 1]]]), "all", background=None)
        >>> len(concat_pairs(a, a))
        4
    """
    return RegionPairs(
        torch.cat([first.sample, second.sample]), torch.cat([first.class_id, second.class_id]),
        torch.cat([first.masks, second.masks]), first.source,
    )


def localization_scores(maps: torch.Tensor, pairs: RegionPairs, true_masks: torch.Tensor) -> dict[str, Any]:
    """How well the maps of ``pairs`` point at the true object: the pointing-game hit rate and the share of
    positive attribution inside the true mask of the explained class, with the chance level of both (the
    true mask's area fraction), averaged over the pairs whose class is present in the true mask.

    A pair whose class is absent from the sample's true mask (a false-positive region) has no object to
    point at: it is counted in ``"skipped"`` and left out of the means, never scored as a miss; with no
    pair left the scores are ``None``.

    Args:
        maps: ``(P, H, W)`` or ``(P, C, H, W)`` maps (channels summed), one per pair.
        pairs: the explained pairs.
        true_masks: ``(N, H, W)`` integer masks of the samples.

    Returns:
        ``{"pointing_game", "energy_in_mask", "chance", "pairs", "skipped"}``.

    Example:
        >>> truth = torch.tensor([[[0, 1], [0, 0]]])
        >>> pairs = region_pairs(truth, "all", background=None)
        >>> maps = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 3.0], [1.0, 0.0]]])
        >>> localization_scores(maps, pairs, truth)
        {'pointing_game': 1.0, 'energy_in_mask': 0.875, 'chance': 0.5, 'pairs': 2, 'skipped': 0}
    """
    objects = true_masks.to(pairs.class_id.device)[pairs.sample] == pairs.class_id.view(-1, 1, 1)
    valid = objects.flatten(1).any(1)
    k = int(valid.sum())
    out: dict[str, Any] = {"pointing_game": None, "energy_in_mask": None, "chance": None, "pairs": k, "skipped": len(pairs) - k}
    if k:
        m, o = maps[valid], objects[valid]
        # through the module, so that a benchmark can time the localisation as the callback runs it
        out["pointing_game"] = float(localization.pointing_game(m, o).mean())
        out["energy_in_mask"] = float(localization.energy_in_mask(m, o).mean())
        out["chance"] = float(localization.chance_level(o).mean())
    return out


# ------------------------------------------------------------------------------------- faithfulness
#: the reference maps every method's faithfulness is read against (``edges`` for images only)
FAITHFULNESS_REFERENCES = ("random", "edges")


def faithfulness_scores(
    model: torch.nn.Module,
    x: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    target: torch.Tensor | RegionTarget,
    *,
    steps: int = 20,
    baseline: str = "blur",
    seed: int = 0,
    max_batch: int = 128,
) -> dict[str, dict[str, float]]:
    """The mean deletion and insertion AUC of each method's maps and of two reference maps, ``"random"``
    (:func:`~lightning_introspect.methods.faithfulness.random_map`) and, for images, ``"edges"`` (the Sobel
    edges of the input, :func:`~lightning_introspect.methods.faithfulness.edge_map`), in one batched run
    (:func:`~lightning_introspect.methods.faithfulness.faithfulness_curves`: every map's ties broken by the
    same keys).

    Args:
        model: returns logits (wrap a model with another output first).
        x: the explained inputs, one per map: images ``(N, C, H, W)`` or tabular ``(N, F)``.
        maps: ``{method: maps}`` (finite).
        target: the class id explained in each input ``(N,)``, or a :class:`RegionTarget` (segmentation: the
            class's mean probability over the region is scored).
        steps: steps of each curve.
        baseline: ``"blur"``, ``"mean"`` or ``"zero"``; tabular inputs use ``"mean"`` for ``"blur"``.
        seed: seeds the tie breaks (``seed``) and the random map (``seed + 1``).
        max_batch: the most perturbed inputs in one forward.

    Returns:
        ``{name: {"deletion_auc": float, "insertion_auc": float}}``: the methods in order, then the
        references; ``{}`` without maps. Cost: ``N x (2 + 2 x (steps - 1) x (methods + references))`` perturbed
        inputs, ``max_batch`` per forward.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> x = torch.rand(2, 1, 4, 4)
        >>> scores = faithfulness_scores(net, x, {"saliency": torch.rand(2, 1, 4, 4)}, torch.tensor([0, 2]), steps=4)
        >>> list(scores), sorted(scores["edges"])
        (['saliency', 'random', 'edges'], ['deletion_auc', 'insertion_auc'])
    """
    if not maps:
        return {}
    references = {"random": random_map(x, private_generator(seed + 1))}
    if x.ndim == 4:
        references["edges"] = edge_map(x)
    if x.ndim == 2 and baseline == "blur":  # features have no neighbours to blur with
        baseline = "mean"
    curves = faithfulness_curves(
        model, x, {**maps, **references}, target, steps=steps, baseline=baseline, generator=private_generator(seed), max_batch=max_batch,
    )
    return {
        name: {"deletion_auc": float(c["deletion"].auc.mean()), "insertion_auc": float(c["insertion"].auc.mean())}
        for name, c in curves.items()
    }


__all__ = [
    "FAITHFULNESS_REFERENCES",
    "REGION_SOURCES",
    "Explain",
    "RegionPairs",
    "attribute_pairs",
    "attribute_targets",
    "class_probabilities",
    "concat_pairs",
    "explained_classes",
    "faithfulness_scores",
    "localization_pairs",
    "localization_scores",
    "nonfinite_grids",
    "region_confidence",
    "region_pairs",
    "skipped_grids",
]
