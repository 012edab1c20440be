"""One run of :class:`~lightning_introspect.callbacks.feature_visualization.FeatureVisualization`: every chosen
unit optimised once per regulariser setting, in chunks of images, at the sizes a budget allows (settings,
steps), timed. The optimisation is :func:`~lightning_introspect.methods.featviz.render.visualize_features`; the
callback decides when and logs the results.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_introspect._torch.guards import module_device
from lightning_introspect.callbacks.budget import Option, best_of
from lightning_introspect.callbacks.progress import IntrospectionProgress
from lightning_introspect.methods.featviz import FeatureVisualizationResult, visualize_features
from lightning_introspect.methods.featviz_plan import (
    comparison_columns,
    concat_results,
    image_shape,
    optimisation_space,
)

if TYPE_CHECKING:
    from lightning_introspect._lightning import pl
    from lightning_introspect.callbacks.feature_visualization import FeatureVisualization

__all__ = ["optimise_settings", "run_options"]


def optimise_settings(
    cb: FeatureVisualization, trainer: pl.Trainer, pl_module: nn.Module, x: torch.Tensor
) -> tuple[dict[str, FeatureVisualizationResult], tuple[float, float]] | None:
    """Optimise ``cb``'s units once per setting of the run's size (``cb.run_columns`` / ``cb.run_steps``, set
    here) with the samples ``x`` giving the image shape and range: the results per setting and the value range
    of the images, or ``None`` when the budget leaves no room for a run."""
    chunks = cb.chunk_objectives(cb.chunk_size(trainer))
    c, h, w = image_shape(x, cb.image_size)
    value_range, mean, std = optimisation_space(x, cb.mean, cb.std, cb.value_range)
    device = module_device(pl_module)
    if cb.prior_module is not None and "prior" in cb.regularizers:
        cb.prior_module.to(device)

    def optimise(setting: str, steps: int) -> FeatureVisualizationResult:
        start, parts = 0, []
        for objective, k in chunks:  # each chunk seeded by its first image's position: a given size is deterministic
            parts.append(visualize_features(pl_module, objective, shape=(k, c, h, w), steps=steps, lr=cb.lr,
                                            value_range=value_range, mean=mean, std=std, seed=cb.seed + start,
                                            **cb.setting_kwargs(setting, min(h, w))))
            start += k
        return concat_results(parts)

    option = cb.sized(trainer, run_options(cb, optimise))
    if option is None:
        return None
    cb.run_columns, cb.run_steps = list(option.sizes["settings"]), int(option.sizes["steps"])
    start = time.perf_counter()
    results: dict[str, FeatureVisualizationResult] = {}
    with IntrospectionProgress(trainer, "feature visualisation", total=len(cb.run_columns)) as bar:
        for setting in cb.run_columns:
            results[setting] = optimise(setting, cb.run_steps)
            bar.update(message=setting)
    elapsed = time.perf_counter() - start
    cb.unit_costs.observe("setting_step", elapsed, len(cb.run_columns) * cb.run_steps)
    cb.charge(elapsed)
    return results, value_range


def run_options(cb: FeatureVisualization, optimise: Callable[[str, int], Any]) -> list[Option]:
    """The sizes a run may take under a budget, largest first: the configured settings and steps, then
    only the ``all`` setting, then half the steps (not below 16); explicit arguments are kept."""
    given = set(cb._given)
    if not cb.unit_costs.known("setting_step") and cb.budget is not None:
        _probe_step(cb, optimise)
    per_step = cb.unit_costs.get("setting_step", 0.0)

    def option(settings: list[str], steps: int) -> Option:
        return Option({"settings": settings, "steps": steps}, per_step * len(settings) * steps)

    settings, steps = list(cb.columns), cb.steps
    options = [option(settings, steps)]
    if "compare" not in given and len(settings) > 1:
        settings = comparison_columns(cb.regularizers, False)
        options.append(option(settings, steps))
    while "steps" not in given and steps > 16:
        steps = max(16, steps // 2)
        options.append(option(settings, steps))
    return options


def _probe_step(cb: FeatureVisualization, optimise: Callable[[str, int], Any]) -> None:
    """Estimate one optimisation step of one setting before the first run: the most regularised setting
    run for 1 and for 3 steps; the difference leaves out the set-up both share."""
    setting = cb.columns[-1]
    one, three = best_of(1, lambda: optimise(setting, 1)), best_of(1, lambda: optimise(setting, 3))
    cb.unit_costs.observe("setting_step", max((three - one) / 2, one / 4))
