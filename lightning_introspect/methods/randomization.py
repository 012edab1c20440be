"""Sanity checks for attribution maps (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

An explanation that does not change when the network is destroyed cannot be explaining the network.
This module measures that, on a deep copy of the model (the trained model is never touched):

* :func:`cascading_randomization` re-initialises the model's blocks from the output side to the input
  side, in execution order, and recomputes every attribution map after each step;
  :func:`independent_randomization` re-initialises one block at a time, the rest kept trained.
* :func:`map_similarity` compares each randomised map with the original one, sample by sample:
  Spearman rank correlation of ``|map|`` (``"spearman_abs"``) and of the signed map (``"spearman"``),
  and SSIM of the max-normalised ``|map|`` (``"ssim"``), with torchmetrics' implementations.
* :func:`class_sensitivity` compares the map for the predicted class with the map for another class
  (the runner-up and / or a random other class): the same picture for every class is a failure.
* :func:`detect_caveats` lists model and data properties that make maps untrustworthy: BatchNorm,
  in-place ReLU, functional ReLU that module hooks cannot see, non-ReLU activations, negative
  inputs for input-times-gradient methods, probability outputs, segmentation-style outputs.
* :func:`run_sanity_checks` runs all of it and returns a :class:`SanityReport` with the curves,
  a ``"pass"`` / ``"fail"`` verdict per method and the caveats; ``report.to_dict()`` holds only plain
  Python values (for checkpoints loaded with ``weights_only=True``).

Blocks and re-initialisation
----------------------------
A *block* is a parametrised layer (anything with parameters of its own: conv, linear, embedding, ...)
together with the normalisation layers that run after it and before the next parametrised layer.
Blocks are found by running the model once (:func:`~lightning_introspect._torch.hooks.record_execution_order`),
so the order is the order of execution, not of registration. Naming a container (``"layer4.1"``)
makes all its parametrised descendants one block. A layer is re-initialised by its own
``reset_parameters()`` while the global RNG is forked and seeded with a private per-layer seed
(:func:`layer_seed`, derived from ``seed`` and the layer's name: every layer gets its own stream and
the global RNG is untouched); layers without ``reset_parameters`` get each parameter redrawn from a
normal distribution with the trained tensor's mean and standard deviation, from a private generator.
Because the seed depends on the name, the top block is re-initialised identically by both modes.

Normalisation layers follow ``bn_mode``:

* ``"affine"`` (default, as in the paper, which re-initialises trainable variables): the learned scale
  and shift go back to their initial values (1 and 0); running statistics are kept.
* ``"stats"``: running mean / variance reset to 0 / 1 (what Quantus does); scale and shift kept.
* ``"both"``: both of the above, the layer as freshly constructed.
* ``"keep"``: normalisation layers are left trained.

Similarity conventions
----------------------
Maps of shape ``(N, C, H, W)`` are reduced over channels first: ``sum |map|`` for the absolute
metrics, ``sum map`` for the signed one; ``(N, H, W)`` and ``(N, D)`` maps are used as they are.
The rank correlation of a constant map (an all-zero Grad-CAM after randomisation, for example) is
undefined; it is defined here as **0** ("no rank information shared"), never NaN. SSIM is computed
on ``|map|`` divided by its maximum (data range 1, Gaussian window of 11 pixels, shrunk for maps
smaller than that); two all-zero maps have SSIM 1; SSIM is skipped for maps that are not images.
Per-sample values are averaged over the samples (the standard deviation is kept too).

Verdicts
--------
The verdict score is ``verdict_metric`` (default ``"spearman_max"``: the larger of the mean Spearman
correlations of ``|map|`` and of the signed map; a map fails if either its magnitude ranking or its
sign pattern survives; ``"spearman_abs"``, ``"spearman"`` and ``"ssim"`` use that metric alone).
``verdicts[method]`` is ``"pass"`` when the score after the top ``verdict_depth`` blocks are randomised
(cascading; default 1, the output layer) is below ``thresholds["randomization"]`` (default 0.5), else
``"fail"``. ``class_sensitivity_verdicts[method]`` is ``"pass"`` when the score between the map for the
predicted class and the map for every other class compared is below ``thresholds["class_sensitivity"]``
(default 0.6), else ``"fail"``. On a small CNN trained on digits (Spearman of ``|map|`` / signed, top
layer randomised): gradient 0.28 / 0.28, Grad-CAM 0.0 / 0.0, input x gradient 0.43 / 0.09, guided
backprop 0.69 / 0.86, deconvnet 0.46 / 0.69, guided Grad-CAM 0.15 / 0.60 -- the signed ranking is
what betrays guided backprop, deconvnet and guided Grad-CAM (as in the paper and Sixt et al. 2020).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> def gradient(model, inputs, target, layer=None):
    ...     x = inputs.clone().requires_grad_(True)
    ...     score = model(x).gather(1, target.view(-1, 1)).sum()
    ...     return torch.autograd.grad(score, x)[0]
    >>> report = run_sanity_checks(net, torch.randn(4, 1, 4, 4), methods={"gradient": gradient}, warn=False)
    >>> report.layers
    ['3', '1']
    >>> sorted(report.verdicts)
    ['gradient']
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_introspect._torch.guards import (
    eager_mode,
    eval_mode,
    fork_global_rng,
    fresh_input,
    gradients_on,
    module_device,
    private_generator,
)
from lightning_introspect._torch.hooks import hooks, record_execution_order
from lightning_introspect._torch.layers import resolve_layers
from lightning_introspect.methods.targets import RegionTarget, target_indices

METRICS: tuple[str, ...] = ("spearman_abs", "spearman", "ssim")
BN_MODES: tuple[str, ...] = ("affine", "stats", "both", "keep")
MODES: tuple[str, ...] = ("cascading", "independent", "both")
OTHER_CLASSES: tuple[str, ...] = ("second", "random")
DEFAULT_METHODS: tuple[str, ...] = ("saliency", "guided_backprop", "grad_cam", "input_x_gradient")
DEFAULT_THRESHOLDS: dict[str, float] = {"randomization": 0.5, "class_sensitivity": 0.6}
VERDICT_METRICS: tuple[str, ...] = ("spearman_max", "spearman_abs", "spearman", "ssim")
DEFAULT_VERDICT_METRIC = "spearman_max"
ORIGINAL = "original"

# Methods that multiply by the input (sign of the input matters) and methods with modified ReLU rules.
_INPUT_TIMES_METHODS = frozenset({"input_x_gradient", "lrp", "integrated_gradients", "deeplift"})
_GUIDED_METHODS = frozenset({"guided_backprop", "deconvnet", "guided_grad_cam"})

ExplainFn = Callable[..., torch.Tensor]
"""``fn(model, inputs, target, layer=None) -> Tensor``: one detached map per sample, in batch order."""

MethodSpec = str | ExplainFn | Sequence[str | ExplainFn] | Mapping[str, str | ExplainFn]


class SanityCaveatWarning(UserWarning):
    """Raised (as a warning) for each caveat :func:`detect_caveats` finds."""


# ---------------------------------------------------------------------------------- similarity
def _reduce_channels(maps: torch.Tensor, *, absolute: bool) -> torch.Tensor:
    maps = torch.nan_to_num(maps.detach().float())
    if maps.ndim < 2:
        raise ValueError(f"Expected attribution maps with a batch dimension, (N, ...), but got shape {tuple(maps.shape)}.")
    if maps.ndim == 4:  # (N, C, H, W): channel-reduce like the paper
        return maps.abs().sum(1) if absolute else maps.sum(1)
    return maps.abs() if absolute else maps


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"Expected two batches of maps of the same shape, but got {tuple(a.shape)} and {tuple(b.shape)}.")


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Row-wise ranks (1-based, float64) of ``(N, D)`` values, ties sharing their mean rank (scipy's
    ``"average"``). Vectorised over rows: one sort, then the first and last position of each run of ties.
    """
    n, d = x.shape
    if x.device.type == "cpu":  # numpy's row sort is about twice as fast as torch's on CPU
        order = torch.from_numpy(np.argsort(x.numpy(), axis=1))
        values = x.gather(1, order)
    else:
        values, order = x.sort(dim=1)
    pos = torch.arange(d, dtype=torch.float64, device=x.device).expand(n, d)
    starts = torch.ones(n, d, dtype=torch.bool, device=x.device)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    last = torch.where(ends, pos, torch.full_like(pos, d - 1)).flip(1).cummin(dim=1).values.flip(1)
    return torch.empty(n, d, dtype=torch.float64, device=x.device).scatter_(1, order, (first + last) / 2 + 1)


