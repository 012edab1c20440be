"""Verdicts with uncertainty: a bootstrap interval of a mean similarity, a threshold relative to reference
maps, and ``"pass"`` / ``"fail"`` / ``"inconclusive"``.

A sanity check measures one similarity per sample (and per repeated re-initialisation). The verdict reads
the *mean* of those values through a percentile bootstrap interval (:func:`bootstrap_interval`: samples are
resampled with replacement, each with all its repeats, ``resamples`` times, from a private generator) and
compares the interval with a threshold:

* ``"pass"``: the whole interval lies below the threshold;
* ``"fail"``: the whole interval lies at or above it;
* ``"inconclusive"``: the interval straddles it (more samples or repeats narrow it).

Thresholds are relative to references measured on the same maps (:func:`reference_similarities`): the
similarity of the trained map to a *random map* (uniform noise: a map that knows nothing; Spearman about
0) and to an *edge map* of the input (the Sobel edges of
:func:`~lightning_introspect.methods.faithfulness.edge_map`: a map that knows the image but not the model).
:func:`relative_threshold` places the threshold a fraction of the way from such a floor to a ceiling.

Example:
    >>> import torch
    >>> gen = torch.Generator().manual_seed(0)
    >>> v = decide(torch.tensor([0.1, 0.2, 0.15, 0.12]), threshold=0.5, generator=gen, metric="spearman")
    >>> v.verdict, v.low <= v.score <= v.high
    ('pass', True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lightning_introspect.methods.similarity import map_similarities

VERDICTS: tuple[str, ...] = ("pass", "fail", "inconclusive")
DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
REFERENCES: tuple[str, ...] = ("random", "edge")


def per_sample(values: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """One value per sample, float64: ``(N,)`` as it is, ``(R, N)`` (or a list of ``R`` tensors ``(N,)``,
    one per repeat) averaged over the repeats; non-finite values dropped.

    Example:
        >>> per_sample(torch.tensor([[0.0, 1.0], [1.0, 1.0]])).tolist()
        [0.5, 1.0]
    """
    v = torch.stack([torch.as_tensor(t) for t in values]) if isinstance(values, (list, tuple)) else torch.as_tensor(values)
    v = v.detach().double().cpu()
    if v.ndim == 2:
        v = v.mean(0)
    v = v.flatten()
    return v[torch.isfinite(v)]


def bootstrap_interval(
    values: torch.Tensor | Sequence[torch.Tensor],
    *,
    generator: torch.Generator,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of :func:`per_sample` ``values``.

    ``resamples`` times, ``N`` samples are drawn with replacement (``torch.randint`` from ``generator``);
    the interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles (linear
    interpolation) of their means: ``scipy.stats.bootstrap(..., method="percentile")``'s definition. With
    repeats, each resampled sample brings all its repeats (the mean over repeats is taken first). One
    sample gives a zero-width interval; none gives ``(nan, nan)``.

    Args:
        values: per-sample values ``(N,)`` or ``(R, N)``.
        generator: the private generator the resampling draws from.
        resamples: how many bootstrap resamples.
        confidence: the interval's coverage, in (0, 1).

    Returns:
        ``(low, high)``.

    Example:
        >>> low, high = bootstrap_interval(torch.arange(10.0), generator=torch.Generator().manual_seed(0))
        >>> low < 4.5 < high
        True
    """
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"Expected `resamples` to be a positive int, but got {resamples!r}.")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"Expected `confidence` to be a number in (0, 1), but got {confidence!r}.")
    v = per_sample(values)
    n = v.numel()
    if n == 0:
        return float("nan"), float("nan")
    if n == 1:
        return float(v[0]), float(v[0])
    index = torch.randint(0, n, (resamples, n), generator=generator, device=generator.device).cpu()
    means = v[index].mean(1)
    alpha = (1.0 - float(confidence)) / 2.0
    low, high = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
    return float(low), float(high)


def relative_threshold(fraction: float, floor: float, ceiling: float = 1.0) -> float:
    """``floor + fraction * (ceiling - floor)``: a threshold a ``fraction`` of the way from a reference
    floor (what a map without knowledge of the model reaches) to a ceiling (what an unchanged map reaches).

    Example:
        >>> relative_threshold(0.5, 0.25)
        0.625
    """
    return float(floor) + float(fraction) * (float(ceiling) - float(floor))


