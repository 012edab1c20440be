"""Hook registration that always cleans up, and execution-order discovery."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_introspect._torch.guards import module_device


@contextlib.contextmanager
def hooks() -> Iterator[list[RemovableHandle]]:
    """Collect hook handles; every one is removed on exit, also when the block raises.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> with hooks() as handles:
        ...     handles.append(net.register_forward_hook(lambda m, i, o: None))
        >>> len(net._forward_hooks)
        0
    """
    handles: list[RemovableHandle] = []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def record_execution_order(model: nn.Module, example_input: torch.Tensor, *, leaves_only: bool = False) -> list[str]:
    """Names of the submodules in the order their forward runs on ``example_input``.

    Runs one forward pass in eval mode under ``no_grad`` with the global RNG forked. A module called
    twice is listed once (first call).
    """
    from lightning_introspect._torch.guards import introspection_mode

    names = {m: n for n, m in model.named_modules() if n}
    order: list[str] = []

    def record(module: nn.Module, _inputs: object) -> None:
        name = names.get(module)
        if name is not None and name not in order:
            order.append(name)

    with introspection_mode(model, grad=False), hooks() as handles:
        for module in names:
            if leaves_only and any(True for _ in module.children()):
                continue
            handles.append(module.register_forward_pre_hook(record))
        model(example_input)
    return order


def layer_outputs(model: nn.Module, example_input: torch.Tensor, names: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One eval-mode, ``no_grad`` forward pass returning the outputs of the named submodules and the model.

    A module or model that returns a tuple / list contributes its first element. The input is moved to
    the model's device and floating dtype; hooks are removed afterwards and the global RNG is forked.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        >>> outs, y = layer_outputs(net, torch.ones(2, 3), ["0"])
        >>> outs["0"].shape, y.shape
        (torch.Size([2, 4]), torch.Size([2, 4]))
    """
    from lightning_introspect._torch.guards import introspection_mode

    def first(out: object) -> torch.Tensor:
        return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[return-value]  # a tensor for every model we accept

    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    device = module_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    with introspection_mode(model, grad=False), hooks() as handles:
        for name in names:
            handles.append(modules[name].register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, first(out))))
        output = first(model(example_input.to(device=device, dtype=dtype)))
    return captured, output


@contextlib.contextmanager
def output_as_tensor(model: nn.Module, extract: Callable[[Any], Any]) -> Iterator[nn.Module]:
    """Inside the block, ``model(x)`` returns ``extract(output)`` (the logits) instead of its own output.

    For models whose ``forward`` returns a tuple, a dict or an output object: the attribution methods
    need one tensor. A forward hook on ``model`` itself does the replacement, so layer names and
    parameters stay those of the model, and deep copies made inside the block carry the hook too. It is
    removed on exit, also when the block raises.

    Args:
        model: the model.
        extract: ``output -> tensor | None``; returning the output itself leaves it unchanged.

    Raises:
        ValueError: (from the forward) when ``extract`` finds no tensor.

    Example:
        >>> class Pair(nn.Module):
        ...     def forward(self, x):
        ...         return x * 2, "aux"
        >>> net = Pair()
        >>> with output_as_tensor(net, lambda out: out[0] if isinstance(out, tuple) else out):
        ...     net(torch.ones(1))
        tensor([2.])
        >>> len(net._forward_hooks)
        0
    """

    def replace(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        value = extract(output)
        if value is output:
            return None
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"The model returns {type(output).__name__} and no logits tensor could be taken from it (a tensor, "
                "a dict's 'logits' / 'preds', an object's `.logits` or a tuple's first tensor); pass `output_transform`."
            )
        return value

    with hooks() as handles:
        handles.append(model.register_forward_hook(replace))
        yield model