def _centred_ranks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ranks - mean rank, their norm, constant-row flag)`` of ``(N, D)`` values (float64, CPU)."""
    x = x.detach().cpu().double()
    constant = x.amax(1) == x.amin(1) if x.shape[1] else torch.ones(x.shape[0], dtype=torch.bool)
    ranks = _average_ranks(x)
    ranks = ranks - ranks.mean(1, keepdim=True)
    return ranks, ranks.pow(2).sum(1).sqrt(), constant


def _rank_correlation(a: tuple[torch.Tensor, torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Spearman correlation of matching rows of two :func:`_centred_ranks` results; 0 for a constant row."""
    (ra, na, ca), (rb, nb, cb) = a, b
    rho = (ra * rb).sum(1) / (na * nb).clamp_min(1e-300)
    dead = ca | cb | (ra.shape[1] < 2)
    return torch.nan_to_num(rho, nan=0.0).clamp(-1.0, 1.0).masked_fill(dead, 0.0)


def spearman_similarity(a: torch.Tensor, b: torch.Tensor, *, absolute: bool = True) -> torch.Tensor:
    """Per-sample Spearman rank correlation between two batches of maps: ``(N,)``.

    The Pearson correlation of the ranks, ties given their mean rank (as ``scipy.stats.spearmanr`` and
    ``torchmetrics``' ``spearman_corrcoef``), vectorised over the batch. A constant map (zero variance)
    has no ranks to correlate: its correlation is defined as 0, never NaN.

    Example:
        >>> a = torch.arange(8.0).view(2, 4)
        >>> spearman_similarity(a, a ** 2).round(decimals=4).tolist(), spearman_similarity(a, torch.zeros(2, 4)).tolist()
        ([1.0, 1.0], [0.0, 0.0])
    """
    _check_pair(a, b)
    x = _centred_ranks(_reduce_channels(a, absolute=absolute).flatten(1))
    y = _centred_ranks(_reduce_channels(b, absolute=absolute).flatten(1))
    return _rank_correlation(x, y).float()


_SSIM_K1, _SSIM_K2 = 0.01, 0.03
_BAND_LIMIT = 96  # up to this side, the Gaussian window is applied as a (reflect-padded) band matrix product


@functools.lru_cache(maxsize=16)
def _gaussian_1d(sigma: float) -> torch.Tensor:
    """torchmetrics' SSIM window: ``int(3.5 sigma + 0.5) * 2 + 1`` taps, normalised (float32)."""
    size = int(3.5 * sigma + 0.5) * 2 + 1
    dist = torch.arange((1 - size) / 2, (1 + size) / 2, 1, dtype=torch.float32)
    gauss = torch.exp(-torch.pow(dist / sigma, 2) / 2)
    return gauss / gauss.sum()


@functools.lru_cache(maxsize=16)
def _band(n: int, sigma: float) -> torch.Tensor:
    """``(n, n)`` matrix ``B`` with ``B @ x`` = the Gaussian window filtered along ``x``'s rows, reflect-padded."""
    g = _gaussian_1d(sigma)
    pad = (g.numel() - 1) // 2
    rows = torch.arange(n)
    band = torch.zeros(n, n, dtype=g.dtype)
    for t in range(g.numel()):
        cols = rows + t - pad
        cols = torch.where(cols < 0, -cols, cols)
        cols = torch.where(cols > n - 1, 2 * (n - 1) - cols, cols)
        band.index_put_((rows, cols), g[t].expand(n), accumulate=True)
    return band


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(M, H, W)`` images filtered with the separable Gaussian window (reflect padding, same size)."""
    h, w = x.shape[-2:]
    if max(h, w) <= _BAND_LIMIT:  # two small matrix products beat a 1-channel convolution by ~15x on CPU
        return _band(h, sigma) @ x @ _band(w, sigma).T
    g = _gaussian_1d(sigma)
    pad = (g.numel() - 1) // 2
    m = x.shape[0]
    y = torch.nn.functional.pad(x.unsqueeze(0), (pad, pad, pad, pad), mode="reflect")
    y = torch.nn.functional.conv2d(y, g.view(1, 1, -1, 1).expand(m, 1, -1, 1), groups=m)
    return torch.nn.functional.conv2d(y, g.view(1, 1, 1, -1).expand(m, 1, 1, -1), groups=m).squeeze(0)


def _ssim_moments(x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Local mean and local mean of squares of ``(N, H, W)`` images."""
    mu, sq = _gaussian_blur(torch.cat([x, x * x]), sigma).split(x.shape[0])
    return mu, sq


def _ssim_pairs(x: torch.Tensor, mx: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor, my: tuple[torch.Tensor, torch.Tensor], sigma: float) -> torch.Tensor:
    """Mean SSIM of matching ``(N, H, W)`` images in [0, 1] given their :func:`_ssim_moments`: torchmetrics'
    definition (data range 1, reflect padding, every pixel averaged)."""
    (mu_x, sq_x), (mu_y, sq_y) = mx, my
    xy = _gaussian_blur(x * y, sigma)
    mu_xx, mu_yy, mu_xy = mu_x.pow(2), mu_y.pow(2), mu_x * mu_y
    var_x = (sq_x - mu_xx).clamp_min(0.0)
    var_y = (sq_y - mu_yy).clamp_min(0.0)
    cov = xy - mu_xy
    c1, c2 = _SSIM_K1**2, _SSIM_K2**2
    ssim = ((2 * mu_xy + c1) * (2 * cov + c2)) / ((mu_xx + mu_yy + c1) * (var_x + var_y + c2))
    return torch.nan_to_num(ssim.flatten(1).mean(1).float(), nan=0.0)


def _ssim_input(maps: torch.Tensor) -> torch.Tensor | None:
    """``|map|`` (channels summed) divided by its maximum, ``(N, H, W)`` float32 CPU; ``None`` if not an image."""
    x = _reduce_channels(maps, absolute=True)
    if x.ndim != 3 or min(x.shape[-2:]) < 3:
        return None
    return (x / x.flatten(1).amax(1).clamp_min(1e-30).view(-1, 1, 1)).cpu()


def _ssim_sigma(shape: Sequence[int]) -> float:
    """The window's sigma for maps of this size: 11 pixels and sigma 1.5, shrunk (sigma alike) to the largest
    odd size that fits."""
    size = min(11, min(shape[-2:]))
    size = size if size % 2 == 1 else size - 1
    return 1.5 * size / 11.0


