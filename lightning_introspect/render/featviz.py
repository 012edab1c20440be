"""Feature visualisations as a person reads them: one image row per unit, the results table, notes and lines.

Pure: optimised images and :class:`~lightning_introspect.methods.featviz.render.FeatureVisualizationResult`
values in, image tensors and strings out (no logging, no Lightning).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from lightning_introspect.methods.featviz import FeatureVisualizationResult
from lightning_introspect.render.grid import make_grid


def unit_image(tiles: torch.Tensor, value_range: tuple[float, float], *, min_side: int = 64) -> torch.Tensor:
    """One unit's images ``(S, C, H, W)`` (one per setting, in ``value_range``) as one row ``(C, H', W')``
    in [0, 1]: small images are enlarged (nearest neighbour, a whole factor) to at least ``min_side``.

    Example:
        >>> unit_image(torch.zeros(3, 1, 16, 16), (0.0, 1.0)).shape
        torch.Size([1, 68, 200])
    """
    lo, hi = value_range
    scale = max(1, math.ceil(min_side / max(tiles.shape[-2:])))
    shown = ((tiles - lo) / (hi - lo)).clamp(0, 1)
    if scale > 1:
        shown = F.interpolate(shown, scale_factor=scale, mode="nearest")
    return make_grid(shown, nrow=tiles.shape[0], padding=2)


def featviz_table(
    keys: Sequence[str],
    results: Mapping[str, FeatureVisualizationResult],
    columns: Sequence[str],
    *,
    steps: int,
    lr: float,
    chosen: Sequence[str],
    nonfinite: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """A markdown table: one row per unit, its final objective and high-frequency fraction per setting.

    Args:
        keys: the unit keys, in the results' batch order.
        results: ``{setting: result}`` for every setting in ``columns``.
        columns: the settings, left to right.
        steps: optimisation steps (for the header).
        lr: learning rate (for the header).
        chosen: what was chosen, one phrase each (``"conv: channels [0, 2]"``, ``"classes [3]"``).
        nonfinite: unit key -> the settings that held NaN / Inf (shown as ``non-finite``).

    Returns:
        The markdown text.
    """
    nonfinite = nonfinite or {}
    lines = [
        f"Columns (left to right): {', '.join(columns)}. Steps {steps}, lr {lr:g}.",
        "",
        "Chosen: " + "; ".join(chosen),
        "",
        "| unit | " + " | ".join(f"{s} objective | {s} hf" for s in columns) + " |",
        "|---|" + "---|---|" * len(columns),
    ]
    for i, key in enumerate(keys):
        cells = " | ".join(
            "non-finite | -" if s in nonfinite.get(key, ())
            else f"{float(results[s].objective[i]):.3g} | {float(results[s].high_frequency_fraction[i]):.2f}"
            for s in columns
        )
        lines.append(f"| {key} | {cells} |")
    return "\n".join(lines)


def class_objective_text(classes: Sequence[int], *, task: str, region: float = 0.5, background: int | None = None) -> str:
    """The class units in words, with the objective their images maximise (for the table's "Chosen" line).

    Example:
        >>> class_objective_text([3], task="classification")
        'classes [3] (objective: the class logit)'
        >>> class_objective_text([1, 2], task="segmentation", background=0)
        'classes [1, 2] (segmentation; objective: mean logit of the class over the central half of the height and width of the output; background class 0 left out by classes="auto")'
    """
    if task != "segmentation":
        return f"classes {list(classes)} (objective: the class logit)"
    span = "half" if region == 0.5 else f"{region:g}"
    where = "the whole output" if region == 1.0 else f"the central {span} of the height and width of the output"
    text = f"classes {list(classes)} (segmentation; objective: mean logit of the class over {where}"
    return text + (f"; background class {background} left out by classes=\"auto\")" if background is not None else ")")


def nonfinite_units_text(nonfinite: Mapping[str, Sequence[str]], columns: Sequence[str]) -> str:
    """The units that held NaN / Inf, in words, with the settings concerned.

    Example:
        >>> nonfinite_units_text({"conv/0": ["none", "all"]}, ["none", "all"])
        'conv/0 (every setting)'
        >>> nonfinite_units_text({"conv/0": ["all"], "class/3": ["none"]}, ["none", "all"])
        'conv/0 (all); class/3 (none)'
    """
    if all(list(settings) == list(columns) for settings in nonfinite.values()):
        return f"{', '.join(nonfinite)} ({'every setting' if len(columns) > 1 else columns[0]})"
    return "; ".join(f"{key} ({', '.join(settings)})" for key, settings in nonfinite.items())


def featviz_summary_lines(results: Mapping[str, FeatureVisualizationResult], columns: Sequence[str], n_units: int) -> list[str]:
    """One plain-text line: per setting the mean high-frequency fraction and the median objective
    relative to the unregularised ``none`` setting (when it ran). Empty without results."""
    if not results:
        return []
    base = results.get("none")
    parts = []
    for s in columns:
        r = results[s]
        text = f"{s}: hf {float(r.high_frequency_fraction.mean()):.2f}"
        if base is not None and s != "none":
            ratio = (r.objective / base.objective.abs().clamp_min(1e-6)).median()
            text += f", objective x{float(ratio):.2f} of none"
        parts.append(text)
    return [f"{n_units} units; " + "; ".join(parts)]


__all__ = ["class_objective_text", "featviz_summary_lines", "featviz_table", "nonfinite_units_text", "unit_image"]
