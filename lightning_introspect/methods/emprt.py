"""eMPRT, the efficient model parameter randomisation test (Hedström et al. 2023, "Sanity Checks Revisited:
An Exploration to Repair the Model Parameter Randomisation Test").

Instead of comparing maps layer by layer with a similarity measure (biased by what the measure ignores),
eMPRT compares only two models, the trained one and the *fully* randomised one, through the complexity of
their explanations: an explanation of a model whose weights are random should be noise, so its complexity
should rise. The score of a sample is the relative rise of the explanation's entropy,

    eMPRT = (H(map of the randomised model) - H(map of the trained model)) / H(map of the trained model),

where ``H`` (:func:`map_entropy`) is the Shannon entropy (natural log) of the histogram of the map's values
in ``bins`` equal-width bins between the map's own minimum and maximum (the paper's ``n = 100``). Higher is
better: 0 means the randomised model's maps are as ordered as the trained model's. A trained map of
entropy 0 (a constant map) gives NaN for that sample, left out of the mean.

The maps are reduced as the similarity metrics reduce them: ``|map|`` summed over channels for
``(N, C, H, W)`` maps (``absolute=False``: the signed sum), ``|map|`` / the map itself for other shapes.

Cost: one deep copy of the model, every parametrised layer re-initialised once (the same private per-layer
seeds as :mod:`~lightning_introspect.methods.randomization`, derived from one number drawn from
``generator``), and **two attribution passes** over ``inputs`` (trained and randomised): about twice one
explanation of the batch, cheap enough to log at every run. A caller that has already explained ``inputs``
with the trained model passes those maps (``trained_maps``) and saves the first pass.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> res = emprt(net, torch.randn(4, 1, 4, 4), "pred", ["saliency"], generator=torch.Generator().manual_seed(0))
    >>> tuple(res.scores["saliency"].shape), isinstance(res.mean["saliency"], float)
    ((4,), True)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_introspect.methods.chunks import (
    chunk_slices,
    explain_in_chunks,
    explanation_rows,
    rows_per_chunk,
)
from lightning_introspect.methods.explainers import (
    Explainer,
    MethodSpec,
    as_explainer,
    model_input,
    work_mode,
)
from lightning_introspect.methods.randomization import (
    check_bn_mode,
    fixed_target,
    randomization_blocks,
    randomize_block,
)

DEFAULT_BINS = 100


def map_entropy(maps: torch.Tensor, *, bins: int = DEFAULT_BINS, absolute: bool = True) -> torch.Tensor:
    """Per-sample histogram entropy of maps ``(N, ...)``: ``(N,)`` float64, in nats.

    Each sample's (channel-reduced) values are counted in ``bins`` equal-width bins spanning its own
    ``[min, max]`` (the last bin closed, as ``numpy.histogram``); the entropy of the bin frequencies is
    ``-sum p log p`` (``scipy.stats.entropy`` of the counts). A constant map has entropy 0.

    Example:
        >>> map_entropy(torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0]]), bins=4).tolist()
        [0.0, 1.3862943611198906]
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"Expected `bins` to be a positive int, but got {bins!r}.")
    if maps.ndim < 2:
        raise ValueError(f"Expected maps with a batch dimension, (N, ...), but got shape {tuple(maps.shape)}.")
    # samples are independent: large maps are counted a few at a time (about five float64 copies of a map each)
    rows = rows_per_chunk(5 * 8 * maps[:1].numel())
    if maps.shape[0] > rows:
        return torch.cat([_map_entropy(maps[part], bins, absolute) for part in chunk_slices(int(maps.shape[0]), rows)])
    return _map_entropy(maps, bins, absolute)


def _map_entropy(maps: torch.Tensor, bins: int, absolute: bool) -> torch.Tensor:
    m = torch.nan_to_num(maps.detach().double().cpu())
    if m.ndim == 4:
        m = m.abs().sum(1) if absolute else m.sum(1)
    elif absolute:
        m = m.abs()
    flat = m.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = hi - lo  # a constant map: every value in bin 0
    # numpy.histogram's bin index for equal-width bins: floor((v - lo) / (hi - lo) * bins), the maximum in the last bin
    index = ((flat - lo) / span.clamp_min(torch.finfo(torch.float64).tiny) * bins).floor().long().clamp_(0, bins - 1)
    counts = torch.zeros(flat.shape[0], bins, dtype=torch.float64).scatter_add_(1, index, torch.ones_like(flat))
    p = counts / counts.sum(1, keepdim=True)
    return (-(p * torch.log(p.clamp_min(1e-300))).sum(1)).clamp_min(0.0) + 0.0  # + 0.0: no negative zero


@dataclass(frozen=True)
class EMPRTResult:
    """What :func:`emprt` measured, per method.

    Attributes:
        scores: ``{method: (N,)}`` the relative rise in entropy per sample (NaN where the trained map is
            constant).
        mean: ``{method: mean of the finite scores}`` (NaN if none).
        trained_entropy: ``{method: (N,)}`` the trained model's map entropies.
        random_entropy: ``{method: (N,)}`` the fully randomised model's map entropies.
        layers: the layers re-initialised.
    """

    scores: dict[str, torch.Tensor]
    mean: dict[str, float]
    trained_entropy: dict[str, torch.Tensor]
    random_entropy: dict[str, torch.Tensor]
    layers: list[str]


