"""Which layers to visualise when none are named: the convolutions on the network's main path.

:func:`main_conv_chain` starts from the feature map that Grad-CAM explains by default
(:func:`~lightning_introspect.methods.attribution.auto_layer`: the last spatial feature map in execution
order that the output depends on) and follows the autograd graph back to the input, keeping the
longest chain of convolutions. A side branch -- e.g. the 1x1 shortcut conv of a residual block, which
may well be registered and run after the block's 3x3 convs -- lies on a shorter chain and is left out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_introspect._torch.guards import introspection_mode, module_device
from lightning_introspect._torch.hooks import hooks
from lightning_introspect._torch.layers import get_layer
from lightning_introspect.methods.attribution import auto_layer


class _Stop(Exception):
    """Raised from the final feature map's hook: the rest of the forward pass is not needed."""


def main_conv_chain(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """The convolutions on the longest conv-to-conv path from the input to Grad-CAM's default feature map.

    One forward pass on ``example_input[:1]`` (eval mode, gradients on for the graph, global RNG forked;
    parameters get no ``.grad``, hooks are removed). Names in execution order; ``[]`` without a
    convolution in front of that feature map.

    Raises:
        ValueError: no module outputs a spatial feature map (from ``auto_layer``).

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.conv1, self.conv2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        ...         self.shortcut = nn.Conv2d(2, 4, 1)  # registered and run after the main convs
        ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x))
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), Block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> main_conv_chain(net, torch.zeros(1, 1, 8, 8))
        ['0', '1.conv1', '1.conv2']
    """
    final = auto_layer(model, example_input)
    final_module = get_layer(model, final, argument="layer")
    conv_names: dict[nn.Module, str] = {m: n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    conv_nodes: dict[Any, str] = {}
    roots: list[Any] = []

    def on_conv(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            conv_nodes[output.grad_fn] = conv_names[module]

    def on_final(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, (tuple, list)) and output:
            output = output[0]
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            roots.append(output.grad_fn)
        raise _Stop

    with introspection_mode(model, grad=True), hooks() as handles:
        for module in conv_names:
            handles.append(module.register_forward_hook(on_conv))
        handles.append(final_module.register_forward_hook(on_final))  # after its own conv hook, if it is a conv
        x = example_input[:1].detach().to(module_device(model, example_input.device)).clone().requires_grad_(True)
        try:
            model(x)
        except _Stop:
            pass
    return _longest_chain(roots[0], conv_nodes) if roots else []


def _longest_chain(root: Any, conv_nodes: dict[Any, str]) -> list[str]:
    """The conv names on the path from ``root`` back to the inputs that passes the most conv nodes
    (iterative post-order over the autograd graph: deep networks would exceed the recursion limit)."""
    best: dict[Any, tuple[str, ...]] = {}
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node in best:
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((child, False) for child in children if child not in best)
            continue
        chain = max((best[child] for child in children), key=len, default=())
        best[node] = (*chain, conv_nodes[node]) if node in conv_nodes else chain
    return list(dict.fromkeys(best[root]))  # a conv called twice counts once, at its first place


__all__ = ["main_conv_chain"]
