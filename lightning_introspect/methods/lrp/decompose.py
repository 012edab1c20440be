"""Traceable forwards for the ``torch.nn`` transformer modules whose own ``forward`` torch.fx cannot trace.

``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` check devices, dtypes,
autograd and the batch in Python before they choose between a fused "fast path" kernel and the reference
computation; the fast path is taken in eval mode, where LRP runs. :mod:`torch.fx` cannot follow such checks
and a fused kernel hides the operations LRP needs. The LRP tracer therefore traces these modules through
the functions here: the reference computation written out with the module's own parameters and submodules
(``linear1``, ``norm1``, ``out_proj``, ...), so the plan sees the projections, the attention and the
residual additions. Dropout is left out (the pass runs in eval mode) and the attention weights are not
returned (``need_weights`` is ignored; the second output is ``None``).

The attention itself is one call to :func:`attention` (a leaf of the trace), whose masks are combined at run
time, when their dtypes are known. Only the forward computation lives here; the plan and the rules know
nothing of these modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["DECOMPOSED", "additive_mask", "attention", "attention_arguments", "attention_inputs"]


def additive_mask(length: int, source: int, dtype: torch.dtype, device: torch.device, attn_mask: Any = None,
                  key_padding_mask: Any = None, is_causal: bool = False) -> torch.Tensor | None:
    """One additive float mask (``0`` where attending is allowed, ``-inf`` where not, or the given floats) for
    scores ``(N, heads, length, source)``, from masks in SDPA's convention (a boolean ``True`` where attending
    is *allowed*; :func:`attention_inputs` inverts ``nn.MultiheadAttention``'s, where ``True`` masks out)."""
    total: torch.Tensor | None = None

    def add(mask: torch.Tensor) -> None:
        nonlocal total
        total = mask if total is None else total + mask

    if is_causal:
        allowed = torch.ones(length, source, dtype=torch.bool, device=device).tril(diagonal=source - length)
        add(torch.zeros(length, source, dtype=dtype, device=device).masked_fill(~allowed, float("-inf")))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            add(torch.zeros(attn_mask.shape, dtype=dtype, device=device).masked_fill(~attn_mask, float("-inf")))
        else:
            add(attn_mask.to(dtype))
    if key_padding_mask is not None:  # (N, S), MHA's convention already turned into "allowed"
        kpm = key_padding_mask.view(key_padding_mask.shape[0], 1, 1, source)
        if kpm.dtype == torch.bool:
            add(torch.zeros(kpm.shape, dtype=dtype, device=device).masked_fill(~kpm, float("-inf")))
        else:
            add(kpm.to(dtype))
    return total


def _sdpa_arguments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
                    is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> dict[str, Any]:
    return {"query": query, "key": key, "value": value, "attn_mask": attn_mask, "key_padding_mask": None, "is_causal": is_causal,
            "scale": scale, "mha": False, "enable_gqa": enable_gqa}


def _attention_arguments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None, key_padding_mask: Any = None,
                         is_causal: bool = False, scale: float | None = None, mha: bool = False) -> dict[str, Any]:
    return {"query": query, "key": key, "value": value, "attn_mask": attn_mask, "key_padding_mask": key_padding_mask,
            "is_causal": is_causal, "scale": scale, "mha": mha, "enable_gqa": False}


