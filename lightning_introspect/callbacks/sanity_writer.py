"""What :class:`~lightning_introspect.callbacks.sanity_checks.SanityChecks` writes for one report: the scalars,
the curve figures and map grids of every curve, the class-sensitivity grid and the verdicts table, in one
batch (one flush)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from lightning_introspect.loggers.adapter import IntrospectionWriter
from lightning_introspect.methods.sanity_report import SanityReport
from lightning_introspect.render.grid import shown_size, shrink_images
from lightning_introspect.render.sanity import (
    class_maps_grid,
    curve_figures,
    maps_grid,
    plotted_metrics,
    report_scalars,
    token_class_maps_figure,
    token_maps_figure,
)

__all__ = ["shown_inputs", "write_report"]


def shown_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """What the map grids draw of ``inputs`` (the first image and the tile size): images whose longer side
    exceeds :data:`~lightning_introspect.render.grid.SHOWN_SIDE` are shrunk to it (first image only: the grids
    draw one); anything else as it is.

    Example:
        >>> tuple(shown_inputs(torch.zeros(4, 3, 384, 256)).shape), tuple(shown_inputs(torch.zeros(4, 1, 32, 32)).shape)
        ((1, 3, 128, 85), (4, 1, 32, 32))
    """
    if inputs.ndim != 4 or not inputs.is_floating_point():
        return inputs
    size = shown_size(*(int(v) for v in inputs.shape[-2:]))
    return inputs if size == tuple(inputs.shape[-2:]) else shrink_images(inputs[:1], size)


def write_report(
    writer: IntrospectionWriter, tag: Callable[..., str], report: SanityReport, inputs: torch.Tensor, step: int, metrics: Sequence[str]
) -> None:
    """Everything of ``report`` at ``step``, under the callback's tags (``tag(*parts)``), in one batch."""
    batch = getattr(writer, "batch", None)
    with batch() if batch is not None else contextlib.nullcontext():  # one flush for the whole check
        writer.scalars({tag(path): value for path, value in report_scalars(report).items()}, step)
        tokens = report.input_kind == "token_ids"
        inputs = inputs if tokens else shown_inputs(inputs)  # the maps are resized to these tiles when drawn
        for mode in report.curves:
            for metric, image in curve_figures(report, mode, plotted_metrics(report, mode, list(metrics))).items():
                writer.image(tag("curve", mode, metric), image, step)
            grid = token_maps_figure(report, mode, inputs) if tokens else maps_grid(report, mode, inputs)
            if grid is not None:
                writer.image(tag("maps", mode), grid, step)
        class_grid = token_class_maps_figure(report, inputs) if tokens else class_maps_grid(report, inputs)
        if class_grid is not None:
            writer.image(tag("class_maps"), class_grid, step)
        writer.text(tag("verdicts"), report.markdown(), step)
    writer.flush()
