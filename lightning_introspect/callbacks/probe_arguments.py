"""The checks of :class:`~lightning_introspect.callbacks.linear_probes.LinearProbes`' arguments.

A wrong argument is refused when the callback is built, before any fit: one ``ValueError`` that names the
argument in backticks and says what it accepts (the valid choices listed where there are a few).
"""

from __future__ import annotations

import math
from typing import Any

from lightning_introspect.callbacks.checks import check_callable, check_choice, check_int, check_positive_int
from lightning_introspect.methods.probes import CACHE_POLICIES, POOLING_CHOICES, TOKEN_POOLING_CHOICES
from lightning_introspect.methods.task import TASK_KINDS

#: the values of ``solver``: chosen per evaluation, inline on the model's device, or in a background thread
SOLVERS = ("auto", "sklearn", "torch")

__all__ = ["SOLVERS", "check_probe_arguments"]


def check_probe_arguments(
    *,
    layers: Any,
    pooling: Any,
    token_pooling: Any,
    pad_token_id: Any,
    max_samples: Any,
    max_features: Any,
    solver: Any,
    test_fraction: Any,
    max_iter: Any,
    tol: Any,
    C: Any,
    cache: Any,
    probe_dataloader: Any,
    target_transform: Any,
    figures_every_n_epochs: Any,
    task: Any,
    pixels_per_image: Any,
    ignore_index: Any,
) -> None:
    """Raise ``ValueError`` for the first of ``LinearProbes``' arguments that it cannot take.

    Args:
        layers, pooling, token_pooling, pad_token_id, max_samples, max_features, solver, test_fraction,
            max_iter, tol, C, cache, probe_dataloader, target_transform, figures_every_n_epochs, task,
            pixels_per_image, ignore_index: the arguments of the same names (see ``LinearProbes``).

    Raises:
        ValueError: naming the argument and what it accepts.
    """
    if not (isinstance(layers, str) or (isinstance(layers, (list, tuple)) and all(isinstance(n, str) for n in layers))):
        raise ValueError(f"Expected `layers` to be 'auto', a layer name or a list of layer names, but got {layers!r}.")
    check_choice(pooling, "pooling", POOLING_CHOICES)
    check_choice(token_pooling, "token_pooling", TOKEN_POOLING_CHOICES)
    check_choice(solver, "solver", SOLVERS)
    check_choice(cache, "cache", CACHE_POLICIES)
    check_positive_int(max_samples, "max_samples")
    check_positive_int(max_features, "max_features")
    check_positive_int(max_iter, "max_iter")
    check_positive_int(figures_every_n_epochs, "figures_every_n_epochs", allow_none=True)
    check_choice(task, "task", TASK_KINDS)
    check_positive_int(pixels_per_image, "pixels_per_image")
    for value, argument in ((ignore_index, "ignore_index"), (pad_token_id, "pad_token_id")):
        check_int(value, argument)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"Expected `test_fraction` to be a float in (0, 1), but got {test_fraction!r}.")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < math.inf:
        raise ValueError(f"Expected `tol` to be a positive finite float, but got {tol!r}.")
    if isinstance(C, bool) or not isinstance(C, (int, float)) or not C > 0 or math.isinf(C):
        raise ValueError(f"Expected `C` to be a positive finite float, but got {C!r}.")
    check_callable(target_transform, "target_transform")
    if probe_dataloader is not None and not hasattr(probe_dataloader, "__iter__"):
        raise ValueError(f"Expected `probe_dataloader` to be an iterable DataLoader or None, but got {probe_dataloader!r}.")
