"""The sanity-check report as a person reads it: similarity curves, map grids and flat scalars.

Pure: a :class:`~lightning_introspect.methods.sanity_report.SanityReport` and the explained inputs in,
HWC uint8 images, scalar dicts and plain-text lines out (no logging, no Lightning). The verdict table
itself is :meth:`SanityReport.markdown`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lightning_introspect.methods.randomization import ORIGINAL
from lightning_introspect.methods.sanity_report import SanityReport
from lightning_introspect.methods.similarity import map_similarities
from lightning_introspect.render.grid import captioned_grid
from lightning_introspect.render.heatmap import colorize, normalize_maps, to_display
from lightning_introspect.render.plot import Chart, color

PASSED = {"pass": 1.0, "inconclusive": 0.5, "fail": 0.0}
"""The ``.../passed`` scalar of each verdict."""

CURVE_TITLES = {"cascading": "top-down cascading", "bottom_up": "bottom-up cascading", "independent": "independent"}
CURVE_ROWS = {"cascading": "cumulative, output side first", "bottom_up": "cumulative, input side first", "independent": "one block each"}

METRIC_LABELS = {
    "spearman_abs": "Spearman rank correlation of |map|",
    "spearman": "Spearman rank correlation (signed)",
    "ssim": "SSIM of |map|",
}


def report_scalars(report: SanityReport) -> dict[str, float]:
    """The report as finite scalars keyed by tag path (below ``introspect/sanity/``).

    ``<method>/<metric>/<curve>/<layer>`` holds each similarity after randomising ``<layer>`` (``<curve>``:
    ``cascading`` top-down, ``bottom_up``, ``independent``); ``<method>/score`` and ``<method>/passed``
    (1.0 pass / 0.5 inconclusive / 0.0 fail) the top-down randomisation verdict, with ``score_low``,
    ``score_high`` (its bootstrap interval) and ``threshold``; ``<method>/bottom_up_score`` and
    ``bottom_up_passed`` the bottom-up verdict; ``<method>/class_score`` and ``<method>/class_passed`` the
    class-sensitivity verdict (least likely class) with ``class_threshold``, ``class_second_score`` and
    ``class_second_passed`` for the runner-up; ``<method>/emprt`` eMPRT. NaN / Inf values are left out (a
    scalar chart cannot show them).

    Args:
        report: the sanity-check report.

    Returns:
        ``{path: value}``.
    """
    scalars: dict[str, float] = {}
    for mode, per_method in report.curves.items():
        for method, per_metric in per_method.items():
            for metric, per_layer in per_metric.items():
                for layer_name, value in per_layer.items():
                    scalars[f"{method}/{metric}/{mode}/{layer_name}"] = value
    for method in report.methods:
        if method in report.verdicts:
            scalars[f"{method}/score"] = report.verdict_scores[method]
            scalars[f"{method}/passed"] = PASSED[report.verdicts[method]]
        if method in report.class_sensitivity_verdicts:
            scalars[f"{method}/class_score"] = report.class_sensitivity_scores[method]
            scalars[f"{method}/class_passed"] = PASSED[report.class_sensitivity_verdicts[method]]
        for check, prefix in (("randomization", "score"), ("bottom_up", "bottom_up_score"), ("class_least", "class_score"),
                              ("class_second", "class_second_score")):
            detail = report.details.get(check, {}).get(method)
            if detail is None:
                continue
            stem = prefix.removesuffix("score")
            scalars[f"{method}/{prefix}"] = detail.score
            scalars[f"{method}/{prefix}_low"] = detail.low
            scalars[f"{method}/{prefix}_high"] = detail.high
            scalars[f"{method}/{stem}threshold"] = detail.threshold
            scalars[f"{method}/{stem}passed"] = PASSED[detail.verdict]
        if method in report.emprt:
            scalars[f"{method}/emprt"] = report.emprt[method]["score"]
    return {k: v for k, v in scalars.items() if math.isfinite(v)}


def plotted_metrics(report: SanityReport, mode: str, metrics: Sequence[str]) -> list[str]:
    """The metrics among ``metrics`` (in their order) that the report has curves of for ``mode``."""
    present = {m for per_metric in report.curves[mode].values() for m in per_metric}
    return [m for m in metrics if m in present]


def sanity_summary_lines(report: SanityReport | None) -> list[str]:
    """A few plain-text lines: each method's verdicts with their scores, the kinds of caveat and, for
    segmentation, what was explained.

    Args:
        report: the latest report, or ``None`` (no lines).

    Returns:
        The lines (empty without a report).
    """
    if report is None:
        return []
    r = report

    def text(check: str, method: str, verdict: str, score: float) -> str:
        detail = r.details.get(check, {}).get(method)
        return f"{method} {verdict} ({detail.interval_text() if detail is not None else f'{score:.2f}'})"

    lines = [
        "SanityChecks randomisation: " + ", ".join(text("randomization", m, v, r.verdict_scores[m]) for m, v in r.verdicts.items()),
    ]
    if r.details.get("bottom_up"):
        lines.append("SanityChecks bottom-up: " + ", ".join(text("bottom_up", m, v.verdict, v.score) for m, v in r.details["bottom_up"].items()))
    if r.class_sensitivity_verdicts:
        lines.append(
            "SanityChecks class sensitivity (least likely class): "
            + ", ".join(text("class_least", m, v, r.class_sensitivity_scores[m]) for m, v in r.class_sensitivity_verdicts.items())
        )
    if r.emprt:
        lines.append("SanityChecks eMPRT: " + ", ".join(f"{m} {v['score']:.2f}" for m, v in r.emprt.items()))
    if r.caveats:
        lines.append("SanityChecks caveats: " + ", ".join(sorted({c.kind for c in r.caveats})))
    if r.task == "segmentation":
        lines.append(f"SanityChecks explained: {r.target}")
    if r.input_kind == "token_ids":
        lines.append(f"SanityChecks explained: token scores at the output of `{r.embedding_layer}` (Spearman only; no SSIM for 1-D scores)")
    return lines


def plain_map(maps: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor | None:
    """One sample's map ``(C, H, W)`` / ``(H, W)`` as a signed ``(H, W)`` map (channels summed), resized.

    Args:
        maps: one sample's attribution map.
        size: ``(H, W)`` to resize to (bilinear), or ``None`` to keep the map's size.

    Returns:
        The ``(H, W)`` map, or ``None`` for a map of another rank (tabular maps have no image).

    Example:
        >>> plain_map(torch.ones(3, 2, 2), None)
        tensor([[3., 3.],
                [3., 3.]])
        >>> plain_map(torch.ones(5), None) is None
        True
    """
    m = maps.detach().float()
    if m.ndim == 3:
        m = m.sum(0)
    if m.ndim != 2:
        return None
    if size is not None and tuple(m.shape) != tuple(size):
        m = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return m


def _colour(m: torch.Tensor, signed: bool) -> torch.Tensor:
    return colorize(normalize_maps(m[None], signed=signed), signed=signed)[0]


def input_image(inputs: torch.Tensor) -> torch.Tensor | None:
    """The first input as an RGB ``(3, H, W)`` tile in [0, 1] (min-max scaled); ``None`` for non-images.

    Example:
        >>> input_image(torch.arange(4.0).view(1, 1, 2, 2)).shape
        torch.Size([3, 2, 2])
        >>> input_image(torch.zeros(2, 5)) is None
        True
    """
    if inputs.ndim != 4:
        return None
    img = to_display(inputs[:1])[0]
    return img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]


def _fill_captions(captions: list[str], slots: Sequence[int], pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write "ρ(|m|) .. ρ(m) .." of each map pair into ``captions[slot]`` (one batched similarity call)."""
    for slot, sim in zip(slots, map_similarities(pairs, ["spearman_abs", "spearman"]) if pairs else []):
        captions[slot] = f"ρ(|m|) {float(sim['spearman_abs'][0]):.2f}  ρ(m) {float(sim['spearman'][0]):.2f}"


