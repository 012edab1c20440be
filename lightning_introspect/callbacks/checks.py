"""Argument checks with uniform messages (the argument named, the valid choices listed), and the
model checks the gradient callbacks share."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lightning_introspect._warnings import warn

NO_INPUT_GRADIENT = (
    "autograd does not connect the model's output to its input: its forward runs the part the input enters "
    "under torch.no_grad() (or detaches it), as a frozen feature extractor often does, so there is no input "
    "gradient to explain or optimise. Run the frozen part without no_grad (its parameters can keep "
    "requires_grad=False) to use it."
)


def input_gradient_problem(model: Any, inputs: torch.Tensor) -> str | None:
    """Why gradient-based methods cannot work on ``model`` with these inputs, or ``None`` when they can
    (call it where ``model(x)`` returns the logits tensor)."""
    from lightning_introspect._torch.guards import output_depends_on_input

    if not inputs.is_floating_point():
        return (
            f"the inputs are {inputs.dtype} (integer data such as token ids or raw uint8 pixels), so there is no input "
            "gradient to explain or optimise; gradient methods need floating inputs (convert pixels to float in the "
            "data pipeline, not in forward)."
        )
    return None if output_depends_on_input(model, inputs) else NO_INPUT_GRADIENT

def check_positive_int(value: Any, argument: str, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is a positive int."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"Expected `{argument}` to be a positive int{extra}, but got {value!r}.")


def check_fractions(value: Any, argument: str) -> tuple[float, ...]:
    """``value`` as a tuple of fractions in [0, 1]; ``ValueError`` naming ``argument`` otherwise.

    Example:
        >>> check_fractions([0.0, 0.5], "at")
        (0.0, 0.5)
    """
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"Expected `{argument}` to be a list of fractions in [0, 1] (e.g. [0.5]), but got {value!r}.")
    out = []
    for f in value:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or math.isnan(f) or not 0.0 <= f <= 1.0:
            raise ValueError(f"Expected every entry of `{argument}` to be a fraction in [0, 1], but got {f!r}.")
        out.append(float(f))
    return tuple(out)


def check_callable(value: Any, argument: str) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is callable or ``None``."""
    if value is not None and not callable(value):
        raise ValueError(f"Expected `{argument}` to be a callable or None, but got {value!r}.")


def lrp_problem(model: Any, output_transform: Any = None, sample: torch.Tensor | None = None) -> str | None:
    """Why LRP cannot run on ``model`` (the end of a warning that names the callback), or ``None``.

    ``sample`` (a couple of inputs): a model torch.fx cannot trace is recorded on it, so a model the
    recording cannot explain either is refused here, before training, not found out mid-fit."""
    if output_transform is not None:
        return "LRP propagates through the model's own graph and cannot apply `output_transform`; 'lrp' is skipped."
    from lightning_introspect.methods.lrp import lrp_unsupported

    reason = lrp_unsupported(model, sample)  # a property of the model, known before training: not a failure
    return None if reason is None else f"'lrp' is skipped for this model: {reason}"


def renamed_argument(old: str, new: str, old_value: Any, new_value: Any, default: Any) -> Any:
    """The value of an argument renamed from ``old`` to ``new``: ``old`` still works for one release with a
    ``DeprecationWarning`` (configs may have it); giving both different values is an error."""
    if old_value is None:
        return new_value
    if new_value != default and new_value != old_value:
        raise ValueError(f"Expected only `{new}` (the new name of `{old}`), but got both: {new}={new_value!r}, {old}={old_value!r}.")
    warn(f"`{old}` is renamed to `{new}`; `{old}` stops working in the next release.", DeprecationWarning)  # at the user's line
    return old_value


def check_choice(value: Any, argument: str, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming ``argument`` and listing ``choices`` unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"Expected `{argument}` to be one of {', '.join(repr(c) for c in choices)}, but got {value!r}.")


def check_bool(value: Any, argument: str) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is a bool (``1`` / ``"yes"`` are refused:
    a YAML typo must not switch an analysis on)."""
    if not isinstance(value, bool):
        raise ValueError(f"Expected `{argument}` to be a bool, but got {value!r}.")


def check_int(value: Any, argument: str, *, minimum: int | None = None, what: str = "an int") -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is ``None`` or an int (``>= minimum`` if given)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ValueError(f"Expected `{argument}` to be {what} or None, but got {value!r}.")


def check_names(value: Any, argument: str) -> list[str] | None:
    """``value`` as a list of str (class or feature names), or ``None``; ``ValueError`` naming ``argument`` otherwise.

    Example:
        >>> check_names(("cat", "dog"), "class_names")
        ['cat', 'dog']
    """
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(n, str) for n in value):
        raise ValueError(f"Expected `{argument}` to be a list of str or None, but got {value!r}.")
    return list(value)


def check_module_name(value: Any, argument: str) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is ``"auto"`` or a (non-empty) dotted module name."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"Expected `{argument}` to be 'auto' or a dotted module name, but got {value!r}.")


def check_unit_interval(value: Any, argument: str) -> float:
    """``value`` as a float in [0, 1]; ``ValueError`` naming ``argument`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"Expected `{argument}` to be a float in [0, 1], but got {value!r}.")
    return float(value)


def check_colormap(value: Any, argument: str) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` names a matplotlib colormap."""
    import matplotlib

    if not isinstance(value, str) or value not in matplotlib.colormaps:
        raise ValueError(f"Expected `{argument}` to be a matplotlib colormap name (e.g. 'inferno', 'viridis', 'bwr'), but got {value!r}.")


def check_channel_stats(mean: Any, std: Any) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``(mean, std)`` of the input normalisation, each a float or one per channel, given together or not at all.

    Example:
        >>> check_channel_stats(0.5, [0.2, 0.3, 0.4])
        ((0.5,), (0.2, 0.3, 0.4))
    """
    stats: list[tuple[float, ...] | None] = []
    for argument, value in (("mean", mean), ("std", std)):
        if value is None:
            stats.append(None)
            continue
        values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(values, (list, tuple)) or not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise ValueError(f"Expected `{argument}` to be a float, a list of floats (one per channel) or None, but got {value!r}.")
        stats.append(tuple(float(v) for v in values))
    if (stats[0] is None) != (stats[1] is None):
        raise ValueError(f"Expected `mean` and `std` to be given together (or both None), but got mean={mean!r}, std={std!r}.")
    if stats[1] is not None and any(s <= 0 for s in stats[1]):
        raise ValueError(f"Expected every `std` entry to be > 0, but got {std!r}.")
    return stats[0], stats[1]


def gradient_problem(model: Any, inputs: torch.Tensor, output_transform: Any = None, *, reraise: bool = False) -> str | None:
    """Why the gradient callbacks cannot explain ``model`` on ``inputs`` (the reason for their skip
    warning), or ``None`` when they can. A forward that fails only when its input requires gradients
    (it changes its input in place) is such a reason, unless ``reraise`` (``on_error="raise"``)."""
    from lightning_introspect.callbacks.outputs import logits_only

    try:
        with logits_only(model, output_transform):
            return input_gradient_problem(model, inputs)
    except RuntimeError as err:
        if reraise:
            raise
        return (
            "the model's forward fails when its input requires gradients (for example it changes its input in "
            f"place, as `x.sub_(mean)` does; use `x = x - mean`): {err}"
        )
