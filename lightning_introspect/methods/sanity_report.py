"""Sanity checks for attribution maps (Adebayo et al. 2018, "Sanity Checks for Saliency Maps") in one call.

:func:`run_sanity_checks` runs, on a deep copy of the model (the trained model is never touched):

* :func:`~lightning_introspect.methods.caveats.detect_caveats`: model and data properties that make
  maps untrustworthy;
* :func:`~lightning_introspect.methods.class_check.class_sensitivity`: the map for the predicted class
  against the maps for the least likely class and the runner-up, with the same class under a small input
  noise as the reference (the same picture for every class is a failure);
* :func:`~lightning_introspect.methods.randomization.randomization_curves`: cascading (``order``:
  top-down and / or bottom-up) and / or independent re-initialisation of the model's blocks, with every
  map compared to the trained one (:mod:`~lightning_introspect.methods.similarity`);
* :func:`~lightning_introspect.methods.emprt.emprt`: the rise in map entropy from the trained to the fully
  randomised model (two attribution passes);

and returns a :class:`SanityReport` with the curves, a ``"pass"`` / ``"fail"`` / ``"inconclusive"``
verdict per method with its interval and the caveats; ``report.to_dict()`` holds only plain Python values
(for checkpoints loaded with ``weights_only=True``).

What is explained
-----------------
Classification: each sample's predicted class (``target="pred"``) or the class ids given. Segmentation
(the task detected from a dense ``(N, C, H, W)`` output, :func:`~lightning_introspect.methods.task.resolve_task`,
or ``task="segmentation"``): a whole-image class target would explain the background, which covers most
pixels, so each sample's target is instead its largest non-background object
(:func:`~lightning_introspect.methods.targets.object_targets`): of the predicted masks for ``"pred"``, of the
masks given for an ``(N, H, W)`` mask tensor; the score is that class's logits summed over the object's
region. Class sensitivity then compares the maps of the object's class and of other classes over the same
region (:func:`~lightning_introspect.methods.class_check.region_classes`). ``report.target`` says in words
what was explained, ``report.task`` which task.

Token ids
---------
For a text model fed integer token ids ``(N, T)`` the maps are token scores ``(N, T)``, computed at the
output of the embedding layer (:mod:`~lightning_introspect.methods.token_attribution`; ``layer`` names that
layer, ``"auto"`` finds it with :func:`~lightning_introspect.methods.token_attribution.find_embedding`); the
default methods are :data:`DEFAULT_TOKEN_METHODS` (image-only methods such as guided backprop and Grad-CAM
have no token version and are refused by name). Every check runs as for images on these 1-D score vectors:
the randomisation curves and verdicts with the Spearman rank correlations of ``|score|`` and of the signed
score; SSIM needs 2-D maps and is left out (:data:`TOKEN_NOTE`; ``verdict_metric="ssim"`` is refused); the
randomisation floor is the random-map reference alone (there is no edge map of a sentence); the class check's
same-class reference puts its 1 % noise on the embedding output (:mod:`~lightning_introspect.methods.class_check`);
eMPRT takes the entropy of the ``T`` scores. The embedding layer is a block like any other, so the bottom-up
cascade randomises it first.

Verdicts
--------
The verdict score is ``verdict_metric`` (default ``"spearman_max"``: of the Spearman correlations of
``|map|`` and of the signed map, the one with the larger mean; a map fails if either its magnitude ranking
or its sign pattern survives; ``"spearman_abs"``, ``"spearman"`` and ``"ssim"`` use that metric alone).
Every verdict reads the per-sample scores through a percentile bootstrap interval of their mean
(``resamples`` resamples of the samples, each with its repeats; ``confidence`` 0.95;
:mod:`~lightning_introspect.methods.verdicts`): ``"pass"`` when the whole interval lies below the
threshold, ``"fail"`` when it lies at or above it, ``"inconclusive"`` when it straddles it. Thresholds are
relative to references measured on the same trained maps, and every number is kept in
``report.details``:

* **Randomisation** (``verdicts``: top-down, Adebayo et al.'s test, after the top ``verdict_depth``
  blocks are randomised; ``details["bottom_up"]``: after the first ``verdict_depth`` blocks of the
  bottom-up cascade, when it ran). The floor ``f`` is what a map that knows nothing about the model
  shares with the trained map: the larger of its similarity to a random map (about 0) and to the Sobel
  edge map of the input. The threshold is ``f + thresholds["randomization"] * (1 - f)`` (default 0.5:
  the randomised model's map must be nearer the floor than the trained map itself).
* **Class sensitivity** (``class_sensitivity_verdicts``: the least likely class, the classes the model
  tells furthest apart; ``details["class_second"]``: the runner-up, reported apart, as a similar class
  may legitimately share its evidence). The ceiling ``c`` is the similarity of the predicted class's map
  to its own map under a 1 % input noise (``class_noise``), the floor ``f`` the random-map similarity;
  the threshold is ``f + thresholds["class_sensitivity"] * (c - f)`` (default 1.0: a method fails only
  when maps for different classes are as similar as the same class's maps under resampling).

On the demo CNN trained 8 epochs on digits (16 images, one re-initialisation; Spearman of ``|map|`` /
signed, top layer randomised; edge reference in brackets): gradient 0.31 / 0.31 (0.13), Grad-CAM
-0.04 (0.21), input x gradient 0.46 / -0.11 (-0.10), guided backprop 0.66 / 0.84 (0.05 / 0.15), guided
Grad-CAM 0.11 / 0.58 (0.15 / 0.11): thresholds 0.57, 0.61, 0.50, 0.58 and 0.56 -- the signed ranking is
what betrays guided backprop and guided Grad-CAM (as in the paper and Sixt et al. 2020). Bottom-up, the
first block randomised already lowers every method below 0.35 (guided backprop 0.31 signed): guided
backprop does depend on the learned input-side filters; what survives top-down randomisation is what the
intact lower layers compute.

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

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_introspect._torch.guards import private_generator
from lightning_introspect.methods.caveats import Caveat, detect_caveats
from lightning_introspect.methods.chunks import explain_in_chunks, explanation_rows
from lightning_introspect.methods.class_check import (
    DEFAULT_NOISE,
    DEFAULT_OTHERS,
    SAME,
    ClassSensitivity,
    class_sensitivity,
)
from lightning_introspect.methods.emprt import emprt
from lightning_introspect.methods.explainers import (
    DEFAULT_METHODS,
    Explainer,
    MethodSpec,
    model_input,
    work_mode,
)
from lightning_introspect.methods.randomization import (
    ORDERS,
    RandomizationCurves,
    fixed_target,
    layer_seed,
    randomization_blocks,
    randomization_curves,
)
from lightning_introspect.methods.similarity import METRICS, check_metrics
from lightning_introspect.methods.targets import RegionTarget, object_targets
from lightning_introspect.methods.task import as_masks, resolve_task
from lightning_introspect.methods.token_attribution import TOKEN_METHODS, find_embedding, is_token_ids
from lightning_introspect.methods.verdicts import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    Verdict,
    bootstrap_interval,
    decide,
    reference_similarities,
    relative_threshold,
)

MODES: tuple[str, ...] = ("cascading", "independent", "both")
ORDER_CHOICES: tuple[str, ...] = (*ORDERS, "both")
CURVES: tuple[str, ...] = ("cascading", "bottom_up", "independent")
"""The keys of :attr:`SanityReport.curves`: ``"cascading"`` is the top-down cascade (its name before bottom-up
existed), ``"bottom_up"`` the bottom-up cascade, ``"independent"`` one block at a time."""
CHECKS: tuple[str, ...] = ("randomization", "bottom_up", "class_least", "class_second", "class_random")
"""The keys of :attr:`SanityReport.details`."""
PREDICTED_CLASS = "each sample's predicted class"
PREDICTED_OBJECTS = "object regions of the predicted masks"
"""``report.target`` of a segmentation check of ``"pred"``: each sample's largest non-background predicted
object, the class's logits summed over its region."""
TRUE_OBJECTS = "object regions of the true masks"
GIVEN_REGIONS = "the given region targets"
_REGION_TARGETS = (PREDICTED_OBJECTS, TRUE_OBJECTS, GIVEN_REGIONS)
REGION_NOTE = (
    "Region targets: a map explains the class's logits summed over the region, so part of its layout comes from "
    "the region itself (even a randomised network's gradient map is a blob over the object's receptive field); "
    "a high randomisation score means the map shows where the object is more than what the model learned about it."
)
DEFAULT_THRESHOLDS: dict[str, float] = {"randomization": 0.5, "class_sensitivity": 1.0}
"""Fractions of the way from a reference floor to a ceiling (module docstring, "Verdicts")."""
VERDICT_METRICS: tuple[str, ...] = ("spearman_max", "spearman_abs", "spearman", "ssim")
DEFAULT_VERDICT_METRIC = "spearman_max"
DEFAULT_TOKEN_METHODS: tuple[str, ...] = ("saliency", "input_x_gradient", "integrated_gradients")
"""The methods explained for token ids ``(N, T)`` when ``methods`` is left at its default."""
TOKEN_VERDICT_METRICS: tuple[str, ...] = ("spearman_max", "spearman_abs", "spearman")
"""The verdict metrics of token scores (SSIM needs 2-D maps)."""
TOKEN_NOTE = (
    "Token scores are one value per token (N, T), not images: similarity is the Spearman rank correlation of "
    "|score| and of the signed score; SSIM is left out; the randomisation floor is the random-map reference alone."
)