def ssim_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Per-sample SSIM of the max-normalised ``|map|``: ``(N,)``; ``None`` when the maps are not images.

    The definition of ``torchmetrics.functional.structural_similarity_index_measure`` (data range 1, an
    11-pixel Gaussian window of sigma 1.5, reflect padding, the mean over all pixels), the window shrunk to
    the largest odd size that fits smaller maps (sigma scaled alike); maps under 3x3 pixels get ``None``.
    Two all-zero maps have SSIM 1. The window is applied separably (agrees with torchmetrics to ~1e-7).

    Example:
        >>> a = torch.rand(2, 16, 16)
        >>> torch.allclose(ssim_similarity(a, a), torch.ones(2))
        True
    """
    _check_pair(a, b)
    x, y = _ssim_input(a), _ssim_input(b)
    if x is None or y is None:
        return None
    sigma = _ssim_sigma(x.shape)
    return _ssim_pairs(x, _ssim_moments(x, sigma), y, _ssim_moments(y, sigma), sigma)


def map_similarity(a: torch.Tensor, b: torch.Tensor, metrics: Sequence[str] = METRICS) -> dict[str, torch.Tensor]:
    """Per-sample similarity of two batches of maps for each metric in ``metrics``: ``{metric: (N,)}``.

    ``"ssim"`` is left out when the maps are not images (see :func:`ssim_similarity`).

    Example:
        >>> a = torch.rand(3, 12, 12)
        >>> {k: v.shape for k, v in map_similarity(a, a).items()}
        {'spearman_abs': torch.Size([3]), 'spearman': torch.Size([3]), 'ssim': torch.Size([3])}
    """
    return _similarities([(a, b)], metrics)[0]


def _similarities(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], metrics: Sequence[str], *, budget: int = 1 << 22) -> list[dict[str, torch.Tensor]]:
    """:func:`map_similarity` of many ``(a, b)`` pairs in a few batched passes; the same per-sample values.

    Pairs of maps of one shape are measured together (at most ``budget`` map elements a side per pass),
    and an ``a`` tensor shared by several pairs (the trained model's map, compared with every randomised
    one) is ranked and filtered once.
    """
    _check_metrics(metrics)
    out: list[dict[str, torch.Tensor]] = [{} for _ in pairs]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (a, b) in enumerate(pairs):
        _check_pair(a, b)
        if a.ndim < 2:
            _reduce_channels(a, absolute=True)  # raises the shape error
        groups.setdefault(tuple(a.shape[1:]), []).append(i)
    for indices in groups.values():
        chunk: list[int] = []
        size = 0
        for i in indices:
            n = pairs[i][1].numel()
            if chunk and size + n > budget:
                _similarity_chunk([pairs[j] for j in chunk], metrics, [out[j] for j in chunk])
                chunk, size = [], 0
            chunk.append(i)
            size += n
        _similarity_chunk([pairs[j] for j in chunk], metrics, [out[j] for j in chunk])
    return out


def _similarity_chunk(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], metrics: Sequence[str], out: list[dict[str, torch.Tensor]]) -> None:
    """Fill ``out[i]`` with the similarity of ``pairs[i]`` (maps of one shape), batched."""
    unique: dict[int, int] = {}
    firsts: list[torch.Tensor] = []
    for a, _ in pairs:
        if id(a) not in unique:
            unique[id(a)] = len(firsts)
            firsts.append(a)
    offsets = [0]
    for a in firsts:
        offsets.append(offsets[-1] + a.shape[0])
    a_rows = torch.cat([torch.arange(a.shape[0]) + offsets[unique[id(a)]] for a, _ in pairs])
    a_all = torch.cat(firsts)
    b_all = torch.cat([b for _, b in pairs])
    values: dict[str, torch.Tensor] = {}
    for metric in metrics:
        if metric in ("spearman_abs", "spearman"):
            absolute = metric == "spearman_abs"
            ra = _centred_ranks(_reduce_channels(a_all, absolute=absolute).flatten(1))
            rb = _centred_ranks(_reduce_channels(b_all, absolute=absolute).flatten(1))
            values[metric] = _rank_correlation(tuple(t[a_rows] for t in ra), rb).float()  # type: ignore[arg-type]
        else:
            x, y = _ssim_input(a_all), _ssim_input(b_all)
            if x is None or y is None:
                continue
            sigma = _ssim_sigma(x.shape)
            mx = tuple(t[a_rows] for t in _ssim_moments(x, sigma))
            values[metric] = _ssim_pairs(x[a_rows], mx, y, _ssim_moments(y, sigma), sigma)  # type: ignore[arg-type]
    start = 0
    for (_, b), res in zip(pairs, out):
        k = b.shape[0]
        res.update({m: v[start : start + k] for m, v in values.items()})
        start += k


class _PendingSimilarities:
    """Map pairs queued under keys and measured with :func:`_similarities` in batches (flushed whenever
    ``budget`` map elements are waiting, so memory stays bounded for large maps and many blocks)."""

    def __init__(self, metrics: Sequence[str], budget: int = 1 << 22) -> None:
        _check_metrics(metrics)
        self.metrics, self.budget = list(metrics), budget
        self.keys: list[Any] = []
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.size = 0
        self.done: list[tuple[Any, dict[str, torch.Tensor]]] = []

    def add(self, key: Any, a: torch.Tensor, b: torch.Tensor) -> None:
        _check_pair(a, b)
        self.keys.append(key)
        self.pairs.append((a, b))
        self.size += b.numel()
        if self.size >= self.budget:
            self.flush()

    def flush(self) -> None:
        if self.pairs:
            self.done.extend(zip(self.keys, _similarities(self.pairs, self.metrics, budget=self.budget)))
        self.keys, self.pairs, self.size = [], [], 0

    def results(self) -> list[tuple[Any, dict[str, torch.Tensor]]]:
        """``[(key, {metric: (N,)})]`` for every pair added, in order."""
        self.flush()
        return self.done


def _check_metrics(metrics: Sequence[str]) -> None:
    if isinstance(metrics, str) or not metrics:
        raise ValueError(f"Expected `metrics` to be a non-empty list of {', '.join(repr(m) for m in METRICS)}, but got {metrics!r}.")
    for metric in metrics:
        if metric not in METRICS:
            raise ValueError(f"Expected every entry of `metrics` to be one of {', '.join(repr(m) for m in METRICS)}, but got {metric!r}.")


# ------------------------------------------------------------------------------------ methods
class _Explainer:
    """Resolved attribution methods: names go through ``attribution.attribute`` (one shared call),
    callables are called as ``fn(model, inputs, target, layer=layer)``."""

    def __init__(self, methods: MethodSpec) -> None:
        if isinstance(methods, str) or callable(methods):
            methods = [methods]
        if isinstance(methods, Mapping):
            items = list(methods.items())
        else:
            items = []
            for spec in methods:
                name = spec if isinstance(spec, str) else getattr(spec, "__name__", type(spec).__name__)
                items.append((name, spec))
        if not items:
            raise ValueError("Expected `methods` to name at least one attribution method, but got none.")
        self.registry: list[str] = []
        self.callables: dict[str, ExplainFn] = {}
        self.names: list[str] = []
        for name, spec in items:
            if not isinstance(name, str) or name in self.names:
                raise ValueError(f"Expected `methods` to have unique string names, but got {name!r} twice or as a non-string.")
            self.names.append(name)
            if isinstance(spec, str):
                valid = self._registry_names()
                if spec not in valid:
                    raise ValueError(f"Expected every entry of `methods` to be one of {', '.join(repr(v) for v in valid)} or a callable, but got {spec!r}.")
                if spec != name:
                    self.callables[name] = self._registry_fn(spec)
                else:
                    self.registry.append(name)
            elif callable(spec):
                self.callables[name] = spec
            else:
                raise ValueError(f"Expected every entry of `methods` to be a method name or a callable, but got {spec!r}.")

    @staticmethod
    def _attribution() -> Any:
        try:
            from lightning_introspect.methods import attribution
        except ImportError as err:  # pragma: no cover - the attribution module ships with the package
            raise ValueError(
                "Attribution methods given by name need `lightning_introspect.methods.attribution`; "
                "pass callables `fn(model, inputs, target, layer=None)` instead."
            ) from err
        return attribution

    @classmethod
    def _registry_names(cls) -> list[str]:
        return sorted(cls._attribution().METHODS)

    @classmethod
    def _registry_fn(cls, name: str) -> ExplainFn:
        attribution = cls._attribution()

        def fn(model: nn.Module, inputs: torch.Tensor, target: Any, layer: str | None = None) -> torch.Tensor:
            return attribution.attribute(model, inputs, target, [name], layer=layer)[name]

        return fn

    def resolve_layer(self, model: nn.Module, example: torch.Tensor, layer: str | None) -> str | None:
        """``"auto"`` -> ``attribution.auto_layer`` when a registry method needs a layer."""
        if layer != "auto":
            return layer
        if not any(n in ("grad_cam", "guided_grad_cam") for n in self.registry):
            return None
        return self._attribution().auto_layer(model, example)

    def __call__(self, model: nn.Module, inputs: torch.Tensor, target: Any, layer: str | None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.registry:
            kwargs = {"layer": layer} if layer is not None else {}
            maps = self._attribution().attribute(model, inputs, target, list(self.registry), **kwargs)
            out.update({n: maps[n] for n in self.registry})
        for name, fn in self.callables.items():
            out[name] = fn(model, inputs, target, layer=layer)
        result = {}
        for name in self.names:
            value = out[name]
            if not isinstance(value, torch.Tensor) or value.ndim < 2 or value.shape[0] != inputs.shape[0]:
                raise ValueError(
                    f"Expected the method {name!r} to return one map per sample, shape ({inputs.shape[0]}, ...), "
                    f"but got {getattr(value, 'shape', type(value).__name__)}."
                )
            result[name] = torch.nan_to_num(value.detach().float()).cpu()
        return result


# ------------------------------------------------------------------------------- randomisation
@dataclass(frozen=True)
class RandomizationBlock:
    """One randomisation step: ``name`` (the block's main layer) and the module names it re-initialises."""

    name: str
    modules: tuple[str, ...]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm))


def _has_own_state(module: nn.Module, bn_mode: str) -> bool:
    if _is_norm(module):
        if bn_mode == "keep":
            return False
        affine = any(True for _ in module.parameters(recurse=False))
        stats = isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
        return (bn_mode in ("affine", "both") and affine) or (bn_mode in ("stats", "both") and stats)
    return any(True for _ in module.parameters(recurse=False))


