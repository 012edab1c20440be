"""The feature map Grad-CAM explains by default: :func:`auto_layer`.

One recorded forward pass lists every module call with its output shape; the choice is the last
convolution's output, carried on while the shape holds, with a dense model's output head left out
(:func:`_dense_head_index`). For a vision transformer the candidates are the blocks whose outputs are
tokens laid out as prefix tokens and a patch grid (:func:`_token_layout`), and one more forward and
backward pass keeps the last whose patch tokens reach the output (:func:`_reaching_block`).

Re-exported by :mod:`lightning_introspect.methods.attribution`, whose methods call it for ``layer=None``
or ``"auto"``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_introspect._torch.guards import fresh_input, introspection_mode
from lightning_introspect._torch.hooks import hooks
from lightning_introspect._torch.layers import get_layer
from lightning_introspect.methods.attention import token_grid, tokens_first
from lightning_introspect.methods.gradients import _check_inputs, _input_dtype, _model_device
from lightning_introspect.methods.targets import model_logits, target_scores

__all__ = ["auto_layer"]

# auto_layer is documented and imported as part of the attribution module: its choice is logged under
# that module's name, the one logger to set a level on for every attribution message.
log = logging.getLogger("lightning_introspect.methods.attribution")


def _dense_head_index(calls: Sequence[tuple[str, tuple[int, ...] | None, bool]], output: Any) -> int:
    """Where the output head of a dense (per-pixel) model starts in ``calls``: the last convolution
    producing the output's shape; ``len(calls)`` for other models (nothing is cut)."""
    if not isinstance(output, torch.Tensor) or output.ndim != 4 or max(output.shape[2:]) <= 1:
        return len(calls)
    heads = [i for i, (_, shape, is_conv) in enumerate(calls) if is_conv and shape == tuple(output.shape)]
    return heads[-1] if heads and heads[-1] > 0 else len(calls)


def auto_layer(model: nn.Module, example_input: torch.Tensor) -> str:
    """The feature map Grad-CAM explains by default: the last convolution's output, as late as it stays.

    Runs one forward pass (eval mode, no grad, global RNG forked) recording every module call as it
    completes. Takes the last call of a 2-D (more generally N-D spatial) convolution, then moves on
    through the calls that follow it while the output keeps that shape (BatchNorm, the ReLU, a residual
    block or stage that ends there), and returns the last of those modules that runs once per forward.
    Without a convolution: the last module whose output has spatial dimensions larger than 1.
    For :class:`~lightning_introspect.demo.DigitsCNN` this is ``"features.9"`` (the ReLU after the last
    conv); for a torchvision-style ResNet ``"layer4"``.

    Dense outputs (segmentation, ``(N, C, H, W)`` logits): the output head -- the last convolution whose
    output is the logits' shape, typically a 1x1 classifier -- and everything after it are left out, so
    the choice is the deepest feature map before the head (for a U-Net its last decoder stage). Grad-CAM
    of the head itself would only re-weight the logit map it produces.

    Vision transformers (image inputs, and after the last convolution -- the patch embedding, if it is
    one -- modules with children that output tokens ``(1, T, D)`` / ``(T, 1, D)`` laid out as prefix tokens
    and a patch grid, see :func:`~lightning_introspect.methods.attention.token_grid`): the last such block
    whose *patch tokens reach the output*, found with one more forward and backward pass (the gradient of
    the predicted class's score w.r.t. each block's output; a module returning the same tensor as a block
    inside it, such as the ``nn.Sequential`` holding the blocks, gives way to that block). With a
    mean-pooling head this is the last block; with a head that reads only the class token it is the block
    before the last (the last block's patch tokens feed nothing but themselves), as pytorch-grad-cam
    recommends. When no block qualifies (one block and a class-token head) the convolution rule above
    applies (the patch embedding). The choice is logged at INFO.

    Raises:
        ValueError: if no module outputs a spatial feature map (images: 4-D) or a qualifying token block.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 2))
        >>> auto_layer(net, torch.zeros(1, 1, 8, 8))
        '1'
    """
    _check_inputs(example_input)
    names = {m: n for n, m in model.named_modules() if n}
    calls: list[tuple[str, tuple[int, ...] | None, bool]] = []
    block_shapes: list[tuple[int, ...] | None] = []  # per call: a container's output (a tuple's first tensor)

    def record(module: nn.Module, _inputs: Any, output: Any) -> None:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        calls.append((names[module], shape, isinstance(module, nn.modules.conv._ConvNd)))
        first = _first_tensor(output) if next(module.children(), None) is not None else None
        block_shapes.append(None if first is None else tuple(first.shape))

    with introspection_mode(model, grad=False), hooks() as handles:
        for module in names:
            handles.append(module.register_forward_hook(record))
        output = model(example_input[:1].to(_model_device(model, example_input)))
    calls = calls[: _dense_head_index(calls, _logits_or_none(output))]
    counts: dict[str, int] = {}
    for name, _, _ in calls:
        counts[name] = counts.get(name, 0) + 1

    image = example_input.ndim == 4

    def spatial(shape: tuple[int, ...] | None) -> bool:
        # image inputs: 3-D outputs are tokens (N, T, D), not 1-D feature maps
        return shape is not None and len(shape) >= 3 and any(s > 1 for s in shape[2:]) and (not image or len(shape) == 4)

    conv_idx = [i for i, (_, shape, is_conv) in enumerate(calls) if is_conv and spatial(shape)]
    blocks = [
        name for i, (name, _, _) in enumerate(calls)
        if image and i > (conv_idx[-1] if conv_idx else -1) and counts[name] == 1 and _token_layout(block_shapes[i], example_input) is not None
    ]
    if blocks:
        chosen = _reaching_block(model, example_input, blocks)
        if chosen is not None:
            log.info("auto_layer: %r, the last transformer block whose patch tokens reach the output.", chosen)
            return chosen
        log.info("auto_layer: the patch tokens of no transformer block (%s) reach the output; using the feature-map rule.", ", ".join(blocks))
    if conv_idx:
        start = conv_idx[-1]
        shape = calls[start][1]
        best = calls[start][0] if counts[calls[start][0]] == 1 else None
        for name, s, _ in calls[start + 1 :]:
            if s != shape:
                break
            if counts[name] == 1:
                best = name
        if best is not None:
            return best
    candidates = [name for name, shape, _ in calls if spatial(shape) and counts[name] == 1]
    if not candidates:
        tokens = f" nor a transformer block whose patch tokens reach the output (blocks seen: {', '.join(blocks)})" if blocks else ""
        raise ValueError(
            f"Cannot choose a layer automatically: no submodule outputs a spatial feature map (N, C, H, W){tokens}. "
            "Pass `layer` with the dotted name of a convolutional layer or of a transformer block."
        )
    return candidates[-1]