@dataclass(frozen=True)
class Verdict:
    """One verdict with the numbers it comes from.

    Attributes:
        verdict: ``"pass"``, ``"fail"`` or ``"inconclusive"``.
        score: the mean similarity (over samples and repeats).
        low: the lower end of its bootstrap interval.
        high: the upper end.
        threshold: the threshold the interval was compared with.
        metric: the similarity metric the score is measured in.
        samples: how many samples the score averages.
        repeats: how many repeats per sample.
        references: the reference similarities the threshold was made from (``{"random": ..., "edge": ...,
            "same_class": ...}``, those that apply).
    """

    verdict: str
    score: float
    low: float
    high: float
    threshold: float
    metric: str
    samples: int = 0
    repeats: int = 1
    references: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only."""
        return {
            "verdict": self.verdict,
            "score": float(self.score),
            "low": float(self.low),
            "high": float(self.high),
            "threshold": float(self.threshold),
            "metric": self.metric,
            "samples": int(self.samples),
            "repeats": int(self.repeats),
            "references": {k: float(v) for k, v in self.references.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verdict:
        """Rebuild from :meth:`to_dict`."""
        return cls(
            verdict=str(data["verdict"]),
            score=float(data["score"]),
            low=float(data["low"]),
            high=float(data["high"]),
            threshold=float(data["threshold"]),
            metric=str(data.get("metric", "")),
            samples=int(data.get("samples", 0)),
            repeats=int(data.get("repeats", 1)),
            references={str(k): float(v) for k, v in dict(data.get("references", {})).items()},
        )

    def interval_text(self) -> str:
        """``"0.31 [0.22, 0.40] < 0.57"``: the score, its interval and the threshold."""
        sign = {"pass": "<", "fail": "≥"}.get(self.verdict, "~")
        return f"{self.score:.2f} [{self.low:.2f}, {self.high:.2f}] {sign} {self.threshold:.2f}"


def decide(
    values: torch.Tensor | Sequence[torch.Tensor],
    threshold: float,
    *,
    generator: torch.Generator,
    metric: str,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    references: Mapping[str, float] | None = None,
) -> Verdict:
    """The :class:`Verdict` of per-sample similarities ``values`` against ``threshold`` (module docstring).

    A score with no finite value is ``"inconclusive"``.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> decide(torch.tensor([0.4, 0.6, 0.5, 0.55]), 0.5, generator=gen, metric="spearman").verdict
        'inconclusive'
    """
    raw = torch.as_tensor(torch.stack(list(values)) if isinstance(values, (list, tuple)) else values)
    repeats = int(raw.shape[0]) if raw.ndim == 2 else 1
    v = per_sample(raw)
    low, high = bootstrap_interval(v, generator=generator, resamples=resamples, confidence=confidence)
    score = float(v.mean()) if v.numel() else float("nan")
    if not (math.isfinite(low) and math.isfinite(high)):
        verdict = "inconclusive"
    elif high < threshold:
        verdict = "pass"
    elif low >= threshold:
        verdict = "fail"
    else:
        verdict = "inconclusive"
    return Verdict(verdict, score, low, high, float(threshold), metric, int(v.numel()), repeats, dict(references or {}))


def _reduced(maps: torch.Tensor, *, absolute: bool) -> torch.Tensor:
    """Channels reduced as :mod:`~lightning_introspect.methods.similarity` does for ``(N, C, H, W)`` maps
    (``sum |map|`` or ``sum map``), other maps as they are; float32 on the CPU."""
    m = torch.nan_to_num(maps.detach().float().cpu())
    if m.ndim == 4:
        return m.abs().sum(1) if absolute else m.sum(1)
    return m


def reference_similarities(
    maps: torch.Tensor, inputs: torch.Tensor | None, metrics: Sequence[str], *, generator: torch.Generator
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-sample similarity of ``maps`` to the reference maps: ``{"random" | "edge": {metric: (N,)}}``.

    ``"random"``: uniform noise of the (channel-reduced) map's shape, from ``generator``. ``"edge"``: the
    Sobel edge magnitude of the input (:func:`~lightning_introspect.methods.faithfulness.edge_map`), resized
    (bilinear) to the map's size; only for image inputs ``(N, C, H, W)`` with image maps. Channels are
    reduced as the similarity metrics reduce them (``sum |map|`` for ``"spearman_abs"`` and ``"ssim"``,
    ``sum map`` for ``"spearman"``).

    Example:
        >>> refs = reference_similarities(torch.rand(2, 1, 8, 8), torch.rand(2, 3, 8, 8), ["spearman"],
        ...                               generator=torch.Generator().manual_seed(0))
        >>> sorted(refs), tuple(refs["edge"]["spearman"].shape)
        (['edge', 'random'], (2,))
    """
    spatial = _reduced(maps, absolute=True)
    noise = torch.rand(spatial.shape, generator=generator, device=generator.device).cpu()
    edges: torch.Tensor | None = None
    if inputs is not None and inputs.ndim == 4 and spatial.ndim == 3 and inputs.is_floating_point():
        from lightning_introspect.methods.faithfulness import edge_map

        edges = edge_map(inputs.detach().float().cpu())
        if tuple(edges.shape[-2:]) != tuple(spatial.shape[-2:]):
            edges = F.interpolate(edges, size=tuple(spatial.shape[-2:]), mode="bilinear", align_corners=False)
        edges = edges[:, 0]
    out: dict[str, dict[str, torch.Tensor]] = {"random": {}}
    if edges is not None:
        out["edge"] = {}
    for metric in metrics:
        m = _reduced(maps, absolute=metric != "spearman")
        pairs = [(m, noise)] + ([(m, edges)] if edges is not None else [])
        for name, sims in zip(REFERENCES, map_similarities(pairs, [metric])):
            if metric in sims:
                out[name][metric] = sims[metric]
    return out


__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_RESAMPLES",
    "REFERENCES",
    "VERDICTS",
    "Verdict",
    "bootstrap_interval",
    "decide",
    "per_sample",
    "reference_similarities",
    "relative_threshold",
]
