"""What the introspection callbacks of a fit found, as a few plain-text lines (what the demo prints)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def introspection_summary(source: Any) -> list[str]:
    """One summary of every introspection callback of ``source`` (a ``Trainer`` after ``fit``, or the
    callbacks themselves), in their order.

    Each line is ``[Callback] <line>`` for every line of the callback's ``summary_lines()``; a callback
    skipped for the fit gives ``[Callback] skipped: <reason>``, one disabled by a failure ``[Callback]
    failed and was disabled (see the warning)``, and a one-off run that a budget made smaller or skipped
    ``[Callback] budget ...: <the decision>``. Other callbacks (Lightning's own) are ignored.

    Example:
        >>> from lightning_introspect.callbacks.weight_histograms import WeightHistograms
        >>> skipped = WeightHistograms()
        >>> skipped.skip_reason = "the model has no parameters to track."
        >>> introspection_summary([WeightHistograms(), skipped])
        ['[WeightHistograms] skipped: the model has no parameters to track.']
    """
    callbacks: Iterable[Any] = getattr(source, "callbacks", source)
    lines: list[str] = []
    for cb in callbacks:
        if not hasattr(cb, "summary_lines") or not hasattr(cb, "skip_reason"):
            continue
        name = type(cb).__name__
        if cb.skip_reason is not None:
            lines.append(f"[{name}] skipped: {cb.skip_reason}")
            continue
        if getattr(cb, "disabled", False):
            lines.append(f"[{name}] failed and was disabled (see the warning)")
        lines.extend(f"[{name}] {line.removeprefix(name).lstrip(' :')}" for line in cb.summary_lines())
        choice = getattr(cb, "budget_choice", None)
        if choice is not None and choice.reduced:
            lines.append(f"[{name}] {choice.note.removeprefix(name).lstrip(' :')}")
    return lines