def emprt(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: Any,
    explain: MethodSpec | Explainer,
    *,
    generator: torch.Generator,
    layer: str | None = "auto",
    bn_mode: str = "affine",
    bins: int = DEFAULT_BINS,
    absolute: bool = True,
    trained_maps: Mapping[str, torch.Tensor] | None = None,
) -> EMPRTResult:
    """eMPRT of every method in ``explain`` on ``inputs`` (the module docstring has the definition and cost).

    The model is never changed: a deep copy is randomised, in eval mode, with the global RNG untouched.

    Args:
        model: the trained model.
        inputs: a batch ``(N, ...)``.
        targets: what to explain (:mod:`~lightning_introspect.methods.targets`): ``"pred"`` (fixed to the
            trained model's predictions for both models), class ids, a ``RegionTarget`` or a callable.
        explain: method names, callables ``fn(model, inputs, target, layer=None)``, a dict of either
            (:mod:`~lightning_introspect.methods.explainers`), or an :class:`Explainer`.
        generator: a private ``torch.Generator``; one number drawn from it seeds the re-initialisation, so
            the same generator state gives the same result.
        layer: the layer of layer methods (Grad-CAM); ``"auto"`` asks ``attribution.auto_layer``.
        bn_mode: how normalisation layers are randomised (:data:`~lightning_introspect.methods.randomization.BN_MODES`).
        bins: histogram bins of the entropy (the paper's 100).
        absolute: entropy of ``|map|`` (default) or of the signed map.
        trained_maps: ``{method: (N, ...)}``, the maps the trained model already gave for ``inputs`` and the
            same targets (every method of ``explain``); ``None``: explained here. Only the randomised copy
            is then explained: one attribution pass instead of two, the same scores.

    Returns:
        An :class:`EMPRTResult`.

    Raises:
        ValueError: ``trained_maps`` lacks a method of ``explain`` or holds other than one map per sample.
    """
    check_bn_mode(bn_mode)
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2:
        raise ValueError(f"Expected `inputs` to be a batch tensor (N, ...), but got {getattr(inputs, 'shape', type(inputs).__name__)}.")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"Expected `generator` to be a torch.Generator, but got {type(generator).__name__}.")
    explainer = as_explainer(explain)
    given = None if trained_maps is None else _given_maps(trained_maps, explainer.names, int(inputs.shape[0]))
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    # a copy made inside torch.inference_mode (a Lightning validation hook) would hold inference tensors,
    # which autograd refuses: copy and explain outside it
    with torch.inference_mode(False):
        work = copy.deepcopy(model)
        return _emprt_of_copy(work, inputs, targets, explainer, seed=seed, layer=layer, bn_mode=bn_mode, bins=bins, absolute=absolute,
                              trained=given)


def _given_maps(maps: Mapping[str, torch.Tensor], names: list[str], n: int) -> dict[str, torch.Tensor]:
    """The caller's trained maps as the explainer would have returned them: detached float32 on the CPU, NaN-free."""
    missing = [name for name in names if name not in maps]
    if missing:
        raise ValueError(f"Expected `trained_maps` to hold the maps of every method ({names}), but {missing} are missing.")
    for name in names:
        value = maps[name]
        if not isinstance(value, torch.Tensor) or value.ndim < 2 or value.shape[0] != n:
            raise ValueError(f"Expected `trained_maps[{name!r}]` to hold one map per sample, shape ({n}, ...), "
                             f"but got {getattr(value, 'shape', type(value).__name__)}.")
    return {name: torch.nan_to_num(maps[name].detach().float()).cpu() for name in names}


def _emprt_of_copy(work: nn.Module, inputs: torch.Tensor, targets: Any, explainer: Explainer, *, seed: int,
                   layer: str | None, bn_mode: str, bins: int, absolute: bool, trained: dict[str, torch.Tensor] | None) -> EMPRTResult:
    with work_mode(work):
        x = model_input(work, inputs)
        fixed = fixed_target(work, x, targets)
        layer = explainer.resolve_layer(work, x[:1], layer)
        blocks = randomization_blocks(work, x[:1], "auto", bn_mode=bn_mode)
        rows = explanation_rows(work, x)
        if trained is None:
            trained = explain_in_chunks(explainer, work, x, fixed, layer, rows=rows)
        modules = dict(work.named_modules())
        for block in blocks:
            randomize_block(modules, block, seed=seed, bn_mode=bn_mode, repeat=0)
        randomised = explain_in_chunks(explainer, work, x, fixed, layer, rows=rows)
    scores, means, h_trained, h_random = {}, {}, {}, {}
    for name in explainer.names:
        h0 = map_entropy(trained[name], bins=bins, absolute=absolute)
        h1 = map_entropy(randomised[name], bins=bins, absolute=absolute)
        rise = torch.where(h0 > 0, (h1 - h0) / h0.clamp_min(1e-300), torch.full_like(h0, math.nan))
        finite = rise[torch.isfinite(rise)]
        scores[name], h_trained[name], h_random[name] = rise, h0, h1
        means[name] = float(finite.mean()) if finite.numel() else math.nan
    return EMPRTResult(scores, means, h_trained, h_random, [m for b in blocks for m in b.modules])


__all__ = ["DEFAULT_BINS", "EMPRTResult", "emprt", "map_entropy"]