def resolve_thresholds(thresholds: Mapping[str, float] | float | None) -> dict[str, float]:
    """:data:`DEFAULT_THRESHOLDS` updated with ``thresholds`` (a float sets ``"randomization"``), checked:
    each a fraction in [0, 1].

    Example:
        >>> resolve_thresholds(0.4)
        {'randomization': 0.4, 'class_sensitivity': 1.0}
    """
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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"Expected `thresholds[{key!r}]` to be a fraction in [0, 1], but got {value!r}.")
        out[key] = float(value)
    return out


@dataclass
class SanityReport:
    """Everything :func:`run_sanity_checks` found.

    Attributes:
        methods: the method names, in order.
        layers: the randomised blocks, output side first.
        curves: ``{curve: {method: {metric: {layer: similarity}}}}``, ``curve`` in :data:`CURVES`
            (``"cascading"``: top-down, ``"bottom_up"``, ``"independent"``); cascading values are with that
            block and every block randomised before it (:meth:`steps` gives the sequence).
        curves_std: the same shape, standard deviation over samples.
        agreement: ``{curve: {layer: fraction of unchanged predictions}}``.
        verdicts: ``{method: "pass" | "fail" | "inconclusive"}`` for the (top-down) randomisation test.
        verdict_scores: ``{method: the mean similarity the verdict was decided on}``.
        class_sensitivity: ``{method: {other: {metric: similarity}}}`` (empty when not run).
        class_sensitivity_verdicts: ``{method: "pass" | "fail" | "inconclusive"}`` (the least likely class).
        class_sensitivity_scores: ``{method: the mean similarity of that verdict}``.
        caveats: :class:`Caveat` list.
        thresholds: the threshold fractions used; ``verdict_metric``, ``verdict_depth``, ``bn_mode``,
            ``seed``, ``num_samples``, ``repeats``, ``order``, ``resamples``, ``confidence``: the settings;
            ``classes``: ``{"pred" | other: class id per sample}`` (``"pred"``: the explained class).
        task: ``"classification"`` or ``"segmentation"``.
        target: what the maps explain, in words (e.g. ``"object regions of the predicted masks"``).
        details: ``{check: {method: Verdict}}``, ``check`` in :data:`CHECKS`: each verdict with its score,
            bootstrap interval, threshold and the reference similarities the threshold comes from.
        emprt: ``{method: {"score", "low", "high", "trained_entropy", "random_entropy"}}``: eMPRT's mean
            relative entropy rise with its bootstrap interval and the mean entropies (empty when not run).
        class_same: ``{method: {metric: similarity}}``: the same-class resampling reference.
        input_kind: ``"floating"`` (images, tabular: maps of the input's shape) or ``"token_ids"`` (token
            scores ``(N, T)`` at the output of ``embedding_layer``, module docstring "Token ids").
        embedding_layer: the embedding layer the token scores were computed at (``None`` otherwise).
        maps: ``{curve: {method: {"original" | layer: maps}}}`` and ``class_maps`` ``{method: {class: maps}}``
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
    task: str = "classification"
    target: str = PREDICTED_CLASS
    order: str = "top_down"
    resamples: int = DEFAULT_RESAMPLES
    confidence: float = DEFAULT_CONFIDENCE
    details: dict[str, dict[str, Verdict]] = field(default_factory=dict)
    emprt: dict[str, dict[str, float]] = field(default_factory=dict)
    class_same: dict[str, dict[str, float]] = field(default_factory=dict)
    input_kind: str = "floating"
    embedding_layer: str | None = None
    maps: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict, repr=False)
    class_maps: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def steps(self, curve: str = "cascading") -> list[str]:
        """The layers of one curve in the order they were randomised (input side first for ``"bottom_up"``)."""
        for per_metric in self.curves.get(curve, {}).values():  # recorded in the order of randomisation
            for per_layer in per_metric.values():
                return list(per_layer)
        return list(reversed(self.layers)) if curve == "bottom_up" else list(self.layers)

    def curve(self, method: str, metric: str = "spearman_abs", mode: str = "cascading") -> list[float]:
        """The similarity values along :meth:`steps` for one method (``1.0`` for the original is not included)."""
        values = self.curves.get(mode, {}).get(method, {}).get(metric, {})
        return [values[layer] for layer in self.steps(mode) if layer in values]

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
            "task": self.task,
            "target": self.target,
            "order": self.order,
            "resamples": int(self.resamples),
            "confidence": float(self.confidence),
            "details": {check: {m: v.to_dict() for m, v in per.items()} for check, per in self.details.items()},
            "emprt": copy.deepcopy(self.emprt),
            "class_same": copy.deepcopy(self.class_same),
            "input_kind": self.input_kind,
            "embedding_layer": self.embedding_layer,
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
            task=str(data.get("task", "classification")),
            target=str(data.get("target", PREDICTED_CLASS)),
            order=str(data.get("order", "top_down")),
            resamples=int(data.get("resamples", DEFAULT_RESAMPLES)),
            confidence=float(data.get("confidence", DEFAULT_CONFIDENCE)),
            details={str(c): {str(m): Verdict.from_dict(v) for m, v in dict(per).items()} for c, per in dict(data.get("details", {})).items()},
            emprt=copy.deepcopy(dict(data.get("emprt", {}))),
            class_same=copy.deepcopy(dict(data.get("class_same", {}))),
            input_kind=str(data.get("input_kind", "floating")),
            embedding_layer=None if data.get("embedding_layer") is None else str(data["embedding_layer"]),
        )

    def reading(self, method: str) -> str:
        """One line on how far to trust ``method``'s maps, from its verdicts."""
        rand = self.verdicts.get(method)
        cls_ = self.class_sensitivity_verdicts.get(method)
        if rand == "fail":
            return "survives randomisation: shows the input more than the model"
        if cls_ == "fail":
            return "the same picture for very different classes: not class-specific"
        if "inconclusive" in (rand, cls_):
            return "inconclusive: more samples or repeats would decide"
        if rand == "pass" and cls_ in ("pass", None):
            return "depends on the weights" + (" and the class" if cls_ == "pass" else "")
        return "-"

    def markdown(self) -> str:
        """The verdict table with intervals, the references, eMPRT and the caveats as markdown, for
        TensorBoard's text tab or a notebook."""
        depth_layer = self.layers[min(self.verdict_depth, len(self.layers)) - 1] if self.layers else "-"
        tokens = self.input_kind == "token_ids"
        at = f", token scores at the output of the embedding layer `{self.embedding_layer}`" if tokens else ""
        lines = [f"Explained: {self.target} ({self.task}{at}).", ""]
        if self.target in _REGION_TARGETS:
            lines += [REGION_NOTE, ""]
        if tokens:
            lines += [TOKEN_NOTE, ""]
        floor = "the similarity of the trained map to a random map" if tokens else (
            "the larger similarity of the trained map to a random map and to the input's edge map")
        pct = f"{100 * self.confidence:.0f} %"
        lines += [
            f"Score: `{self.verdict_metric}`, mean over {self.num_samples} samples x {self.repeats} re-initialisation(s), "
            f"with its {pct} bootstrap interval ({self.resamples} resamples) and the threshold: **pass** when the interval "
            "lies below the threshold, **fail** when it lies at or above it, **inconclusive** when it straddles it. "
            f"**Randomisation** (top-down: the top {self.verdict_depth} block(s), down to `{depth_layer}`; bottom-up: "
            f"the first {self.verdict_depth}): threshold = floor + {self.thresholds['randomization']:.2f} x (1 - floor), "
            f"floor = {floor}. "
            f"**Class sensitivity** ({self._class_check_text()}): threshold = floor + "
            f"{self.thresholds['class_sensitivity']:.2f} x (same-class similarity under input noise - floor), floor = the "
            "random-map similarity. **eMPRT**: the relative rise of the map's histogram entropy from the trained to the "
            "fully randomised model (higher: the maps depend more on the weights).",
            "",
            "| method | randomisation (top-down) | bottom-up | eMPRT | class: least likely | class: runner-up | reading |",
            "|---|---|---|---|---|---|---|",
        ]
        for method in self.methods:
            cells = [self._cell("randomization", method, self.verdicts, self.verdict_scores), self._cell("bottom_up", method)]
            e = self.emprt.get(method)
            cells.append(f"{e['score']:.2f} [{e['low']:.2f}, {e['high']:.2f}]" if e else "-")
            cells.append(self._cell("class_least", method, self.class_sensitivity_verdicts, self.class_sensitivity_scores))
            cells.append(self._cell("class_second", method))
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {self.reading(method)} |")
        refs = self._references_lines()
        if refs:
            lines += ["", "**References** (mean similarity of the trained map to each reference, in the verdict's metric)", "", *refs]
        if self.caveats:
            lines += ["", "**Caveats**", ""] + [f"- {c}" for c in self.caveats]
        return "\n".join(lines)

    def _cell(self, check: str, method: str, verdicts: Mapping[str, str] | None = None, scores: Mapping[str, float] | None = None) -> str:
        detail = self.details.get(check, {}).get(method)
        if detail is not None:
            return f"{detail.verdict} {detail.interval_text()}"
        if verdicts is not None and method in verdicts:
            score = (scores or {}).get(method, float("nan"))
            return f"{verdicts[method]} {score:.2f}"
        return "-"

    def _references_lines(self) -> list[str]:
        lines = []
        for method in self.methods:
            parts = []
            for check, label in (("randomization", "randomisation"), ("class_least", "class")):
                detail = self.details.get(check, {}).get(method)
                if detail is not None and detail.references:
                    refs = ", ".join(f"{k} {v:.2f}" for k, v in detail.references.items())
                    parts.append(f"{label} ({detail.metric}): {refs} -> threshold {detail.threshold:.2f}")
            if parts:
                lines.append(f"- {method}: " + "; ".join(parts))
        return lines

    def _class_check_text(self) -> str:
        if self.target in _REGION_TARGETS:
            return "the explained class vs other classes over the same region"
        return "predicted class vs the least likely class and the runner-up"


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


