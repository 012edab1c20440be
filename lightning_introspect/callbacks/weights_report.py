"""What :class:`~lightning_introspect.callbacks.weight_histograms.WeightHistograms` writes: the tracked layers,
an evaluation's raw histograms and non-finite counts (one warning per tensor that has any), the drift from ``W0``
per layer, the not-learning summary and the two figures; and the summary in the form a checkpoint keeps. The
binning and distances are :mod:`lightning_introspect.methods.weights`, the verdict
:mod:`lightning_introspect.methods.not_learning`, the tables and figures :mod:`lightning_introspect.render.weights`;
the callback decides when.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from lightning_introspect.methods.not_learning import not_learning_summary
from lightning_introspect.methods.weights import HistogramStats, drift
from lightning_introspect.render.weights import (
    drift_by_depth_chart,
    drift_summary_markdown,
    initial_vs_current_chart,
    layers_table,
)

if TYPE_CHECKING:
    from lightning_introspect._lightning import pl
    from lightning_introspect.callbacks.weight_histograms import WeightHistograms
    from lightning_introspect.loggers.adapter import IntrospectionWriter

__all__ = ["draw_figures", "log_drift", "log_histograms", "log_layers", "log_summary", "plain", "write_histograms"]


def write_histograms(writer: IntrospectionWriter, hists: Mapping[str, HistogramStats], step: int) -> None:
    """Write ``tag -> HistogramStats`` as raw histograms in one :meth:`IntrospectionWriter.histograms` call
    (one TensorBoard event); tensors with no finite value are skipped."""
    writer.histograms(
        {
            tag: (
                h.counts.numpy(),
                h.edges.numpy(),
                {"min": h.min, "max": h.max, "num": float(h.num), "sum": h.sum, "sum_squares": h.sum_squares},
            )
            for tag, h in hists.items()
            if h.num
        },
        step,
    )


def plain(value: Any) -> Any:
    """``value`` with tuples as lists and numbers as Python floats / ints: what ``torch.load(weights_only=True)``
    reads back."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def log_layers(cb: WeightHistograms, trainer: pl.Trainer) -> None:
    """The tracked layers as a table: name, type, weight shape, trainable."""
    weights = cb._weights()
    rows = [(n, type(m).__name__, tuple(weights[n].shape), weights[n].requires_grad) for n, m in cb._modules.items()]
    cb.writer(trainer).text(cb.tag("layers"), layers_table(rows), trainer.global_step)


def log_histograms(cb: WeightHistograms, trainer: pl.Trainer, hists: dict[str, HistogramStats], *prefix: str) -> dict[str, Any]:
    """Write binned tensors (``prefix``: ``"grad"`` for gradients) and their non-finite counts (one warning per
    tensor that has any); keep the weights' histograms in ``cb.histograms``; return the evaluation's history entry."""
    writer, step = cb.writer(trainer), trainer.global_step
    write_histograms(writer, {cb.tag(*prefix, *key.split("/", 1)): h for key, h in hists.items()}, step)
    what = "gradient of" if prefix else "weight"
    scalars = {cb.tag(*prefix, "nonfinite"): float(sum(h.nonfinite for h in hists.values()))}
    for key, h in hists.items():
        if h.nonfinite:
            scalars[cb.tag(*prefix, "nonfinite", key)] = float(h.nonfinite)
            cb.warn_once(
                f"nonfinite-{what}-{key}",
                f"WeightHistograms: {what} {key!r} has {h.nonfinite} non-finite values "
                f"(NaN {h.nan}, +Inf {h.posinf}, -Inf {h.neginf}) at step {step}; "
                "they are left out of its histogram.",
            )
    writer.scalars(scalars, step)
    if not prefix:
        cb.histograms = dict(hists)
    return {
        "step": step,
        "epoch": trainer.current_epoch,
        "weights": {k: h.summary() for k, h in hists.items() if not k.startswith("bias/")},
        "bias": {k[5:]: h.summary() for k, h in hists.items() if k.startswith("bias/")},
    }


def log_drift(cb: WeightHistograms, trainer: pl.Trainer, initial: dict[str, torch.Tensor]) -> None:
    """Relative change, cosine distance and Wasserstein distance of every tracked weight from ``initial``:
    written as scalars and appended to ``cb.drift`` / ``cb.cosine`` / ``cb.wasserstein``."""
    scalars = {}
    for n, d in drift(cb._weights(), initial, seed=cb.seed).items():
        for tag, series, value in (
            ("drift", cb.drift, d.relative_change),
            ("cosine", cb.cosine, d.cosine_distance),
            ("wasserstein", cb.wasserstein, d.wasserstein),
        ):
            scalars[cb.tag(tag, n)] = value
            series.setdefault(n, []).append(value)
    cb.writer(trainer).scalars(scalars, trainer.global_step)


def log_summary(cb: WeightHistograms, trainer: pl.Trainer, epoch: int) -> None:
    """The not-learning verdict at ``epoch`` kept in ``cb.summary`` and written as a markdown table per layer."""
    weights = cb._weights()
    trainable = {n: w.requires_grad for n, w in weights.items()}
    cb.summary = not_learning_summary(
        cb.drift, trainable, threshold=cb.drift_threshold, epoch=epoch, step=trainer.global_step,
        total_epochs=cb.total_epochs(trainer), nonfinite={k: h.nonfinite for k, h in cb.histograms.items()},
    )
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    markdown = drift_summary_markdown(cb.summary, shapes, trainable, cb.drift, cb.cosine, cb.wasserstein)
    cb.writer(trainer).text(cb.tag("summary"), markdown, trainer.global_step)


def draw_figures(cb: WeightHistograms, trainer: pl.Trainer, initial_histograms: Callable[[], dict[str, HistogramStats]]) -> None:
    """The drift by depth, then the initial (``initial_histograms()``: those of ``W0``) vs current histograms."""
    step, epoch, final = trainer.global_step, cb.summary.get("epoch"), cb.is_final(trainer)
    latest = {n: cb.drift[n][-1] for n in cb._modules if cb.drift.get(n)}
    cosine = {n: cb.cosine[n][-1] for n in latest}
    cb.figure(trainer, cb.tag("drift_by_depth"), lambda: drift_by_depth_chart(
        latest, cosine, threshold=cb.drift_threshold, not_learning=cb.summary.get("not_learning", []),
        frozen=cb.summary.get("frozen", []), epoch=epoch,
    ), step, final=final)
    initial, current = initial_histograms(), {n: cb.histograms[n] for n in cb._modules if n in cb.histograms}
    cb.figure(trainer, cb.tag("initial_vs_current"),
              lambda: initial_vs_current_chart(initial, current, latest, epoch=epoch), step, final=final)