def attention_arguments(target: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a call of :func:`attention` or ``F.scaled_dot_product_attention`` by name, in the keywords
    of :func:`attention_inputs` (SDPA's ``dropout_p`` is dropped: the pass runs in eval mode)."""
    bind = _sdpa_arguments if target is F.scaled_dot_product_attention else _attention_arguments
    return bind(*args, **kwargs)


def attention_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None, key_padding_mask: Any = None,
                     is_causal: bool = False, scale: float | None = None, mha: bool = False,
                     enable_gqa: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Keys and values (repeated over the query heads for grouped-query attention), the one additive mask
    ``(.., L, S)`` (or ``None``) and the scale of ``softmax(q k^T * scale + mask) v``."""
    if mha:
        if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() == 3:  # (N * heads, L, S)
            attn_mask = attn_mask.view(query.shape[0], query.shape[1], *attn_mask.shape[1:])
        attn_mask = ~attn_mask if isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == torch.bool else attn_mask
        if isinstance(key_padding_mask, torch.Tensor) and key_padding_mask.dtype == torch.bool:
            key_padding_mask = ~key_padding_mask
        is_causal = is_causal and attn_mask is None
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    mask = additive_mask(query.shape[-2], key.shape[-2], query.dtype, query.device, attn_mask, key_padding_mask, is_causal)
    return key, value, mask, scale


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None, key_padding_mask: Any = None,
              is_causal: bool = False, scale: float | None = None, mha: bool = False) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` on ``(N, heads, L, d)`` queries and ``(N, heads, S, d)`` keys / values.

    ``mha=True``: the masks are in ``nn.MultiheadAttention``'s convention (a boolean ``True`` masks out) and
    ``is_causal`` is only a hint about ``attn_mask`` (as there). A leaf of the LRP trace: the propagator
    evaluates it and propagates relevance through its parts.

    Example:
        >>> q, k, v = torch.randn(3, 2, 1, 4, 8).unbind(0)
        >>> torch.allclose(attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-6)
        True
    """
    key, value, mask, scale = attention_inputs(query, key, value, attn_mask, key_padding_mask, is_causal, scale, mha)
    scores = query @ key.transpose(-2, -1) * scale
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1) @ value


fx.wrap("attention")  # a leaf of the trace: its masks are combined when their dtypes are known


def _refuse(module: nn.Module, what: str) -> None:
    raise TypeError(f"LRP does not support {type(module).__name__} with {what}.")


def multihead_attention(m: nn.MultiheadAttention, query: Any, key: Any, value: Any, key_padding_mask: Any = None,
                        need_weights: bool = True, attn_mask: Any = None, average_attn_weights: bool = True,
                        is_causal: bool = False) -> tuple[Any, None]:
    """``nn.MultiheadAttention.forward`` written out (batched inputs; ``batch_first`` either way)."""
    if m.bias_k is not None or m.bias_v is not None or m.add_zero_attn:
        _refuse(m, "add_bias_kv=True or add_zero_attn=True")
    if not m.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    dim, heads = m.embed_dim, m.num_heads
    head_dim = dim // heads
    if m._qkv_same_embed_dim:
        w_q, w_k, w_v = m.in_proj_weight[:dim], m.in_proj_weight[dim : 2 * dim], m.in_proj_weight[2 * dim :]
    else:
        w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    bias = m.in_proj_bias
    b_q, b_k, b_v = (None, None, None) if bias is None else (bias[:dim], bias[dim : 2 * dim], bias[2 * dim :])
    q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    n, length, source = q.shape[0], q.shape[1], k.shape[1]
    q = q.view(n, length, heads, head_dim).transpose(1, 2)
    k = k.view(n, source, heads, head_dim).transpose(1, 2)
    v = v.view(n, source, heads, head_dim).transpose(1, 2)
    out = attention(q, k, v, attn_mask, key_padding_mask, is_causal, None, True)
    out = m.out_proj(out.transpose(1, 2).reshape(n, length, dim))
    if not m.batch_first:
        out = out.transpose(0, 1)
    return out, None


def encoder_layer(m: nn.TransformerEncoderLayer, src: Any, src_mask: Any = None, src_key_padding_mask: Any = None,
                  is_causal: bool = False) -> Any:
    """``nn.TransformerEncoderLayer.forward`` without the fast path and without dropout."""

    def self_attention(x: Any) -> Any:
        return m.self_attn(x, x, x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask, need_weights=False,
                           is_causal=is_causal)[0]

    def feed_forward(x: Any) -> Any:
        return m.linear2(m.activation(m.linear1(x)))

    x = src
    if m.norm_first:
        x = x + self_attention(m.norm1(x))
        return x + feed_forward(m.norm2(x))
    x = m.norm1(x + self_attention(x))
    return m.norm2(x + feed_forward(x))


def encoder(m: nn.TransformerEncoder, src: Any, mask: Any = None, src_key_padding_mask: Any = None, is_causal: bool | None = None) -> Any:
    """``nn.TransformerEncoder.forward`` without the fast path (no nested tensors)."""
    x = src
    for layer in m.layers:
        x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
    return x if m.norm is None else m.norm(x)


DECOMPOSED: dict[type[nn.Module], Callable[..., Any]] = {
    nn.MultiheadAttention: multihead_attention,
    nn.TransformerEncoderLayer: encoder_layer,
    nn.TransformerEncoder: encoder,
}
"""Module type -> its traceable forward ``f(module, *args, **kwargs)`` (exact types: a subclass may change forward)."""
