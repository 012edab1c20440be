"""Faithfulness of attribution maps: does taking away what a map calls important change the model's output?

* :func:`deletion_curve` (Petsiuk et al. 2018, RISE): remove the pixels (or features) in the order of the
  map, most important first, replacing them by a baseline, and record the target's probability after
  each step. A faithful map makes the probability fall fast: a *low* area under the curve is good.
* :func:`insertion_curve`: start from the baseline and put the pixels back in the same order. A
  faithful map makes the probability rise fast: a *high* area under the curve is good.
* :func:`road` (Rong et al. 2022, "A consistent and efficient evaluation strategy for attribution
  methods"): remove the most (MoRF) or least (LeRF) relevant fraction of the pixels and fill them by
  *noisy linear imputation* (:func:`linear_imputation`), so that what the model sees after the removal
  does not betray which pixels were removed (a blurred or black patch is itself a shape the model reacts
  to); MoRF should fall fast and LeRF stay high.
* :func:`faithfulness_curves`: both curves of several maps of the same inputs in one batched run.
* Reference maps that every score is read against: :func:`random_map` (a map that knows nothing) and
  :func:`edge_map` (the Sobel edges of the input: a map that knows the image but not the model). A
  method that does not beat the edge detector is explaining the image, not the model.

The order comes from the map summed over its channels (as the heat maps show it; signed maps keep their
sign, so positive evidence is removed first -- pass ``maps.abs()`` to order by magnitude), resized
bilinearly to the input's size when it is coarser (Grad-CAM). Ties -- the zeros of a Grad-CAM or of a
saliency map on a black background -- are broken at random by a seeded ``torch.Generator``, so a map that
says nothing about some pixels neither gains nor loses by the pixel order.

The target's *score* is its softmax probability: for a class id (an int, one per sample, or ``"pred"``,
read once on the unperturbed inputs) the class's probability; for a dense output ``(N, C, H, W)`` the
class's mean probability over all pixels, and for a :class:`~lightning_introspect.methods.targets.RegionTarget`
its mean probability over the region; a callable target's own score (it must work row by row).

Inputs are images ``(N, C, H, W)`` (a pixel is removed in all its channels) or tabular ``(N, F)`` (a
feature is removed); other shapes raise ``ValueError``. Every perturbed input of every step and sample is
run in a few batched forwards (``max_batch`` inputs each; fewer for large inputs, as many as a memory budget
holds, :func:`perturbation_rows`: each input is scored on its own, so the chunks change no score), in eval
mode, without gradients, with every module's mode restored and the global RNG untouched (:func:`~lightning_introspect._torch.guards.introspection_mode`);
the only randomness (tie breaking, the random map, ROAD's noise) comes from the generator passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_introspect._torch.guards import introspection_mode, module_device, private_generator
from lightning_introspect.methods.chunks import DEFAULT_MEMORY_BUDGET, activation_bytes, rows_per_chunk
from lightning_introspect.methods.targets import RegionTarget, Target, model_logits, target_indices

__all__ = [
    "BASELINES",
    "FaithfulnessResult",
    "RoadResult",
    "deletion_curve",
    "edge_map",
    "faithfulness_curves",
    "insertion_curve",
    "linear_imputation",
    "perturbation_rows",
    "pixel_scores",
    "random_map",
    "road",
]

#: what a removed pixel / feature is replaced by
BASELINES = ("blur", "mean", "zero")


@dataclass(frozen=True)
class FaithfulnessResult:
    """A deletion or insertion curve per sample.

    Attributes:
        curve: ``(N, steps + 1)`` the target's score after each step (step 0: nothing removed / inserted).
        auc: ``(N,)`` the area under each curve over the removed / inserted fraction 0..1 (trapezoid rule).
        fractions: ``(steps + 1,)`` the fraction of the pixels removed (deletion) or inserted (insertion) at
            each step.
        kind: ``"deletion"`` or ``"insertion"``.
    """

    curve: torch.Tensor
    auc: torch.Tensor
    fractions: torch.Tensor
    kind: str


@dataclass(frozen=True)
class RoadResult:
    """ROAD scores at each removed fraction.

    Attributes:
        fractions: ``(K,)`` the removed fractions of the pixels.
        morf: ``(N, K)`` the target's score with the *most* relevant pixels removed (should fall fast).
        lerf: ``(N, K)`` the target's score with the *least* relevant pixels removed (should stay high).
        morf_hit: ``(N, K)`` whether the model still predicts the target class (1.0 / 0.0; for a dense
            output the fraction of the region's pixels still predicted as the class; NaN for a callable
            target).
        lerf_hit: ``(N, K)`` the same for LeRF.
    """

    fractions: torch.Tensor
    morf: torch.Tensor
    lerf: torch.Tensor
    morf_hit: torch.Tensor
    lerf_hit: torch.Tensor

    @property
    def morf_accuracy(self) -> torch.Tensor:
        """``(K,)`` the share of the samples still predicted as their target at each MoRF fraction."""
        return self.morf_hit.mean(0)

    @property
    def lerf_accuracy(self) -> torch.Tensor:
        """``(K,)`` the share of the samples still predicted as their target at each LeRF fraction."""
        return self.lerf_hit.mean(0)


# ------------------------------------------------------------------------------------------ inputs
def _check_inputs(inputs: object) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor) or inputs.ndim not in (2, 4) or not inputs.is_floating_point():
        what = f"a {inputs.dtype} tensor of shape {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(
            f"Expected `inputs` to be floating images (N, C, H, W) or tabular features (N, F), but got {what}; "
            "removing pixels or features needs one of these layouts."
        )
    if inputs.shape[0] == 0:
        raise ValueError("Expected `inputs` to hold at least one sample, but got an empty batch.")
    return inputs.detach()


def pixel_scores(maps: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The value each pixel (or feature) is ordered by: ``(N, H * W)`` for images, ``(N, F)`` for tabular inputs.

    Image maps ``(N, C, h, w)``, ``(N, 1, h, w)`` or ``(N, h, w)`` are summed over their channels (the heat
    map the callbacks show) and resized bilinearly to the input's ``(H, W)`` when coarser.

    Example:
        >>> maps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[1.0, 0.0], [0.0, 0.0]]]])
        >>> pixel_scores(maps, torch.zeros(1, 2, 2, 2)).tolist()
        [[2.0, 2.0, 3.0, 4.0]]
    """
    inputs = _check_inputs(inputs)
    if not isinstance(maps, torch.Tensor):
        raise ValueError(f"Expected `maps` to be a tensor, but got {type(maps).__name__}.")
    n = inputs.shape[0]
    m = maps.detach().float().cpu()
    if inputs.ndim == 2:
        if m.shape != inputs.shape:
            raise ValueError(f"Expected tabular `maps` of the inputs' shape {tuple(inputs.shape)}, but got {tuple(m.shape)}.")
        flat = m
    else:
        if m.ndim == 3:
            m = m.unsqueeze(1)
        if m.ndim != 4 or m.shape[0] != n:
            raise ValueError(f"Expected `maps` of shape (N, C, H, W) or (N, H, W) with N={n}, but got {tuple(maps.shape)}.")
        m = m.sum(dim=1, keepdim=True)
        if m.shape[-2:] != inputs.shape[-2:]:
            m = F.interpolate(m, size=tuple(inputs.shape[-2:]), mode="bilinear", align_corners=False)
        flat = m.flatten(1)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("Expected finite `maps`, but they hold NaN / Inf: there is no order to remove pixels in.")
    return flat