def _first_tensor(output: Any) -> torch.Tensor | None:
    """A module's output tensor, or the first element of a tuple / list output (a transformer layer's
    ``(hidden, attention)``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _logits_or_none(output: Any) -> torch.Tensor | None:
    """The logits of a model's output as :func:`model_logits` reads them (tensor, dict, ``.logits``, tuple), or ``None``."""
    try:
        return model_logits(output)
    except ValueError:
        return None


def _token_layout(shape: tuple[int, ...] | None, example_input: torch.Tensor) -> tuple[int, int, int] | None:
    """``(k, h, w)`` when ``shape`` is one sample's tokens ``(1, T, D)`` / ``(T, 1, D)`` of the image: prefix
    tokens and a patch grid of at least two patches; else ``None``."""
    if shape is None or len(shape) != 3 or 1 not in shape[:2]:
        return None
    tokens = shape[1] if shape[0] == 1 else shape[0]
    try:
        k, h, w = token_grid(tokens, example_input.shape[2:])
    except ValueError:
        return None
    return (k, h, w) if h * w >= 2 else None


def _reaching_block(model: nn.Module, example_input: torch.Tensor, blocks: Sequence[str]) -> str | None:
    """The last of ``blocks`` (token outputs, in call order) whose patch tokens get a non-zero gradient of
    the predicted class's score (one sample; one forward and one backward pass); ``None`` if none does."""
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            first = _first_tensor(output)
            if first is not None and first.requires_grad:
                captured[name] = first
        return hook

    with introspection_mode(model), hooks() as handles:
        for name in blocks:
            handles.append(get_layer(model, name).register_forward_hook(capture(name)))
        x = fresh_input(example_input[:1].to(_model_device(model, example_input)), dtype=_input_dtype(model))
        output = _logits_or_none(model(x.clone()))
        if output is None or not output.is_floating_point() or output.ndim < 2:
            return None
        names = [n for n in blocks if n in captured]
        if not names:
            return None
        grads = torch.autograd.grad(target_scores(output.float(), "pred").sum(), [captured[n] for n in names], allow_unused=True)
        reaching = []
        for name, grad in zip(names, grads):
            layout = _token_layout(tuple(captured[name].shape), example_input)
            if grad is not None and layout is not None and bool(tokens_first(grad, 1)[:, layout[0]:].abs().sum() > 0):
                reaching.append(name)
        if not reaching:
            return None
        chosen = reaching[-1]
        # a container returning the very tensor of a block inside it (nn.Sequential of blocks): the block
        return next(n for n in names if captured[n] is captured[chosen])