def maps_grid(report: SanityReport, mode: str, inputs: torch.Tensor) -> Any:
    """HWC uint8 grid: rows = randomisation depth (original first), columns = input + one per method."""
    per_method = report.maps.get(mode, {})
    methods = [m for m in report.methods if m in per_method and ORIGINAL in per_method[m]]
    if not methods:
        return None
    size = (int(inputs.shape[-2]), int(inputs.shape[-1])) if inputs.ndim == 4 else None
    steps = [ORIGINAL, *report.steps(mode)]
    first = input_image(inputs)
    images, captions = [], []
    pairs, slots = [], []  # caption similarities, measured in one batched call below
    for r, step_name in enumerate(steps):
        if first is not None:
            images.append(first if r == 0 else torch.ones_like(first))
            captions.append("input" if r == 0 else "")
        for method in methods:
            maps = per_method[method]
            original = plain_map(maps[ORIGINAL][0], size)
            if original is None or step_name not in maps:
                return None
            current = plain_map(maps[step_name][0], size)
            if current is None:
                return None
            signed = bool((original < 0).any())
            images.append(_colour(current, signed))
            if r == 0:
                captions.append(method)
            else:
                pairs.append((maps[ORIGINAL][:1], maps[step_name][:1]))
                slots.append(len(captions))
                captions.append("")
    _fill_captions(captions, slots, pairs)
    ncol = len(methods) + (first is not None)
    labels = [ORIGINAL] + [f"{'→ ' if mode != 'independent' else ''}{name}" for name in report.steps(mode)]
    title = f"{CURVE_TITLES.get(mode, mode)} randomisation (rows: {CURVE_ROWS.get(mode, mode)})"
    return captioned_grid(torch.stack(images), captions, nrow=ncol, row_labels=labels, title=title)