def explained_target(output: torch.Tensor, target: Any, task: str) -> tuple[Any, str]:
    """What the checks explain for ``target`` on a model whose (trained) output is ``output``, and its
    description for the report (the module docstring's "What is explained").

    Example:
        >>> out = torch.zeros(2, 3, 4, 4); out[:, 0] = 1.0; out[0, 2, :2, :2] = 5.0
        >>> region, text = explained_target(out, "pred", "segmentation")
        >>> region.class_id.tolist(), region.mask.sum(dim=(1, 2)).tolist(), text
        ([2, 0], [4, 16], 'object regions of the predicted masks')
        >>> explained_target(torch.zeros(2, 3), "pred", "classification")[1]
        "each sample's predicted class"
    """
    if task == "segmentation" and isinstance(output, torch.Tensor) and output.ndim == 4:
        if isinstance(target, str) and target == "pred":
            return object_targets(output.detach().argmax(1)), PREDICTED_OBJECTS
        if isinstance(target, torch.Tensor) and target.ndim >= 3:
            masks = as_masks(target).to(output.device)
            if masks.ndim == 3 and masks.shape[0] == output.shape[0] and masks.shape[-2:] == output.shape[-2:]:
                return object_targets(masks), TRUE_OBJECTS
            raise ValueError(f"Expected `target` masks of shape (N, H, W) = {(output.shape[0], *output.shape[-2:])}, but got {tuple(target.shape)}.")
    if isinstance(target, RegionTarget):
        return target, GIVEN_REGIONS
    if callable(target) and not isinstance(target, torch.Tensor):
        return target, "a custom score of the output"
    summed = " (logits summed over all positions)" if isinstance(output, torch.Tensor) and output.ndim > 2 else ""
    if isinstance(target, str) and target == "pred":
        return target, PREDICTED_CLASS + summed
    return target, "the given class ids" + summed


