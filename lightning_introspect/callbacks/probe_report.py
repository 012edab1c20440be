"""What :class:`~lightning_introspect.callbacks.linear_probes.LinearProbes` shows of its evaluations: the record of
:class:`~lightning_introspect.methods.probes.ProbeEvaluations` (accuracy and macro-F1 per evaluation, the best
layer, the baselines) as the table, the accuracy-vs-depth chart and the summary lines of
:mod:`lightning_introspect.render.probes`. The callback decides when and where they are written.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_introspect.methods.probe_capture import INPUT_KEY
from lightning_introspect.methods.probes import ProbeEvaluations
from lightning_introspect.render.plot import Chart
from lightning_introspect.render.probes import (
    accuracy_vs_depth_chart,
    probe_summary_lines,
    probe_table,
)

#: the key of the probes on the model as initialised (fitted once, at fit start)
INIT_KEY = "init"

__all__ = ["INIT_KEY", "depth_chart", "evaluation_table", "input_accuracy", "latest_summary_lines"]


def input_accuracy(evaluations: ProbeEvaluations) -> float | None:
    """The raw-input baseline's test accuracy, when it was fitted."""
    return evaluations.history[INPUT_KEY][INPUT_KEY] if INPUT_KEY in evaluations.history else None


def evaluation_table(evaluations: ProbeEvaluations, key: int | str | None, *, order: Sequence[str], notes: str = "") -> str:
    """A markdown table of the probe accuracies of ``key`` (``None``: the latest epoch) beside the baselines.

    Args:
        evaluations: the fit's evaluations.
        key: an epoch, ``"init"`` or ``"input"``.
        order: the probed layers in execution order.
        notes: paragraphs put above the table (how token layers were pooled, the pixels of per-pixel probes).

    Returns:
        The markdown, or a sentence when there is no epoch to show yet.
    """
    latest = evaluations.latest_epoch()
    if key is None:
        if latest is None:
            return "No probe results yet."
        key = latest
    history, macro_f1 = evaluations.history, evaluations.macro_f1
    baseline = None
    if INPUT_KEY in history:
        nan = float("nan")
        baseline = history[INPUT_KEY].get(INPUT_KEY, nan), macro_f1.get(INPUT_KEY, {}).get(INPUT_KEY, nan)
    table = probe_table(
        key, history.get(key, {}), macro_f1.get(key, {}), order=order, init=history.get(INIT_KEY, {}),
        input_scores=baseline, best=evaluations.best_layer if key == latest else None,
    )
    return notes + "\n\n" + table if notes else table


def depth_chart(evaluations: ProbeEvaluations, key: int, *, order: Sequence[str]) -> Chart:
    """The accuracy-vs-depth chart of epoch ``key``, with the init curve and the input baseline."""
    return accuracy_vs_depth_chart(
        key, evaluations.history[key], order=order, init=evaluations.history.get(INIT_KEY),
        input_accuracy=input_accuracy(evaluations),
    )


def latest_summary_lines(evaluations: ProbeEvaluations, *, order: Sequence[str]) -> list[str]:
    """A few plain-text lines on the latest epoch's probes (none before the first evaluated epoch)."""
    latest, best = evaluations.latest_epoch(), evaluations.best_layer
    if latest is None or best is None:
        return []
    return probe_summary_lines(
        latest, evaluations.history[latest], best, order=order,
        init_accuracy=evaluations.history.get(INIT_KEY, {}).get(best), input_accuracy=input_accuracy(evaluations),
    )