def class_maps_grid(report: SanityReport, inputs: torch.Tensor) -> Any:
    """HWC uint8 grid: rows = predicted / other classes, columns = input + one per method."""
    if not report.class_maps:
        return None
    methods = [m for m in report.methods if m in report.class_maps]
    keys = list(report.class_maps[methods[0]])
    size = (int(inputs.shape[-2]), int(inputs.shape[-1])) if inputs.ndim == 4 else None
    first = input_image(inputs)
    images, captions, labels = [], [], []
    pairs, slots = [], []
    for r, key in enumerate(keys):
        cls = report.classes.get(key, [None])[0]
        labels.append(f"{key}: class {cls}")
        if first is not None:
            images.append(first if r == 0 else torch.ones_like(first))
            captions.append("input" if r == 0 else "")
        for method in methods:
            m = plain_map(report.class_maps[method][key][0], size)
            if m is None:
                return None
            reference = plain_map(report.class_maps[method]["pred"][0], size)
            if reference is None:
                return None
            images.append(_colour(m, bool((reference < 0).any())))
            if r == 0:
                captions.append(method)
            else:
                pairs.append((report.class_maps[method]["pred"][:1], report.class_maps[method][key][:1]))
                slots.append(len(captions))
                captions.append("")
    _fill_captions(captions, slots, pairs)
    ncol = len(methods) + (first is not None)
    return captioned_grid(torch.stack(images), captions, nrow=ncol, row_labels=labels, title="class sensitivity (first sample)")


