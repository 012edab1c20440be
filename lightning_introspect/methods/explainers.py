"""The attribution methods a sanity check explains with, and the conditions they run under.

Methods are given as names from ``attribution.METHODS`` (computed together by ``attribution.attribute``,
one shared forward pass), callables ``fn(model, inputs, target, layer=None) -> Tensor`` (one map per
sample, in batch order), a list of either, or a dict ``{name: name or callable}``. :class:`Explainer`
resolves them once and returns every method's maps, detached, float32, on the CPU.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> explain = Explainer(["saliency", "input_x_gradient"])
    >>> maps = explain(net, torch.randn(2, 1, 2, 2), torch.tensor([0, 2]), layer=None)
    >>> {name: tuple(m.shape) for name, m in maps.items()}
    {'saliency': (2, 1, 2, 2), 'input_x_gradient': (2, 1, 2, 2)}
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_introspect._torch.guards import (
    eager_mode,
    eval_mode,
    fork_global_rng,
    fresh_input,
    gradients_on,
    module_device,
)

DEFAULT_METHODS: tuple[str, ...] = ("saliency", "guided_backprop", "grad_cam", "input_x_gradient")

ExplainFn = Callable[..., torch.Tensor]
"""``fn(model, inputs, target, layer=None) -> Tensor``: one detached map per sample, in batch order."""

MethodSpec = str | ExplainFn | Sequence[str | ExplainFn] | Mapping[str, str | ExplainFn]

_LAYER_METHODS = ("grad_cam", "guided_grad_cam")


def _attribution() -> Any:
    # Imported on first use: the attribution module is only needed for methods given by name.
    from lightning_introspect.methods import attribution

    return attribution


def _registry_fn(name: str) -> ExplainFn:
    """The registry method ``name`` as an explain callable (used when a dict renames it)."""

    def fn(model: nn.Module, inputs: torch.Tensor, target: Any, layer: str | None = None) -> torch.Tensor:
        return _attribution().attribute(model, inputs, target, [name], layer=layer)[name]

    return fn


class Explainer:
    """Resolved attribution methods: registry names go through one shared ``attribution.attribute`` call,
    callables are called as ``fn(model, inputs, target, layer=layer)``.

    Args:
        methods: see the module docstring.

    Attributes:
        names: the method names, in the order given.
        registry: the names computed by ``attribution.attribute``.
        callables: ``{name: callable}`` for the rest.

    Raises:
        ValueError: no method, a duplicate name, or an unknown method name.
    """

    def __init__(self, methods: MethodSpec) -> None:
        if isinstance(methods, str) or callable(methods):
            methods = [methods]
        if isinstance(methods, Mapping):
            items = list(methods.items())
        else:
            items = [(spec if isinstance(spec, str) else getattr(spec, "__name__", type(spec).__name__), spec) for spec in methods]
        if not items:
            raise ValueError("Expected `methods` to name at least one attribution method, but got none.")
        self.registry: list[str] = []
        self.callables: dict[str, ExplainFn] = {}
        self.names: list[str] = []
        for name, spec in items:
            if not isinstance(name, str) or name in self.names:
                raise ValueError(f"Expected `methods` to have unique string names, but got {name!r} twice or as a non-string.")
            self.names.append(name)
            if isinstance(spec, str):
                valid = sorted(_attribution().METHODS)
                if spec not in valid:
                    raise ValueError(f"Expected every entry of `methods` to be one of {', '.join(repr(v) for v in valid)} or a callable, but got {spec!r}.")
                if spec != name:
                    self.callables[name] = _registry_fn(spec)
                else:
                    self.registry.append(name)
            elif callable(spec):
                self.callables[name] = spec
            else:
                raise ValueError(f"Expected every entry of `methods` to be a method name or a callable, but got {spec!r}.")

    def resolve_layer(self, model: nn.Module, example: torch.Tensor, layer: str | None) -> str | None:
        """``"auto"`` becomes ``attribution.auto_layer`` when a registry method needs a layer, else ``None``."""
        if layer != "auto":
            return layer
        if not any(n in _LAYER_METHODS for n in self.registry):
            return None
        return _attribution().auto_layer(model, example)

    def __call__(self, model: nn.Module, inputs: torch.Tensor, target: Any, layer: str | None) -> dict[str, torch.Tensor]:
        """Every method's maps for ``inputs``: ``{name: (N, ...)}``, detached float32 on the CPU, NaN-free."""
        out: dict[str, torch.Tensor] = {}
        if self.registry:
            kwargs = {"layer": layer} if layer is not None else {}
            maps = _attribution().attribute(model, inputs, target, list(self.registry), **kwargs)
            out.update({n: maps[n] for n in self.registry})
        for name, fn in self.callables.items():
            out[name] = fn(model, inputs, target, layer=layer)
        result = {}
        for name in self.names:
            value = out[name]
            if not isinstance(value, torch.Tensor) or value.ndim < 2 or value.shape[0] != inputs.shape[0]:
                raise ValueError(
                    f"Expected the method {name!r} to return one map per sample, shape ({inputs.shape[0]}, ...), "
                    f"but got {getattr(value, 'shape', type(value).__name__)}."
                )
            result[name] = torch.nan_to_num(value.detach().float()).cpu()
        return result


def as_explainer(methods: MethodSpec | Explainer) -> Explainer:
    """``methods`` resolved (an :class:`Explainer` is returned as it is)."""
    return methods if isinstance(methods, Explainer) else Explainer(methods)


def model_input(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``inputs`` on the model's device, in the model's floating dtype."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = fresh_input(inputs, requires_grad=False, dtype=dtype if inputs.is_floating_point() else None)
    return x.to(module_device(model))


@contextlib.contextmanager
def work_mode(model: nn.Module) -> Iterator[None]:
    """Where the sanity checks run the model: global RNG forked, eager, eval mode, gradients enabled."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(fork_global_rng())
        stack.enter_context(eager_mode())
        stack.enter_context(eval_mode(model))
        stack.enter_context(gradients_on(module_device(model)))
        yield


__all__ = ["DEFAULT_METHODS", "ExplainFn", "Explainer", "MethodSpec", "as_explainer", "model_input", "work_mode"]
