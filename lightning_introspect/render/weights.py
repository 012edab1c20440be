"""Weight drift as a person reads it: markdown tables, the drift-by-depth chart, the initial-vs-current
histogram overlay and a short plain-text summary (numbers and histograms in, strings and
:class:`~lightning_introspect.render.plot.Chart` s out; no logging, no Lightning).

``summary`` below is the dictionary of
:func:`~lightning_introspect.methods.not_learning.not_learning_summary`; layers are listed from input to
output (depth order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_introspect.render.plot import Chart

if TYPE_CHECKING:
    from lightning_introspect.methods.weights import HistogramStats

#: layers shown in the initial-vs-current overlay (spread over depth)
MAX_OVERLAYS = 16


def format_value(value: float) -> str:
    """A number in three significant digits, ``"nan"`` for NaN.

    Example:
        >>> format_value(0.012345), format_value(float("nan"))
        ('0.0123', 'nan')
    """
    return "nan" if math.isnan(value) else f"{value:.3g}"


def layers_table(layers: Sequence[tuple[str, str, tuple[int, ...], bool]]) -> str:
    """A markdown table of the tracked layers: ``(name, module type, weight shape, trainable)`` each.

    Example:
        >>> print(layers_table([("fc", "Linear", (3, 4), True), ("bn", "BatchNorm1d", (3,), False)]))
        | layer | type | weight shape | |
        |---|---|---|---|
        | fc | Linear | (3, 4) |  |
        | bn | BatchNorm1d | (3,) | frozen |
    """
    rows = [f"| {n} | {kind} | {shape} | {'' if trainable else 'frozen'} |" for n, kind, shape, trainable in layers]
    return "| layer | type | weight shape | |\n|---|---|---|---|\n" + "\n".join(rows)


def layer_status(name: str, summary: Mapping[str, Any], trainable: bool) -> str:
    """The status cell of one layer: ``**not learning**``, ``frozen``, ``non-finite`` (comma-separated).

    Example:
        >>> layer_status("fc", {"not_learning": ["fc"], "latest_drift": {"fc": 0.0}}, trainable=False)
        '**not learning**, frozen'
    """
    latest = summary.get("latest_drift", {}).get(name, math.nan)
    parts = []
    if name in summary.get("not_learning", []):
        parts.append("**not learning**")
    if not trainable:
        parts.append("frozen")
    if math.isnan(latest) or summary.get("nonfinite", {}).get(name):
        parts.append("non-finite")
    return ", ".join(parts)


def drift_summary_markdown(
    summary: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    trainable: Mapping[str, bool],
    drift: Mapping[str, Sequence[float]],
    cosine: Mapping[str, Sequence[float]],
    wasserstein: Mapping[str, Sequence[float]],
) -> str:
    """The markdown summary of one evaluation: the not-learning verdict and a table of the latest distances.

    Args:
        summary: the evaluation's summary (``epoch``, ``step``, ``checked``, ``threshold``, ``not_learning``...).
        shapes: ``{layer: weight shape}`` of every tracked layer in depth order (the depth column counts them).
        trainable: ``{layer: requires_grad}``.
        drift, cosine, wasserstein: ``{layer: [value per evaluation]}``; the last value is shown, layers
            without one are left out.
    """
    threshold = summary["threshold"]
    head = (
        f"Drift from initialisation at epoch {summary['epoch']} (step {summary['step']}), layers from input to output. "
        f"Not learning = relative change below {threshold:g}"
        + ("" if summary["checked"] else " (checked from the second epoch on)")
        + ".\n\n"
    )
    if summary["not_learning"]:
        head += "**Not learning:** " + ", ".join(f"`{n}`" for n in summary["not_learning"]) + "\n\n"
    elif summary["checked"]:
        head += "Every tracked layer moved more than the threshold.\n\n"
    rows = ["| depth | layer | shape | relative change | cosine distance | Wasserstein | status |", "|---|---|---|---|---|---|---|"]
    for i, (n, shape) in enumerate(shapes.items()):
        if not drift.get(n):
            continue
        rows.append(
            f"| {i} | `{n}` | {shape} | {format_value(drift[n][-1])} | {format_value(cosine[n][-1])} "
            f"| {format_value(wasserstein[n][-1])} | {layer_status(n, summary, trainable[n])} |"
        )
    return head + "\n".join(rows)


def drift_by_depth_chart(
    relative: Mapping[str, float],
    cosine: Mapping[str, float],
    *,
    threshold: float,
    not_learning: Sequence[str] = (),
    frozen: Sequence[str] = (),
    epoch: Any = None,
) -> Chart:
    """Relative change and cosine distance per layer by depth: two bar panels over the layers.

    Args:
        relative: ``{layer: ||W - W0|| / ||W0||}`` in depth order.
        cosine: ``{layer: 1 - cos(W, W0)}``.
        threshold: the not-learning threshold (a dashed line).
        not_learning: layers drawn red (and marked on the axis).
        frozen: layers drawn grey (and marked on the axis).
        epoch: the epoch named in the title.

    Example:
        >>> chart = drift_by_depth_chart({"a": 0.5, "b": 0.0}, {"a": 0.1, "b": 0.0}, threshold=1e-3, not_learning=["b"])
        >>> [panel.series[0].y for panel in chart.panels]
        [(0.5, 0.0), (0.1, 0.0)]
    """
    names = list(relative)
    flagged, fixed = set(not_learning), set(frozen)
    colors = ["#d62728" if n in flagged else "#7f7f7f" if n in fixed else "#1f77b4" for n in names]
    step = max(1, math.ceil(len(names) / 60))
    x = list(range(len(names)))
    ticks = [(i, names[i]) for i in x[::step]]
    chart = Chart(
        title=f"Drift from initialisation by depth (input -> output), epoch {epoch}\n"
        f"red x: not learning (< {threshold:g}, dashed), grey: frozen",
        width=int(80 * min(24.0, max(6.5, 0.3 * len(names) + 2.5))), panel_height=150,
    )
    top = chart.panel(ylabel="||W - W0|| / ||W0||", xticks=ticks)
    top.bars(x, [v if math.isfinite(v) else 0.0 for v in relative.values()], colors=colors)
    top.hline(threshold, color="#d62728", width=0.8)
    low = [i for i, n in enumerate(names) if n in flagged or n in fixed]
    if low:  # a zero-height bar is invisible: mark the flagged / frozen layers on the axis
        top.markers(low, [0.0] * len(low), colors=[colors[i] for i in low])
    bottom = chart.panel(ylabel="1 - cos(W, W0)", xticks=ticks)
    bottom.bars(x, [v if math.isfinite(v) else 0.0 for v in (cosine[n] for n in names)], colors=colors)
    return chart


def initial_vs_current_chart(
    initial: Mapping[str, HistogramStats],
    current: Mapping[str, HistogramStats],
    drift: Mapping[str, float],
    *,
    epoch: Any = None,
    max_layers: int = MAX_OVERLAYS,
) -> Chart:
    """The initial (black outline) and current (blue) weight histogram of each layer, as densities: one row
    per layer in depth order, each on its own value range (named in its label), all in one panel.

    Args:
        initial: ``{layer: histogram of W0}``.
        current: ``{layer: histogram of W}`` in depth order; layers in both are drawn, at most
            ``max_layers`` spread evenly over depth.
        drift: ``{layer: relative change}`` shown in each row's label.
        epoch: the epoch named in the title.
        max_layers: the most rows.

    Example:
        >>> import torch
        >>> from lightning_introspect.methods.weights import histogram
        >>> w0 = torch.randn(100)
        >>> chart = initial_vs_current_chart({"a": histogram(w0)}, {"a": histogram(w0 * 2)}, {"a": 1.0})
        >>> chart.panels[0].yticks[0][1].split("  ")[:2]
        ['a', 'drift 1']
    """
    names = [n for n in current if n in initial]
    if len(names) > max_layers:
        picks = sorted({round(i * (len(names) - 1) / (max_layers - 1)) for i in range(max_layers)})
        names = [names[i] for i in picks]
    rows = max(1, len(names))
    chart = Chart(title=f"Weight distribution: initial (black) vs current (blue), epoch {epoch}",
                  xlabel="each row: its layer's own value range [min, max] (in its label)",
                  width=768, panel_height=34 * rows, legend=False)
    labels: list[tuple[float, str]] = []
    panel = chart.panel(ylim=(-0.1, float(rows)), xlim=(-0.05, 1.05), yticks=labels, grid=False)
    for row, n in enumerate(names):
        base = float(rows - 1 - row)  # the first (input side) layer on top
        lo, hi, (now, init) = _overlay_row(base, initial[n], current[n])
        if len(now):
            panel.polygon(now[:, 0].tolist(), now[:, 1].tolist(), color="#1f77b4", alpha=0.5, width=1.0)
        if len(init):
            panel.polygon(init[:, 0].tolist(), init[:, 1].tolist(), color="#333333", alpha=0.0, width=1.0)
        labels.append((base + 0.4, f"{n}  drift {format_value(drift.get(n, math.nan))}  [{lo:.3g}, {hi:.3g}]"))
    return chart


def _overlay_row(base: float, h0: HistogramStats, h: HistogramStats) -> tuple[float, float, list[np.ndarray]]:
    """One layer's row of :func:`initial_vs_current_chart` at height ``base``: its value range and the outline
    ``(k, 2)`` of the current and of the initial density, each scaled to the row (a constant tensor, e.g. norm
    weights at init, is a vertical line at its value)."""
    finite = [v for v in (h0.min, h.min, h0.max, h.max) if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    span = hi - lo if hi > lo else max(abs(hi), 1e-3)
    densities: list[np.ndarray | None] = []
    for hist in (h, h0):
        if hist.num == 0 or hist.min == hist.max:
            densities.append(None)
            continue
        widths = (hist.edges[1:] - hist.edges[:-1]).clamp_min(1e-30)
        densities.append((hist.counts.double() / (hist.num * widths)).numpy())
    top = max((float(d.max()) for d in densities if d is not None), default=0.0)
    shapes = []
    for hist, density in zip((h, h0), densities):
        if hist.num == 0:
            shapes.append(np.zeros((0, 2)))
        elif density is None:
            x = 0.5 if hi == lo else (hist.min - lo) / span
            shapes.append(np.array([[x, base], [x, base + 0.85]]))
        else:
            xs = np.repeat(((hist.edges - lo) / span).numpy(), 2)
            ys = np.concatenate([[base], np.repeat(density / top * 0.85 if top > 0 else density * 0, 2) + base, [base]])
            shapes.append(np.column_stack([xs, ys]))
    return lo, hi, shapes



def weights_summary_lines(summary: Mapping[str, Any], n_layers: int, n_evaluations: int, threshold: float) -> list[str]:
    """One line on the drift range, one on the not-learning layers, one on non-finite values.

    Example:
        >>> s = {"checked": True, "not_learning": ["b"], "nonfinite": {},
        ...      "latest_drift": {"a": 0.5, "b": 0.0}}
        >>> for line in weights_summary_lines(s, 2, 3, threshold=1e-3):
        ...     print(line)
        2 layers tracked, 3 evaluations; drift ||W-W0||/||W0|| from 0 (b) to 0.5 (a)
        not learning (drift < 0.001): b
    """
    if not summary:
        return []
    latest = {n: v for n, v in summary["latest_drift"].items() if math.isfinite(v)}
    lines = [f"{n_layers} layers tracked, {n_evaluations} evaluations"]
    if latest:
        lo, hi = min(latest, key=latest.__getitem__), max(latest, key=latest.__getitem__)
        lines[0] += f"; drift ||W-W0||/||W0|| from {latest[lo]:.3g} ({lo}) to {latest[hi]:.3g} ({hi})"
    if summary["not_learning"]:
        lines.append(f"not learning (drift < {threshold:g}): {', '.join(summary['not_learning'])}")
    elif summary["checked"]:
        lines.append(f"every layer moved more than {threshold:g}")
    if summary["nonfinite"]:
        lines.append(f"non-finite values in: {', '.join(f'{k} ({v})' for k, v in summary['nonfinite'].items())}")
    return lines