def _chosen_metric(metric: str, means: Mapping[str, float]) -> str:
    """The metric a verdict reads: ``metric`` itself, or for ``"spearman_max"`` the Spearman variant with
    the larger mean (the one :func:`verdict_score` returns)."""
    if metric != "spearman_max":
        return metric
    present = [m for m in ("spearman_abs", "spearman") if m in means and math.isfinite(means[m])]
    return max(present, key=lambda m: means[m]) if present else "spearman_abs"


def _mean(values: torch.Tensor | None) -> float:
    if values is None:
        return float("nan")
    v = values.double()
    v = v[torch.isfinite(v)]
    return float(v.mean()) if v.numel() else float("nan")


def _bootstrap(seed: int, check: str, method: str) -> torch.Generator:
    """The private generator of one verdict's bootstrap (a stream per check and method)."""
    return private_generator(layer_seed(seed, f"bootstrap/{check}/{method}"))


def _randomization_verdicts(
    curves: RandomizationCurves,
    references: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]],
    *,
    check: str,
    depth: int,
    fraction: float,
    metric: str,
    seed: int,
    resamples: int,
    confidence: float,
) -> dict[str, Verdict]:
    """Each method's verdict after the first ``depth`` steps of ``curves`` (module docstring, "Verdicts")."""
    if not curves.layers:
        return {}
    at = curves.layers[min(depth, len(curves.layers)) - 1]
    out = {}
    for method, per_metric in curves.samples.items():
        chosen = _chosen_metric(metric, {m: curves.curves[method][m][at] for m in per_metric if at in per_metric[m]})
        values = per_metric.get(chosen, {}).get(at)
        refs = {name: _mean(sims.get(chosen)) for name, sims in references.get(method, {}).items()}
        finite = [v for v in refs.values() if math.isfinite(v)]
        floor = max(finite) if finite else 0.0
        out[method] = decide(
            values if values is not None else torch.full((1,), float("nan")),
            relative_threshold(fraction, floor, 1.0),
            generator=_bootstrap(seed, check, method),
            metric=chosen,
            resamples=resamples,
            confidence=confidence,
            references=refs,
        )
    return out


