"""Class sensitivity: is the map for the predicted class different from the map for another class?

An explanation that draws the same picture whatever class it is asked about is not explaining the
class decision (guided backprop is the known offender). :func:`class_sensitivity` compares, sample by
sample, the map for the predicted class with the map for other classes (:data:`OTHER_CLASSES`), with the
metrics of :mod:`~lightning_introspect.methods.similarity`:

* ``"least"``: the least likely class (smallest logit), the case Adebayo et al. (2018) intend: two classes
  the model tells far apart should get clearly different maps;
* ``"second"``: the runner-up, the hardest case (a similar class may legitimately look at the same parts);
* ``"random"``: a class drawn uniformly among the others from a private generator.

The reference, **the same class under resampling** (``noise``): the map of the predicted class for the
input plus Gaussian noise of standard deviation ``noise`` times the sample's value range (1 % by default),
compared with the map of the clean input. It says how much a map moves when nothing about the class
changes; a method whose maps for very different classes are as similar as that cannot tell classes apart.
(Raw gradients are noisy: on the digits CNN a 1 % perturbation already lowers the Spearman correlation of a
saliency map with itself to about 0.42, while Grad-CAM stays at 1.0.)

Token ids ``(N, T)`` cannot take noise, and their maps are token scores computed at the output of the
embedding layer (:mod:`~lightning_introspect.methods.token_attribution`): there the reference's noise goes
instead, added to each sentence's embedding output (standard deviation ``noise`` times that sentence's
embedding value range) by a forward hook for one extra explanation call, so the same class is explained
for a slightly moved point of the space the scores live in.

Segmentation (``region``: a :class:`~lightning_introspect.methods.targets.RegionTarget` per sample, e.g.
the largest predicted object): every class is explained over the SAME region, so the maps differ only by
the class asked about. The explained class is the region's class; ``"second"`` is another class present in
the sample's predicted mask (the one with the largest logit sum over the region), or, when the prediction
holds no other class, the least likely class over the region; ``"least"`` the class with the smallest
logit sum over the region; ``"random"`` is drawn as for classification.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> res = class_sensitivity(net, torch.randn(2, 1, 2, 2), ["saliency"], metrics=["spearman"])
    >>> sorted(res.classes), sorted(res.similarity["saliency"]), sorted(res.same_class["saliency"])
    (['least', 'pred', 'second'], ['least', 'second'], ['spearman'])
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_introspect._torch.guards import private_generator
from lightning_introspect._torch.hooks import hooks
from lightning_introspect._torch.layers import get_layer
from lightning_introspect.methods.chunks import DEFAULT_MEMORY_BUDGET, explain_in_chunks, explanation_rows
from lightning_introspect.methods.explainers import (
    DEFAULT_METHODS,
    Explainer,
    MethodSpec,
    as_explainer,
    model_input,
    work_mode,
)
from lightning_introspect.methods.similarity import METRICS, check_metrics, map_similarities, mean_and_std
from lightning_introspect.methods.targets import RegionTarget, model_logits, target_indices
from lightning_introspect.methods.token_attribution import find_embedding, is_token_ids

OTHER_CLASSES: tuple[str, ...] = ("least", "second", "random")
DEFAULT_OTHERS: tuple[str, ...] = ("least", "second")
DEFAULT_NOISE = 0.01
SAME = "same"
"""The key of the same-class resampling reference in :attr:`ClassSensitivity.samples`."""


@dataclass
class ClassSensitivity:
    """Similarity of the map for the predicted class to the map for another class.

    Attributes:
        similarity: ``{method: {other: {metric: mean similarity}}}``, ``other`` in :data:`OTHER_CLASSES`.
        similarity_std: the same shape, standard deviation over the samples.
        classes: ``{"pred" | other: class id per sample}``.
        same_class: ``{method: {metric: mean similarity}}`` of the predicted class's map to its map under
            input noise (the reference; empty when ``noise`` is ``None``).
        noise: the noise level of that reference (a fraction of each sample's value range).
        maps: ``{method: {"pred" | other: maps}}`` for the first ``keep_maps`` samples (not serialised).
        samples: ``{method: {other | "same": {metric: (N,)}}}`` every sample's similarity (not serialised).
    """

    similarity: dict[str, dict[str, dict[str, float]]]
    similarity_std: dict[str, dict[str, dict[str, float]]]
    classes: dict[str, list[int]]
    maps: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    same_class: dict[str, dict[str, float]] = field(default_factory=dict)
    noise: float | None = None
    samples: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only (the maps and per-sample values left out)."""
        return {
            "similarity": copy.deepcopy(self.similarity),
            "similarity_std": copy.deepcopy(self.similarity_std),
            "classes": copy.deepcopy(self.classes),
            "same_class": copy.deepcopy(self.same_class),
            "noise": self.noise,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassSensitivity:
        """Rebuild from :meth:`to_dict` (without the maps)."""
        noise = data.get("noise")
        return cls(
            copy.deepcopy(dict(data["similarity"])),
            copy.deepcopy(dict(data.get("similarity_std", {}))),
            copy.deepcopy(dict(data.get("classes", {}))),
            same_class=copy.deepcopy(dict(data.get("same_class", {}))),
            noise=None if noise is None else float(noise),
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
    ranked = scores.argsort(dim=1, descending=True, stable=True)
    out = {"pred": ranked[:, 0]}
    for other in others:
        if other == "second":
            out[other] = ranked[:, 1]
        elif other == "least":
            out[other] = ranked[:, -1]
        else:
            out[other] = _random_other(ranked[:, 0], num_classes, seed)
    return out


def region_classes(output: torch.Tensor, region: RegionTarget, others: Sequence[str] = OTHER_CLASSES, seed: int = 0) -> dict[str, torch.Tensor]:
    """The classes compared over each sample's region of a dense output ``(N, C, H, W)``: ``"pred"`` the
    region's own class, ``"second"`` another class present in the predicted mask (largest logit sum over
    the region; without one, the least likely class over the region), ``"least"`` the least likely class
    over the region, ``"random"`` uniform among the others.

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
        if other == "second":
            out[other] = torch.where(present.any(1), runner_up, least_likely)
        elif other == "least":
            out[other] = least_likely
        else:
            out[other] = _random_other(explained, num_classes, seed)
    return out


def class_sensitivity(
    model: nn.Module,
    inputs: torch.Tensor,
    methods: MethodSpec | Explainer = DEFAULT_METHODS,
    *,
    others: Sequence[str] = DEFAULT_OTHERS,
    seed: int = 0,
    layer: str | None = "auto",
    metrics: Sequence[str] = METRICS,
    keep_maps: int = 1,
    region: RegionTarget | None = None,
    noise: float | None = DEFAULT_NOISE,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> ClassSensitivity:
    """Compare the map for each sample's predicted class with the map for other classes.

    The model is only run (eval mode, global RNG forked), never changed.

    Args:
        model: the model.
        inputs: a batch ``(N, ...)``.
        methods: as in :func:`~lightning_introspect.methods.randomization.randomization_curves`.
        others: ``"least"`` is the least likely class (smallest logit), ``"second"`` the runner-up
            (largest other logit; the hardest case), ``"random"`` a class drawn uniformly among the other
            classes with a private generator seeded by ``seed``. For ``(N, C, H, W)`` outputs the class
            scores are summed over the pixels.
        seed: the seed of the random class and of the reference's noise.
        layer: the layer of layer methods (Grad-CAM); ``"auto"`` asks ``attribution.auto_layer``.
        metrics: a subset of :data:`~lightning_introspect.methods.similarity.METRICS`.
        keep_maps: keep the maps of this many samples (for figures).
        region: for a dense output ``(N, C, H, W)``, the explained region of each sample (its class is
            the explained class, ``classes["pred"]``); every class is then explained over this same region
            (:func:`region_classes` picks the others). ``None``: classes over the whole output.
        noise: the same-class reference's noise (standard deviation as a fraction of each sample's value
            range, drawn from a private generator seeded by ``seed``); ``None`` skips the reference. Cost:
            one more copy of the batch in the one attribution call. Token ids: the noise is added to the
            embedding output (module docstring), in one more attribution call.
        memory_budget: bytes one chunk of the stacked copies may hold while it is explained
            (:func:`~lightning_introspect.methods.chunks.explanation_rows`); small inputs fit in one chunk.

    Returns:
        The :class:`ClassSensitivity`.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> grad = lambda m, x, t, layer=None: torch.autograd.grad(
        ...     m(x.requires_grad_()).gather(1, t.view(-1, 1)).sum(), x)[0]
        >>> res = class_sensitivity(net, torch.randn(2, 1, 2, 2), {"grad": grad}, metrics=["spearman"])
        >>> sorted(res.similarity["grad"])
        ['least', 'second']
    """
    check_metrics(metrics)
    if noise is not None and (isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 < float(noise) <= 1.0):
        raise ValueError(f"Expected `noise` to be None or a number in (0, 1], but got {noise!r}.")
    if isinstance(others, str) or not others or any(o not in OTHER_CLASSES for o in others):
        raise ValueError(f"Expected `others` to be a non-empty list of {', '.join(repr(o) for o in OTHER_CLASSES)}, but got {others!r}.")
    explainer = as_explainer(methods)
    with work_mode(model):
        x = model_input(model, inputs)
        with torch.no_grad():
            out = model_logits(model(x)).detach()
        if region is not None:
            classes = region_classes(out, region, list(others), seed)
        else:
            classes = _other_classes(out.flatten(2).sum(-1) if out.ndim > 2 else out, list(others), seed)
        layer = explainer.resolve_layer(model, x[:1], layer)
        # Every class in one batch: the inputs repeated once per class key, each copy with its class ids
        # (the maps are per sample, so this is the same as one call per class, with fewer forward passes);
        # explained in chunks sized to the memory budget, since the stack is several times the batch.
        keys = list(classes)
        copies = [x] * len(keys)
        tokens = is_token_ids(x)
        resample = noise is not None and (x.is_floating_point() or tokens)
        if resample and not tokens:  # the same class again, for the input under a small resampling noise
            keys.append(SAME)
            classes_ids = [classes[k] for k in keys[:-1]] + [classes["pred"]]
            copies.append(_noisy(x, float(noise or 0.0), seed))
        else:
            classes_ids = [classes[k] for k in keys]
        n = x.shape[0]
        rows = explanation_rows(model, x, memory_budget)
        # class keys explained together: all of them when their copies fit in one chunk (one call, as for
        # small inputs); else a few at a time, each measured against the predicted class's maps at once and
        # then dropped (except the first `keep_maps`), so that only two keys' maps are held at a time
        per_call = max(1, rows // max(1, n))
        measured: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # {other: {method: {metric: (N,)}}}
        maps: dict[str, dict[str, torch.Tensor]] = {}
        for start in range(0, len(keys), per_call):
            group = keys[start : start + per_call]
            tiled = torch.cat(copies[start : start + per_call])
            ids = torch.cat(classes_ids[start : start + per_call])
            tiled_target = ids if region is None else _tiled_region(region, ids, n, len(group))
            joint = explain_in_chunks(explainer, model, tiled, tiled_target, layer, rows=rows)
            del tiled
            maps.update({key: {name: joint[name][i * n : (i + 1) * n] for name in explainer.names} for i, key in enumerate(group)})
            if per_call < len(keys):
                done = [key for key in group if key != "pred"]
                measured.update(_measure(maps, explainer.names, done, metrics))
                for key in done:
                    maps[key] = {name: m[:keep_maps].clone() for name, m in maps[key].items()}
        if resample and tokens:  # the same class with the noise on the embedding output (ids take none)
            keys.append(SAME)
            embedding = find_embedding(model, x, None if layer in (None, "auto") else layer)
            with _embedding_noise(model, embedding, x, float(noise or 0.0), seed):
                maps[SAME] = explainer(model, x, classes["pred"], layer)
    similarity: dict[str, dict[str, dict[str, float]]] = {m: {} for m in explainer.names}
    spread: dict[str, dict[str, dict[str, float]]] = {m: {} for m in explainer.names}
    same_class: dict[str, dict[str, float]] = {}
    samples: dict[str, dict[str, dict[str, torch.Tensor]]] = {m: {} for m in explainer.names}
    kept: dict[str, dict[str, torch.Tensor]] = {}
    compared = list(others) + ([SAME] if resample else [])
    measured.update(_measure(maps, explainer.names, [other for other in compared if other not in measured], metrics))
    for name in explainer.names:
        for other in compared:
            values = measured[other][name]
            samples[name][other] = values
            if other == SAME:
                same_class[name] = mean_and_std(values)[0]
            else:
                similarity[name][other], spread[name][other] = mean_and_std(values)
        if keep_maps:
            kept[name] = {key: maps[key][name][:keep_maps].clone() for key in classes}
    return ClassSensitivity(
        similarity, spread, {k: v.cpu().tolist() for k, v in classes.items()}, kept, same_class,
        float(noise) if resample and noise is not None else None, samples,
    )


def _measure(
    maps: Mapping[str, Mapping[str, torch.Tensor]], names: Sequence[str], others: Sequence[str], metrics: Sequence[str]
) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """``{other: {method: {metric: (N,)}}}``: each method's maps for ``others`` against its maps for the
    predicted class, in one batched :func:`map_similarities` call."""
    pairs = [(maps["pred"][name], maps[other][name]) for name in names for other in others]
    sims = iter(map_similarities(pairs, metrics)) if pairs else iter(())
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {other: {} for other in others}
    for name in names:
        for other in others:
            out[other][name] = next(sims)
    return out


def _noisy(x: torch.Tensor, level: float, seed: int) -> torch.Tensor:
    """``x`` plus Gaussian noise of standard deviation ``level`` times each sample's value range (private generator)."""
    gen = private_generator(seed, device=x.device)
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, *([1] * (x.ndim - 1)))
    eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32).to(x.dtype)
    return x + level * span * eps


