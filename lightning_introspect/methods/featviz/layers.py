"""Which layers to visualise when none are named: a vision transformer's blocks, else the convolutions on
the network's main path; and where the patch tokens of a token layer are.

Vision transformers (:func:`vit_blocks`): the blocks are found as linear probes find them
(:func:`~lightning_introspect.methods.probe_layers.transformer_blocks`: the innermost modules that run
once and hold an attention layer and an MLP ``Linear``), and kept when their output is patch tokens
``(N, T, D)`` (:func:`patch_token_layouts`). There an embedding dimension plays the part of a channel and
the patch tokens the part of the positions, so a channel objective averages a dimension over the patch
tokens (:func:`~lightning_introspect.methods.featviz.objectives.token_channel`). Which 3-D outputs are
tokens, and how many class / register tokens come first, is decided by the rules the probes and Grad-CAM
already use: the module types (:func:`~lightning_introspect.methods.probes.tokens.module_layout`, through
:func:`~lightning_introspect.methods.probe_layers.token_layers`), the probes' prefix rule
(:func:`~lightning_introspect.methods.probes.tokens.prefix_tokens`) and Grad-CAM's patch grid
(:func:`~lightning_introspect.methods.attention.token_grid`), so a ViT's patch tokens are the same ones
for every callback.

Convolutional networks:

:func:`main_conv_chain` starts from the feature map that Grad-CAM explains by default
(:func:`~lightning_introspect.methods.attribution.auto_layer`: the last spatial feature map in execution
order that the output depends on) and follows the autograd graph back to the input, keeping the
longest chain of convolutions. A side branch -- e.g. the 1x1 shortcut conv of a residual block, which
may well be registered and run after the block's 3x3 convs -- lies on a shorter chain and is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_introspect._torch.guards import introspection_mode, module_device
from lightning_introspect._torch.hooks import hooks, layer_outputs
from lightning_introspect._torch.layers import get_layer, trace_module_calls
from lightning_introspect.methods.attention import token_grid
from lightning_introspect.methods.attribution import auto_layer
from lightning_introspect.methods.probe_layers import token_layers, transformer_blocks
from lightning_introspect.methods.probes.tokens import is_attention, prefix_tokens


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


@dataclass(frozen=True)
class PatchTokens:
    """Where the patch tokens of one token layer's output are.

    Attributes:
        prefix: tokens before the patches (a class token, register tokens), left out of the objective.
        grid: the patch grid ``(h, w)``; ``None`` when the tokens form no grid of the image (then every
            token after ``prefix`` counts, and ``prefix`` is 0).
        num_tokens: ``T``, the tokens per sample.
        dim: ``D``, the embedding dimensions.
        sequence_first: the output is ``(T, N, D)`` (``batch_first=False``).
    """

    prefix: int
    grid: tuple[int, int] | None
    num_tokens: int
    dim: int
    sequence_first: bool = False

    def describe(self) -> str:
        """In words, for the table.

        Example:
            >>> PatchTokens(1, (4, 4), 17, 32).describe()
            'mean over the 4x4 patch tokens; 1 prefix token left out'
            >>> PatchTokens(0, None, 12, 8).describe()
            'mean over all 12 tokens (no patch grid found)'
        """
        if self.grid is None:
            return f"mean over all {self.num_tokens - self.prefix} tokens (no patch grid found)"
        left_out = f"; {self.prefix} prefix token{'s' if self.prefix != 1 else ''} left out" if self.prefix else ""
        return f"mean over the {self.grid[0]}x{self.grid[1]} patch tokens{left_out}"


def patch_token_layouts(model: nn.Module, example_input: torch.Tensor, names: Sequence[str]) -> dict[str, PatchTokens]:
    """``{name: PatchTokens}`` of the layers among ``names`` whose output is tokens ``(N, T, D)`` (or
    ``(T, N, D)``) for image inputs ``example_input`` ``(N, C, H, W)``; conv maps and other outputs are
    left out.

    Token or channel layout: :func:`~lightning_introspect.methods.probe_layers.token_layers` (the module
    types). The prefix: the probes' rule (:func:`~lightning_introspect.methods.probes.tokens.prefix_tokens`:
    the fewest tokens, at most 8, after which a grid of the image's aspect is left), else Grad-CAM's
    (:func:`~lightning_introspect.methods.attention.token_grid`, which also considers more prefix tokens);
    the grid is ``token_grid``'s for that prefix. Tokens that form no grid at all: ``prefix`` 0, ``grid``
    ``None`` (every token counts). Two forward passes of ``example_input`` (eval mode, no gradients,
    hooks removed, global RNG forked).

    Example:
        >>> layer = nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=16, batch_first=True)
        >>> class ViT(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.embed, self.block, self.head = nn.Conv2d(1, 8, 4, stride=4), layer, nn.Linear(8, 2)
        ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         t = self.embed(x).flatten(2).transpose(1, 2)
        ...         return self.head(self.block(torch.cat([t.mean(1, keepdim=True), t], 1))[:, 0])
        >>> patch_token_layouts(ViT(), torch.zeros(2, 1, 8, 8), ["embed", "block"])
        {'block': PatchTokens(prefix=1, grid=(2, 2), num_tokens=5, dim=8, sequence_first=False)}
    """
    if example_input.ndim != 4:
        return {}
    x = example_input.detach().to(module_device(model, example_input.device))
    modules = {name: get_layer(model, name, argument="layers") for name in names}
    image = (int(x.shape[-2]), int(x.shape[-1]))
    out: dict[str, PatchTokens] = {}
    pools = token_layers(model, x, modules, token_pooling="mean", batch_size=int(x.shape[0]))
    if not pools:
        return {}
    outputs, _ = layer_outputs(model, x, list(pools))
    for name, pooling in pools.items():
        tokens = pooling.num_tokens
        if tokens is None or name not in outputs:
            continue
        prefix, grid = prefix_tokens(tokens, image), None
        try:
            k, h, w = token_grid(tokens, image, num_prefix_tokens=prefix)
            prefix, grid = k, (h, w)
        except ValueError:  # the tokens are not a patch grid of this image (pooled or merged tokens)
            prefix = 0
        out[name] = PatchTokens(prefix, grid, tokens, int(outputs[name].shape[-1]), pooling.sequence_first)
    return out


def vit_blocks(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """A vision transformer's block outputs that hold patch tokens, in execution order; ``[]`` for other models.

    The blocks are :func:`~lightning_introspect.methods.probe_layers.transformer_blocks` without the patch
    embedding in front of them (the one module it returns that holds no attention layer and runs before
    the first one), kept when :func:`patch_token_layouts` finds patch tokens in their output (a grid of the
    image): a CNN with an attention module on conv maps gives none.

    Example:
        >>> class ViT(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.embed = nn.Conv2d(1, 8, 4, stride=4)
        ...         self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(8, 2, 16, batch_first=True) for _ in range(3)])
        ...         self.head = nn.Linear(8, 2)
        ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         return self.head(self.blocks(self.embed(x).flatten(2).transpose(1, 2)).mean(1))
        >>> vit_blocks(ViT(), torch.zeros(2, 1, 8, 8))
        ['blocks.0', 'blocks.1', 'blocks.2']
    """
    if example_input.ndim != 4:
        return []
    x = example_input[:2].detach().to(module_device(model, example_input.device))
    calls = trace_module_calls(model, x)
    modules = dict(model.named_modules())
    attention = [n for n in calls.order if is_attention(modules[n])]
    if not attention:
        return []
    first = calls.order.index(attention[0])

    def holds_attention(name: str) -> bool:
        return any(a.startswith(name + ".") for a in attention)

    blocks = [
        n for n in transformer_blocks(model, calls)
        if holds_attention(n) or calls.order.index(n) > first  # the embedding runs before the first attention
    ]
    layouts = patch_token_layouts(model, x, blocks)
    return [n for n in blocks if n in layouts and layouts[n].grid is not None]


__all__ = ["PatchTokens", "main_conv_chain", "patch_token_layouts", "vit_blocks"]
