"""The checks of :class:`~lightning_introspect.callbacks.misclassifications.Misclassifications`' arguments.

A wrong argument is refused when the callback is built, before any fit: one ``ValueError`` that names the
argument in backticks and says what it accepts. The arguments that take several spellings (one statistic or
a list, a number or one per channel) come back in the one form the review uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from lightning_introspect.callbacks.checks import check_callable, check_choice, check_int, check_positive_int
from lightning_introspect.errors import IntrospectionInputError
from lightning_introspect.methods.image_stats import PERTURBATIONS, STATISTICS
from lightning_introspect.methods.task import TASK_KINDS

__all__ = ["ReviewArguments", "check_review_arguments", "class_labels"]


class ReviewArguments(NamedTuple):
    """The arguments that :func:`check_review_arguments` gives back in the form the review uses."""

    statistics: list[str]
    perturbations: list[str]
    strengths: dict[str, list[float]]  # kind -> strengths, for every kind (the unused ones too)
    class_names: list[str] | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


def _check_floats(values: Any, argument: str, *, low: float = 0.0, high: float = math.inf) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"Expected `{argument}` to be a list of numbers, but got {values!r}.") from err
    for v in out:
        if not low <= v <= high or math.isnan(v):
            raise ValueError(f"Expected every entry of `{argument}` to be in [{low}, {high}], but got {v!r}.")
    return out


def _normalization(value: Any, argument: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, (int, float)) else tuple(value)
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Expected `{argument}` to be a number, a list of numbers or None, but got {value!r}.") from err


def _among(value: str | Sequence[str], argument: str, choices: Sequence[str]) -> list[str]:
    values = [value] if isinstance(value, str) else list(value)
    bad = [v for v in values if v not in choices]
    if bad:
        raise ValueError(f"Expected `{argument}` to be among {', '.join(map(repr, choices))}, but got {bad}.")
    return values


def check_review_arguments(
    *,
    task: Any,
    top_k: Any,
    per_class: Any,
    ignore_index: Any,
    boundary_width: Any,
    statistics: Any,
    num_bins: Any,
    perturbations: Any,
    blur_sigmas: Any,
    noise_stds: Any,
    color_strengths: Any,
    class_names: Any,
    decode: Any,
    output_transform: Any,
    target_transform: Any,
    mean: Any,
    std: Any,
) -> ReviewArguments:
    """Raise ``ValueError`` for the first of ``Misclassifications``' arguments that it cannot take.

    Args:
        task, top_k, per_class, ignore_index, boundary_width, statistics, num_bins, perturbations, blur_sigmas,
            noise_stds, color_strengths, class_names, decode, output_transform, target_transform, mean, std: the
            arguments of the same names (see ``Misclassifications``).

    Returns:
        The statistics, perturbations, strengths per kind, class names and normalisation as lists and tuples.

    Raises:
        ValueError: naming the argument and what it accepts.
    """
    check_choice(task, "task", TASK_KINDS)
    check_positive_int(top_k, "top_k")
    check_positive_int(num_bins, "num_bins")
    check_positive_int(boundary_width, "boundary_width")
    check_int(ignore_index, "ignore_index")
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 0:
        raise ValueError(f"Expected `per_class` to be a non-negative int, but got {per_class!r}.")
    statistics = _among(statistics, "statistics", STATISTICS)
    perturbations = _among(perturbations, "perturbations", PERTURBATIONS)
    check_callable(output_transform, "output_transform")
    check_callable(target_transform, "target_transform")
    check_callable(decode, "decode")
    strengths = {
        "blur": _check_floats(blur_sigmas, "blur_sigmas"),
        "noise": _check_floats(noise_stds, "noise_stds"),
        "color": _check_floats(color_strengths, "color_strengths", high=1.0),
    }
    names = None if class_names is None else [str(c) for c in class_names]
    mean, std = _normalization(mean, "mean"), _normalization(std, "std")
    if (mean is None) != (std is None):
        raise ValueError("Expected `mean` and `std` to be given together (or neither), but got only one.")
    if std is not None and any(s <= 0 for s in std):
        raise ValueError(f"Expected every entry of `std` to be positive, but got {list(std)}.")
    return ReviewArguments(statistics, perturbations, strengths, names, mean, std)


def class_labels(class_names: list[str] | None, n: int) -> list[str]:
    """The display names of ``n`` classes: ``class_names``, refused (before training, or at the first review)
    when it has not one entry per class, else the class ids."""
    if class_names is not None:
        if len(class_names) != n:
            raise IntrospectionInputError(
                f"Expected `class_names` to have one entry per class ({n} from the logits' width), "
                f"but got {len(class_names)}."
            )
        return list(class_names)
    return [str(i) for i in range(n)]