def _heat_strips(
    rows: Sequence[tuple[str, dict[str, torch.Tensor]]], methods: Sequence[str], ids: torch.Tensor, title: str, signed: dict[str, bool],
) -> Any:
    """HWC uint8 figure: one panel per method, one heat strip per row (a label and ``{method: (T,) scores}``),
    the tokens of the sentence as column labels, each strip after the first with its Spearman correlation of
    ``|score|`` with the first strip at its right. Each strip is scaled by its own largest ``|score|``
    (signed methods: blue against the explained class, red for it; unsigned: white to red)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from lightning_introspect.loggers.adapter import figure_to_array

    tokens = [str(int(t)) for t in ids.detach().cpu().long().tolist()]
    n_rows, n_tok = len(rows), len(tokens)
    strips = {m: torch.stack([r[m].detach().float().cpu().reshape(-1)[:n_tok] for _, r in rows]) for m in methods}
    pairs = [(strips[m][:1], strips[m][i : i + 1]) for m in methods for i in range(1, n_rows)]
    rho = iter(map_similarities(pairs, ["spearman_abs"]) if pairs else [])
    width = max(2.4, 0.32 * n_tok + 1.0)
    fig, axes = plt.subplots(1, len(methods), figsize=(max(6.0, width * len(methods) + 1.2), 0.34 * n_rows + 1.3), dpi=90, squeeze=False)
    try:
        for k, (ax, method) in enumerate(zip(axes[0], methods)):
            values = strips[method]
            scale = values.abs().amax(1, keepdim=True).clamp_min(1e-12)
            if signed[method]:
                ax.imshow((values / scale).numpy(), cmap="bwr", vmin=-1.0, vmax=1.0, aspect="auto", interpolation="nearest")
            else:
                ax.imshow((values.abs() / scale).numpy(), cmap="Reds", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
            ax.set_xticks(range(n_tok))
            ax.set_xticklabels(tokens, fontsize=6, rotation=90)
            ax.set_yticks(range(n_rows))
            ax.set_yticklabels([label for label, _ in rows] if k == 0 else [""] * n_rows, fontsize=7)
            for i in range(1, n_rows):
                value = float(next(rho)["spearman_abs"][0])
                ax.text(n_tok - 0.4, i, f" ρ {value:.2f}", va="center", ha="left", fontsize=6)
            ax.set_title(f"{method} (ρ: Spearman of |score| with the first row)" if k == 0 else method, fontsize=7.5)
        fig.suptitle(title, fontsize=8.5)
        fig.subplots_adjust(left=min(0.45, 1.4 / fig.get_figwidth()), right=1 - 0.45 / fig.get_figwidth(), top=1 - 0.45 / fig.get_figheight(),
                            bottom=0.5 / fig.get_figheight(), wspace=0.22)
        return figure_to_array(fig, close=False)
    finally:
        plt.close(fig)


def token_maps_figure(report: SanityReport, mode: str, ids: torch.Tensor) -> Any:
    """The token scores of the first sentence along one randomisation curve: HWC uint8, a panel per method,
    a heat strip per step (original first) with its Spearman correlation of ``|score|`` with the original,
    the token ids as column labels. ``None`` without kept maps."""
    per_method = report.maps.get(mode, {})
    methods = [m for m in report.methods if m in per_method and ORIGINAL in per_method[m]]
    if not methods or ids.ndim != 2:
        return None
    steps = [ORIGINAL, *(s for s in report.steps(mode) if all(s in per_method[m] for m in methods))]
    signed = {m: bool((per_method[m][ORIGINAL][0] < 0).any()) for m in methods}
    rows = [
        (ORIGINAL if step == ORIGINAL else f"{'→ ' if mode != 'independent' else ''}{step}", {m: per_method[m][step][0] for m in methods})
        for step in steps
    ]
    title = f"{CURVE_TITLES.get(mode, mode)} randomisation: token scores of sentence #0 ({CURVE_ROWS.get(mode, mode)})"
    return _heat_strips(rows, methods, ids[0], title, signed)


def token_class_maps_figure(report: SanityReport, ids: torch.Tensor) -> Any:
    """The token scores of the first sentence for the predicted and the other classes: HWC uint8, a panel per
    method, a heat strip per class (the predicted class first). ``None`` without class maps."""
    if not report.class_maps or ids.ndim != 2:
        return None
    methods = [m for m in report.methods if m in report.class_maps]
    keys = list(report.class_maps[methods[0]])
    signed = {m: bool((report.class_maps[m]["pred"][0] < 0).any()) for m in methods}
    rows = [(f"{key}: class {report.classes.get(key, [None])[0]}", {m: report.class_maps[m][key][0] for m in methods}) for key in keys]
    return _heat_strips(rows, methods, ids[0], "class sensitivity: token scores of sentence #0", signed)


def _verdict_of(report: SanityReport, mode: str, method: str) -> str:
    if mode == "bottom_up":
        detail = report.details.get("bottom_up", {}).get(method)
        return detail.verdict if detail is not None else "?"
    return report.verdicts.get(method, "?")


def curve_chart(report: SanityReport, mode: str, metric: str) -> Chart:
    """The similarity-vs-layer curves of one mode and metric: one line per method (its verdict in the legend),
    a band of +-1 standard deviation over the repeats, and the method's own threshold dashed in its colour.
    """
    steps = report.steps(mode)
    xs = [ORIGINAL, *steps]
    chart = Chart(title=f"{CURVE_TITLES.get(mode, mode)} randomisation ({CURVE_ROWS.get(mode, mode)})",
                  width=int(90 * max(4.5, 0.7 * len(xs) + 2.5)), panel_height=190)
    panel = chart.panel(ylabel=METRIC_LABELS.get(metric, metric), xticks=list(enumerate(xs)))
    lowest = 0.0
    for i, method in enumerate(report.methods):
        values = report.curves.get(mode, {}).get(method, {}).get(metric)
        if not values:
            continue
        ys = [1.0] + [values.get(name, math.nan) for name in steps]
        std = [0.0] + [report.curves_std.get(mode, {}).get(method, {}).get(metric, {}).get(name, 0.0) for name in steps]
        lo, hi = [y - d for y, d in zip(ys, std)], [y + d for y, d in zip(ys, std)]
        panel.band(range(len(xs)), lo, hi, color=color(i))
        panel.line(range(len(xs)), ys, color=color(i), label=f"{method} ({_verdict_of(report, mode, method)})")
        lowest = min(lowest, min((v for v in lo if math.isfinite(v)), default=0.0))
        detail = report.details.get("bottom_up" if mode == "bottom_up" else "randomization", {}).get(method)
        if detail is not None and detail.metric == metric and mode != "independent":  # its own relative threshold
            panel.hline(detail.threshold, color=color(i), width=0.8)
    panel.ylim = (min(-0.1, lowest - 0.05), 1.05)
    return chart


def curve_figure(report: SanityReport, mode: str, metric: str) -> Any:
    """HWC uint8 image of :func:`curve_chart`."""
    return curve_chart(report, mode, metric).render()


def curve_figures(report: SanityReport, mode: str, metrics: Sequence[str]) -> dict[str, Any]:
    """:func:`curve_figure` of each metric of one mode: ``{metric: HWC uint8 image}``."""
    return {metric: curve_figure(report, mode, metric) for metric in metrics}


__all__ = [
    "CURVE_ROWS",
    "CURVE_TITLES",
    "METRIC_LABELS",
    "PASSED",
    "class_maps_grid",
    "curve_chart",
    "curve_figure",
    "curve_figures",
    "input_image",
    "maps_grid",
    "plain_map",
    "plotted_metrics",
    "report_scalars",
    "sanity_summary_lines",
    "token_class_maps_figure",
    "token_maps_figure",
]
