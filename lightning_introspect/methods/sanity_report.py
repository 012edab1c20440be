"""Sanity checks for attribution maps (Adebayo et al. 2018, "Sanity Checks for Saliency Maps") in one call.

:func:`run_sanity_checks` runs, on a deep copy of the model (the trained model is never touched):

* :func:`~lightning_introspect.methods.caveats.detect_caveats`: model and data properties that make
  maps untrustworthy;
* :func:`~lightning_introspect.methods.class_check.class_sensitivity`: the map for the predicted class
  against the map for other classes (the same picture for every class is a failure);
* :func:`~lightning_introspect.methods.randomization.randomization_curves`: cascading and / or
  independent re-initialisation of the model's blocks, with every map compared to the trained one
  (:mod:`~lightning_introspect.methods.similarity`);

and returns a :class:`SanityReport` with the curves, a ``"pass"`` / ``"fail"`` verdict per method and the
caveats; ``report.to_dict()`` holds only plain Python values (for checkpoints loaded with
``weights_only=True``).

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

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_introspect.methods.caveats import Caveat, detect_caveats
from lightning_introspect.methods.class_check import OTHER_CLASSES, class_sensitivity
from lightning_introspect.methods.explainers import (
    DEFAULT_METHODS,
    Explainer,
    MethodSpec,
    model_input,
    work_mode,
)
from lightning_introspect.methods.randomization import (
    RandomizationCurves,
    randomization_blocks,
    randomization_curves,
)
from lightning_introspect.methods.similarity import METRICS, check_metrics
from lightning_introspect.methods.targets import RegionTarget, object_targets
from lightning_introspect.methods.task import as_masks, resolve_task

MODES: tuple[str, ...] = ("cascading", "independent", "both")
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
DEFAULT_THRESHOLDS: dict[str, float] = {"randomization": 0.5, "class_sensitivity": 0.6}
VERDICT_METRICS: tuple[str, ...] = ("spearman_max", "spearman_abs", "spearman", "ssim")
DEFAULT_VERDICT_METRIC = "spearman_max"


def resolve_thresholds(thresholds: Mapping[str, float] | float | None) -> dict[str, float]:
    """:data:`DEFAULT_THRESHOLDS` updated with ``thresholds`` (a float sets ``"randomization"``), checked.

    Example:
        >>> resolve_thresholds(0.4)
        {'randomization': 0.4, 'class_sensitivity': 0.6}
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
            ``num_samples``, ``repeats``: the settings; ``classes``: ``{"pred" | other: class id per sample}``
            (``"pred"``: the explained class).
        task: ``"classification"`` or ``"segmentation"``.
        target: what the maps explain, in words (e.g. ``"object regions of the predicted masks"``).
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
    task: str = "classification"
    target: str = PREDICTED_CLASS
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
            "task": self.task,
            "target": self.target,
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
        )

    def markdown(self) -> str:
        """The verdict table (and caveats) as markdown, for TensorBoard's text tab or a notebook."""
        depth_layer = self.layers[min(self.verdict_depth, len(self.layers)) - 1] if self.layers else "-"
        lines = [f"Explained: {self.target} ({self.task}).", ""]
        if self.target in _REGION_TARGETS:
            lines += [REGION_NOTE, ""]
        lines += [
            f"Score: `{self.verdict_metric}` (lower = the map changed more). **Randomisation**: after randomising "
            f"the top {self.verdict_depth} block(s) (down to `{depth_layer}`; mean over {self.num_samples} samples x "
            f"{self.repeats} re-initialisation(s)), pass below "
            f"{self.thresholds['randomization']:.2f}. **Class sensitivity**: {self._class_check_text()}, "
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

    def _class_check_text(self) -> str:
        if self.target in _REGION_TARGETS:
            return "the explained class vs other classes over the same region"
        return "predicted class vs other classes"


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
    task: str = "auto",
) -> SanityReport:
    """Caveats, randomisation (``mode``), class sensitivity and verdicts in one call.

    Args are those of :func:`~lightning_introspect.methods.randomization.randomization_curves` and
    :func:`~lightning_introspect.methods.class_check.class_sensitivity`, plus:
        target: ``"pred"``, class ids, a callable or a ``RegionTarget``; for segmentation also integer
            masks ``(N, H, W)`` (their largest objects are explained; see "What is explained").
        mode: ``"cascading"`` | ``"independent"`` | ``"both"``. Verdicts always use the cascading curve;
            in ``"independent"`` mode only the top ``verdict_depth`` cascading steps are run for them.
        thresholds: ``{"randomization": 0.5, "class_sensitivity": 0.6}`` (a float sets the first).
        verdict_depth: how many top blocks are randomised when the verdict is taken (1: the output layer).
        verdict_metric: one of :data:`VERDICT_METRICS` (module docstring); its metrics are always computed.
        class_check: run :func:`class_sensitivity`.
        warn: issue the caveats as :class:`SanityCaveatWarning`.
        task: ``"auto"`` (segmentation for a dense ``(N, C, H, W)`` output), ``"classification"`` or
            ``"segmentation"`` (:func:`~lightning_introspect.methods.task.resolve_task`; a task the shapes
            contradict raises ``IntrospectionInputError``, a ``ValueError``).

    Returns:
        A :class:`SanityReport`.
    """
    if mode not in MODES:
        raise ValueError(f"Expected `mode` to be one of {', '.join(repr(m) for m in MODES)}, but got {mode!r}.")
    if isinstance(verdict_depth, bool) or not isinstance(verdict_depth, int) or verdict_depth < 1:
        raise ValueError(f"Expected `verdict_depth` to be a positive int, but got {verdict_depth!r}.")
    check_metrics(metrics)
    resolved = resolve_thresholds(thresholds)
    explainer = Explainer(methods)
    metrics = _verdict_metrics(verdict_metric, metrics)
    work = copy.deepcopy(model)  # everything below runs on this copy; the trained model is only read
    caveats = detect_caveats(work, inputs, explainer.names, warn=warn)
    with work_mode(work):
        x = model_input(work, inputs)
        with torch.no_grad():
            output = work(x)
        masks = target if isinstance(target, torch.Tensor) and target.ndim >= 3 else None
        resolved_task = resolve_task(task, output, masks)
        target, described = explained_target(output, target, resolved_task)
        blocks = randomization_blocks(work, x[:1], layers, bn_mode=bn_mode)
    region = target if isinstance(target, RegionTarget) else None
    sensitivity = None
    cs_verdicts: dict[str, str] = {}
    cs_scores: dict[str, float] = {}
    if class_check:  # before any randomisation
        if progress is not None:
            progress("class sensitivity")
        sensitivity = class_sensitivity(
            work, inputs, explainer, others=others, seed=seed, layer=layer, metrics=metrics, keep_maps=keep_maps, region=region
        )
        for method, per_other in sensitivity.similarity.items():
            worst = max(verdict_score(vals, verdict_metric) for vals in per_other.values())
            cs_scores[method] = worst
            cs_verdicts[method] = "pass" if worst < resolved["class_sensitivity"] else "fail"
    common: dict[str, Any] = dict(
        seed=seed, bn_mode=bn_mode, layer=layer, metrics=metrics, keep_maps=keep_maps, progress=progress, repeats=repeats,
        copy_model=False,
    )
    results: dict[str, RandomizationCurves] = {}
    if mode in ("independent", "both"):  # restores every block it touches, so it goes first
        results["independent"] = randomization_curves(work, inputs, target, explainer, mode="independent", layers=blocks, **common)
    if mode in ("cascading", "both"):
        results["cascading"] = randomization_curves(work, inputs, target, explainer, mode="cascading", layers=blocks, **common)
        cascade = results["cascading"]
    else:  # the verdicts need only the top `verdict_depth` cascading steps
        quiet = {**common, "keep_maps": 0, "progress": None}
        cascade = randomization_curves(work, inputs, target, explainer, mode="cascading", layers=blocks[:verdict_depth], **quiet)
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
        task=resolved_task,
        target=described,
        maps={k: results[k].maps for k in ("cascading", "independent") if k in results},
        class_maps=sensitivity.maps if sensitivity else {},
    )


__all__ = [
    "DEFAULT_THRESHOLDS",
    "DEFAULT_VERDICT_METRIC",
    "MODES",
    "VERDICT_METRICS",
    "SanityReport",
    "decide_verdicts",
    "explained_target",
    "resolve_thresholds",
    "run_sanity_checks",
    "verdict_score",
]