@contextlib.contextmanager
def _embedding_noise(model: nn.Module, layer: str, ids: torch.Tensor, level: float, seed: int) -> Iterator[None]:
    """While active, the output of the embedding layer ``layer`` gets Gaussian noise of standard deviation
    ``level`` times each sentence's embedding value range: one draw from a private generator, measured on
    one forward pass of ``ids`` (no gradient) and added at every later call, per copy for a pass over ``k``
    stacked copies of the sentences (as integrated gradients runs its path)."""
    module = get_layer(model, layer, argument="embedding_layer")
    n = ids.shape[0]
    seen: list[torch.Tensor] = []

    def capture(_module: nn.Module, _args: Any, output: Any) -> None:
        if not seen and isinstance(output, torch.Tensor):
            seen.append(output.detach().float())

    with hooks() as handles, torch.no_grad():
        handles.append(module.register_forward_hook(capture))
        model(ids)
    if not seen or seen[0].ndim != 3 or seen[0].shape[0] != n:
        raise ValueError(f"Expected the embedding layer {layer!r} to output one tensor (N, T, D) for the sentences.")
    first = seen[0]
    span = (first.flatten(1).amax(1) - first.flatten(1).amin(1)).view(-1, 1, 1)
    eps = torch.randn(first.shape, generator=private_generator(seed, device=first.device), device=first.device, dtype=torch.float32)
    noise = level * span * eps

    def add(_module: nn.Module, _args: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor) or output.shape[1:] != noise.shape[1:] or output.shape[0] % n:
            return None
        return output + noise.repeat(output.shape[0] // n, 1, 1).to(output.device, output.dtype)

    with hooks() as handles:
        handles.append(module.register_forward_hook(add))
        yield


def _tiled_region(region: RegionTarget, ids: torch.Tensor, n: int, copies: int) -> RegionTarget:
    """``region``'s mask for ``copies`` stacked copies of the batch, with the class ids of every copy."""
    mask = torch.as_tensor(region.mask)
    if mask.ndim == 3 and mask.shape[0] == n and n > 1:
        mask = mask.repeat(copies, 1, 1)
    return RegionTarget(class_id=ids, mask=mask)


__all__ = ["DEFAULT_NOISE", "DEFAULT_OTHERS", "OTHER_CLASSES", "SAME", "ClassSensitivity", "class_sensitivity", "region_classes"]