def _ranks(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``rank[i, p]``: when pixel ``p`` of sample ``i`` comes in the order (0: the highest score). Equal scores
    are ordered by a random permutation drawn from ``generator``."""
    n, p = scores.shape
    perm = torch.rand(n, p, generator=generator, device=generator.device).cpu().argsort(dim=1)
    order = perm.gather(1, scores.gather(1, perm).argsort(dim=1, descending=True, stable=True))
    return torch.empty_like(order).scatter_(1, order, torch.arange(p).expand(n, p).contiguous())


def _baseline(inputs: torch.Tensor, baseline: str | torch.Tensor, blur_sigma: float | None) -> torch.Tensor:
    if isinstance(baseline, torch.Tensor):
        try:
            return baseline.detach().to(inputs.device, inputs.dtype).expand_as(inputs).clone()
        except RuntimeError as err:
            raise ValueError(f"Expected a `baseline` tensor that broadcasts to the inputs' shape {tuple(inputs.shape)}, but got {tuple(baseline.shape)}.") from err
    if baseline not in BASELINES:
        raise ValueError(f"Expected `baseline` to be one of {', '.join(repr(b) for b in BASELINES)} or a tensor, but got {baseline!r}.")
    if baseline == "zero":
        return torch.zeros_like(inputs)
    if baseline == "mean":  # the inputs' mean colour (per channel) / each feature's mean
        dims = (0,) if inputs.ndim == 2 else (0, 2, 3)
        return inputs.mean(dim=dims, keepdim=True).expand_as(inputs).clone()
    if inputs.ndim != 4:
        raise ValueError("Expected `baseline` 'mean' or 'zero' (or a tensor) for tabular inputs (N, F), but got 'blur': features have no neighbours to blur with.")
    from lightning_introspect.methods.image_stats import gaussian_blur

    sigma = max(inputs.shape[-2:]) / 16.0 if blur_sigma is None else float(blur_sigma)
    if not sigma > 0 or math.isinf(sigma):
        raise ValueError(f"Expected `blur_sigma` to be a positive number of pixels or None, but got {blur_sigma!r}.")
    return gaussian_blur(inputs, sigma).to(inputs.dtype)


# ----------------------------------------------------------------------------------------- targets
class _Scorer:
    """The target resolved once on the unperturbed outputs; scores any row of perturbed outputs."""

    def __init__(self, output: torch.Tensor, target: Target) -> None:
        self.fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.mask: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None
        if callable(target) and not isinstance(target, (torch.Tensor, RegionTarget)):
            self.fn = target
            return
        self.ids = target_indices(output, target).cpu()
        if isinstance(target, RegionTarget):
            if output.ndim != 4:
                raise ValueError(f"A RegionTarget in `target` needs an (N, C, H, W) output, but the model gave {tuple(output.shape)}.")
            mask = torch.as_tensor(target.mask).detach().float().cpu()
            n = output.shape[0]
            if mask.shape[-2:] != output.shape[-2:] or mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[0] not in (1, n)):
                raise ValueError(f"Expected the RegionTarget mask of shape (H, W) or (N, H, W) matching the output's {tuple(output.shape[-2:])}, but got {tuple(mask.shape)}.")
            self.mask = mask.expand(n, *output.shape[-2:]).contiguous()

    def __call__(self, out: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(score, hit)`` of the perturbed outputs ``out`` of samples ``rows``."""
        if self.fn is not None:
            scores = self.fn(out)
            if not isinstance(scores, torch.Tensor) or scores.shape != (out.shape[0],):
                raise ValueError(f"Expected the callable `target` to return one score per row, shape ({out.shape[0]},), but got {getattr(scores, 'shape', type(scores))}.")
            return scores.detach().float().cpu(), torch.full((out.shape[0],), float("nan"))
        out = out.detach().float()
        rows = rows.to(out.device)
        ids = cast(torch.Tensor, self.ids).to(out.device)[rows]
        probs = F.softmax(out, dim=1)
        index = ids.view(-1, 1, *([1] * (out.ndim - 2))).expand(-1, 1, *out.shape[2:])
        picked = probs.gather(1, index).squeeze(1)
        hit = (out.argmax(1) == ids.view(-1, *([1] * (out.ndim - 2)))).float()
        if out.ndim == 2:
            return picked.cpu(), hit.cpu()
        weights = (self.mask.to(out.device)[rows] if self.mask is not None else torch.ones_like(picked)).flatten(1)
        area = weights.sum(1).clamp_min(1e-12)
        return ((picked.flatten(1) * weights).sum(1) / area).cpu(), ((hit.flatten(1) * weights).sum(1) / area).cpu()


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model_logits(model(x.to(module_device(model, x.device))))
    if out.ndim < 2:
        raise ValueError(
            f"Expected the model to return logits of shape (N, C, ...), but got {getattr(out, 'shape', type(out).__name__)}; "
            "wrap the model so that it returns the logits."
        )
    return out


def _scores_of(
    model: nn.Module, build: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], items: int, scorer: _Scorer, max_batch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score ``items`` perturbed inputs, ``max_batch`` per forward; ``build(item ids) -> (inputs, sample rows)``."""
    scores, hits = [], []
    for start in range(0, items, max_batch):
        x, rows = build(torch.arange(start, min(start + max_batch, items)))
        s, h = scorer(_forward(model, x), rows)
        scores.append(s)
        hits.append(h)
    return (torch.cat(scores), torch.cat(hits)) if scores else (torch.zeros(0), torch.zeros(0))


def perturbation_rows(model: nn.Module, inputs: torch.Tensor, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Perturbed inputs scored together within ``memory_budget`` bytes: per input, one forward pass's
    activations (:func:`~lightning_introspect.methods.chunks.activation_bytes`, measured on ``inputs[:1]``) and
    what building it holds besides: the sample and its baseline gathered, the perturbed copy, and the row of
    the order (int32 per pixel) with its mask.

    Example:
        >>> perturbation_rows(nn.Flatten(), torch.zeros(3, 1, 4, 4), memory_budget=1000)  # 64 + 3 x 64 + 16 x 5 bytes a row
        2
    """
    row = inputs[:1]
    pixels = row[0].numel() if row.ndim == 2 else row[0, 0].numel()
    own = 3 * row.numel() * row.element_size() + pixels * (4 + 1)
    return rows_per_chunk(activation_bytes(model, row) + own, memory_budget)


def _check_positive(value: object, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{argument}` to be a positive int, but got {value!r}.")
    return value


# ------------------------------------------------------------------------------ deletion / insertion
def faithfulness_curves(
    model: nn.Module,
    inputs: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    target: Target = "pred",
    *,
    steps: int = 20,
    baseline: str | torch.Tensor = "blur",
    blur_sigma: float | None = None,
    generator: torch.Generator | None = None,
    max_batch: int = 128,
    kinds: Sequence[str] = ("deletion", "insertion"),
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
) -> dict[str, dict[str, FaithfulnessResult]]:
    """The deletion and / or insertion curves of several maps of the same inputs, in one batched run.

    Every map's ties are broken by the same random keys (the generator's state is reset to where it was
    before each map's order is drawn), so each map gets the curves that :func:`deletion_curve` /
    :func:`insertion_curve` give it with a generator in that state, and no map gains from a luckier draw.
    The perturbed inputs of all maps, kinds, samples and steps go through the model ``max_batch`` at a time;
    the curves' ends (the inputs and the baseline) are the same for every map and run once: ``N x (2 + (steps - 1)
    x kinds x maps)`` inputs in all.

    Args:
        model: the classifier or segmenter, as in :func:`deletion_curve`.
        inputs: images ``(N, C, H, W)`` or tabular ``(N, F)``.
        maps: ``{name: maps}``, each one map per input (see :func:`pixel_scores`).
        target: as in :func:`deletion_curve`.
        steps: the number of steps (each curve has ``steps + 1`` points).
        baseline: ``"blur"``, ``"mean"``, ``"zero"`` or a tensor, as in :func:`deletion_curve`.
        blur_sigma: the blur's standard deviation in pixels (``None``: ``max(H, W) / 16``).
        generator: breaks ties in the orders (``None``: a private generator seeded with 0).
        max_batch: the most perturbed inputs in one forward.
        kinds: ``"deletion"`` and / or ``"insertion"``.
        memory_budget: bytes one forward's perturbed inputs may hold (:func:`perturbation_rows`; large
            images run fewer than ``max_batch`` at a time, with the same scores); ``None``: ``max_batch``.

    Returns:
        ``{name: {kind: FaithfulnessResult}}`` (on CPU).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> x = torch.rand(2, 1, 4, 4)
        >>> got = faithfulness_curves(net, x, {"a": torch.rand(2, 1, 4, 4), "b": torch.rand(2, 4, 4)}, steps=4)
        >>> sorted(got), got["a"]["deletion"].curve.shape, got["b"]["insertion"].auc.shape
        (['a', 'b'], torch.Size([2, 5]), torch.Size([2]))
    """
    inputs = _check_inputs(inputs)
    steps = _check_positive(steps, "steps")
    max_batch = _check_positive(max_batch, "max_batch")
    kinds = list(kinds)
    if not kinds or any(k not in ("deletion", "insertion") for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"Expected `kinds` to name 'deletion' and / or 'insertion' (each once), but got {kinds!r}.")
    if not isinstance(maps, Mapping) or not maps:
        raise ValueError(f"Expected `maps` to be a non-empty dict {{name: maps}}, but got {type(maps).__name__}.")
    scores = {name: pixel_scores(m, inputs) for name, m in maps.items()}
    n, p = inputs.shape[0], next(iter(scores.values())).shape[1]
    generator = private_generator(0) if generator is None else generator
    state = generator.get_state()
    ranks = []
    rank_dtype = torch.int32 if p < 2**31 else torch.int64  # only compared with the counts: half the memory of int64
    for s in scores.values():
        generator.set_state(state)
        ranks.append(_ranks(s, generator).to(rank_dtype))
    names = list(scores)
    del scores  # the orders are drawn: only the ranks are needed while the perturbed inputs run
    fractions = torch.linspace(0.0, 1.0, steps + 1)
    counts = torch.tensor([round(k * p / steps) for k in range(steps + 1)])
    inner = steps - 1  # steps 1 .. steps-1 depend on the map; the ends (input, baseline) are shared by all maps
    deleting = torch.tensor([k == "deletion" for k in kinds])
    x = inputs.to(module_device(model, inputs.device))
    if memory_budget is not None:  # each perturbed input scores alone: any chunking gives the same numbers
        max_batch = min(max_batch, perturbation_rows(model, x, memory_budget))
    with introspection_mode(model, grad=False):
        base = _baseline(x, baseline, blur_sigma)
        out = _forward(model, x)
        scorer = _Scorer(out, target)
        on_input = scorer(out, torch.arange(n))[0]
        on_baseline = _scores_of(model, lambda ids: (base[ids.to(x.device)], ids), n, scorer, max_batch)[0]
        rank_d = torch.stack(ranks).to(x.device)  # (maps, N, P)
        del ranks
        counts_d, deleting_d = counts.to(x.device), deleting.to(x.device)

        def build(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            ids = ids.to(x.device)
            curve, k = ids // inner, ids % inner + 1
            rows, kind, which = curve % n, (curve // n) % len(kinds), curve // (n * len(kinds))
            first = rank_d[which, rows] < counts_d[k].unsqueeze(1)  # (B, P): the first count[k] pixels of the order
            first = first.view(-1, 1, *x.shape[2:]) if x.ndim == 4 else first
            # deletion: those pixels replaced by the baseline; insertion: only those pixels shown, on the baseline
            show_input = torch.where(deleting_d[kind].view(-1, *([1] * (x.ndim - 1))), ~first, first)
            return torch.where(show_input, x[rows], base[rows]), rows.cpu()

        flat, _ = _scores_of(model, build, n * inner * len(kinds) * len(names), scorer, max_batch)
    middle = flat.view(len(names), len(kinds), n, inner)
    results: dict[str, dict[str, FaithfulnessResult]] = {}
    for i, name in enumerate(names):
        results[name] = {}
        for j, kind in enumerate(kinds):
            start, stop = (on_input, on_baseline) if kind == "deletion" else (on_baseline, on_input)
            curve = torch.cat([start[:, None], middle[i, j], stop[:, None]], dim=1)
            results[name][kind] = FaithfulnessResult(curve=curve, auc=torch.trapezoid(curve, fractions, dim=1), fractions=fractions, kind=kind)
    return results


def deletion_curve(
    model: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    target: Target = "pred",
    *,
    steps: int = 20,
    baseline: str | torch.Tensor = "blur",
    blur_sigma: float | None = None,
    generator: torch.Generator | None = None,
    max_batch: int = 128,
) -> FaithfulnessResult:
    """Remove the pixels in the order of ``maps``, most important first, and record the target's score.

    Step ``k`` of ``steps`` replaces the first ``round(k / steps * P)`` of the ``P`` pixels (features) in the
    order by the baseline (with more steps than features some steps repeat a count): ``curve[:, 0]`` is the score on the unperturbed input and ``curve[:, -1]`` the
    score on the baseline. A faithful map makes the score fall fast: the lower ``auc``, the better.

    Args:
        model: the classifier or segmenter (its output: logits ``(N, C)`` or ``(N, C, H, W)``).
        inputs: images ``(N, C, H, W)`` or tabular ``(N, F)``.
        maps: one attribution map per input (see :func:`pixel_scores` for the shapes and the order).
        target: an int, one class id per sample, ``"pred"`` (the prediction on ``inputs``), a
            ``RegionTarget`` (segmentation: the class's mean probability over the region) or a callable
            ``output -> (rows,)`` score.
        steps: the number of removal steps (the curve has ``steps + 1`` points).
        baseline: what a removed pixel becomes: ``"blur"`` (the input blurred with a Gaussian of
            ``blur_sigma`` pixels, default ``max(H, W) / 16``; images only), ``"mean"`` (the inputs' mean
            per channel / per feature), ``"zero"``, or a tensor that broadcasts to ``inputs``.
        blur_sigma: the blur's standard deviation in pixels (``None``: ``max(H, W) / 16``).
        generator: breaks ties in the order (``None``: a private generator seeded with 0).
        max_batch: the most perturbed inputs in one forward.

    Returns:
        :class:`FaithfulnessResult` with ``kind="deletion"`` (on CPU).

    Raises:
        ValueError: inputs neither ``(N, C, H, W)`` nor ``(N, F)``, maps of another shape or non-finite,
            an unknown baseline.

    Example:
        >>> net = nn.Linear(3, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [3.0, 2.0, 1.0]]))
        >>> x = torch.ones(1, 3)
        >>> result = deletion_curve(net, x, torch.tensor([[3.0, 2.0, 1.0]]), 1, steps=3, baseline="zero")
        >>> [round(v, 3) for v in result.curve[0].tolist()]
        [0.998, 0.953, 0.731, 0.5]
    """
    return faithfulness_curves(model, inputs, {"map": maps}, target, steps=steps, baseline=baseline, blur_sigma=blur_sigma,
                               generator=generator, max_batch=max_batch, kinds=("deletion",))["map"]["deletion"]


def insertion_curve(
    model: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    target: Target = "pred",
    *,
    steps: int = 20,
    baseline: str | torch.Tensor = "blur",
    blur_sigma: float | None = None,
    generator: torch.Generator | None = None,
    max_batch: int = 128,
) -> FaithfulnessResult:
    """Start from the baseline and put the pixels back in the order of ``maps``, most important first.

    ``curve[:, 0]`` is the score on the baseline, ``curve[:, -1]`` on the unperturbed input. A faithful map
    makes the score rise fast: the higher ``auc``, the better. Arguments as :func:`deletion_curve`.

    Example:
        >>> net = nn.Linear(3, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [3.0, 2.0, 1.0]]))
        >>> result = insertion_curve(net, torch.ones(1, 3), torch.tensor([[3.0, 2.0, 1.0]]), 1, steps=3, baseline="zero")
        >>> [round(v, 3) for v in result.curve[0].tolist()], round(float(result.auc[0]), 3)
        ([0.5, 0.953, 0.993, 0.998], 0.898)
    """
    return faithfulness_curves(model, inputs, {"map": maps}, target, steps=steps, baseline=baseline, blur_sigma=blur_sigma,
                               generator=generator, max_batch=max_batch, kinds=("insertion",))["map"]["insertion"]


# ------------------------------------------------------------------------------------------ ROAD
#: the 8-neighbourhood of ROAD's imputation: direct neighbours weigh 1/6, diagonal ones 1/12
_NEIGHBOURS = ((-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
               (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12))


def linear_imputation(
    image: torch.Tensor, removed: torch.Tensor, *, noise: float = 0.0, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill the ``removed`` pixels of ``image`` ``(C, H, W)`` so that each equals the weighted mean of its
    neighbours (ROAD's linear imputation), plus Gaussian noise of std ``noise``.

    Each removed pixel ``p`` gets ``x_p = sum_q w_q x_q / sum_q w_q`` over its neighbours ``q`` inside the
    image (direct ones weigh 1/6, diagonal ones 1/12), where a neighbour that is itself removed is an
    unknown too: one sparse linear system per image, all channels solved together
    (``scipy.sparse.linalg.spsolve``). Kept pixels are unchanged.

    Args:
        image: ``(C, H, W)``.
        removed: ``(H, W)`` bool; at least one pixel must be kept (else there is nothing to impute from).
        noise: std of the Gaussian noise added to the imputed pixels (ROAD's "noisy" imputation; in the
            image's units).
        generator: the noise's generator (``None``: a private generator seeded with 0).

    Example:
        >>> img = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 9.0, 0.0], [6.0, 6.0, 6.0]]])
        >>> removed = torch.zeros(3, 3, dtype=torch.bool); removed[1, 1] = True
        >>> linear_imputation(img, removed)[0, 1, 1].item()  # (6/12 + 6/6 + 6/12) / 1
        2.0
    """
    import scipy.sparse
    import scipy.sparse.linalg

    if image.ndim != 3 or removed.shape != image.shape[-2:]:
        raise ValueError(f"Expected `image` (C, H, W) and a bool `removed` mask (H, W) of its size, but got {tuple(image.shape)} and {tuple(removed.shape)}.")
    out = image.detach().clone()
    gone = removed.detach().bool().cpu().numpy()
    u = int(gone.sum())
    if u == 0:
        return out
    if u == gone.size:
        raise ValueError("Expected at least one kept pixel to impute from, but `removed` covers the whole image.")
    c, h, w = image.shape
    values = image.detach().double().cpu().numpy().reshape(c, h * w)
    index = -np.ones(h * w, dtype=np.int64)
    index[gone.ravel()] = np.arange(u)
    ys, xs = np.nonzero(gone)
    diag = np.zeros(u)
    rhs = np.zeros((u, c))
    rows, cols, vals = [], [], []
    for dy, dx, weight in _NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        me = index[ys[inside] * w + xs[inside]]
        other = ny[inside] * w + nx[inside]
        diag[me] += weight
        unknown = index[other] >= 0
        rows.append(me[unknown])
        cols.append(index[other[unknown]])
        vals.append(np.full(int(unknown.sum()), -weight))
        np.add.at(rhs, me[~unknown], weight * values[:, other[~unknown]].T)
    a = scipy.sparse.csr_matrix(
        (np.concatenate([diag, *vals]), (np.concatenate([np.arange(u), *rows]), np.concatenate([np.arange(u), *cols]))), shape=(u, u)
    )
    solved = np.asarray(scipy.sparse.linalg.spsolve(a.tocsc(), rhs)).reshape(u, c)
    filled = torch.from_numpy(solved.T.copy()).to(out.dtype)
    if noise > 0:
        gen = private_generator(0) if generator is None else generator
        filled = filled + noise * torch.randn(filled.shape, generator=gen, device=gen.device).cpu().to(out.dtype)
    flat = out.view(c, h * w)
    flat[:, torch.from_numpy(np.flatnonzero(gone)).to(out.device)] = filled.to(out.device)
    return out


def road(
    model: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    target: Target = "pred",
    *,
    fractions: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    noise: float = 0.01,
    generator: torch.Generator | None = None,
    max_batch: int = 128,
) -> RoadResult:
    """ROAD (Rong et al. 2022): the target's score with the most (MoRF) and the least (LeRF) relevant
    ``fractions`` of the pixels removed and filled by noisy linear imputation.

    A removed pixel is filled from its neighbours (:func:`linear_imputation`) plus a little noise, so the
    removal leaves no blurred or black patch whose *shape* tells the model which pixels were removed: the
    score measures the information removed, not the artefact. A faithful map: MoRF falls fast, LeRF stays
    high.

    Args:
        model: the classifier or segmenter.
        inputs: images ``(N, C, H, W)`` (tabular inputs have no neighbours to impute from: use
            :func:`deletion_curve` with ``baseline="mean"``).
        maps: one attribution map per image (see :func:`pixel_scores`).
        target: as :func:`deletion_curve`.
        fractions: removed fractions, each in ``(0, 1)``.
        noise: std of the noise added to the imputed pixels, in the inputs' units.
        generator: breaks ties in the order and draws the noise (``None``: a private generator seeded with 0).
        max_batch: the most imputed images in one forward.

    Returns:
        :class:`RoadResult` (on CPU).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        >>> result = road(net, torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4), 1, fractions=(0.25, 0.5))
        >>> result.morf.shape, result.morf_accuracy.shape
        (torch.Size([2, 2]), torch.Size([2]))
    """
    inputs = _check_inputs(inputs)
    if inputs.ndim != 4:
        raise ValueError("Expected images (N, C, H, W) for `road`, but got tabular inputs (N, F): features have no neighbours to impute from; "
                         "use deletion_curve(..., baseline='mean').")
    max_batch = _check_positive(max_batch, "max_batch")
    fracs = [float(f) for f in fractions]
    if not fracs or any(not 0.0 < f < 1.0 for f in fracs):
        raise ValueError(f"Expected `fractions` to be a non-empty list of numbers in (0, 1), but got {list(fractions)!r}.")
    if not noise >= 0 or math.isinf(noise):
        raise ValueError(f"Expected `noise` to be a finite number >= 0, but got {noise!r}.")
    scores = pixel_scores(maps, inputs)
    n, p = scores.shape
    generator = private_generator(0) if generator is None else generator
    rank = _ranks(scores, generator)
    counts = [min(p - 1, max(1, round(f * p))) for f in fracs]
    k = len(fracs)
    cpu = inputs.cpu()
    # imputed images: for each sample, MoRF at each fraction, then LeRF at each fraction
    imputed = torch.stack([
        linear_imputation(cpu[i], (rank[i] < c if order == "morf" else rank[i] >= p - c).view(inputs.shape[-2:]), noise=noise, generator=generator)
        for i in range(n) for order in ("morf", "lerf") for c in counts
    ])
    with introspection_mode(model, grad=False):
        scorer = _Scorer(_forward(model, inputs), target)

        def build(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return imputed[ids], ids // (2 * k)

        flat, hits = _scores_of(model, build, n * 2 * k, scorer, max_batch)
    flat, hits = flat.view(n, 2, k), hits.view(n, 2, k)
    return RoadResult(fractions=torch.tensor(fracs), morf=flat[:, 0], lerf=flat[:, 1], morf_hit=hits[:, 0], lerf_hit=hits[:, 1])


# ------------------------------------------------------------------------------------ reference maps
def random_map(inputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A map that knows nothing: uniform noise, ``(N, 1, H, W)`` for images, ``(N, F)`` for tabular inputs.

    Its deletion and insertion curves are the chance level of the scores (removing pixels in a random order).

    Example:
        >>> random_map(torch.zeros(2, 3, 4, 4)).shape, random_map(torch.zeros(2, 5)).shape
        (torch.Size([2, 1, 4, 4]), torch.Size([2, 5]))
    """
    inputs = _check_inputs(inputs)
    gen = private_generator(0) if generator is None else generator
    shape = (inputs.shape[0], 1, *inputs.shape[2:]) if inputs.ndim == 4 else tuple(inputs.shape)
    return torch.rand(shape, generator=gen, device=gen.device).cpu()


def edge_map(inputs: torch.Tensor) -> torch.Tensor:
    """A map that knows the image but not the model: the Sobel gradient magnitude of each channel
    (``sqrt(gx^2 + gy^2)``, edge pixels repeated at the border), summed over channels: ``(N, 1, H, W)``.

    Example:
        >>> x = torch.zeros(1, 1, 4, 4); x[..., 2:] = 1.0
        >>> edge_map(x)[0, 0, 0].tolist()
        [0.0, 4.0, 4.0, 0.0]
    """
    inputs = _check_inputs(inputs)
    if inputs.ndim != 4:
        raise ValueError("Expected images (N, C, H, W) for `edge_map`, but got tabular inputs (N, F): features have no edges.")
    x = inputs.float()
    smooth, diff = torch.tensor([1.0, 2.0, 1.0]), torch.tensor([-1.0, 0.0, 1.0])
    kernels = torch.stack([torch.outer(smooth, diff), torch.outer(diff, smooth)]).unsqueeze(1).to(x.device)  # d/dx, d/dy
    # one image at a time: the working copies of a batch of large images (padded, two gradients, their squares)
    # would be several times the batch; and an image's edges do not depend on the batch it came in
    return torch.cat([_edges(image, kernels) for image in x.split(1)])  # `_check_inputs`: at least one image


def _edges(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    padded = F.pad(x.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    g = F.conv2d(padded, kernels)  # (N*C, 2, H, W)
    return g.pow(2).sum(1).sqrt().view(n, c, h, w).sum(1, keepdim=True)
