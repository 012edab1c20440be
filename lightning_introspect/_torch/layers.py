"""Dotted layer names to modules, with errors that list the valid choices, and how often each runs."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
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


@dataclass(frozen=True)
class ModuleCalls:
    """What one forward pass did, per named submodule (see :func:`trace_module_calls`).

    Attributes:
        order: names in the order their first call started (parents before their children).
        counts: ``name -> number of forward calls``; modules that did not run are absent.
        features: ``name -> (N, -1)`` float copy of the first tensor of the module's *last* call (``None``
            when its output holds no tensor); kept only for the modules ``keep_outputs`` asks for.
        storage: for the same modules, where that tensor lives (storage address, offset, shape).
    """

    order: list[str]
    counts: dict[str, int]
    features: dict[str, torch.Tensor | None]
    storage: dict[str, tuple[int, int, tuple[int, ...]]]

    def reused(self, names: Sequence[str]) -> dict[str, int]:
        """The ``names`` that ran more than once, with their call counts."""
        return {n: self.counts[n] for n in names if self.counts.get(n, 0) > 1}

    def enclosing_single_call(self, name: str) -> str | None:
        """The innermost module containing ``name`` (a dotted prefix) that ran exactly once, else ``None``."""
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:i])
            if self.counts.get(parent) == 1:
                return parent
        return None

    def same_output(self, a: str, b: str) -> bool:
        """Whether ``a`` and ``b`` give the same output: equal values, and one module contains the other (a
        block and its last norm, a wrapper ``Sequential`` and its last child) or both return the very same
        tensor (an ``Identity`` after a layer). Equal values alone are not enough: on a degenerate example
        (all-zero activations) unrelated layers agree. Needs both in ``keep_outputs``."""
        fa, fb = self.features.get(a), self.features.get(b)
        if fa is None or fb is None or fa.shape != fb.shape or not torch.equal(fa, fb):
            return False
        nested = a.startswith(b + ".") or b.startswith(a + ".")
        return nested or self.storage.get(a) == self.storage.get(b)


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return None


def trace_module_calls(
    model: nn.Module, example_input: Any, *, keep_outputs: bool | Collection[str] = False
) -> ModuleCalls:
    """Run ``model(example_input)`` once and count the forward calls of every named submodule.

    A module object used twice in one forward (a ResNet block applying its one ``self.relu`` after each
    convolution) is counted twice: its forward hooks fire twice, so a hook that keeps one call describes
    only part of what the name suggests. The pass runs in eval mode under ``no_grad`` (outside
    ``inference_mode``), with the global RNG forked; every hook is removed afterwards, also when the model
    raises. Pass a small example (two samples) already on the model's device.

    Args:
        model: the model.
        example_input: what ``model`` takes (a tensor, or whatever its forward accepts as one argument).
        keep_outputs: also keep an ``(N, -1)`` copy of the output of every module (``True``) or of the
            named ones, for :meth:`ModuleCalls.same_output` (memory: those outputs for the example).

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin, self.act = nn.Linear(2, 2), nn.ReLU()
        ...     def forward(self, x):
        ...         return self.act(self.lin(self.act(x)))
        >>> calls = trace_module_calls(nn.Sequential(Block()), torch.ones(1, 2))
        >>> calls.counts
        {'0': 1, '0.act': 2, '0.lin': 1}
        >>> calls.enclosing_single_call("0.act")
        '0'
    """
    from lightning_introspect._torch.guards import introspection_mode
    from lightning_introspect._torch.hooks import hooks

    names = {m: n for n, m in model.named_modules() if n}
    order: list[str] = []
    counts: dict[str, int] = {}
    features: dict[str, torch.Tensor | None] = {}
    storage: dict[str, tuple[int, int, tuple[int, ...]]] = {}

    def pre(module: nn.Module, _inputs: Any) -> None:
        name = names[module]
        if name not in counts:
            order.append(name)
            counts[name] = 0
        counts[name] += 1

    def post(module: nn.Module, _inputs: Any, output: Any) -> None:
        # copied now: a later in-place op (ReLU(inplace=True), `out += identity`) would change it
        t = _first_tensor(output)
        name = names[module]
        features[name] = None if t is None or t.ndim == 0 else t.detach().reshape(t.shape[0], -1).float().clone()
        if t is not None:
            storage[name] = (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape))

    with torch.inference_mode(False), introspection_mode(model, grad=False), hooks() as handles:
        for module in names:
            handles.append(module.register_forward_pre_hook(pre))
            if keep_outputs is True or (not isinstance(keep_outputs, bool) and names[module] in keep_outputs):
                handles.append(module.register_forward_hook(post))
        x = example_input.clone() if isinstance(example_input, torch.Tensor) and example_input.is_inference() else example_input
        model(x)
    return ModuleCalls(order=order, counts={n: counts[n] for n in sorted(counts)}, features=features, storage=storage)


def refuse_reused_modules(calls: ModuleCalls, names: Sequence[str], *, argument: str = "layers") -> None:
    """Raise ``ValueError`` when a named module runs more than once per forward pass.

    Hooks on such a module see several different tensors per batch under one name (a reused ReLU sees
    the middle and the end of a block), so a per-layer result would describe an unnamed mixture or only
    its first call. The message names ``argument``, the module, its call count and the enclosing module
    that runs once (the block), which is what to name instead.
    """
    reused = calls.reused(names)
    if not reused:
        return
    parts = []
    for name, count in reused.items():
        block = calls.enclosing_single_call(name)
        hint = f"name the enclosing block {block!r} (its output) instead" if block else "name a module that runs once"
        parts.append(f"{name!r} runs {count} times per forward pass (the same module object reused); {hint}")
    raise ValueError(
        f"Expected `{argument}` to name modules that run once per forward pass, but " + "; ".join(parts) + "."
    )
