"""The layers whose weights are tracked over a fit: which modules carry a weight, which ones a ``layers``
argument names, and what changed when tracked modules were replaced during the fit.

Pure torch (no Lightning).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> list(weight_layers(net, "auto"))
    ['0', '2']
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_introspect._torch.hooks import record_execution_order
from lightning_introspect._torch.layers import close_matches, resolve_layers


def _own_param(module: nn.Module, name: str) -> torch.Tensor | None:
    param = module._parameters.get(name)
    if isinstance(param, torch.Tensor):
        return param
    if parametrize.is_parametrized(module, name):
        return getattr(module, name)
    return None


def own_weight(module: nn.Module) -> torch.Tensor | None:
    """The module's own ``weight`` parameter (also a parametrized one), else ``None``.

    Example:
        >>> own_weight(torch.nn.Linear(2, 3)).shape, own_weight(torch.nn.Sequential(torch.nn.Linear(2, 3)))
        (torch.Size([3, 2]), None)
    """
    return _own_param(module, "weight")


def own_bias(module: nn.Module) -> torch.Tensor | None:
    """The module's own ``bias`` parameter (also a parametrized one), else ``None``."""
    return _own_param(module, "bias")


def weight_layers(model: nn.Module, spec: str | list[str]) -> dict[str, nn.Module]:
    """``{name: module}`` of the layers ``spec`` names, each with its own weight (registration order).

    Args:
        model: the network.
        spec: ``"auto"`` (every submodule with its own ``weight``), a dotted module name, a glob
            (``"features.*"``: the matches that have a weight) or a list of those.

    Raises:
        ValueError: a name that is not a submodule (with close matches), a named module without a
            weight (listing layers that have one), or a pattern that matches no module with a weight.
    """
    with_weight = {n: m for n, m in model.named_modules() if n and own_weight(m) is not None}
    if not with_weight:
        raise ValueError("`layers`: the model has no submodule with its own `weight` parameter to track.")
    if spec == "auto":
        return with_weight
    chosen: dict[str, nn.Module] = {}
    for one in [spec] if isinstance(spec, str) else spec:
        found = resolve_layers(model, one, argument="layers")
        if any(ch in one for ch in "*?["):
            found = {n: m for n, m in found.items() if n in with_weight}
            if not found:
                raise ValueError(
                    f"Expected the pattern {one!r} in `layers` to match a module with its own weight, but none "
                    f"of its matches has one. Layers with weights include: {close_matches(one, list(with_weight))}."
                )
        elif one not in with_weight:
            raise ValueError(
                f"Expected `layers` to name modules with their own `weight`, but {one!r} "
                f"({type(found[one]).__name__}) has none. Closest layers with weights: {close_matches(one, list(with_weight))}."
            )
        chosen.update(found)
    order = list(with_weight)
    return {n: chosen[n] for n in sorted(chosen, key=order.index)}


@dataclass
class LayerChanges:
    """What :func:`follow_replacements` found.

    Attributes:
        modules: the layers to track from now on (the old order first, new layers after).
        gone: tracked layers no longer in the model (or without a weight).
        renewed: layers whose module or weight shape is new: their current weights become their ``W0``.
    """

    modules: dict[str, nn.Module]
    gone: list[str] = field(default_factory=list)
    renewed: list[str] = field(default_factory=list)


def follow_replacements(
    model: nn.Module, tracked: Mapping[str, nn.Module], initial: Mapping[str, torch.Tensor], spec: str | list[str]
) -> LayerChanges | None:
    """The tracked layers after modules of ``model`` were replaced, or ``None`` when nothing changed.

    ``model.fc = nn.Linear(...)`` between epochs (a new head for fine-tuning), or a weight parameter
    swapped for one of another shape, leaves the tracked object out of the model. The layers are
    re-resolved from ``spec``; when a named module is gone (or lost its weight) the rest stay tracked.

    Args:
        model: the network as it is now.
        tracked: ``{name: module}`` tracked so far.
        initial: ``{name: W0}`` of the tracked layers (a weight of another shape counts as replaced).
        spec: the ``layers`` argument, as for :func:`weight_layers`.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
        >>> tracked = weight_layers(net, "auto")
        >>> initial = {n: own_weight(m).detach().clone() for n, m in tracked.items()}
        >>> follow_replacements(net, tracked, initial, "auto") is None
        True
        >>> net[1] = torch.nn.Linear(8, 5)
        >>> follow_replacements(net, tracked, initial, "auto").renewed
        ['1']
    """
    current = dict(model.named_modules())
    replaced = [n for n, m in tracked.items() if current.get(n) is not m]
    reshaped = []  # the same module with a weight of another shape (or none left)
    for n, m in tracked.items():
        weight = own_weight(m)
        if n not in replaced and n in initial and (weight is None or tuple(initial[n].shape) != tuple(weight.shape)):
            reshaped.append(n)
    if not replaced and not reshaped:
        return None
    try:
        resolved = weight_layers(model, spec)
    except ValueError:  # a named module is gone or lost its weight: keep tracking the rest
        resolved = {n: current[n] for n in tracked if n in current and own_weight(current[n]) is not None}
    order = [n for n in tracked if n in resolved] + [n for n in resolved if n not in tracked]
    return LayerChanges(
        modules={n: resolved[n] for n in order},
        gone=[n for n in tracked if n not in resolved],
        renewed=[n for n in order if n in replaced or n in reshaped or n not in tracked],
    )


def depth_order(model: nn.Module, inputs: torch.Tensor, names: list[str]) -> list[str]:
    """``names`` in the order their modules run on the first two samples of ``inputs`` (input side first);
    names that do not run keep their order, after the others.

    One forward pass in eval mode under ``no_grad`` (nothing of training changes); ``inputs`` are moved to
    the device (and floating dtype) of the model's first floating-point parameter.

    Raises:
        Exception: whatever the model's forward raises on ``inputs``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
        >>> depth_order(net, torch.randn(5, 4), ["1", "0"])
        ['0', '1']
    """
    x = inputs[:2]
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None:
        x = x.to(param.device, dtype=param.dtype) if x.is_floating_point() else x.to(param.device)
    ran = [n for n in record_execution_order(model, x) if n in names]
    return ran + [n for n in names if n not in ran]
