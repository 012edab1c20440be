"""The checks of :class:`~lightning_introspect.callbacks.attributions.Attributions`' arguments.

A wrong argument is refused when the callback is built, before any fit: one ``ValueError`` that names the
argument in backticks and says what it accepts (the valid choices listed where there are a few). The few
arguments that are normalised on the way (the methods, the renamed ``layer``, the channel statistics, the
names) come back in :class:`AttributionArguments`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_introspect.callbacks.checks import (
    check_bool,
    check_callable,
    check_channel_stats,
    check_choice,
    check_colormap,
    check_int,
    check_module_name,
    check_names,
    check_positive_int,
    check_unit_interval,
    renamed_argument,
)
from lightning_introspect.methods.attribution import _check_methods
from lightning_introspect.methods.attribution_runs import REGION_SOURCES
from lightning_introspect.methods.faithfulness import BASELINES
from lightning_introspect.methods.task import TASK_KINDS

NORMALIZE_CHOICES = ("per_map", "per_batch")
TARGET_CHOICES = ("pred", "true", "all")
LRP_RULES = ("epsilon", "zplus", "alpha_beta")
DEFAULT_METHODS = ("saliency", "guided_backprop", "grad_cam", "lrp")

__all__ = [
    "DEFAULT_METHODS", "LRP_RULES", "NORMALIZE_CHOICES", "TARGET_CHOICES", "AttributionArguments", "check_attribution_arguments",
    "is_default_methods",
]


@dataclass(frozen=True)
class AttributionArguments:
    """The arguments :func:`check_attribution_arguments` normalises: the methods as a list, ``cam_layer`` with
    the deprecated ``layer`` applied, ``targets`` as a string or a list, the channel statistics as tuples (or
    ``None``), ``alpha`` as a float and the names as lists (or ``None``)."""

    methods: list[str]
    cam_layer: str
    targets: str | list[int]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    alpha: float
    class_names: list[str] | None
    feature_names: list[str] | None


def check_attribution_arguments(
    *,
    methods: Any,
    cam_layer: Any,
    layer: Any,
    embedding_layer: Any,
    targets: Any,
    per_class: Any,
    top_k: Any,
    normalize: Any,
    lrp_rule: Any,
    task: Any,
    region: Any,
    faithfulness_baseline: Any,
    ignore_index: Any,
    baseline_token_id: Any,
    pad_token_id: Any,
    faithfulness: Any,
    run_emprt: Any,
    faithfulness_steps: Any,
    colormap: Any,
    signed_colormap: Any,
    decode: Any,
    output_transform: Any,
    mean: Any,
    std: Any,
    alpha: Any,
    class_names: Any,
    feature_names: Any,
) -> AttributionArguments:
    """Raise ``ValueError`` for the first of ``Attributions``' arguments that it cannot take; else the
    normalised ones.

    Args:
        methods, cam_layer, layer, embedding_layer, targets, per_class, top_k, normalize, lrp_rule, task,
            region, faithfulness_baseline, ignore_index, baseline_token_id, pad_token_id, faithfulness,
            run_emprt, faithfulness_steps, colormap, signed_colormap, decode, output_transform, mean, std,
            alpha, class_names, feature_names: the arguments of the same names (see ``Attributions``).

    Raises:
        ValueError: naming the argument and what it accepts.
    """
    checked_methods = _check_methods(list(methods) if not isinstance(methods, str) else [methods])
    cam_layer = renamed_argument("layer", "cam_layer", layer, cam_layer, "auto")
    check_module_name(cam_layer, "cam_layer")
    check_module_name(embedding_layer, "embedding_layer")
    _check_targets(targets)
    for argument, count in (("per_class", per_class), ("top_k", top_k)):
        check_positive_int(count, argument, allow_none=True)
    for argument, value, choices in (("normalize", normalize, NORMALIZE_CHOICES), ("lrp_rule", lrp_rule, LRP_RULES),
                                     ("task", task, TASK_KINDS), ("region", region, REGION_SOURCES),
                                     ("faithfulness_baseline", faithfulness_baseline, BASELINES)):
        check_choice(value, argument, choices)
    check_int(ignore_index, "ignore_index")
    for argument, token in (("baseline_token_id", baseline_token_id), ("pad_token_id", pad_token_id)):
        check_int(token, argument, minimum=0, what="a token id (int >= 0)")
    for argument, flag in (("faithfulness", faithfulness), ("run_emprt", run_emprt)):
        check_bool(flag, argument)
    check_positive_int(faithfulness_steps, "faithfulness_steps")
    check_colormap(colormap, "colormap")
    check_colormap(signed_colormap, "signed_colormap")
    for argument, fn in (("decode", decode), ("output_transform", output_transform)):
        check_callable(fn, argument)
    checked_mean, checked_std = check_channel_stats(mean, std)
    return AttributionArguments(
        methods=checked_methods,
        cam_layer=cam_layer,
        targets=targets if isinstance(targets, str) else list(targets),
        mean=checked_mean,
        std=checked_std,
        alpha=check_unit_interval(alpha, "alpha"),
        class_names=check_names(class_names, "class_names"),
        feature_names=check_names(feature_names, "feature_names"),
    )


def _check_targets(targets: Any) -> None:
    if isinstance(targets, str):
        check_choice(targets, "targets", TARGET_CHOICES)
    elif not isinstance(targets, (list, tuple)) or not targets or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in targets):
        raise ValueError(f"Expected `targets` to be one of 'pred', 'true', 'all' or a non-empty list of class ids (ints >= 0), but got {targets!r}.")


def is_default_methods(methods: Sequence[str] | str) -> bool:
    """Whether ``methods`` was left at its default (a text model then gets the token defaults)."""
    return not isinstance(methods, str) and list(methods) == list(DEFAULT_METHODS)
