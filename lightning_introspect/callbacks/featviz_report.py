"""What :class:`~lightning_introspect.callbacks.feature_visualization.FeatureVisualization` writes after a run:
each unit's row of images, the objective and high-frequency scalars, the table with its "Chosen" line, and the
note when a unit's images or objective were non-finite. The drawing and the text are
:mod:`lightning_introspect.render.featviz`; the callback decides when and keeps the results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lightning_introspect.methods.featviz import FeatureVisualizationResult
from lightning_introspect.methods.featviz_plan import nonfinite_units
from lightning_introspect.render.featviz import (
    class_objective_text,
    featviz_table,
    nonfinite_units_text,
    unit_image,
)

if TYPE_CHECKING:
    from lightning_introspect._lightning import pl
    from lightning_introspect.callbacks.feature_visualization import FeatureVisualization

__all__ = ["log_results", "results_table"]


def log_results(
    cb: FeatureVisualization, trainer: pl.Trainer, results: dict[str, FeatureVisualizationResult],
    value_range: tuple[float, float], *, epoch: int | None = None,
) -> None:
    """Write a run's images, scalars and table at the trainer's step, and keep its images, history rows and
    non-finite units on ``cb`` (``images``, ``history``, ``nonfinite``)."""
    writer = cb.writer(trainer)
    step, epoch = trainer.global_step, trainer.current_epoch if epoch is None else epoch
    keys = cb.unit_keys()
    scalars: dict[str, float] = {}
    cb.nonfinite = nonfinite_units(keys, results, cb.run_columns)
    for i, key in enumerate(keys):
        columns = cb.run_columns
        # one column (the budget's usual choice): the result's own image, not a copy (large images: MBs each)
        tiles = results[columns[0]].images[i : i + 1] if len(columns) == 1 else torch.stack([results[s].images[i] for s in columns])
        cb.images[key] = tiles
        if key not in cb.nonfinite:  # a NaN / Inf image would be drawn as a silently wrong picture
            writer.image(cb.tag(key), unit_image(tiles, value_range), step)
        for s in cb.run_columns:
            r = results[s]
            obj, hf = float(r.objective[i]), float(r.high_frequency_fraction[i])
            if s not in cb.nonfinite.get(key, ()):
                scalars[cb.tag("objective", s, key)] = obj
                scalars[cb.tag("hf_fraction", s, key)] = hf
            cb.history.append({"epoch": epoch, "step": step, "unit": key, "setting": s, "objective": obj, "initial_objective": float(r.initial_objective[i]), "hf_fraction": hf})
    for s in cb.run_columns:
        good = [i for i, key in enumerate(keys) if s not in cb.nonfinite.get(key, ())]
        if good:
            scalars[cb.tag("hf_fraction", s)] = float(results[s].high_frequency_fraction[good].mean())
    writer.scalars(scalars, step)
    writer.text(cb.tag("table"), cb.table(keys, results), step)
    if cb.nonfinite:
        _note_nonfinite(cb, trainer)


def _note_nonfinite(cb: FeatureVisualization, trainer: pl.Trainer) -> None:
    """Warn once, and note at this step, which units were not logged because of NaN / Inf values."""
    units = nonfinite_units_text(cb.nonfinite, cb.run_columns)
    cb.note_nonfinite(trainer, "nonfinite", f"non-finite values (NaN / Inf) in the optimised images or final objective of {units}",
                      "Their images and non-finite objective / hf_fraction scalars are not logged",
                      "logs these units again once they are finite")


def results_table(cb: FeatureVisualization, keys: Sequence[str], results: dict[str, FeatureVisualizationResult]) -> str:
    """A markdown table: one row per unit, objective and high-frequency fraction per setting, below the
    "Chosen" line (each layer's units, the class objective)."""
    chosen = [_layer_text(cb, n) for n in cb.layer_names]
    if cb.classes_chosen:
        left_out = cb.background if cb.classes == "auto" else None
        chosen.append(class_objective_text(cb.classes_chosen, task=cb.resolved_task or "classification", region=cb.class_region, background=left_out))
    return featviz_table(keys, results, cb.run_columns, steps=cb.run_steps, lr=cb.lr, chosen=chosen, nonfinite=cb.nonfinite)


def _layer_text(cb: FeatureVisualization, name: str) -> str:
    """One layer's chosen units for the table's "Chosen" line."""
    layout = cb.token_layouts.get(name)
    if layout is None:
        return f"{name}: channels {cb.chosen.get(name, [])}"
    return f"{name}: embedding dimensions {cb.chosen.get(name, [])} ({layout.describe()})"