def randomization_blocks(
    model: nn.Module,
    example_input: torch.Tensor,
    layers: str | int | Sequence[str] = "auto",
    *,
    bn_mode: str = "affine",
) -> list[RandomizationBlock]:
    """The blocks to randomise, output side first (reverse execution order).

    Args:
        model: the model (only run once in eval mode, not changed).
        example_input: a small batch the model accepts.
        layers: ``"auto"`` (every parametrised layer with its following normalisation layers, one block
            each), an int ``k`` (the ``k`` blocks nearest the output), or names / glob patterns (each a
            block; a container means all its parametrised descendants).
        bn_mode: how normalisation layers are treated (``"keep"`` leaves them out).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
        >>> [(b.name, b.modules) for b in randomization_blocks(net, torch.zeros(1, 1, 4, 4))]
        [('4', ('4',)), ('0', ('0', '1'))]
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"Expected `bn_mode` to be one of {', '.join(repr(m) for m in BN_MODES)}, but got {bn_mode!r}.")
    modules = dict(model.named_modules())
    order = record_execution_order(model, example_input)
    position = {name: i for i, name in enumerate(order)}
    executed = [n for n in order if _has_own_state(modules[n], bn_mode)]

    if isinstance(layers, bool) or not (isinstance(layers, (str, int)) or isinstance(layers, Sequence)):
        raise ValueError(f"Expected `layers` to be 'auto', a positive int or a list of layer names, but got {layers!r}.")
    if isinstance(layers, int) or layers == "auto":
        blocks: list[RandomizationBlock] = []
        current: list[str] = []
        for name in executed:
            if _is_norm(modules[name]) and current:
                current.append(name)
                continue
            if current:
                blocks.append(RandomizationBlock(current[0], tuple(current)))
            current = [name]
        if current:
            blocks.append(RandomizationBlock(current[0], tuple(current)))
        if not blocks:
            raise ValueError("The model has no parametrised layer that runs in its forward pass; nothing to randomise.")
        blocks.reverse()
        if isinstance(layers, int):
            if layers < 1:
                raise ValueError(f"Expected `layers` to be 'auto', a positive int or a list of layer names, but got {layers!r}.")
            blocks = blocks[:layers]
        return blocks

    named = resolve_layers(model, layers, argument="layers")
    blocks = []
    for name in named:
        prefix = name + "."
        members = [n for n in executed if n == name or n.startswith(prefix)]
        if not members:
            raise ValueError(
                f"Expected every entry of `layers` to hold parameters that run in the forward pass (bn_mode={bn_mode!r}), "
                f"but {name!r} has none."
            )
        blocks.append(RandomizationBlock(name, tuple(members)))
    blocks.sort(key=lambda b: max(position[m] for m in b.modules), reverse=True)
    return blocks


def layer_seed(seed: int, name: str, repeat: int = 0) -> int:
    """The private seed of one layer: a stable hash of ``(seed, name, repeat)`` (differs per layer and
    repeat, not per mode).

    Example:
        >>> layer_seed(0, "features.0") == layer_seed(0, "features.0") != layer_seed(0, "features.4")
        True
        >>> layer_seed(0, "features.0", repeat=1) != layer_seed(0, "features.0")
        True
    """
    key = f"{int(seed)}/{name}" if repeat == 0 else f"{int(seed)}/{name}/{int(repeat)}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def _seeded_global_rng(seed: int, module: nn.Module) -> Iterator[None]:
    """Fork the global RNG of CPU and the module's CUDA devices and seed them privately."""
    cuda = sorted({p.device.index or 0 for p in module.parameters(recurse=False) if p.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


@torch.no_grad()
def reinitialize_(module: nn.Module, *, seed: int, bn_mode: str = "affine") -> None:
    """Re-initialise the parameters of ``module`` itself (not its children) in place.

    Normalisation layers follow ``bn_mode`` (see the module docstring); other layers use their own
    ``reset_parameters()`` under a privately seeded, forked global RNG, or, without one, a normal
    draw with each parameter's trained mean and standard deviation from a private generator.
    """
    if _is_norm(module):
        if bn_mode in ("affine", "both"):
            if isinstance(module, nn.modules.batchnorm._NormBase):
                if module.weight is not None:
                    module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
            elif any(True for _ in module.parameters(recurse=False)) and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        if bn_mode in ("stats", "both") and isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            module.reset_running_stats()
        return
    if callable(getattr(module, "reset_parameters", None)):
        with _seeded_global_rng(seed, module):
            module.reset_parameters()
        return
    for i, param in enumerate(module.parameters(recurse=False)):
        gen = private_generator(seed + i, device=param.device)
        std = float(param.float().std()) if param.numel() > 1 else 0.0
        mean = float(param.float().mean())
        fresh = torch.randn(param.shape, generator=gen, device=param.device, dtype=torch.float32) * std + mean
        param.copy_(fresh.to(param.dtype))


def _randomize_block(model: nn.Module, block: RandomizationBlock, *, seed: int, bn_mode: str, repeat: int = 0) -> None:
    modules = dict(model.named_modules())
    for name in block.modules:
        reinitialize_(modules[name], seed=layer_seed(seed, name, repeat), bn_mode=bn_mode)


@dataclass
class RandomizationCurves:
    """What one randomisation mode measured.

    Attributes:
        mode: ``"cascading"`` or ``"independent"``.
        layers: the blocks in the order they were randomised (output side first).
        curves: ``{method: {metric: {layer: mean similarity to the original map}}}``; for cascading,
            the value at a layer is with that block and every block above it randomised.
        curves_std: the same shape, standard deviation over the samples.
        agreement: ``{layer: fraction of samples whose predicted class is unchanged}`` (shows that
            the randomisation did change the model).
        maps: ``{method: {"original" | layer: maps}}`` for the first ``keep_maps`` samples (not
            serialised).
    """

    mode: str
    layers: list[str]
    curves: dict[str, dict[str, dict[str, float]]]
    curves_std: dict[str, dict[str, dict[str, float]]]
    agreement: dict[str, float]
    maps: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "layers": list(self.layers),
            "curves": copy.deepcopy(self.curves),
            "curves_std": copy.deepcopy(self.curves_std),
            "agreement": dict(self.agreement),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RandomizationCurves:
        return cls(
            mode=str(data["mode"]),
            layers=list(data["layers"]),
            curves=copy.deepcopy(dict(data["curves"])),
            curves_std=copy.deepcopy(dict(data.get("curves_std", {}))),
            agreement=dict(data.get("agreement", {})),
        )


def _model_device(model: nn.Module) -> torch.device:
    return module_device(model)


def _model_input(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``inputs`` on the model's device, in the model's floating dtype."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = fresh_input(inputs, requires_grad=False, dtype=dtype if inputs.is_floating_point() else None)
    return x.to(_model_device(model))


def _predictions(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs)
    out = out.detach()
    return out.argmax(1) if out.ndim >= 2 else out


@contextlib.contextmanager
def _work_mode(model: nn.Module) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        stack.enter_context(fork_global_rng())
        stack.enter_context(eager_mode())
        stack.enter_context(eval_mode(model))
        stack.enter_context(gradients_on(_model_device(model)))
        yield


def _prepare(model: nn.Module, inputs: torch.Tensor, target: Any, explainer: _Explainer, layer: str | None) -> tuple[torch.Tensor, Any, str | None]:
    """Inputs on the model's device, the target fixed to class ids of the trained model, the layer resolved."""
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2:
        raise ValueError(f"Expected `inputs` to be a batch tensor (N, ...), but got {getattr(inputs, 'shape', type(inputs).__name__)}.")
    x = _model_input(model, inputs)
    with torch.no_grad():
        output = model(x)
    ids = target_indices(output, target)
    if isinstance(target, RegionTarget):
        fixed: Any = RegionTarget(class_id=ids, mask=target.mask)
    else:
        fixed = ids if ids is not None else target
    return x, fixed, explainer.resolve_layer(model, x[:1], layer)


def _summarise(values: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, float]]:
    means = {k: float(v.mean()) for k, v in values.items()}
    stds = {k: float(v.std(correction=0)) if v.numel() > 1 else 0.0 for k, v in values.items()}
    return means, stds


def _randomization(
    mode: str,
    model: nn.Module,
    inputs: torch.Tensor,
    target: Any,
    methods: MethodSpec,
    *,
    layers: str | int | Sequence[str],
    seed: int,
    bn_mode: str,
    layer: str | None,
    metrics: Sequence[str],
    keep_maps: int,
    progress: Callable[[str], None] | None,
    repeats: int = 1,
    blocks: list[RandomizationBlock] | None = None,
    copy_model: bool = True,
) -> RandomizationCurves:
    _check_metrics(metrics)
    if bn_mode not in BN_MODES:
        raise ValueError(f"Expected `bn_mode` to be one of {', '.join(repr(m) for m in BN_MODES)}, but got {bn_mode!r}.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"Expected `repeats` to be a positive int, but got {repeats!r}.")
    explainer = methods if isinstance(methods, _Explainer) else _Explainer(methods)
    work = copy.deepcopy(model) if copy_model else model  # never touch the trained model
    with _work_mode(work):
        x, fixed, layer = _prepare(work, inputs, target, explainer, layer)
        if blocks is None:
            blocks = randomization_blocks(work, x[:1], layers, bn_mode=bn_mode)
        original = explainer(work, x, fixed, layer)
        original_pred = _predictions(work, x)
        trained = {k: v.detach().clone() for k, v in work.state_dict().items()} if mode == "cascading" and repeats > 1 else None
        values: dict[str, dict[str, dict[str, list[torch.Tensor]]]] = {m: {} for m in explainer.names}
        kept: dict[str, dict[str, torch.Tensor]] = {m: {ORIGINAL: original[m][:keep_maps].clone()} for m in explainer.names} if keep_maps else {}
        unchanged: dict[str, list[float]] = {}
        pending = _PendingSimilarities(metrics)  # measured in a few batched passes, not one per method and step
        modules = dict(work.named_modules())
        for repeat in range(repeats):
            if repeat and trained is not None:
                work.load_state_dict(trained)
            for step, block in enumerate(blocks, 1):
                if progress is not None:
                    again = f" (repeat {repeat + 1}/{repeats})" if repeats > 1 else ""
                    progress(f"{mode} randomisation {step}/{len(blocks)}: {block.name}{again}")
                saved = None
                if mode == "independent":
                    saved = {n: copy.deepcopy(modules[n].state_dict(keep_vars=False)) for n in block.modules}
                _randomize_block(work, block, seed=seed, bn_mode=bn_mode, repeat=repeat)
                maps = explainer(work, x, fixed, layer)
                unchanged.setdefault(block.name, []).append(float((_predictions(work, x) == original_pred).float().mean()))
                for name in explainer.names:
                    pending.add((name, block.name), original[name], maps[name])
                    if keep_maps and repeat == 0:
                        kept[name][block.name] = maps[name][:keep_maps].clone()
                if saved is not None:
                    for n, state in saved.items():
                        modules[n].load_state_dict(state)
        for (name, block_name), sims in pending.results():  # in the order measured: the same dict order as before
            for metric, sim in sims.items():
                values[name].setdefault(metric, {}).setdefault(block_name, []).append(sim)
    curves: dict[str, dict[str, dict[str, float]]] = {m: {} for m in explainer.names}
    stds: dict[str, dict[str, dict[str, float]]] = {m: {} for m in explainer.names}
    for name, per_metric in values.items():
        for metric, per_block in per_metric.items():
            for block_name, sims in per_block.items():
                means, spread = _summarise({metric: torch.cat(sims)})
                curves[name].setdefault(metric, {})[block_name] = means[metric]
                stds[name].setdefault(metric, {})[block_name] = spread[metric]
    agreement = {k: sum(v) / len(v) for k, v in unchanged.items()}
    return RandomizationCurves(mode, [b.name for b in blocks], curves, stds, agreement, kept)


def cascading_randomization(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Any = "pred",
    methods: MethodSpec = DEFAULT_METHODS,
    *,
    layers: str | int | Sequence[str] = "auto",
    seed: int = 0,
    bn_mode: str = "affine",
    layer: str | None = "auto",
    metrics: Sequence[str] = METRICS,
    keep_maps: int = 1,
    repeats: int = 1,
    progress: Callable[[str], None] | None = None,
) -> RandomizationCurves:
    """Re-initialise blocks from the output side to the input side, cumulatively, on a deep copy.

    After each step every method's maps are recomputed and compared with the trained model's maps
    (the same target classes: ``target="pred"`` is fixed to the trained model's predictions).

    Args:
        model: the trained model; never modified (a deep copy is randomised).
        inputs: a batch ``(N, ...)``; a few samples suffice.
        target: what to explain (see :mod:`lightning_introspect.methods.targets`); default each sample's
            predicted class.
        methods: names from ``attribution.METHODS``, callables ``fn(model, inputs, target, layer=None)``,
            or a dict ``{name: name or callable}``.
        layers: which blocks (see :func:`randomization_blocks`).
        seed: base of the private per-layer seeds (:func:`layer_seed`).
        bn_mode: ``"affine"`` | ``"stats"`` | ``"both"`` | ``"keep"`` (module docstring).
        layer: the layer of layer methods (Grad-CAM); ``"auto"`` asks ``attribution.auto_layer``.
        metrics: a subset of :data:`METRICS`.
        keep_maps: keep the maps of this many samples (for figures; from the first repeat).
        repeats: run the randomisation this many times with different re-initialisations (per-layer
            seeds from ``(seed, layer, repeat)``) and average: one random draw of a small top layer
            can by chance resemble the trained one (Grad-CAM on a 10-class head varies by about
            0.15 between draws); averaging makes the verdicts stable. Cost: ``repeats`` times.
        progress: called with one line of text per step.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> grad = lambda m, x, t, layer=None: torch.autograd.grad(
        ...     m(x.requires_grad_()).gather(1, t.view(-1, 1)).sum(), x)[0]
        >>> res = cascading_randomization(net, torch.randn(3, 1, 2, 2), methods={"grad": grad}, metrics=["spearman"])
        >>> res.layers, list(res.curves["grad"]["spearman"])
        (['3', '1'], ['3', '1'])
    """
    return _randomization(
        "cascading", model, inputs, target, methods, layers=layers, seed=seed, bn_mode=bn_mode,
        layer=layer, metrics=metrics, keep_maps=keep_maps, progress=progress, repeats=repeats,
    )


def independent_randomization(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Any = "pred",
    methods: MethodSpec = DEFAULT_METHODS,
    *,
    layers: str | int | Sequence[str] = "auto",
    seed: int = 0,
    bn_mode: str = "affine",
    layer: str | None = "auto",
    metrics: Sequence[str] = METRICS,
    keep_maps: int = 1,
    repeats: int = 1,
    progress: Callable[[str], None] | None = None,
) -> RandomizationCurves:
    """Re-initialise one block at a time (the others trained), on a deep copy; arguments as
    :func:`cascading_randomization`.

    Each block is restored from its saved state before the next one is randomised.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> grad = lambda m, x, t, layer=None: torch.autograd.grad(
        ...     m(x.requires_grad_()).gather(1, t.view(-1, 1)).sum(), x)[0]
        >>> independent_randomization(net, torch.randn(3, 1, 2, 2), methods={"grad": grad}).mode
        'independent'
    """
    return _randomization(
        "independent", model, inputs, target, methods, layers=layers, seed=seed, bn_mode=bn_mode,
        layer=layer, metrics=metrics, keep_maps=keep_maps, progress=progress, repeats=repeats,
    )


# ---------------------------------------------------------------------------- class sensitivity
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
        return {
            "similarity": copy.deepcopy(self.similarity),
            "similarity_std": copy.deepcopy(self.similarity_std),
            "classes": copy.deepcopy(self.classes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassSensitivity:
        return cls(
            copy.deepcopy(dict(data["similarity"])),
            copy.deepcopy(dict(data.get("similarity_std", {}))),
            copy.deepcopy(dict(data.get("classes", {}))),
        )


def _other_classes(scores: torch.Tensor, others: Sequence[str], seed: int) -> dict[str, torch.Tensor]:
    n, num_classes = scores.shape
    if num_classes < 2:
        raise ValueError(f"Class sensitivity needs a model with at least 2 classes, but the output has {num_classes}.")
    ranked = scores.argsort(dim=1, descending=True)
    out = {"pred": ranked[:, 0]}
    for other in others:
        if other == "second":
            out[other] = ranked[:, 1]
        else:  # uniform among the classes other than the predicted one, from a private generator
            draw = torch.randint(0, num_classes - 1, (n,), generator=private_generator(seed))
            pred = ranked[:, 0].cpu()
            out[other] = (draw + (draw >= pred).long()).to(scores.device)
    return out


def class_sensitivity(
    model: nn.Module,
    inputs: torch.Tensor,
    methods: MethodSpec = DEFAULT_METHODS,
    *,
    others: Sequence[str] = OTHER_CLASSES,
    seed: int = 0,
    layer: str | None = "auto",
    metrics: Sequence[str] = METRICS,
    keep_maps: int = 1,
) -> ClassSensitivity:
    """Compare the map for each sample's predicted class with the map for other classes.

    ``others``: ``"second"`` is the runner-up class (largest other logit; the hardest case),
    ``"random"`` a class drawn uniformly among the other classes with a private generator seeded
    by ``seed``. For ``(N, C, H, W)`` outputs the class scores are summed over the pixels. The model
    is only run (eval mode, global RNG forked), never changed.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> grad = lambda m, x, t, layer=None: torch.autograd.grad(
        ...     m(x.requires_grad_()).gather(1, t.view(-1, 1)).sum(), x)[0]
        >>> res = class_sensitivity(net, torch.randn(2, 1, 2, 2), {"grad": grad}, metrics=["spearman"])
        >>> sorted(res.similarity["grad"])
        ['random', 'second']
    """
    _check_metrics(metrics)
    if isinstance(others, str) or not others or any(o not in OTHER_CLASSES for o in others):
        raise ValueError(f"Expected `others` to be a non-empty list of {', '.join(repr(o) for o in OTHER_CLASSES)}, but got {others!r}.")
    explainer = methods if isinstance(methods, _Explainer) else _Explainer(methods)
    with _work_mode(model):
        x = _model_input(model, inputs)
        with torch.no_grad():
            out = model(x).detach()
        scores = out.flatten(2).sum(-1) if out.ndim > 2 else out
        classes = _other_classes(scores, list(others), seed)
        layer = explainer.resolve_layer(model, x[:1], layer)
        # Every class in one batch: the inputs repeated once per class key, each copy with its class ids
        # (the maps are per sample, so this is the same as one call per class, with one forward pass).
        keys = list(classes)
        tiled = x.repeat(len(keys), *([1] * (x.ndim - 1)))
        joint = explainer(model, tiled, torch.cat([classes[k] for k in keys]), layer)
        n = x.shape[0]
        maps = {key: {name: joint[name][i * n : (i + 1) * n] for name in explainer.names} for i, key in enumerate(keys)}
    similarity: dict[str, dict[str, dict[str, float]]] = {m: {} for m in explainer.names}
    spread: dict[str, dict[str, dict[str, float]]] = {m: {} for m in explainer.names}
    kept: dict[str, dict[str, torch.Tensor]] = {}
    pairs = [(maps["pred"][name], maps[other][name]) for name in explainer.names for other in others]
    sims = iter(_similarities(pairs, metrics))
    for name in explainer.names:
        for other in others:
            means, stds = _summarise(next(sims))
            similarity[name][other] = means
            spread[name][other] = stds
        if keep_maps:
            kept[name] = {key: maps[key][name][:keep_maps].clone() for key in classes}
    return ClassSensitivity(similarity, spread, {k: v.cpu().tolist() for k, v in classes.items()}, kept)


# ----------------------------------------------------------------------------------- caveats
@dataclass(frozen=True)
class Caveat:
    """A reason not to trust some maps: ``kind`` (a short key) and a ``message`` for people."""

    kind: str
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


_RELU_OPS = frozenset({"relu", "relu_"})
_NON_RELU_OPS = frozenset({
    "sigmoid", "sigmoid_", "tanh", "tanh_", "gelu", "silu", "elu", "elu_", "selu", "celu", "leaky_relu", "leaky_relu_",
    "softplus", "mish", "hardswish", "hardsigmoid", "relu6", "hardtanh", "hardtanh_", "prelu", "rrelu", "glu",
    "logsigmoid", "softsign", "tanhshrink", "threshold",
})
_PROB_OPS = frozenset({"softmax", "log_softmax", "sigmoid"})
_CLAMP_OPS = frozenset({"clamp", "clamp_", "clamp_min", "clamp_min_", "clip", "clip_", "maximum", "max"})


def _is_zero(value: Any) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    if isinstance(value, torch.Tensor) and value.numel() and (value.numel() == 1 or value.numel() < 1_000_000):
        return bool((value == 0).all())
    return False


def _is_hidden_relu(op: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    """``clamp(x, min=0)`` without a max, ``clamp_min(x, 0)`` or ``maximum(x, 0)``: a ReLU no hook sees."""
    if op not in _CLAMP_OPS:
        return False
    if op in ("maximum", "max"):
        return len(args) >= 2 and isinstance(args[1], torch.Tensor) and (_is_zero(args[1]) or _is_zero(args[0]))
    low = kwargs.get("min", args[1] if len(args) > 1 else None)
    high = kwargs.get("max", args[2] if len(args) > 2 else None)
    return low is not None and _is_zero(low) and (high is None or op.startswith("clamp_min"))
_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.PReLU, nn.RReLU, nn.GLU, nn.LogSigmoid,
    nn.Softsign, nn.Tanhshrink, nn.Threshold,
)


def _trace_activations(model: nn.Module, example_input: torch.Tensor) -> tuple[list[tuple[str, str, bool, str]], Any, dict[str, int]]:
    """Run the model once, recording every activation op: ``(op, innermost module, in-place, its class)``.

    Also returns the output and how often each activation module ran. Uses a ``TorchFunctionMode`` so
    functional calls (``F.relu``, ``x.relu()``) are seen as well as modules.
    """
    from torch.overrides import TorchFunctionMode

    names = {m: n for n, m in model.named_modules()}
    stack: list[nn.Module] = []
    calls: dict[str, int] = {}
    records: list[tuple[str, str, bool, str]] = []
    prob_outputs: list[torch.Tensor] = []

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            result = func(*args, **kwargs)
            op = getattr(func, "__name__", "")
            if _is_hidden_relu(op, args, kwargs):
                op = "hidden_relu"
            if op in _RELU_OPS or op in _NON_RELU_OPS or op in _PROB_OPS or op == "hidden_relu":
                inner = stack[-1] if stack else model
                inplace = op.endswith("_") or bool(kwargs.get("inplace", False))
                records.append((op, names.get(inner, ""), inplace, type(inner).__name__))
                if op in _PROB_OPS and isinstance(result, torch.Tensor):
                    prob_outputs.append(result)
            return result

    def push(module: nn.Module, _args: Any) -> None:
        stack.append(module)
        if isinstance(module, _ACTIVATION_MODULES):
            calls[names[module]] = calls.get(names[module], 0) + 1

    def pop(module: nn.Module, _args: Any, _out: Any) -> None:
        if stack and stack[-1] is module:
            stack.pop()

    with contextlib.ExitStack() as ctx:
        ctx.enter_context(fork_global_rng())
        ctx.enter_context(eager_mode())
        ctx.enter_context(eval_mode(model))
        ctx.enter_context(torch.no_grad())
        handles = ctx.enter_context(hooks())
        for module in names:
            handles.append(module.register_forward_pre_hook(push))
            handles.append(module.register_forward_hook(pop))
        x = _model_input(model, example_input)
        with Recorder():
            output = model(x)
    is_prob = isinstance(output, torch.Tensor) and any(output is p for p in prob_outputs)
    return records, (output, is_prob), calls


def _short_list(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def detect_caveats(
    model: nn.Module,
    example_input: torch.Tensor,
    methods: Sequence[str] | None = None,
    *,
    warn: bool = True,
) -> list[Caveat]:
    """Find properties of the model and inputs that make attribution maps less trustworthy.

    Kinds: ``"batchnorm"``, ``"inplace_relu"``, ``"functional_relu"`` (ReLU applied as a function:
    invisible to module-hook tools such as captum, though our guided methods intercept it),
    ``"hidden_relu"`` (``clamp(min=0)`` / ``maximum(x, 0)``: no guided method sees it), ``"reused_activation"`` (one
    activation module called several times), ``"non_relu_activation"``, ``"negative_inputs"`` (for
    input-times-gradient style methods), ``"probability_output"`` (softmax / sigmoid at the output),
    ``"segmentation_output"`` (per-pixel ``(N, C, H, W)`` output).

    The model runs once in eval mode without gradients (global RNG forked); nothing is changed.

    Args:
        model: the model.
        example_input: a batch it accepts (the real inputs, so the sign check is meaningful).
        methods: the method names in use (caveats specific to other methods are skipped); ``None``: all.
        warn: also issue each caveat as a :class:`SanityCaveatWarning`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(inplace=True))
        >>> [c.kind for c in detect_caveats(net, torch.randn(1, 1, 5, 5), warn=False)]
        ['batchnorm', 'inplace_relu', 'negative_inputs', 'segmentation_output']
    """
    relevant = set(methods) if methods is not None else None

    def uses(kinds: frozenset[str]) -> bool:
        return relevant is None or bool(relevant & kinds)

    caveats: list[Caveat] = []
    modules = dict(model.named_modules())
    norms = [n for n, m in modules.items() if isinstance(m, nn.modules.batchnorm._NormBase)]
    if norms:
        caveats.append(Caveat(
            "batchnorm",
            f"The model has {len(norms)} BatchNorm layer(s) ({_short_list(norms)}). In eval mode each is an affine map "
            "that rescales channels: LRP-style rules need it folded into the neighbouring layer, and how the "
            "randomisation check treats it (`bn_mode`) changes the curves.",
        ))
    try:
        records, (output, is_prob), calls = _trace_activations(model, example_input)
    except Exception as err:  # a model the function mode cannot run through: fall back to modules only
        records, output, is_prob, calls = [], None, False, {}
        caveats.append(Caveat("trace_failed", f"Could not trace the model's activation ops ({type(err).__name__}: {err}); only modules were inspected."))
    inplace = sorted({n for n, m in modules.items() if getattr(m, "inplace", False) is True and isinstance(m, _ACTIVATION_MODULES)})
    inplace_ops = sorted({where or "<model>" for op, where, ip, cls in records if ip and op in _RELU_OPS | _NON_RELU_OPS})
    places = sorted(set(inplace) | set(inplace_ops))
    if places:
        caveats.append(Caveat(
            "inplace_relu",
            f"In-place activations at {_short_list(places)}: they overwrite the tensor a backward hook or an "
            "activation hook wants to read, which breaks or silently changes several attribution tools; "
            "use inplace=False for introspection.",
        ))
    functional = [where or "<model>" for op, where, _ip, cls in records if op in _RELU_OPS and cls not in ("ReLU",)]
    if functional and uses(_GUIDED_METHODS):
        unique = sorted(set(functional))
        caveats.append(Caveat(
            "functional_relu",
            f"{len(functional)} ReLU call(s) are functional (F.relu / torch.relu / x.relu()) inside {_short_list(unique)}: "
            "lightning_introspect's guided backprop and deconvnet intercept these ops, but tools that hook "
            "nn.ReLU modules (captum's GuidedBackprop / Deconvolution, per-module LRP rules, activation hooks) do "
            "not see them and silently use the plain gradient there. Prefer one nn.ReLU module per use.",
        ))
    hidden = sorted({where or "<model>" for op, where, _ip, _cls in records if op == "hidden_relu"})
    if hidden and uses(_GUIDED_METHODS):
        caveats.append(Caveat(
            "hidden_relu",
            f"ReLU written as clamp(min=0) / torch.maximum(x, 0) inside {_short_list(hidden)}: no guided backprop or "
            "deconvnet implementation (ours included) recognises it, so those methods use the plain gradient rule "
            "there. Use nn.ReLU.",
        ))
    reused = sorted(n for n, k in calls.items() if k > 1)
    if reused and uses(_GUIDED_METHODS):
        caveats.append(Caveat(
            "reused_activation",
            f"Activation module(s) {_short_list(reused)} are called more than once per forward pass: per-module "
            "hooks (guided backprop, LRP rules, activation capture) see several calls mixed together.",
        ))
    non_relu = sorted({f"{op} in {where or '<model>'}" for op, where, _ip, cls in records if op in _NON_RELU_OPS and not (is_prob and op == "sigmoid")})
    if non_relu:
        caveats.append(Caveat(
            "non_relu_activation",
            f"Non-ReLU activations ({_short_list(non_relu)}): the guided backprop / deconvnet rules are defined for "
            "ReLU only, and gradient maps of saturating activations (sigmoid, tanh) are small and noisy.",
        ))
    if isinstance(example_input, torch.Tensor) and example_input.is_floating_point() and bool((example_input < 0).any()):
        if uses(_INPUT_TIMES_METHODS):
            caveats.append(Caveat(
                "negative_inputs",
                f"The inputs have negative values (min {float(example_input.min()):.3g}): input x gradient style methods "
                "multiply by the input, so the sign of a normalised pixel flips its attribution and a uniform "
                "background (not zero after normalisation) gets relevance.",
            ))
    if is_prob:
        caveats.append(Caveat(
            "probability_output",
            "The model's output is a softmax / sigmoid: explain the logits instead, gradients of saturated "
            "probabilities are close to zero and compare badly across classes.",
        ))
    if isinstance(output, torch.Tensor) and output.ndim > 2:
        caveats.append(Caveat(
            "segmentation_output",
            f"The output has shape {tuple(output.shape)} (per position, segmentation-style): a plain class target "
            "sums the class score over all pixels, so a map explains the whole image's class mass; use a "
            "RegionTarget to explain a region. Class sensitivity compares classes by their summed scores.",
        ))
    if warn:
        for caveat in caveats:
            warnings.warn(str(caveat), SanityCaveatWarning, stacklevel=2)
    return caveats


# ------------------------------------------------------------------------------------- report
def _resolve_thresholds(thresholds: Mapping[str, float] | float | None) -> dict[str, float]:
    out = dict(DEFAULT_THRESHOLDS)
    if thresholds is None:
        return out
    if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        thresholds = {"randomization": float(thresholds)}
    if not isinstance(thresholds, Mapping):
        raise ValueError(f"Expected `thresholds` to be a float or a dict with keys {sorted(DEFAULT_THRESHOLDS)}, but got {thresholds!r}.")
    for key, value in thresholds.items():
        if key not in DEFAULT_THRESHOLDS:
            raise ValueError(f"Expected the keys of `thresholds` to be among {', '.join(repr(k) for k in DEFAULT_THRESHOLDS)}, but got {key!r}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= float(value) <= 1.0 or math.isnan(value):
            raise ValueError(f"Expected `thresholds[{key!r}]` to be a number in [-1, 1], but got {value!r}.")
        out[key] = float(value)
    return out


@dataclass
class SanityReport:
    """Everything :func:`run_sanity_checks` found.

    Attributes:
        methods: the method names, in order.
        layers: the randomised blocks, output side first.
        curves: ``{mode: {method: {metric: {layer: similarity}}}}``, ``mode`` in ``"cascading"`` /
            ``"independent"``; cascading values are with that block and all above it randomised.
        curves_std: the same shape, standard deviation over samples.
        agreement: ``{mode: {layer: fraction of unchanged predictions}}``.
        verdicts: ``{method: "pass" | "fail"}`` for the randomisation test.
        verdict_scores: ``{method: the similarity the verdict was decided on}``.
        class_sensitivity: ``{method: {other: {metric: similarity}}}`` (empty when not run).
        class_sensitivity_verdicts: ``{method: "pass" | "fail"}``.
        class_sensitivity_scores: ``{method: the largest score over the other classes}``.
        caveats: :class:`Caveat` list.
        thresholds: the thresholds used; ``verdict_metric``, ``verdict_depth``, ``bn_mode``, ``seed``,
            ``num_samples``, ``repeats``: the settings; ``classes``: ``{"pred" | other: class id per sample}``.
        maps: ``{mode: {method: {"original" | layer: maps}}}`` and ``class_maps`` ``{method: {class: maps}}``
            for a few samples (kept for figures, not serialised).
    """

    methods: list[str]
    layers: list[str]
    curves: dict[str, dict[str, dict[str, dict[str, float]]]]
    curves_std: dict[str, dict[str, dict[str, dict[str, float]]]]
    agreement: dict[str, dict[str, float]]
    verdicts: dict[str, str]
    verdict_scores: dict[str, float]
    class_sensitivity: dict[str, dict[str, dict[str, float]]]
    class_sensitivity_verdicts: dict[str, str]
    class_sensitivity_scores: dict[str, float]
    caveats: list[Caveat]
    thresholds: dict[str, float]
    verdict_metric: str
    verdict_depth: int
    bn_mode: str
    seed: int
    num_samples: int
    repeats: int = 1
    classes: dict[str, list[int]] = field(default_factory=dict)
    maps: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict, repr=False)
    class_maps: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def curve(self, method: str, metric: str = "spearman_abs", mode: str = "cascading") -> list[float]:
        """The similarity values along ``layers`` for one method (``1.0`` for the original is not included)."""
        values = self.curves.get(mode, {}).get(method, {}).get(metric, {})
        return [values[layer] for layer in self.layers if layer in values]

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only (str, int, float, list, dict): safe for ``weights_only`` checkpoints."""
        return {
            "methods": list(self.methods),
            "layers": list(self.layers),
            "curves": copy.deepcopy(self.curves),
            "curves_std": copy.deepcopy(self.curves_std),
            "agreement": copy.deepcopy(self.agreement),
            "verdicts": dict(self.verdicts),
            "verdict_scores": dict(self.verdict_scores),
            "class_sensitivity": copy.deepcopy(self.class_sensitivity),
            "class_sensitivity_verdicts": dict(self.class_sensitivity_verdicts),
            "class_sensitivity_scores": dict(self.class_sensitivity_scores),
            "caveats": [{"kind": c.kind, "message": c.message} for c in self.caveats],
            "thresholds": dict(self.thresholds),
            "verdict_metric": self.verdict_metric,
            "verdict_depth": int(self.verdict_depth),
            "bn_mode": self.bn_mode,
            "seed": int(self.seed),
            "num_samples": int(self.num_samples),
            "repeats": int(self.repeats),
            "classes": copy.deepcopy(self.classes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SanityReport:
        """Rebuild a report from :meth:`to_dict` (without the maps)."""
        return cls(
            methods=list(data["methods"]),
            layers=list(data["layers"]),
            curves=copy.deepcopy(dict(data["curves"])),
            curves_std=copy.deepcopy(dict(data.get("curves_std", {}))),
            agreement=copy.deepcopy(dict(data.get("agreement", {}))),
            verdicts=dict(data["verdicts"]),
            verdict_scores=dict(data.get("verdict_scores", {})),
            class_sensitivity=copy.deepcopy(dict(data.get("class_sensitivity", {}))),
            class_sensitivity_verdicts=dict(data.get("class_sensitivity_verdicts", {})),
            class_sensitivity_scores=dict(data.get("class_sensitivity_scores", {})),
            caveats=[Caveat(str(c["kind"]), str(c["message"])) for c in data.get("caveats", [])],
            thresholds=dict(data.get("thresholds", DEFAULT_THRESHOLDS)),
            verdict_metric=str(data.get("verdict_metric", DEFAULT_VERDICT_METRIC)),
            verdict_depth=int(data.get("verdict_depth", 1)),
            bn_mode=str(data.get("bn_mode", "affine")),
            seed=int(data.get("seed", 0)),
            num_samples=int(data.get("num_samples", 0)),
            repeats=int(data.get("repeats", 1)),
            classes=copy.deepcopy(dict(data.get("classes", {}))),
        )

    def markdown(self) -> str:
        """The verdict table (and caveats) as markdown, for TensorBoard's text tab or a notebook."""
        depth_layer = self.layers[min(self.verdict_depth, len(self.layers)) - 1] if self.layers else "-"
        lines = [
            f"Score: `{self.verdict_metric}` (lower = the map changed more). **Randomisation**: after randomising "
            f"the top {self.verdict_depth} block(s) (down to `{depth_layer}`; mean over {self.num_samples} samples x "
            f"{self.repeats} re-initialisation(s)), pass below "
            f"{self.thresholds['randomization']:.2f}. **Class sensitivity**: predicted class vs other classes, "
            f"pass below {self.thresholds['class_sensitivity']:.2f}.",
            "",
            "| method | randomisation | score | class sensitivity | score |",
            "|---|---|---|---|---|",
        ]
        for method in self.methods:
            score = self.verdict_scores.get(method, float("nan"))
            cs = self.class_sensitivity.get(method, {})
            cs_values = ", ".join(f"{other} {verdict_score(vals, self.verdict_metric):.2f}" for other, vals in cs.items()) or "-"
            lines.append(
                f"| {method} | {self.verdicts.get(method, '-')} | {score:.2f} | "
                f"{self.class_sensitivity_verdicts.get(method, '-')} | {cs_values} |"
            )
        if self.caveats:
            lines += ["", "**Caveats**", ""] + [f"- {c}" for c in self.caveats]
        return "\n".join(lines)


def verdict_score(values: Mapping[str, float], metric: str = DEFAULT_VERDICT_METRIC) -> float:
    """The verdict score from ``{metric: similarity}``: one metric, or ``"spearman_max"`` (NaN if missing).

    Example:
        >>> verdict_score({"spearman_abs": 0.3, "spearman": 0.8})
        0.8
    """
    if metric == "spearman_max":
        present = [float(values[m]) for m in ("spearman_abs", "spearman") if m in values]
        return max(present) if present else float("nan")
    return float(values.get(metric, float("nan")))


def _verdict_metrics(metric: str, metrics: Sequence[str]) -> list[str]:
    if metric not in VERDICT_METRICS:
        raise ValueError(f"Expected `verdict_metric` to be one of {', '.join(repr(m) for m in VERDICT_METRICS)}, but got {metric!r}.")
    needed = ["spearman_abs", "spearman"] if metric == "spearman_max" else [metric]
    return list(metrics) + [m for m in needed if m not in metrics]


def decide_verdicts(
    curves: Mapping[str, Mapping[str, Mapping[str, float]]],
    layers: Sequence[str],
    *,
    threshold: float,
    depth: int = 1,
    metric: str = DEFAULT_VERDICT_METRIC,
) -> tuple[dict[str, str], dict[str, float]]:
    """``"pass"`` where the cascading curve's score (:func:`verdict_score`) at ``layers[depth - 1]`` is
    below ``threshold``, else ``"fail"`` (a missing score fails).

    Example:
        >>> decide_verdicts({"a": {"spearman_abs": {"fc": 0.2}}, "b": {"spearman_abs": {"fc": 0.9}}}, ["fc"],
        ...                 threshold=0.5, metric="spearman_abs")
        ({'a': 'pass', 'b': 'fail'}, {'a': 0.2, 'b': 0.9})
    """
    if not layers:
        return {}, {}
    at = layers[min(depth, len(layers)) - 1]
    verdicts, scores = {}, {}
    for method, per_metric in curves.items():
        score = verdict_score({m: values[at] for m, values in per_metric.items() if at in values}, metric)
        scores[method] = score
        verdicts[method] = "pass" if score < threshold else "fail"
    return verdicts, scores


def run_sanity_checks(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Any = "pred",
    methods: MethodSpec = DEFAULT_METHODS,
    *,
    mode: str = "cascading",
    layers: str | int | Sequence[str] = "auto",
    seed: int = 0,
    bn_mode: str = "affine",
    layer: str | None = "auto",
    thresholds: Mapping[str, float] | float | None = None,
    verdict_depth: int = 1,
    verdict_metric: str = DEFAULT_VERDICT_METRIC,
    class_check: bool = True,
    others: Sequence[str] = OTHER_CLASSES,
    metrics: Sequence[str] = METRICS,
    keep_maps: int = 1,
    repeats: int = 1,
    warn: bool = True,
    progress: Callable[[str], None] | None = None,
) -> SanityReport:
    """Caveats, randomisation (``mode``), class sensitivity and verdicts in one call.

    Args are those of :func:`cascading_randomization` and :func:`class_sensitivity`, plus:
        mode: ``"cascading"`` | ``"independent"`` | ``"both"``. Verdicts always use the cascading curve;
            in ``"independent"`` mode only the top ``verdict_depth`` cascading steps are run for them.
        thresholds: ``{"randomization": 0.5, "class_sensitivity": 0.6}`` (a float sets the first).
        verdict_depth: how many top blocks are randomised when the verdict is taken (1: the output layer).
        verdict_metric: one of :data:`VERDICT_METRICS` (module docstring); its metrics are always computed.
        class_check: run :func:`class_sensitivity`.
        warn: issue the caveats as :class:`SanityCaveatWarning`.

    Returns:
        A :class:`SanityReport`.
    """
    if mode not in MODES:
        raise ValueError(f"Expected `mode` to be one of {', '.join(repr(m) for m in MODES)}, but got {mode!r}.")
    if isinstance(verdict_depth, bool) or not isinstance(verdict_depth, int) or verdict_depth < 1:
        raise ValueError(f"Expected `verdict_depth` to be a positive int, but got {verdict_depth!r}.")
    _check_metrics(metrics)
    resolved = _resolve_thresholds(thresholds)
    explainer = _Explainer(methods)
    metrics = _verdict_metrics(verdict_metric, metrics)
    work = copy.deepcopy(model)  # everything below runs on this copy; the trained model is only read
    caveats = detect_caveats(work, inputs, explainer.names, warn=warn)
    with _work_mode(work):
        x = _model_input(work, inputs)
        blocks = randomization_blocks(work, x[:1], layers, bn_mode=bn_mode)
    sensitivity = None
    cs_verdicts: dict[str, str] = {}
    cs_scores: dict[str, float] = {}
    if class_check:  # before any randomisation
        if progress is not None:
            progress("class sensitivity")
        sensitivity = class_sensitivity(work, inputs, explainer, others=others, seed=seed, layer=layer, metrics=metrics, keep_maps=keep_maps)
        for method, per_other in sensitivity.similarity.items():
            worst = max(verdict_score(vals, verdict_metric) for vals in per_other.values())
            cs_scores[method] = worst
            cs_verdicts[method] = "pass" if worst < resolved["class_sensitivity"] else "fail"
    common: dict[str, Any] = dict(
        seed=seed, bn_mode=bn_mode, layer=layer, metrics=metrics, keep_maps=keep_maps, progress=progress, layers=layers,
        repeats=repeats, copy_model=False,
    )
    results: dict[str, RandomizationCurves] = {}
    if mode in ("independent", "both"):  # restores every block it touches, so it goes first
        results["independent"] = _randomization("independent", work, inputs, target, explainer, blocks=blocks, **common)
    if mode in ("cascading", "both"):
        results["cascading"] = _randomization("cascading", work, inputs, target, explainer, blocks=blocks, **common)
        cascade = results["cascading"]
    else:
        quiet = {**common, "keep_maps": 0, "progress": None}
        cascade = _randomization("cascading", work, inputs, target, explainer, blocks=blocks[:verdict_depth], **quiet)
    verdicts, scores = decide_verdicts(
        cascade.curves, cascade.layers, threshold=resolved["randomization"], depth=verdict_depth, metric=verdict_metric
    )
    return SanityReport(
        methods=list(explainer.names),
        layers=[b.name for b in blocks],
        curves={k: results[k].curves for k in ("cascading", "independent") if k in results},
        curves_std={k: results[k].curves_std for k in ("cascading", "independent") if k in results},
        agreement={k: results[k].agreement for k in ("cascading", "independent") if k in results},
        verdicts=verdicts,
        verdict_scores=scores,
        class_sensitivity=sensitivity.similarity if sensitivity else {},
        class_sensitivity_verdicts=cs_verdicts,
        class_sensitivity_scores=cs_scores,
        caveats=caveats,
        thresholds=resolved,
        verdict_metric=verdict_metric,
        verdict_depth=verdict_depth,
        bn_mode=bn_mode,
        seed=int(seed),
        num_samples=int(inputs.shape[0]),
        repeats=int(repeats),
        classes=sensitivity.classes if sensitivity else {},
        maps={k: results[k].maps for k in ("cascading", "independent") if k in results},
        class_maps=sensitivity.maps if sensitivity else {},
    )


__all__ = [
    "BN_MODES",
    "DEFAULT_METHODS",
    "DEFAULT_THRESHOLDS",
    "METRICS",
    "MODES",
    "OTHER_CLASSES",
    "Caveat",
    "ClassSensitivity",
    "RandomizationBlock",
    "RandomizationCurves",
    "SanityCaveatWarning",
    "SanityReport",
    "VERDICT_METRICS",
    "cascading_randomization",
    "class_sensitivity",
    "decide_verdicts",
    "detect_caveats",
    "independent_randomization",
    "layer_seed",
    "map_similarity",
    "randomization_blocks",
    "reinitialize_",
    "run_sanity_checks",
    "spearman_similarity",
    "ssim_similarity",
    "verdict_score",
]
