"""Class sensitivity: is the map for the predicted class different from the map for another class?

An explanation that draws the same picture whatever class it is asked about is not explaining the
class decision (guided backprop is the known offender). :func:`class_sensitivity` compares, sample by
sample, the map for the predicted class with the map for the runner-up class and / or a random other
class, with the metrics of :mod:`~lightning_introspect.methods.similarity`.

Segmentation (``region``: a :class:`~lightning_introspect.methods.targets.RegionTarget` per sample, e.g.
the largest predicted object): every class is explained over the SAME region, so the maps differ only by
the class asked about. The explained class is the region's class; ``"second"`` is another class present in
the sample's predicted mask (the one with the largest logit sum over the region), or, when the prediction
holds no other class, the least likely class over the region; ``"random"`` is drawn as for classification.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> res = class_sensitivity(net, torch.randn(2, 1, 2, 2), ["saliency"], metrics=["spearman"])
    >>> sorted(res.classes), sorted(res.similarity["saliency"])
    (['pred', 'random', 'second'], ['random', 'second'])
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_introspect._torch.guards import private_generator
from lightning_introspect.methods.explainers import (
    DEFAULT_METHODS,
    Explainer,
    MethodSpec,
    as_explainer,
    model_input,
    work_mode,
)
from lightning_introspect.methods.similarity import METRICS, check_metrics, map_similarities, mean_and_std
from lightning_introspect.methods.targets import RegionTarget, target_indices

OTHER_CLASSES: tuple[str, ...] = ("second", "random")


@dataclass
class ClassSensitivity:
    """Similarity of the map for the predicted class to the map for another class.

    Attributes:
        similarity: ``{method: {other: {metric: mean similarity}}}``, ``other`` in :data:`OTHER_CLASSES`.
        similarity_std: the same shape, standard deviation over the samples.
        classes: ``{"pred" | other: class id per sample}``.
        maps: ``{method: {"pred" | other: maps}}`` for the first ``keep_maps`` samples (not serialised).
    """

    similarity: dict[str, dict[str, dict[str, float]]]
    similarity_std: dict[str, dict[str, dict[str, float]]]
    classes: dict[str, list[int]]
    maps: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only (the maps left out)."""
        return {
            "similarity": copy.deepcopy(self.similarity),
            "similarity_std": copy.deepcopy(self.similarity_std),
            "classes": copy.deepcopy(self.classes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassSensitivity:
        """Rebuild from :meth:`to_dict` (without the maps)."""
        return cls(
            copy.deepcopy(dict(data["similarity"])),
            copy.deepcopy(dict(data.get("similarity_std", {}))),
            copy.deepcopy(dict(data.get("classes", {}))),
        )


def _random_other(explained: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """Uniform among the classes other than ``explained``, from a private generator."""
    draw = torch.randint(0, num_classes - 1, (explained.shape[0],), generator=private_generator(seed))
    return (draw + (draw >= explained.cpu()).long()).to(explained.device)


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(f"Class sensitivity needs a model with at least 2 classes, but the output has {num_classes}.")


def _other_classes(scores: torch.Tensor, others: Sequence[str], seed: int) -> dict[str, torch.Tensor]:
    num_classes = scores.shape[1]
    _check_num_classes(num_classes)
    ranked = scores.argsort(dim=1, descending=True)
    out = {"pred": ranked[:, 0]}
    for other in others:
        out[other] = ranked[:, 1] if other == "second" else _random_other(ranked[:, 0], num_classes, seed)
    return out


def region_classes(output: torch.Tensor, region: RegionTarget, others: Sequence[str] = OTHER_CLASSES, seed: int = 0) -> dict[str, torch.Tensor]:
    """The classes compared over each sample's region of a dense output ``(N, C, H, W)``: ``"pred"`` the
    region's own class, ``"second"`` another class present in the predicted mask (largest logit sum over
    the region; without one, the least likely class over the region), ``"random"`` uniform among the others.

    Example:
        >>> out = torch.zeros(1, 3, 2, 2); out[0, 1, 0] = 5.0; out[0, 0, 1] = 5.0; out[0, 2] = -1.0
        >>> region = RegionTarget(class_id=[1], mask=out.argmax(1) == 1)
        >>> {k: v.tolist() for k, v in region_classes(out, region, ["second"]).items()}
        {'pred': [1], 'second': [0]}
        >>> everywhere = torch.zeros(1, 3, 2, 2); everywhere[0, 1] = 2.0; everywhere[0, 2] = -1.0
        >>> only = RegionTarget(class_id=[1], mask=torch.ones(1, 2, 2, dtype=torch.bool))
        >>> region_classes(everywhere, only, ["second"])["second"].tolist()  # nothing else predicted: least likely
        [2]
    """
    if output.ndim != 4:
        raise ValueError(f"Expected an (N, C, H, W) output for region class sensitivity, but got {tuple(output.shape)}.")
    n, num_classes = output.shape[:2]
    _check_num_classes(num_classes)
    explained = target_indices(output, region)
    mask = torch.as_tensor(region.mask, device=output.device).to(output.dtype)
    mask = mask.expand(n, *output.shape[-2:]) if mask.ndim == 2 or mask.shape[0] == 1 else mask
    scores = (output * mask.unsqueeze(1)).flatten(2).sum(-1)  # (N, C): each class's logits over the region
    own = torch.nn.functional.one_hot(explained, num_classes).bool()
    present = torch.nn.functional.one_hot(output.argmax(1).flatten(1), num_classes).any(1) & ~own
    big = torch.finfo(scores.dtype).max
    runner_up = scores.masked_fill(~present, -big).argmax(1)
    least_likely = scores.masked_fill(own, big).argmin(1)
    out = {"pred": explained}
    for other in others:
        out[other] = torch.where(present.any(1), runner_up, least_likely) if other == "second" else _random_other(explained, num_classes, seed)
    return out


def class_sensitivity(
    model: nn.Module,
    inputs: torch.Tensor,
    methods: MethodSpec | Explainer = DEFAULT_METHODS,
    *,
    others: Sequence[str] = OTHER_CLASSES,
    seed: int = 0,
    layer: str | None = "auto",
    metrics: Sequence[str] = METRICS,
    keep_maps: int = 1,
    region: RegionTarget | None = None,
) -> ClassSensitivity:
    """Compare the map for each sample's predicted class with the map for other classes.

    The model is only run (eval mode, global RNG forked), never changed.

    Args:
        model: the model.
        inputs: a batch ``(N, ...)``.
        methods: as in :func:`~lightning_introspect.methods.randomization.randomization_curves`.
        others: ``"second"`` is the runner-up class (largest other logit; the hardest case),
            ``"random"`` a class drawn uniformly among the other classes with a private generator
            seeded by ``seed``. For ``(N, C, H, W)`` outputs the class scores are summed over the pixels.
        seed: the seed of the random class.
        layer: the layer of layer methods (Grad-CAM); ``"auto"`` asks ``attribution.auto_layer``.
        metrics: a subset of :data:`~lightning_introspect.methods.similarity.METRICS`.
        keep_maps: keep the maps of this many samples (for figures).
        region: for a dense output ``(N, C, H, W)``, the explained region of each sample (its class is
            the explained class, ``classes["pred"]``); every class is then explained over this same region
            (:func:`region_classes` picks the others). ``None``: classes over the whole output.

    Returns:
        The :class:`ClassSensitivity`.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> grad = lambda m, x, t, layer=None: torch.autograd.grad(
        ...     m(x.requires_grad_()).gather(1, t.view(-1, 1)).sum(), x)[0]
        >>> res = class_sensitivity(net, torch.randn(2, 1, 2, 2), {"grad": grad}, metrics=["spearman"])
        >>> sorted(res.similarity["grad"])
        ['random', 'second']
    """
    check_metrics(metrics)
    if isinstance(others, str) or not others or any(o not in OTHER_CLASSES for o in others):
        raise ValueError(f"Expected `others` to be a non-empty list of {', '.join(repr(o) for o in OTHER_CLASSES)}, but got {others!r}.")
    explainer = as_explainer(methods)
    with work_mode(model):
        x = model_input(model, inputs)
        with torch.no_grad():
            out = model(x).detach()
        if region is not None:
            classes = region_classes(out, region, list(others), seed)
        else:
            classes = _other_classes(out.flatten(2).sum(-1) if out.ndim > 2 else out, list(others), seed)
        layer = explainer.resolve_layer(model, x[:1], layer)
        # Every class in one batch: the inputs repeated once per class key, each copy with its class ids
        # (the maps are per sample, so this is the same as one call per class, with one forward pass).
        keys = list(classes)
        tiled = x.repeat(len(keys), *([1] * (x.ndim - 1)))
        ids = torch.cat([classes[k] for k in keys])
        joint = explainer(model, tiled, ids if region is None else _tiled_region(region, ids, x.shape[0], len(keys)), layer)
        n = x.shape[0]
        maps = {key: {name: joint[name][i * n : (i + 1) * n] for name in explainer.names} for i, key in enumerate(keys)}
    similarity: dict[str, dict[str, dict[str, float]]] = {m: {} for m in explainer.names}
    spread: dict[str, dict[str, dict[str, float]]] = {m: {} for m in explainer.names}
    kept: dict[str, dict[str, torch.Tensor]] = {}
    pairs = [(maps["pred"][name], maps[other][name]) for name in explainer.names for other in others]
    sims = iter(map_similarities(pairs, metrics))
    for name in explainer.names:
        for other in others:
            similarity[name][other], spread[name][other] = mean_and_std(next(sims))
        if keep_maps:
            kept[name] = {key: maps[key][name][:keep_maps].clone() for key in classes}
    return ClassSensitivity(similarity, spread, {k: v.cpu().tolist() for k, v in classes.items()}, kept)


def _tiled_region(region: RegionTarget, ids: torch.Tensor, n: int, copies: int) -> RegionTarget:
    """``region``'s mask for ``copies`` stacked copies of the batch, with the class ids of every copy."""
    mask = torch.as_tensor(region.mask)
    if mask.ndim == 3 and mask.shape[0] == n and n > 1:
        mask = mask.repeat(copies, 1, 1)
    return RegionTarget(class_id=ids, mask=mask)


__all__ = ["OTHER_CLASSES", "ClassSensitivity", "class_sensitivity", "region_classes"]