def _class_verdicts(
    sensitivity: ClassSensitivity,
    references: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]],
    *,
    fraction: float,
    metric: str,
    seed: int,
    resamples: int,
    confidence: float,
) -> dict[str, dict[str, Verdict]]:
    """``{"class_<other>": {method: Verdict}}``: each other class against the same-class ceiling."""
    out: dict[str, dict[str, Verdict]] = {}
    for method, per_other in sensitivity.samples.items():
        same = per_other.get(SAME)
        for other, sims in per_other.items():
            if other == SAME:
                continue
            chosen = _chosen_metric(metric, sensitivity.similarity[method][other])
            floor = _mean(references.get(method, {}).get("random", {}).get(chosen))
            floor = floor if math.isfinite(floor) else 0.0
            ceiling = _mean(same.get(chosen)) if same is not None else 1.0
            refs = {"random": floor, "same_class": ceiling}
            check = f"class_{other}"
            out.setdefault(check, {})[method] = decide(
                sims.get(chosen, torch.full((1,), float("nan"))),
                relative_threshold(fraction, floor, ceiling),
                generator=_bootstrap(seed, check, method),
                metric=chosen,
                resamples=resamples,
                confidence=confidence,
                references=refs,
            )
    return out


def _token_settings(methods: MethodSpec, metrics: Sequence[str], verdict_metric: str) -> tuple[MethodSpec, list[str]]:
    """The methods and metrics of a check on token ids: :data:`DEFAULT_TOKEN_METHODS` for the default
    methods, named methods checked against the token methods, SSIM left out (1-D scores)."""
    if verdict_metric not in TOKEN_VERDICT_METRICS:
        raise ValueError(
            f"Expected `verdict_metric` to be one of {', '.join(repr(m) for m in TOKEN_VERDICT_METRICS)} for token ids (N, T) "
            f"(SSIM needs 2-D maps; token scores are one value per token), but got {verdict_metric!r}."
        )
    if methods is DEFAULT_METHODS:
        methods = DEFAULT_TOKEN_METHODS
    if isinstance(methods, str) or callable(methods):
        names: list[Any] = [methods]
    else:
        names = list(methods.values()) if isinstance(methods, Mapping) else list(methods)
    bad = [m for m in names if isinstance(m, str) and m not in TOKEN_METHODS]
    if bad:
        raise ValueError(
            f"Expected `methods` for token ids (N, T) to be names from {', '.join(repr(m) for m in TOKEN_METHODS)} or callables "
            f"(the others need floating inputs or a spatial feature map), but got {bad!r}."
        )
    kept = [m for m in metrics if m != "ssim"]
    return methods, kept or ["spearman_abs", "spearman"]


