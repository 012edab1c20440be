"""The checks of :class:`~lightning_introspect.callbacks.sanity_checks.SanityChecks`' arguments.

A wrong argument is refused when the callback is built, before any fit: one ``ValueError`` that names the
argument in backticks and says what it accepts. The arguments that are normalised on the way (the methods,
the renamed ``layer`` / ``class_sensitivity``, ``layers``, ``others``, ``metrics``, the thresholds) come
back in :class:`SanityArguments`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning_introspect._warnings import warn
from lightning_introspect.callbacks.checks import (
    check_callable,
    check_choice,
    check_positive_int,
    renamed_argument,
)
from lightning_introspect.methods.class_check import DEFAULT_OTHERS, OTHER_CLASSES
from lightning_introspect.methods.randomization import BN_MODES
from lightning_introspect.methods.sanity_report import (
    MODES,
    ORDER_CHOICES,
    VERDICT_METRICS,
    resolve_thresholds,
)
from lightning_introspect.methods.similarity import METRICS
from lightning_introspect.methods.task import TASK_KINDS

TARGET_CHOICES = ("pred", "true")

__all__ = ["TARGET_CHOICES", "SanityArguments", "check_sanity_arguments"]


@dataclass(frozen=True)
class SanityArguments:
    """The arguments :func:`check_sanity_arguments` normalises: the methods as a list (or ``None``: the
    defaults), ``layers`` with tuples as lists, ``cam_layer`` / ``run_class_sensitivity`` with their
    deprecated names applied, ``others`` / ``metrics`` with their defaults, the thresholds resolved."""

    methods: list[str] | None
    layers: str | int | list[str]
    cam_layer: str
    run_class_sensitivity: bool
    others: list[str]
    metrics: list[str]
    thresholds: dict[str, float]
    confidence: float


def check_sanity_arguments(
    *,
    methods: Any,
    layers: Any,
    mode: Any,
    order: Any,
    thresholds: Any,
    verdict_metric: Any,
    verdict_depth: Any,
    bn_mode: Any,
    cam_layer: Any,
    target: Any,
    task: Any,
    run_class_sensitivity: Any,
    others: Any,
    metrics: Any,
    repeats: Any,
    resamples: Any,
    confidence: Any,
    output_transform: Any,
    layer: Any,
    class_sensitivity: Any,
) -> SanityArguments:
    """Raise ``ValueError`` for the first of ``SanityChecks``' arguments that it cannot take; else the
    normalised ones. Thresholds given explicitly get a ``FutureWarning``: their meaning changed (fractions
    of the way from a reference floor to a ceiling, no longer absolute similarities).

    Args:
        methods, layers, mode, order, thresholds, verdict_metric, verdict_depth, bn_mode, cam_layer, target,
            task, run_class_sensitivity, others, metrics, repeats, resamples, confidence, output_transform,
            layer, class_sensitivity: the arguments of the same names (see ``SanityChecks``).

    Raises:
        ValueError: naming the first argument that is not accepted and what it accepts.
    """
    cam_layer = renamed_argument("layer", "cam_layer", layer, cam_layer, "auto")
    run_class_sensitivity = renamed_argument("class_sensitivity", "run_class_sensitivity", class_sensitivity, run_class_sensitivity, True)
    if methods is not None:
        from lightning_introspect.methods.attribution import METHODS

        if isinstance(methods, str):
            methods = [methods]
        if not isinstance(methods, (list, tuple)) or not methods:
            raise ValueError(f"Expected `methods` to be a non-empty list of method names or None, but got {methods!r}.")
        for method in methods:
            check_choice(method, "methods", list(METHODS))
    check_choice(mode, "mode", MODES)
    check_choice(order, "order", ORDER_CHOICES)
    check_positive_int(resamples, "resamples")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"Expected `confidence` to be a number in (0, 1), but got {confidence!r}.")
    check_choice(bn_mode, "bn_mode", BN_MODES)
    check_choice(verdict_metric, "verdict_metric", VERDICT_METRICS)
    check_choice(target, "target", TARGET_CHOICES)
    check_choice(task, "task", TASK_KINDS)
    check_positive_int(verdict_depth, "verdict_depth")
    check_positive_int(repeats, "repeats")
    if isinstance(layers, bool) or not isinstance(layers, (str, int, list, tuple)):
        raise ValueError(f"Expected `layers` to be 'auto', a positive int or a list of layer names, but got {layers!r}.")
    if isinstance(layers, int):
        check_positive_int(layers, "layers")
    if isinstance(layers, (list, tuple)) and (not layers or not all(isinstance(n, str) for n in layers)):
        raise ValueError(f"Expected `layers` to be a non-empty list of layer names, but got {layers!r}.")
    if not isinstance(cam_layer, str):
        raise ValueError(f"Expected `cam_layer` to be 'auto' or a dotted layer name, but got {cam_layer!r}.")
    others = list(DEFAULT_OTHERS) if others is None else list(others)
    if not others:
        raise ValueError(f"Expected `others` to list at least one of {', '.join(repr(o) for o in OTHER_CLASSES)}, but got [].")
    for other in others:
        check_choice(other, "others", OTHER_CLASSES)
    metrics = list(METRICS) if metrics is None else list(metrics)
    if not metrics:
        raise ValueError(f"Expected `metrics` to list at least one of {', '.join(repr(m) for m in METRICS)}, but got [].")
    for metric in metrics:
        check_choice(metric, "metrics", METRICS)
    resolved = resolve_thresholds(thresholds)
    if thresholds is not None:  # a config written for the absolute thresholds of before must not pass silently
        warn(
            f"SanityChecks: `thresholds` are fractions of the way from a reference floor (the random-map similarity) to a "
            f"ceiling since this release, no longer absolute similarities (the old defaults were {{'randomization': 0.5, "
            f"'class_sensitivity': 0.6}}). Check that {thresholds!r} means what you intend (now {resolved}); "
            "this notice goes away in the next release.",
            FutureWarning,
        )
    check_callable(output_transform, "output_transform")
    return SanityArguments(
        methods=None if methods is None else list(methods),
        layers=list(layers) if isinstance(layers, tuple) else layers,
        cam_layer=cam_layer,
        run_class_sensitivity=bool(run_class_sensitivity),
        others=others,
        metrics=metrics,
        thresholds=resolved,
        confidence=float(confidence),
    )
