"""Token activations ``(N, T, D)``: which 3-D layer outputs hold tokens, which token is the class token, and
one feature vector per sample (the class token, or the mean over the tokens that are not padding).

A 3-D output is ambiguous by shape alone: a transformer block gives ``(N, T, D)`` (tokens first, features
last) and a ``Conv1d`` gives ``(N, C, L)`` (channels first). The module type decides
(:func:`module_layout`): modules that act on the last dimension or on sequences are token-major, 1-D
convolutions, their norms and poolings channel-major, and elementwise modules (activations, dropout) or
containers take the layout of the module that made their values (see
:func:`~lightning_introspect.methods.probe_layers.token_layers`).

The class token is found as Grad-CAM finds the patch grid of a vision transformer: for image inputs
``(N, C, H, W)``, ``T - k`` tokens must form a patch grid of the image's aspect for ``k`` prefix tokens (a
class token, then register tokens); ``k >= 1`` means token 0 is the class token (:func:`prefix_tokens`).
Text gives no such clue, so ``"auto"`` averages its tokens (pass ``token_pooling="cls"`` for a BERT-style
``[CLS]`` at position 0).

Example:
    >>> import torch
    >>> x = torch.arange(12.0).view(1, 3, 4)  # one sample, 3 tokens of width 4
    >>> pool_tokens(x, TokenPooling("mean"), mask=torch.tensor([[True, True, False]])).tolist()
    [[2.0, 3.0, 4.0, 5.0]]
    >>> pool_tokens(x, TokenPooling("cls")).tolist()
    [[0.0, 1.0, 2.0, 3.0]]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: ``token_pooling`` values: ``"auto"`` (the class token where the patch grid shows one, else the mean),
#: ``"cls"`` (token 0) or ``"mean"`` (the mean over the tokens that are not padding, prefix tokens left out)
TOKEN_POOLING_CHOICES = ("auto", "cls", "mean")

#: modules whose 3-D output is ``(N, T, D)``: they act on the last dimension, or on sequences
TOKEN_MAJOR: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.LayerNorm, nn.RMSNorm, nn.Embedding, nn.MultiheadAttention, nn.RNNBase,
    nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder, nn.TransformerDecoder,
)
#: modules whose 3-D output is ``(N, C, L)``: 1-D convolutions, the norms and poolings that go with them
CHANNEL_MAJOR: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d, nn.GroupNorm, nn.MaxPool1d, nn.AvgPool1d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d,
)

#: the most prefix tokens (a class token and register tokens) the patch-grid rule considers
MAX_PREFIX_TOKENS = 8


def is_attention(module: nn.Module) -> bool:
    """Whether ``module`` is an attention layer: ``nn.MultiheadAttention``, or a class named ``*Attention*`` /
    ``*Attn`` (timm's ``Attention``, Hugging Face's ``BertSelfAttention``, hand-written ones)."""
    name = type(module).__name__.lower()
    return isinstance(module, nn.MultiheadAttention) or "attention" in name or name.endswith("attn")


def module_layout(module: nn.Module) -> str | None:
    """``"tokens"`` when the module's 3-D output is ``(N, T, D)``, ``"channels"`` when it is ``(N, C, L)``, ``None``
    when its type does not say (elementwise modules, containers, anything else).

    Example:
        >>> module_layout(nn.LayerNorm(8)), module_layout(nn.Conv1d(2, 4, 3)), module_layout(nn.GELU())
        ('tokens', 'channels', None)
    """
    if isinstance(module, TOKEN_MAJOR) or is_attention(module):
        return "tokens"
    if isinstance(module, CHANNEL_MAJOR):
        return "channels"
    return None


def prefix_tokens(num_tokens: int, image_size: tuple[int, int] | None) -> int | None:
    """How many tokens come before the patch grid of an image ``(H, W)``: the smallest ``k`` (at most
    :data:`MAX_PREFIX_TOKENS`) for which ``num_tokens - k`` patches form a grid ``gh x gw`` of the image's
    aspect (``gh / gw == H / W``, at least 2 x 2). ``None`` when no ``k`` fits or there is no image.

    Example:
        >>> prefix_tokens(197, (224, 224)), prefix_tokens(196, (224, 224)), prefix_tokens(201, (224, 224))
        (1, 0, 5)
        >>> prefix_tokens(12, None) is None
        True
    """
    if image_size is None:
        return None
    height, width = image_size
    if height < 1 or width < 1:
        return None
    for k in range(min(MAX_PREFIX_TOKENS, num_tokens - 4) + 1):
        patches = num_tokens - k
        rows = round(math.sqrt(patches * height / width))
        if rows >= 2 and patches % rows == 0:
            cols = patches // rows
            if cols >= 2 and abs(rows / cols - height / width) <= 1e-6 * max(1.0, height / width):
                return k
    return None


@dataclass(frozen=True)
class TokenPooling:
    """How one layer's tokens become one feature vector per sample.

    Attributes:
        pooling: ``"cls"`` (token ``0``) or ``"mean"`` (the mean over tokens ``prefix:``, padding left out).
        prefix: tokens before the patch grid (class and register tokens), left out of the mean.
        sequence_first: the output is ``(T, N, D)`` (``batch_first=False`` RNNs and attention layers).
        num_tokens: ``T`` on the example batch (``None``: unknown), for the description.
    """

    pooling: str
    prefix: int = 0
    sequence_first: bool = False
    num_tokens: int | None = None

    def describe(self) -> str:
        """In words, for tables and summaries.

        Example:
            >>> TokenPooling("cls", prefix=1, num_tokens=17).describe()
            'class token (token 0 of 17; 1 prefix token before the patch grid)'
            >>> TokenPooling("mean", num_tokens=12).describe()
            'mean over the 12 tokens without padding'
        """
        of = f" of {self.num_tokens}" if self.num_tokens is not None else ""
        prefix = f"; {self.prefix} prefix token{'s' if self.prefix != 1 else ''} before the patch grid" if self.prefix else ""
        if self.pooling == "cls":
            return f"class token (token 0{of}{prefix})"
        count = f" {self.num_tokens}" if self.num_tokens is not None else ""
        left_out = f", the {self.prefix} prefix token{'s' if self.prefix != 1 else ''} left out" if self.prefix else ""
        return f"mean over the{count} tokens without padding{left_out}"


def resolve_token_pooling(
    choice: str, num_tokens: int | None, image_size: tuple[int, int] | None, *, sequence_first: bool = False
) -> TokenPooling:
    """The :class:`TokenPooling` of a token layer with ``num_tokens`` tokens, for the model input's
    ``image_size`` ``(H, W)`` (``None``: not an image, e.g. token ids).

    ``"auto"``: the class token when the patch-grid rule (:func:`prefix_tokens`) finds prefix tokens, else the
    mean (over the patches for images; over the tokens that are not padding for text). ``"cls"``: token 0.
    ``"mean"``: the mean, prefix tokens left out when the rule finds them.

    Example:
        >>> resolve_token_pooling("auto", 17, (16, 16)).pooling, resolve_token_pooling("auto", 12, None).pooling
        ('cls', 'mean')
    """
    if choice not in TOKEN_POOLING_CHOICES:
        raise ValueError(
            f"Expected `token_pooling` to be one of {', '.join(repr(c) for c in TOKEN_POOLING_CHOICES)}, but got {choice!r}."
        )
    prefix = prefix_tokens(num_tokens, image_size) if num_tokens is not None else None
    if choice == "cls" or (choice == "auto" and prefix):
        return TokenPooling("cls", prefix=prefix or 0, sequence_first=sequence_first, num_tokens=num_tokens)
    return TokenPooling("mean", prefix=prefix or 0, sequence_first=sequence_first, num_tokens=num_tokens)


def pool_tokens(activation: torch.Tensor, pooling: TokenPooling, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One float32 vector per sample ``(N, D)`` from tokens ``(N, T, D)`` (``(T, N, D)`` when ``sequence_first``).

    ``"cls"``: token 0. ``"mean"``: the mean over tokens ``prefix:`` where ``mask`` ``(N, T)`` is true (a
    sample without any such token gives zeros); a mask of another length than ``T`` (a layer whose tokens
    are not the input's: a ViT's patches, pooled tokens) is not used, and every token counts.

    Example:
        >>> x = torch.tensor([[[1.0], [2.0], [6.0]]])
        >>> pool_tokens(x, TokenPooling("mean", prefix=1)).tolist()
        [[4.0]]
    """
    x = activation.detach()
    if x.ndim != 3:
        raise ValueError(f"Expected token activations (N, T, D), but got shape {tuple(x.shape)}.")
    if pooling.sequence_first:
        x = x.transpose(0, 1)
    if pooling.pooling == "cls":
        return x[:, 0].float()
    if mask is None or tuple(mask.shape) != tuple(x.shape[:2]):
        return x[:, pooling.prefix :].mean(1, dtype=torch.float32)
    weights = mask[:, pooling.prefix :].to(device=x.device, dtype=torch.float32)
    total = torch.einsum("ntd,nt->nd", x[:, pooling.prefix :].float(), weights)
    return total / weights.sum(1, keepdim=True).clamp_min(1.0)