def cascading_bottom_up(mode: str, order: str) -> bool:
    """Whether a run with ``mode`` and ``order`` computes the bottom-up cascade."""
    return mode in ("cascading", "both") and order in ("bottom_up", "both")


def run_sanity_checks(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Any = "pred",
    methods: MethodSpec = DEFAULT_METHODS,
    *,
    mode: str = "cascading",
    order: str = "top_down",
    layers: str | int | Sequence[str] = "auto",
    seed: int = 0,
    bn_mode: str = "affine",
    layer: str | None = "auto",
    thresholds: Mapping[str, float] | float | None = None,
    verdict_depth: int = 1,
    verdict_metric: str = DEFAULT_VERDICT_METRIC,
    class_check: bool = True,
    others: Sequence[str] = DEFAULT_OTHERS,
    metrics: Sequence[str] = METRICS,
    keep_maps: int = 1,
    repeats: int = 1,
    warn: bool = True,
    progress: Callable[[str], None] | None = None,
    task: str = "auto",
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    class_noise: float | None = DEFAULT_NOISE,
    run_emprt: bool = True,
) -> SanityReport:
    """Caveats, randomisation (``mode``, ``order``), class sensitivity, eMPRT and verdicts in one call.

    Args are those of :func:`~lightning_introspect.methods.randomization.randomization_curves` and
    :func:`~lightning_introspect.methods.class_check.class_sensitivity`, plus:
        target: ``"pred"``, class ids, a callable or a ``RegionTarget``; for segmentation also integer
            masks ``(N, H, W)`` (their largest objects are explained; see "What is explained").
        mode: ``"cascading"`` | ``"independent"`` | ``"both"``.
        order: the cascade's sequence: ``"top_down"`` (output side first; the curve ``"cascading"``),
            ``"bottom_up"`` (input side first; the curve ``"bottom_up"``) or ``"both"``. The randomisation
            verdicts (``verdicts``) are always top-down: without a full top-down cascade only its first
            ``verdict_depth`` steps run for them (``repeats x verdict_depth`` more passes). A bottom-up
            cascade adds ``details["bottom_up"]``.
        thresholds: ``{"randomization": 0.5, "class_sensitivity": 1.0}`` (a float sets the first): the
            fractions of the relative thresholds (module docstring, "Verdicts").
        verdict_depth: how many blocks are randomised when a verdict is taken (1: the output layer top-down).
        verdict_metric: one of :data:`VERDICT_METRICS` (module docstring); its metrics are always computed.
        class_check: run :func:`class_sensitivity`.
        warn: issue the caveats as :class:`SanityCaveatWarning`.
        task: ``"auto"`` (segmentation for a dense ``(N, C, H, W)`` output), ``"classification"`` or
            ``"segmentation"`` (:func:`~lightning_introspect.methods.task.resolve_task`; a task the shapes
            contradict raises ``IntrospectionInputError``, a ``ValueError``).
        resamples: bootstrap resamples of every interval (a private generator per check and method,
            seeded from ``seed``: the same seed gives the same intervals).
        confidence: the intervals' coverage.
        class_noise: the same-class reference's input noise (a fraction of each sample's value range).
        run_emprt: also measure eMPRT (:func:`~lightning_introspect.methods.emprt.emprt`; two passes).

    Token ids ``(N, T)`` (module docstring, "Token ids"): ``methods`` left at its default explains
    :data:`DEFAULT_TOKEN_METHODS`; ``layer`` is the embedding layer (``"auto"``: found); SSIM is left out.

    Returns:
        A :class:`SanityReport`.
    """
    if mode not in MODES:
        raise ValueError(f"Expected `mode` to be one of {', '.join(repr(m) for m in MODES)}, but got {mode!r}.")
    if order not in ORDER_CHOICES:
        raise ValueError(f"Expected `order` to be one of {', '.join(repr(o) for o in ORDER_CHOICES)}, but got {order!r}.")
    if isinstance(verdict_depth, bool) or not isinstance(verdict_depth, int) or verdict_depth < 1:
        raise ValueError(f"Expected `verdict_depth` to be a positive int, but got {verdict_depth!r}.")
    check_metrics(metrics)
    resolved = resolve_thresholds(thresholds)
    bootstrap_interval(torch.zeros(1), generator=torch.Generator(), resamples=resamples, confidence=confidence)  # checks both
    tokens = is_token_ids(inputs)
    if tokens:
        methods, metrics = _token_settings(methods, metrics, verdict_metric)
    explainer = Explainer(methods)
    metrics = _verdict_metrics(verdict_metric, metrics)
    work = copy.deepcopy(model)  # everything below runs on this copy; the trained model is only read
    embedding_layer = None
    if tokens:  # every pass explains the same embedding output, found once
        embedding_layer = find_embedding(work, inputs, None if layer in (None, "auto") else layer)
        layer = embedding_layer
    caveats = detect_caveats(work, inputs, explainer.names, warn=warn)
    with work_mode(work):
        x = model_input(work, inputs)
        with torch.no_grad():
            output = work(x)
        masks = target if isinstance(target, torch.Tensor) and target.ndim >= 3 else None
        resolved_task = resolve_task(task, output, masks)
        target, described = explained_target(output, target, resolved_task)
        blocks = randomization_blocks(work, x[:1], layers, bn_mode=bn_mode)
        # An int k keeps the k blocks a cascade starts from: for the bottom-up cascade those nearest the input
        # (the k nearest the output, reversed, would start a "bottom-up" cascade next to the head).
        bottom_blocks = blocks
        if isinstance(layers, int) and not isinstance(layers, bool) and cascading_bottom_up(mode, order):
            bottom_blocks = randomization_blocks(work, x[:1], "auto", bn_mode=bn_mode)[-layers:]
        # the references: the trained maps against a random map and the input's edges
        resolved_layer = explainer.resolve_layer(work, x[:1], layer)
        trained_maps = explain_in_chunks(explainer, work, x, fixed_target(work, x, target), resolved_layer, rows=explanation_rows(work, x))
    ref_gen = private_generator(layer_seed(seed, "references"))
    references = {
        name: reference_similarities(trained_maps[name], x if isinstance(x, torch.Tensor) else None, metrics, generator=ref_gen)
        for name in explainer.names
    }
    region = target if isinstance(target, RegionTarget) else None
    sensitivity = None
    details: dict[str, dict[str, Verdict]] = {}
    cs_verdicts: dict[str, str] = {}
    cs_scores: dict[str, float] = {}
    if class_check:  # before any randomisation
        if progress is not None:
            progress("class sensitivity")
        sensitivity = class_sensitivity(
            work, inputs, explainer, others=others, seed=seed, layer=layer, metrics=metrics, keep_maps=keep_maps,
            region=region, noise=class_noise,
        )
        details.update(_class_verdicts(
            sensitivity, references, fraction=resolved["class_sensitivity"], metric=verdict_metric, seed=seed,
            resamples=resamples, confidence=confidence,
        ))
        for method in explainer.names:
            per_check = {o: details[f"class_{o}"][method] for o in others if method in details.get(f"class_{o}", {})}
            if not per_check:
                continue
            primary = per_check["least"] if "least" in per_check else max(per_check.values(), key=lambda v: v.score)
            cs_verdicts[method], cs_scores[method] = primary.verdict, primary.score
    emprt_summary: dict[str, dict[str, float]] = {}
    if run_emprt:
        if progress is not None:
            progress("eMPRT")
        result = emprt(work, inputs, target, explainer, generator=private_generator(layer_seed(seed, "emprt")), layer=layer, bn_mode=bn_mode)
        for name in explainer.names:
            low, high = bootstrap_interval(
                result.scores[name], generator=_bootstrap(seed, "emprt", name), resamples=resamples, confidence=confidence
            )
            emprt_summary[name] = {
                "score": result.mean[name], "low": low, "high": high,
                "trained_entropy": _mean(result.trained_entropy[name]), "random_entropy": _mean(result.random_entropy[name]),
            }
    common: dict[str, Any] = dict(
        seed=seed, bn_mode=bn_mode, layer=layer, metrics=metrics, keep_maps=keep_maps, progress=progress, repeats=repeats,
        copy_model=False,
    )
    trained_state = copy.deepcopy(work.state_dict())  # cascades leave their blocks randomised: restored between runs
    results: dict[str, RandomizationCurves] = {}
    if mode in ("independent", "both"):  # restores every block it touches
        results["independent"] = randomization_curves(work, inputs, target, explainer, mode="independent", layers=blocks, **common)
    cascading = mode in ("cascading", "both")
    if cascading and order in ("bottom_up", "both"):
        results["bottom_up"] = randomization_curves(
            work, inputs, target, explainer, mode="cascading", order="bottom_up", layers=bottom_blocks, **common
        )
        work.load_state_dict(trained_state)
    if cascading and order in ("top_down", "both"):
        results["cascading"] = randomization_curves(work, inputs, target, explainer, mode="cascading", layers=blocks, **common)
        top_down = results["cascading"]
    else:  # the verdicts need only the first `verdict_depth` top-down steps
        quiet = {**common, "keep_maps": 0, "progress": None}
        top_down = randomization_curves(work, inputs, target, explainer, mode="cascading", layers=blocks[:verdict_depth], **quiet)
    work.load_state_dict(trained_state)
    settings: dict[str, Any] = dict(
        depth=verdict_depth, fraction=resolved["randomization"], metric=verdict_metric, seed=seed, resamples=resamples,
        confidence=confidence,
    )
    details["randomization"] = _randomization_verdicts(top_down, references, check="randomization", **settings)
    if "bottom_up" in results:
        details["bottom_up"] = _randomization_verdicts(results["bottom_up"], references, check="bottom_up", **settings)
    verdicts = {m: v.verdict for m, v in details["randomization"].items()}
    scores = {m: v.score for m, v in details["randomization"].items()}
    kept = [k for k in CURVES if k in results]
    return SanityReport(
        methods=list(explainer.names),
        layers=[b.name for b in blocks] + [b.name for b in bottom_blocks if b not in blocks],
        curves={k: results[k].curves for k in kept},
        curves_std={k: results[k].curves_std for k in kept},
        agreement={k: results[k].agreement for k in kept},
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
        task=resolved_task,
        target=described,
        order=order,
        resamples=int(resamples),
        confidence=float(confidence),
        details={k: v for k, v in details.items() if v},
        emprt=emprt_summary,
        class_same=sensitivity.same_class if sensitivity else {},
        input_kind="token_ids" if tokens else "floating",
        embedding_layer=embedding_layer,
        maps={k: results[k].maps for k in kept},
        class_maps=sensitivity.maps if sensitivity else {},
    )


__all__ = [
    "CHECKS",
    "CURVES",
    "DEFAULT_THRESHOLDS",
    "DEFAULT_TOKEN_METHODS",
    "DEFAULT_VERDICT_METRIC",
    "MODES",
    "ORDER_CHOICES",
    "TOKEN_NOTE",
    "TOKEN_VERDICT_METRICS",
    "VERDICT_METRICS",
    "SanityReport",
    "decide_verdicts",
    "explained_target",
    "resolve_thresholds",
    "run_sanity_checks",
    "verdict_score",
]
