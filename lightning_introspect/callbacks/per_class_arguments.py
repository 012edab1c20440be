"""The checks of :class:`~lightning_introspect.callbacks.per_class_metrics.PerClassMetrics`' arguments.

A wrong argument is refused when the callback is built, before any fit: one ``ValueError`` that names the
argument in backticks and says what it accepts. The arguments that take several spellings (one metric or a
list, ``num_classes`` implied by ``task="binary"``) come back in the one form the metrics use.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from lightning_introspect.callbacks.checks import check_callable, check_choice, check_int, check_positive_int
from lightning_introspect.methods.per_class import METRICS, TASKS

__all__ = ["PerClassArguments", "check_per_class_arguments"]


class PerClassArguments(NamedTuple):
    """The arguments that :func:`check_per_class_arguments` gives back in the form the metrics use."""

    num_classes: int | None  # 2 for task="binary" (reported as two classes)
    metrics: list[str]
    class_names: list[str] | None
    threshold: float


def check_per_class_arguments(
    *,
    task: Any,
    num_classes: Any,
    least_improved: Any,
    metrics: Any,
    threshold: Any,
    ignore_index: Any,
    output_transform: Any,
    target_transform: Any,
    class_names: Any,
) -> PerClassArguments:
    """Raise ``ValueError`` for the first of ``PerClassMetrics``' arguments that it cannot take.

    Args:
        task, num_classes, least_improved, metrics, threshold, ignore_index, output_transform, target_transform,
            class_names: the arguments of the same names (see ``PerClassMetrics``).

    Returns:
        The number of classes (``None``: read from the logits), the metrics and class names as lists, the
        threshold as a float.

    Raises:
        ValueError: naming the argument and what it accepts.
    """
    check_choice(task, "task", TASKS)
    check_positive_int(num_classes, "num_classes", allow_none=True)
    check_positive_int(least_improved, "least_improved")
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metrics:
        raise ValueError(f"Expected `metrics` to name at least one of {', '.join(map(repr, METRICS))}, but got [].")
    for m in metrics:
        check_choice(m, "metrics", METRICS)
    if task == "binary" and num_classes not in (None, 1, 2):
        raise ValueError(f"Expected `num_classes` to be 1, 2 or None for task='binary', but got {num_classes!r}.")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"Expected `threshold` to be a probability in [0, 1], but got {threshold!r}.")
    check_int(ignore_index, "ignore_index")
    check_callable(output_transform, "output_transform")
    check_callable(target_transform, "target_transform")
    num_classes = 2 if task == "binary" else num_classes
    names = None if class_names is None else [str(c) for c in class_names]
    if names is not None and num_classes is not None and len(names) != num_classes:
        raise ValueError(f"Expected `class_names` to have num_classes={num_classes} entries, but got {len(names)}.")
    return PerClassArguments(num_classes, metrics, names, float(threshold))