def token_mask(batch: Any, *, inputs: Any = None, pad_token_id: int | None = None) -> torch.Tensor | None:
    """Which tokens of a batch are not padding, ``(N, T)`` bool, or ``None`` when the batch does not say.

    Looked for, in this order: an ``"attention_mask"`` in a dict batch, or in dict ``inputs``; then, with
    ``pad_token_id``, the token ids (``inputs`` as an integer tensor ``(N, T)``, or the ``"input_ids"`` of a
    dict batch or dict ``inputs``) that differ from it.

    Example:
        >>> token_mask({"input_ids": torch.tensor([[5, 7, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}).tolist()
        [[True, True, False]]
        >>> token_mask((torch.tensor([[5, 0]]), torch.tensor([1])), inputs=torch.tensor([[5, 0]]), pad_token_id=0).tolist()
        [[True, False]]
    """
    for source in (batch, inputs):
        if isinstance(source, Mapping) and isinstance(source.get("attention_mask"), torch.Tensor):
            return source["attention_mask"].detach().bool()
    if pad_token_id is None:
        return None
    for source in (inputs, batch):
        ids = source.get("input_ids") if isinstance(source, Mapping) else source
        if isinstance(ids, torch.Tensor) and ids.ndim == 2 and not ids.is_floating_point():
            return (ids != pad_token_id).detach()
    return None
