"""Dotted layer names to modules, with errors that list the valid choices."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence

from torch import nn


def close_matches(name: str, valid: Sequence[str], n: int = 5) -> str:
    """The valid names closest to ``name``, quoted and comma-separated, for error messages."""
    matches = difflib.get_close_matches(name, valid, n=n, cutoff=0.4)
    shown = matches or list(valid)[:10]
    suffix = "" if matches or len(valid) <= 10 else f" (and {len(valid) - 10} more)"
    return ", ".join(repr(m) for m in shown) + suffix


def get_layer(model: nn.Module, name: str, *, argument: str = "layer") -> nn.Module:
    """The submodule called ``name`` (dotted, as in ``model.named_modules()``).

    Raises:
        ValueError: naming ``argument`` and the closest valid names.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
        >>> get_layer(net, "0")
        Conv2d(1, 2, kernel_size=(3, 3), stride=(1, 1))
        >>> get_layer(net, "2")
        Traceback (most recent call last):
        ...
        ValueError: Expected `layer` to name a submodule of the model, but got '2'. Closest valid names: '0', '1'.
    """
    modules = dict(model.named_modules())
    if not isinstance(name, str) or name not in modules or name == "":
        valid = [n for n in modules if n]
        raise ValueError(
            f"Expected `{argument}` to name a submodule of the model, but got {name!r}. "
            f"Closest valid names: {close_matches(str(name), valid)}."
        )
    return modules[name]


def resolve_layers(
    model: nn.Module,
    spec: str | Sequence[str],
    *,
    argument: str = "layers",
    auto: Sequence[str] | None = None,
) -> dict[str, nn.Module]:
    """Resolve ``"auto"``, one name, or a list of dotted names / glob patterns to modules.

    Args:
        model: the model whose submodules are named.
        spec: ``"auto"``, a dotted name, a glob pattern (``"features.*"``) or a list of those.
        argument: the user-facing argument name, for error messages.
        auto: the names ``"auto"`` stands for (the caller decides what is sensible).

    Returns:
        Ordered mapping name -> module (order of ``spec``, globs in registration order).
    """
    modules = {n: m for n, m in model.named_modules() if n}
    if isinstance(spec, str) and spec == "auto":
        if auto is None:
            raise ValueError(f"`{argument}='auto'` is not supported here; name the layers explicitly.")
        spec = list(auto)
    names = [spec] if isinstance(spec, str) else list(spec)
    if not names:
        raise ValueError(f"Expected `{argument}` to name at least one layer, but got an empty list.")
    out: dict[str, nn.Module] = {}
    for pattern in names:
        if not isinstance(pattern, str):
            raise ValueError(f"Expected `{argument}` to hold layer names (str), but got {pattern!r}.")
        if any(ch in pattern for ch in "*?["):
            hits = [n for n in modules if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise ValueError(
                    f"Expected the pattern {pattern!r} in `{argument}` to match at least one submodule. "
                    f"Valid names include: {close_matches(pattern, list(modules))}."
                )
            for n in hits:
                out[n] = modules[n]
        else:
            out[pattern] = get_layer(model, pattern, argument=argument)
    return out
