"""Per-class metric snapshots as a person reads them: the classes x snapshots markdown table, the
summary of the least-improved classes and a few plain-text lines (numbers in, strings out; no logging,
no Lightning).

``snapshots`` is ``{key: {metric: [value per class], "support": [count per class]}}`` in time order (as
:class:`~lightning_introspect.callbacks.per_class_metrics.PerClassMetrics` keeps it), a value ``None``
for a class with no support; ``column(key)`` is the heading a snapshot gets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

Snapshots = Mapping[str, Mapping[str, Sequence[Any]]]


def snapshot_column(key: str, epochs: Mapping[str, Mapping[str, int]]) -> str:
    """The heading of snapshot ``key``: when it was taken (``epochs[key]`` is ``{"epoch", "step"}``).

    Example:
        >>> snapshot_column("start", {"start": {"epoch": -1, "step": 0}})
        'start (before training)'
        >>> snapshot_column("end", {"end": {"epoch": 4, "step": 50}})
        'end (epoch 4, step 50)'
    """
    e = epochs.get(key, {})
    if e.get("epoch", -1) < 0:
        return f"{key} (before training)"
    return f"{key} (epoch {e['epoch']}, step {e['step']})"


def _fmt(value: float | None) -> str:
    return "no support" if value is None else f"{value:.3f}"


def per_class_table(
    snapshots: Snapshots, metrics: Sequence[str], names: Sequence[str], column: Callable[[str], str] = str
) -> str:
    """Classes x snapshots for every metric, with the change since the first snapshot and the support of
    the last, as markdown (one section per metric).

    Example:
        >>> snaps = {"start": {"f1": [0.5, None], "support": [3, 0]}, "end": {"f1": [0.75, None], "support": [3, 0]}}
        >>> print(per_class_table(snaps, ["f1"], ["cat", "dog"]))
        ### f1
        <BLANKLINE>
        | class | start | end | support |
        |---|---|---|---|
        | cat | 0.500 | 0.750 (+0.250) | 3 |
        | dog | no support | no support | 0 |
        <BLANKLINE>
    """
    from lightning_introspect.loggers.adapter import markdown_cell

    keys = list(snapshots)
    if not keys:
        return "No snapshot yet."
    first = keys[0]
    lines = []
    for m in metrics:
        lines += [f"### {m}", "", "| class | " + " | ".join(column(k) for k in keys) + " | support |"]
        lines.append("|---" * (len(keys) + 2) + "|")
        for i, name in enumerate(names):
            cells = []
            for k in keys:
                v = snapshots[k][m][i]
                base = snapshots[first][m][i]
                cell = _fmt(v)
                if k != first and v is not None and base is not None:
                    cell += f" ({v - base:+.3f})"
                cells.append(cell)
            support = snapshots[keys[-1]]["support"][i]
            lines.append(f"| {markdown_cell(name, max_chars=48)} | " + " | ".join(cells) + f" | {support} |")
        lines.append("")
    return "\n".join(lines)


def per_class_summary(
    snapshots: Snapshots,
    metric: str,
    names: Sequence[str],
    least_improved: Sequence[tuple[str, float, float]],
    *,
    lowest: int = 3,
    column: Callable[[str], str] = str,
) -> str:
    """Markdown: the ``least_improved`` rows ``(class, first, last)``, the ``lowest`` classes by ``metric``
    in the last snapshot, the classes without support and when the snapshots were taken.

    Example:
        >>> snaps = {"start": {"f1": [0.5, 0.2], "support": [3, 2]}, "end": {"f1": [0.9, 0.3], "support": [3, 2]}}
        >>> print(per_class_summary(snaps, "f1", ["a", "b"], [("b", 0.2, 0.3)], lowest=1))
        **Least improved (f1, start -> end):**
        - class b: 0.200 -> 0.300 (+0.100)
        <BLANKLINE>
        **Lowest f1 at end:** b (0.300)
        <BLANKLINE>
        Snapshots: start; end
    """
    keys = list(snapshots)
    if not keys:
        return "No snapshot yet."
    lines = []
    if least_improved:
        lines.append(f"**Least improved ({metric}, {keys[0]} -> {keys[-1]}):**")
        lines += [f"- class {n}: {a:.3f} -> {b:.3f} ({b - a:+.3f})" for n, a, b in least_improved]
    else:
        lines.append(f"Only one snapshot so far ({column(keys[0])}).")
    last = snapshots[keys[-1]]
    worst = sorted((v, n) for n, v in zip(names, last[metric]) if v is not None)[:lowest]
    if worst:
        lines.append(f"\n**Lowest {metric} at {keys[-1]}:** " + ", ".join(f"{n} ({v:.3f})" for v, n in worst))
    missing = [n for n, s in zip(names, last["support"]) if s == 0]
    if missing:
        lines.append(f"\n**No support** (no sample in the validation data; no value reported): {', '.join(missing)}")
    lines.append("\nSnapshots: " + "; ".join(column(k) for k in keys))
    return "\n".join(lines)


def per_class_summary_lines(
    snapshots: Snapshots, metrics: Sequence[str], least_improved: Sequence[tuple[str, float, float]]
) -> list[str]:
    """A few plain-text lines: the mean per-class value of the first two metrics at each snapshot and the
    least-improved classes.

    Example:
        >>> per_class_summary_lines({"end": {"recall": [0.5, 1.0, None]}}, ["recall"], [])
        ['mean per-class recall: end 0.750']
    """
    keys = list(snapshots)
    if not keys:
        return ["no snapshot taken"]
    out = []
    for m in metrics[:2]:
        parts = []
        for k in keys:
            vals = [v for v in snapshots[k][m] if v is not None]
            parts.append(f"{k} {sum(vals) / max(1, len(vals)):.3f}")
        out.append(f"mean per-class {m}: " + ", ".join(parts))
    if least_improved:
        out.append("least improved: " + ", ".join(f"{n} ({a:.2f}->{b:.2f})" for n, a, b in least_improved))
    return out
