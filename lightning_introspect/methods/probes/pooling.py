"""One feature vector per sample from a layer output: conv maps pooled over space, token sequences by their
class token or their mean (:mod:`.tokens`), and a small thumbnail of the raw input for the input baseline."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lightning_introspect.methods.probes.checks import check_choice
from lightning_introspect.methods.probes.tokens import TokenPooling, pool_tokens

POOLING_CHOICES = ("avg", "max", "avgmax", "flatten")


def first_tensor(output: Any) -> torch.Tensor:
    """The tensor in a module output: the output itself, or the first tensor of a tuple / list.

    Raises:
        ValueError: when the output holds no tensor (e.g. a dict); probe a submodule instead.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise ValueError(
        f"Cannot probe a layer whose output is a {type(output).__name__}; probe a submodule that returns a tensor."
    )


def pool_activation(
    activation: Any, pooling: str = "avg", *, tokens: TokenPooling | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """One float32 feature vector per sample from a layer output ``(N, C, *spatial)``, ``(N, T, D)`` or ``(N, D)``.

    Channels-first layouts are assumed unless ``tokens`` says the layer gives tokens: ``"avg"`` / ``"max"``
    reduce every dimension after the channel dimension (global average / max pooling of conv maps),
    ``"avgmax"`` concatenates both (``2C`` features), ``"flatten"`` keeps everything (``C * H * W``
    features; pair it with a :class:`~lightning_introspect.methods.probes.RandomProjection`). ``(N, D)``
    outputs are returned as they are for every choice. A 3-D output of a token layer (``tokens`` given) is
    pooled by :func:`~lightning_introspect.methods.probes.tokens.pool_tokens` instead (its class token or
    its mean over the tokens ``mask`` keeps), whatever ``pooling`` says.

    Args:
        activation: the layer output (a tensor, or a tuple whose first tensor is used).
        pooling: ``"avg"``, ``"max"``, ``"avgmax"`` or ``"flatten"``.
        tokens: how the layer's tokens are pooled, for layers whose 3-D output is ``(N, T, D)``.
        mask: ``(N, T)`` bool, the tokens that are not padding (token layers only).

    Returns:
        A detached ``(N, D)`` float32 tensor on the activation's device.

    Example:
        >>> pool_activation(torch.ones(2, 3, 4, 4), "avgmax").shape
        torch.Size([2, 6])
    """
    check_choice(pooling, "pooling", POOLING_CHOICES)
    x = first_tensor(activation).detach()
    if x.ndim < 2:
        raise ValueError(f"Expected a layer output with a batch dimension (N, ...), but got shape {tuple(x.shape)}.")
    if x.ndim == 2:
        return x.float()
    if tokens is not None and x.ndim == 3:
        return pool_tokens(x, tokens, mask)
    if pooling == "flatten":
        return x.reshape(x.shape[0], -1).float()
    dims = tuple(range(2, x.ndim))
    if pooling == "avg":
        return x.mean(dims, dtype=torch.float32)
    if pooling == "max":
        return x.amax(dims).float()
    return torch.cat([x.mean(dims, dtype=torch.float32), x.amax(dims).float()], dim=1)


def downsample_input(x: torch.Tensor, max_features: int = 512, size: int = 8) -> torch.Tensor:
    """A small float32 "thumbnail" of raw inputs for the input baseline probe.

    Images ``(N, C, H, W)`` are average-pooled to at most ``size x size`` (fewer when ``C * size**2``
    exceeds ``max_features``), sequences ``(N, C, L)`` to at most ``size**2`` steps; other shapes are
    flattened. Wider results still need a :class:`~lightning_introspect.methods.probes.RandomProjection`.

    Example:
        >>> downsample_input(torch.zeros(4, 1, 32, 32)).shape
        torch.Size([4, 64])
    """
    x = x.detach()
    if not x.is_floating_point():
        x = x.float()
    if x.ndim == 4:
        channels, h, w = x.shape[1:]
        side = max(1, min(size, int(math.sqrt(max(1, max_features) / max(1, channels)))))
        x = F.adaptive_avg_pool2d(x.float(), (min(h, side), min(w, side)))
    elif x.ndim == 3:
        channels, length = x.shape[1:]
        steps = max(1, min(length, size * size, max(1, max_features) // max(1, channels)))
        x = F.adaptive_avg_pool1d(x.float(), steps)
    if x.ndim == 1:
        x = x[:, None]
    return x.reshape(x.shape[0], -1).float()
