"""The checks of :class:`~lightning_introspect.callbacks.weight_histograms.WeightHistograms`' arguments.

A wrong argument is refused when the callback is built, before any fit: one ``ValueError`` that names the
argument in backticks and says what it accepts. ``layers`` (one name or a list) and ``drift_threshold`` come back
in the one form the callback keeps.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from lightning_introspect.callbacks.checks import check_bool, check_positive_int

__all__ = ["WeightsArguments", "check_weights_arguments"]


class WeightsArguments(NamedTuple):
    """The arguments that :func:`check_weights_arguments` gives back in the form the callback keeps."""

    layer_spec: str | list[str]
    drift_threshold: float


def check_weights_arguments(
    *,
    layers: Any,
    every_n_steps: Any,
    bins: Any,
    figures_every_n_epochs: Any,
    include_bias: Any,
    include_gradients: Any,
    drift_threshold: Any,
) -> WeightsArguments:
    """Raise ``ValueError`` for the first of ``WeightHistograms``' arguments that it cannot take.

    Args:
        layers, every_n_steps, bins, figures_every_n_epochs, include_bias, include_gradients, drift_threshold: the
            arguments of the same names (see ``WeightHistograms``).

    Returns:
        ``layers`` as a str or a list, ``drift_threshold`` as a float.

    Raises:
        ValueError: naming the argument and what it accepts.
    """
    if isinstance(layers, str):
        if not layers:
            raise ValueError("Expected `layers` to be 'auto', a layer name, a glob or a list of those, but got ''.")
    elif not isinstance(layers, (list, tuple)) or not layers or not all(isinstance(n, str) and n for n in layers):
        raise ValueError(
            f"Expected `layers` to be 'auto', a layer name, a glob or a non-empty list of those, but got {layers!r}."
        )
    check_positive_int(every_n_steps, "every_n_steps", allow_none=True)
    check_positive_int(bins, "bins")
    check_positive_int(figures_every_n_epochs, "figures_every_n_epochs", allow_none=True)
    for arg, value in (("include_bias", include_bias), ("include_gradients", include_gradients)):
        check_bool(value, arg)
    if isinstance(drift_threshold, bool) or not isinstance(drift_threshold, (int, float)) or not drift_threshold >= 0:
        raise ValueError(f"Expected `drift_threshold` to be a non-negative float, but got {drift_threshold!r}.")
    if not math.isfinite(drift_threshold):
        raise ValueError(f"Expected `drift_threshold` to be a finite non-negative float, but got {drift_threshold!r}.")
    return WeightsArguments(layers if isinstance(layers, str) else list(layers), float(drift_threshold))
