"""Linear-probe results as a person reads them: a markdown table, the accuracy-vs-depth chart and a
short plain-text summary (numbers in, strings and :class:`~lightning_introspect.render.plot.Chart` s out; no
logging, no Lightning).

Every function takes the probe accuracies of one evaluation as ``{layer: accuracy}`` and ``order``, the
probed layers in execution order: a layer's depth is its position there (1 = the first probed layer;
layers not in ``order`` come last), and 0 is the raw input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_introspect.render.plot import Chart


def _depth(name: str, order: Sequence[str]) -> int:
    """0-based position of ``name`` in ``order``; ``len(order)`` for a name that is not there."""
    return list(order).index(name) if name in order else len(order)


def _by_depth(names: Any, order: Sequence[str]) -> list[str]:
    return sorted(names, key=lambda n: _depth(n, order))


def probe_table(
    epoch: int | str,
    accuracy: Mapping[str, float],
    macro_f1: Mapping[str, float],
    *,
    order: Sequence[str],
    init: Mapping[str, float] | None = None,
    input_scores: tuple[float, float] | None = None,
    best: str | None = None,
) -> str:
    """A markdown table of one evaluation's probe accuracies beside the baselines, layers by depth.

    Args:
        epoch: the evaluation's label in the header (an epoch, or ``"init"``).
        accuracy: ``{layer: probe-test accuracy}``.
        macro_f1: ``{layer: macro-F1}`` (missing layers show ``nan``).
        order: the probed layers in execution order (depth).
        init: ``{layer: accuracy}`` of the probes on the model as initialised (adds the change vs init).
        input_scores: ``(accuracy, macro-F1)`` of the raw-input baseline: a first row at depth 0.
        best: the layer marked **best**.

    Example:
        >>> print(probe_table(3, {"b": 0.9, "a": 0.7}, {"a": 0.6, "b": 0.88}, order=["a", "b"], init={"a": 0.5}))
        | layer | depth | accuracy (epoch 3) | macro-F1 | init accuracy | change vs init |
        |---|---|---|---|---|---|
        | `a` | 1 | 0.700 | 0.600 | 0.500 | +0.200 |
        | `b` | 2 | 0.900 | 0.880 |  |  |
    """
    init = init or {}
    lines = [
        f"| layer | depth | accuracy (epoch {epoch}) | macro-F1 | init accuracy | change vs init |",
        "|---|---|---|---|---|---|",
    ]
    if input_scores is not None:
        lines.append(f"| input (baseline) | 0 | {input_scores[0]:.3f} | {input_scores[1]:.3f} | | |")
    for name in _by_depth(accuracy, order):
        acc = accuracy[name]
        base = init.get(name)
        delta = f"{acc - base:+.3f}" if base is not None else ""
        base_s = f"{base:.3f}" if base is not None else ""
        star = " **best**" if name == best else ""
        depth = _depth(name, order) + 1
        lines.append(f"| `{name}`{star} | {depth} | {acc:.3f} | {macro_f1.get(name, float('nan')):.3f} | {base_s} | {delta} |")
    return "\n".join(lines)


def accuracy_vs_depth_chart(
    epoch: int | str,
    accuracy: Mapping[str, float],
    *,
    order: Sequence[str],
    init: Mapping[str, float] | None = None,
    input_accuracy: float | None = None,
) -> Chart:
    """The probe accuracy by layer depth, with the init curve and the raw-input line.

    Args:
        epoch: the evaluation's label in the legend and title.
        accuracy: ``{layer: probe-test accuracy}``.
        order: the probed layers in execution order (the x axis).
        init: ``{layer: accuracy}`` of the probes on the model as initialised (a dashed grey curve).
        input_accuracy: the raw-input baseline (a dotted horizontal line).

    Example:
        >>> chart = accuracy_vs_depth_chart(2, {"a": 0.6, "b": 0.9}, order=["a", "b"], input_accuracy=0.5)
        >>> chart.labels(), chart.panels[0].series[0].y
        (['epoch 2', 'raw input'], (0.6, 0.9))
    """
    names = _by_depth(accuracy, order)
    depth = [_depth(n, order) + 1 for n in names]
    chart = Chart(title=f"Linear probes, epoch {epoch}", xlabel="layer (execution order)",
                  width=int(90 * max(4.0, 0.9 * len(names) + 2)), panel_height=190)
    panel = chart.panel(ylabel="probe test accuracy", xticks=list(zip(depth, names)))
    panel.line(depth, [accuracy[n] for n in names], color="#1f77b4", label=f"epoch {epoch}")
    if init:
        pts = [(_depth(n, order) + 1, init[n]) for n in names if n in init]
        panel.line([p[0] for p in pts], [p[1] for p in pts], color="#7f7f7f", marker="s", dash="dashed", label="init")
    if input_accuracy is not None:
        panel.hline(input_accuracy, color="#ff7f0e", dash="dotted", width=1.5, label="raw input")
    return chart


def probe_summary_lines(
    epoch: int,
    accuracy: Mapping[str, float],
    best: str,
    *,
    order: Sequence[str],
    init_accuracy: float | None = None,
    input_accuracy: float | None = None,
) -> list[str]:
    """Two plain-text lines: the best layer beside its baselines, and the accuracy curve by depth.

    Example:
        >>> for line in probe_summary_lines(4, {"b": 0.91, "a": 0.7}, "b", order=["a", "b"], input_accuracy=0.5):
        ...     print(line)
        best layer `b`: probe accuracy 0.910 at epoch 4 | raw input 0.500
        by depth: a 0.70, b 0.91
    """
    parts = [f"best layer `{best}`: probe accuracy {accuracy[best]:.3f} at epoch {epoch}"]
    if init_accuracy is not None:
        parts.append(f"init {init_accuracy:.3f}")
    if input_accuracy is not None:
        parts.append(f"raw input {input_accuracy:.3f}")
    curve = ", ".join(f"{n} {accuracy[n]:.2f}" for n in _by_depth(accuracy, order))
    return [" | ".join(parts), f"by depth: {curve}"]


def probe_notes(
    *,
    token_pooling: Mapping[str, str] | None = None,
    pixels_per_image: int | None = None,
    ignore_index: int | None = None,
    max_samples: int | None = None,
) -> str:
    """What a reader of the probe table needs to know about how the features were made, as markdown
    paragraphs ("" when there is nothing to say): how token layers were pooled and, for per-pixel probes
    (``pixels_per_image`` given), which pixels were drawn.

    Example:
        >>> print(probe_notes(token_pooling={"blocks.1": "class token (token 0 of 17)"}))
        Token layers (N, T, D), one vector per sample: `blocks.1`: class token (token 0 of 17).
    """
    notes = []
    if token_pooling:
        layers = "; ".join(f"`{name}`: {how}" for name, how in token_pooling.items())
        notes.append(f"Token layers (N, T, D), one vector per sample: {layers}.")
    if pixels_per_image is not None:
        ignored = "" if ignore_index is None else f", pixels labelled {ignore_index} never drawn"
        notes.append(
            f"Per-pixel probes (segmentation): up to {pixels_per_image} positions per image, the same every epoch, "
            f"each labelled by the mask resized to its layer's feature map (nearest){ignored}; at most {max_samples} "
            "pixels per layer. Accuracy is over pixels (the background's share is the majority baseline)."
        )
    return "\n\n".join(notes)
