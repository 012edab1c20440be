"""The misclassification review as a person reads it: galleries of confidently wrong images, markdown
tables of the wrong examples, of error rates by image statistic and of accuracy under perturbations,
their figures and a few plain-text lines (tensors and numbers in, images, strings and matplotlib figures
out; no logging, no Lightning).

``bins`` is ``{statistic: {"edges", "counts", "errors", "rate"}}`` (one entry per quantile bin, ``rate``
``None`` for an empty bin) and ``results`` is ``{kind: {"strengths", "accuracy", "per_class"}}`` with the
clean accuracy (strength 0) first, as :class:`~lightning_introspect.callbacks.misclassifications.Misclassifications`
keeps them in its ``report``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_introspect.loggers.adapter import markdown_cell
from lightning_introspect.render.charts import bar_polygons
from lightning_introspect.render.figures import set_margins
from lightning_introspect.render.grid import captioned_grid
from lightning_introspect.render.heatmap import to_display

_KIND_LABEL = {"blur": "blur sigma", "noise": "noise std", "color": "colour filter"}


def display_images(raw: torch.Tensor, *, unnormalized: bool = False) -> torch.Tensor:
    """Images ready to show: un-normalised images (``unnormalized``) already in [0, 1] are only clipped,
    anything else is min-max scaled per image (:func:`~lightning_introspect.render.heatmap.to_display`).

    Example:
        >>> display_images(torch.tensor([[[[1.02, 0.5, 0.0]]]]), unnormalized=True).tolist()
        [[[[1.0, 0.5, 0.0]]]]
    """
    if unnormalized and raw.min() >= -0.05 and raw.max() <= 1.05:
        return raw.clamp(0, 1)
    return to_display(raw)


def wrong_gallery(top: Mapping[str, Any], names: Sequence[str], *, unnormalized: bool = False) -> Any:
    """The most confidently wrong images (``top["image"]``) in a captioned grid of up to 8 columns: true and
    predicted class and the confidence under each (``top`` holds ``"label"``, ``"pred"``, ``"conf"``)."""
    captions = [
        f"true {names[int(y)]} / pred {names[int(p)]}\n{float(c):.2f}"
        for y, p, c in zip(top["label"], top["pred"], top["conf"])
    ]
    return captioned_grid(display_images(top["image"], unnormalized=unnormalized), captions, nrow=min(8, len(captions)),
                          title="most confidently wrong (true / predicted, confidence)")


def per_class_gallery(
    per_class: Mapping[int, Mapping[str, Any]], names: Sequence[str], k: int, *, unnormalized: bool = False
) -> Any:
    """One row of up to ``k`` confidently wrong images per true class (``{class: rows}`` as for
    :func:`wrong_gallery`), blank cells where a class has fewer."""
    blank = torch.ones_like(next(iter(per_class.values()))["image"][0])
    images, captions, rows = [], [], []
    for cls in sorted(per_class):
        buf = per_class[cls]
        shown = display_images(buf["image"], unnormalized=unnormalized)
        rows.append(f"true {names[cls]}")
        for j in range(k):
            if j < shown.shape[0]:
                images.append(shown[j])
                captions.append(f"pred {names[int(buf['pred'][j])]} {float(buf['conf'][j]):.2f}")
            else:
                images.append(blank)
                captions.append("")
    return captioned_grid(torch.stack(images), captions, nrow=k, row_labels=rows, title="confidently wrong, per true class")


def wrong_markdown(rows: Sequence[Mapping[str, Any]], names: Sequence[str], error_rate: float, n: int) -> str:
    """The error rate and the confidently wrong rows (``{"index", "label", "pred", "confidence"}``) as markdown.

    Example:
        >>> print(wrong_markdown([{"index": 7, "label": 0, "pred": 1, "confidence": 0.9}], ["cat", "dog"], 0.25, 4))
        Error rate 25.0% on 4 validation samples.
        <BLANKLINE>
        | rank | index | true | predicted | confidence |
        |---|---|---|---|---|
        | 1 | 7 | cat | dog | 0.900 |
    """
    lines = [f"Error rate {error_rate:.1%} on {n} validation samples.", ""]
    if not rows:
        return "\n".join(lines + ["No misclassified sample."])
    lines += ["| rank | index | true | predicted | confidence |", "|---|---|---|---|---|"]
    lines += [
        f"| {r + 1} | {row['index']} | {markdown_cell(names[row['label']], max_chars=48)} | "
        f"{markdown_cell(names[row['pred']], max_chars=48)} | {row['confidence']:.3f} |"
        for r, row in enumerate(rows)
    ]
    return "\n".join(lines)


def wrong_sentences_markdown(
    rows: Sequence[Mapping[str, Any]],
    texts: Sequence[str],
    names: Sequence[str],
    *,
    tokens: Sequence[Sequence[str]] | None = None,
    scores: Sequence[torch.Tensor | None] | None = None,
) -> str:
    """The confidently wrong text samples: rank, true and predicted class, confidence and the text itself;
    with ``scores``, a last column with each token coloured by its score for the predicted class (gradient x
    embedding; :func:`~lightning_introspect.render.tokens.token_line`: red for the predicted class, blue
    against it), under a legend.

    Args:
        rows: the wrong rows (``index``, ``label``, ``pred``, ``confidence``).
        texts: each row's text.
        names: the class names.
        tokens: each row's tokens as strings (needed with ``scores``).
        scores: each row's ``(T,)`` token scores, or ``None`` for a row without (its cell shows ``-``).

    Example:
        >>> print(wrong_sentences_markdown([{"index": 3, "label": 0, "pred": 1, "confidence": 0.8}], ["a | b"], ["neg", "pos"]))
        | rank | index | true | predicted | confidence | text |
        |---|---|---|---|---|---|
        | 1 | 3 | neg | pos | 0.800 | a \\| b |
    """
    from lightning_introspect.render.tokens import token_legend, token_line

    scored = scores is not None and tokens is not None
    token_rows, score_rows = list(tokens or []), list(scores or [])
    head = "| rank | index | true | predicted | confidence | text |"
    rule = "|---|---|---|---|---|---|"
    lines = [f"Token colours (gradient x embedding for the predicted class): {token_legend(True)}", ""] if scored else []
    lines += [head + (" tokens for the predicted class |" if scored else ""), rule + ("---|" if scored else "")]
    for r, (row, text) in enumerate(zip(rows, texts)):
        line = (f"| {r + 1} | {row['index']} | {markdown_cell(names[row['label']], max_chars=48)} | "
                f"{markdown_cell(names[row['pred']], max_chars=48)} | {row['confidence']:.3f} | {markdown_cell(text, max_chars=300)} |")
        if scored:  # token_line escapes markdown (a token "|" included)
            score = score_rows[r] if r < len(score_rows) else None
            line += f" {token_line(token_rows[r], score, signed=True) if score is not None else '-'} |"
        lines.append(line)
    return "\n".join(lines)


def review_summary_lines(report: Mapping[str, Any] | None) -> list[str]:
    """A few plain-text lines on one review: the error rate, where errors concentrate, accuracy under
    each perturbation."""
    if report is None:
        return ["no review yet"]
    r = report
    out = [f"epoch {r['epoch']}: error rate {r['error_rate']:.3f} on {r['num_samples']} samples"]
    finding = strongest_bin(r["bins"], r["error_rate"])
    if finding:
        out.append(finding)
    for kind, res in r["perturbations"].items():
        out.append(
            f"{kind}: accuracy " + " -> ".join(f"{a:.2f}" for a in res["accuracy"])
            + f" at strengths {', '.join(f'{s:g}' for s in res['strengths'])}"
        )
    return out


def strongest_bin(bins: Mapping[str, Mapping[str, Any]], overall: float, *, ratio: float = 1.5) -> str | None:
    """One sentence on the statistic bin with the highest error rate (bins of at least 5 samples).

    It says "errors concentrate" only when that rate is at least ``ratio`` times the overall rate.
    """
    best = None
    for stat, b in bins.items():
        n = len(b["rate"])
        for i, (rate, count) in enumerate(zip(b["rate"], b["counts"])):
            if rate is None or count < 5:
                continue
            if best is None or rate > best[0]:
                side = " (lowest values)" if i == 0 else " (highest values)" if i == n - 1 else ""
                best = (rate, f"{stat} quantile bin q{i + 1} of {n}{side}", b["edges"][i], b["edges"][i + 1])
    if best is None or overall <= 0:
        return None
    rate, where, lo, hi = best
    detail = f"{where}, values [{lo:.3g}, {hi:.3g}]: error rate {rate:.1%} vs {overall:.1%} overall ({rate / overall:.1f}x)"
    if rate >= ratio * overall:
        return f"errors concentrate in {detail}"
    return f"no statistic bin stands out; the worst is {detail}"


def statistics_markdown(bins: Mapping[str, Mapping[str, Any]], overall: float) -> str:
    """Error rate per quantile bin of each statistic, as a markdown table."""
    width = max((len(b["rate"]) for b in bins.values()), default=0)
    lines = [f"Overall error rate {overall:.1%}. Bins are quantiles, q1 = lowest values.", ""]
    lines.append("| statistic | " + " | ".join(f"q{i + 1}" for i in range(width)) + " | worst / overall |")
    lines.append("|---" * (width + 2) + "|")
    for stat, b in bins.items():
        cells = []
        for i in range(width):
            if i < len(b["rate"]) and b["rate"][i] is not None:
                cells.append(f"{b['rate'][i]:.1%} (n={b['counts'][i]}, [{b['edges'][i]:.3g}, {b['edges'][i + 1]:.3g}])")
            else:
                cells.append("-")
        rates = [r for r in b["rate"] if r is not None]
        ratio = f"{max(rates) / overall:.2f}x" if rates and overall > 0 else "-"
        lines.append(f"| {stat} | " + " | ".join(cells) + f" | {ratio} |")
    finding = strongest_bin(bins, overall)
    if finding:
        lines += ["", f"**Finding:** {finding}."]
    return "\n".join(lines)


def statistics_figure(
    bins: Mapping[str, Mapping[str, Any]], overall: float, *, value: str = "rate", label: str = "error rate",
    color: str = "tab:red",
) -> Any:
    """Bar chart per statistic: error rate (or ``bins[stat][value]``, named ``label``) in each quantile bin,
    the overall value dashed.

    A plain ``Figure`` (no pyplot state); each panel's bars are one ``PolyCollection``.
    """
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    stats = list(bins)
    fig = Figure(figsize=(2.6 * max(1, len(stats)), 2.6))
    axes = fig.subplots(1, max(1, len(stats)), squeeze=False)
    for ax, stat in zip(axes[0], stats):
        b = bins[stat]
        rates = [0.0 if r is None else r for r in b[value]]
        bars = PolyCollection(bar_polygons(range(len(rates)), rates, 0.8), facecolors=color, edgecolors="none",
                              alpha=0.7)
        bars.sticky_edges.y.append(0.0)  # no margin below zero, as with ``ax.bar``
        ax.add_collection(bars)
        ax.axhline(overall, color="black", linestyle="--", linewidth=1)
        if max(rates, default=0.0) > 0 or overall > 0:
            ax.autoscale_view()
        else:  # nothing above zero: the symmetric range ``ax.bar`` falls back to
            ax.set_ylim(-0.055, 0.055)
        ax.set_xticks(range(len(rates)), [f"q{i + 1}" for i in range(len(rates))], fontsize=7)
        ax.set_title(stat, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].set_ylabel(label, fontsize=8)
    set_margins(fig, left=0.55, bottom=0.35, top=0.3)
    return fig


def perturbation_markdown(results: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> str:
    """Per-class accuracy under each perturbation and strength, as a markdown table."""
    columns = ["clean"]
    cells: list[list[Any]] = []
    first = next(iter(results.values()))
    cells.append([first["accuracy"][0], *first["per_class"][0]])
    for kind, res in results.items():
        for s, acc, per in zip(res["strengths"][1:], res["accuracy"][1:], res["per_class"][1:]):
            columns.append(f"{_KIND_LABEL.get(kind, kind)} {s:g}")
            cells.append([acc, *per])
    lines = ["Accuracy on the fixed validation subset.", "", "| class | " + " | ".join(columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for row, label in enumerate(["all", *names]):
        lines.append(
            f"| {markdown_cell(label, max_chars=48)} | " + " | ".join("no support" if col[row] is None else f"{col[row]:.2f}" for col in cells) + " |"
        )
    for kind, res in results.items():
        clean, worst = res["per_class"][0], res["per_class"][-1]
        pairs = [(c - w, n) for n, c, w in zip(names, clean, worst) if c is not None and w is not None]
        if pairs and len(res["strengths"]) > 1:
            drop, name = max(pairs)
            lines.append(f"\n**{kind}:** class {name} breaks most (accuracy -{drop:.2f} at strength {res['strengths'][-1]:g}).")
    return "\n".join(lines)


def perturbation_figure(
    results: Mapping[str, Mapping[str, Any]], names: Sequence[str], *, value: str = "accuracy", label: str = "accuracy",
) -> Any:
    """Accuracy (or ``results[kind][value]``, named ``label``) vs strength, one panel per perturbation: a thin
    line per class, the overall in black (``None`` values are gaps)."""
    import matplotlib
    from matplotlib.figure import Figure

    kinds = list(results)
    fig = Figure(figsize=(3.0 * len(kinds) + 1.2, 2.8))
    axes = fig.subplots(1, len(kinds), squeeze=False)
    cmap = matplotlib.colormaps["tab20" if len(names) > 10 else "tab10"]
    for ax, kind in zip(axes[0], kinds):
        res = results[kind]
        s = res["strengths"]
        for c, name in enumerate(names):
            ys = [None if per[c] is None else per[c] for per in res["per_class"]]
            if all(v is None for v in ys):
                continue
            ax.plot(s, [float("nan") if v is None else v for v in ys], color=cmap(c % cmap.N), linewidth=0.9,
                    alpha=0.8, label=name)
        ax.plot(s, [float("nan") if v is None else v for v in res[value]], color="black", linewidth=2.2, label="all")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(_KIND_LABEL.get(kind, kind), fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel(label, fontsize=8)
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    set_margins(fig, left=0.55, right=1.2, bottom=0.45, top=0.15, wspace=0.25)
    return fig
