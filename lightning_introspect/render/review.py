"""The misclassification review as a person reads it: galleries of confidently wrong images, markdown
tables of the wrong examples, of error rates by image statistic and of accuracy under perturbations,
their charts and a few plain-text lines (tensors and numbers in, images, strings and
:class:`~lightning_introspect.render.plot.Chart` s out; no logging, no Lightning).

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
from lightning_introspect.render.grid import captioned_grid
from lightning_introspect.render.heatmap import to_display
from lightning_introspect.render.plot import Chart, color

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


def statistics_chart(
    bins: Mapping[str, Mapping[str, Any]], overall: float, *, value: str = "rate", label: str = "error rate",
    color: str = "#d62728",
) -> Chart:
    """Bars per statistic, one panel each: the error rate (or ``bins[stat][value]``, named ``label``) in each
    quantile bin, the overall value dashed.

    Example:
        >>> bins = {"brightness": {"rate": [0.1, None, 0.3]}, "contrast": {"rate": [0.2, 0.2, 0.2]}}
        >>> chart = statistics_chart(bins, 0.2)
        >>> [p.ylabel for p in chart.panels], chart.panels[0].series[0].y
        (['brightness', 'contrast'], (0.1, 0.0, 0.3))
    """
    stats = list(bins)
    lengths = {len(bins[stat][value]) for stat in stats}
    chart = Chart(title=f"{label} per quantile bin (q1 = lowest values; overall dashed)", shared_x=len(lengths) <= 1,
                  width=max(360, 60 * max(lengths, default=1) + 160), panel_height=90, legend=False)
    for stat in stats:
        rates = [0.0 if r is None else r for r in bins[stat][value]]
        panel = chart.panel(ylabel=stat, xticks=[(i, f"q{i + 1}") for i in range(len(rates))])
        panel.bars(range(len(rates)), rates, color=color, alpha=0.7)
        panel.hline(overall, color="#000000", width=1.0)
    return chart


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


def perturbation_chart(
    results: Mapping[str, Mapping[str, Any]], names: Sequence[str], *, value: str = "accuracy", label: str = "accuracy",
) -> Chart:
    """Accuracy (or ``results[kind][value]``, named ``label``) vs strength, one panel per perturbation with its
    own strength axis: a thin line per class (in the legend up to 20 classes), the overall thick and black
    (``None`` values are gaps).

    Example:
        >>> res = {"blur": {"strengths": [0.0, 1.0], "accuracy": [0.9, 0.5], "per_class": [[1.0, 0.8], [0.6, None]]}}
        >>> chart = perturbation_chart(res, ["cat", "dog"])
        >>> chart.labels(), chart.panels[0].series[-1].y
        (['cat', 'dog', 'all'], (0.9, 0.5))
    """
    chart = Chart(shared_x=False, width=max(420, 130 * max((len(r["strengths"]) for r in results.values()), default=1)),
                  panel_height=120)
    for kind, res in results.items():
        strengths = res["strengths"]
        panel = chart.panel(ylim=(-0.02, 1.02), ylabel=label, xlabel=_KIND_LABEL.get(kind, kind),
                            xticks=[(v, f"{v:g}") for v in strengths])
        for c, name in enumerate(names):
            ys = [per[c] for per in res["per_class"]]
            if any(v is not None for v in ys):
                panel.line(strengths, ys, color=color(c), marker=None, width=0.9, label=str(name) if len(names) <= 20 else None)
        panel.line(strengths, res[value], color="#000000", marker=None, width=2.2, label="all")
    return chart
