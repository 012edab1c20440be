"""The checks of :class:`~lightning_introspect.callbacks.feature_visualization.FeatureVisualization`'s arguments.

A wrong argument is refused when the callback is built, before any fit: one ``ValueError`` that names the
argument in backticks and says what it accepts. The arguments that take several spellings (a prior as a module
or an import path, a number or one per channel) come back in the one form the optimisation uses.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from torch import nn

from lightning_introspect.callbacks.checks import check_callable, check_choice, check_positive_int
from lightning_introspect.methods.featviz import PARAMS, PENALTIES
from lightning_introspect.methods.featviz_plan import REGULARIZERS, resolve_prior
from lightning_introspect.methods.task import TASK_KINDS

__all__ = ["FeatvizArguments", "check_featviz_arguments"]


class FeatvizArguments(NamedTuple):
    """The arguments that :func:`check_featviz_arguments` gives back in the form the optimisation uses."""

    prior_module: nn.Module | None
    regularizers: list[str]  # in the order of REGULARIZERS
    mean: list[float] | None
    std: list[float] | None
    value_range: tuple[float, float] | None


def _float_list(value: Any, argument: str, *, length: int | None = None) -> list[float] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else list(value)
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"Expected `{argument}` to be a number or a list of numbers, but got {value!r}.") from err
    if length is not None and len(out) != length or not out or any(math.isnan(v) for v in out):
        need = f"{length} numbers" if length is not None else "a number or a list of numbers"
        raise ValueError(f"Expected `{argument}` to be {need}, but got {value!r}.")
    return out


def _ids(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value)


def _regularizers(regularizers: Any, prior_module: nn.Module | None) -> list[str]:
    if regularizers is None:
        return ["frequency", "transform"] + (["prior"] if prior_module is not None else [])
    if isinstance(regularizers, str) or not isinstance(regularizers, (list, tuple)):
        raise ValueError(f"Expected `regularizers` to be a list drawn from {list(REGULARIZERS)}, but got {regularizers!r}.")
    for r in regularizers:
        check_choice(r, "regularizers", REGULARIZERS)
    regs = [r for r in REGULARIZERS if r in regularizers]
    if "prior" in regs and prior_module is None:
        raise ValueError("`regularizers` contains 'prior' but no `prior` decoder was given; pass `prior` or drop 'prior'.")
    return regs


def check_featviz_arguments(
    *,
    layers: Any,
    channels: Any,
    classes: Any,
    regularizers: Any,
    steps: Any,
    lr: Any,
    image_size: Any,
    frequency_param: Any,
    frequency_penalty: Any,
    penalty: Any,
    transform_strength: Any,
    prior: Any,
    latent_dim: Any,
    latent_penalty: Any,
    mean: Any,
    std: Any,
    value_range: Any,
    num_layers: Any,
    num_channels: Any,
    output_transform: Any,
    task: Any,
    class_region: Any,
    batch_size: Any,
) -> FeatvizArguments:
    """Raise ``ValueError`` for the first of ``FeatureVisualization``'s arguments that it cannot take.

    Args:
        layers, channels, classes, regularizers, steps, lr, image_size, frequency_param, frequency_penalty,
            penalty, transform_strength, prior, latent_dim, latent_penalty, mean, std, value_range, num_layers,
            num_channels, output_transform, task, class_region, batch_size: the arguments of the same names
            (see ``FeatureVisualization``).

    Returns:
        The prior as a module (loaded from its import path), the regularisers (default: ``frequency``,
        ``transform`` and ``prior`` when a prior is given), ``mean`` / ``std`` as lists, ``value_range`` as a pair.

    Raises:
        ValueError: naming the argument and what it accepts.
    """
    if not (isinstance(layers, str) or (isinstance(layers, (list, tuple)) and all(isinstance(n, str) for n in layers))):
        raise ValueError(f"Expected `layers` to be 'auto', a layer name or a list of names, but got {layers!r}.")
    if isinstance(channels, str):
        check_choice(channels, "channels", ("auto",))
    elif not (_ids(channels) and channels):
        raise ValueError(f"Expected `channels` to be 'auto' or a non-empty list of channel ids (ints >= 0), but got {channels!r}.")
    if isinstance(classes, str):
        check_choice(classes, "classes", ("auto",))
    elif classes is not None and not _ids(classes):
        raise ValueError(f"Expected `classes` to be 'auto', None or a list of class ids (ints >= 0), but got {classes!r}.")
    prior_module = resolve_prior(prior)
    regs = _regularizers(regularizers, prior_module)
    check_positive_int(steps, "steps")
    check_positive_int(image_size, "image_size", allow_none=True)
    check_positive_int(num_layers, "num_layers")
    check_positive_int(num_channels, "num_channels")
    check_positive_int(batch_size, "batch_size", allow_none=True)
    check_positive_int(latent_dim, "latent_dim", allow_none=True)
    check_choice(frequency_param, "frequency_param", PARAMS)
    check_choice(penalty, "penalty", PENALTIES)
    check_choice(task, "task", TASK_KINDS)
    if isinstance(class_region, bool) or not isinstance(class_region, (int, float)) or not 0.0 < class_region <= 1.0:
        raise ValueError(f"Expected `class_region` to be a fraction in (0, 1], but got {class_region!r}.")
    for argument, value in (("lr", lr), ("frequency_penalty", frequency_penalty), ("transform_strength", transform_strength), ("latent_penalty", latent_penalty)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (argument == "lr" and value == 0):
            raise ValueError(f"Expected `{argument}` to be a {'positive' if argument == 'lr' else 'non-negative'} number, but got {value!r}.")
    mean_list, std_list = _float_list(mean, "mean"), _float_list(std, "std")
    if std_list is not None and any(s == 0 for s in std_list):
        raise ValueError(f"Expected `std` to be non-zero, but got {std!r}.")
    vr = _float_list(value_range, "value_range", length=2)
    if vr is not None and not vr[0] < vr[1]:
        raise ValueError(f"Expected `value_range` to be [low, high] with low < high, but got {value_range!r}.")
    check_callable(output_transform, "output_transform")
    return FeatvizArguments(prior_module, regs, mean_list, std_list, None if vr is None else (vr[0], vr[1]))
