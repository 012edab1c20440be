"""Token-id inputs in :class:`~lightning_introspect.callbacks.attributions.Attributions`: the methods the
callback runs on a text model (the shared plan of :mod:`~lightning_introspect.callbacks.token_inputs`,
under the callback's arguments) and the text each method logs (coloured sentences, top tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lightning_introspect.callbacks.token_inputs import TokenPlan, plan_token_attributions
from lightning_introspect.methods.token_attribution import SIGNED_TOKEN_METHODS
from lightning_introspect.render.tokens import token_sentences_markdown, token_strings, top_tokens_markdown

if TYPE_CHECKING:
    from lightning_introspect.callbacks.attributions import Attributions

#: what a text model is explained with when ``methods`` is left at its default
TOKEN_DEFAULT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "lrp")

__all__ = ["TOKEN_DEFAULT_METHODS", "token_markdown", "token_plan"]


def token_plan(cb: Attributions, model: Any, x: torch.Tensor, methods: Sequence[str]) -> TokenPlan:
    """Token ids: the shared plan (the methods with a token version, the embedding layer) for ``cb``'s
    arguments, ``TOKEN_DEFAULT_METHODS`` where ``methods`` was left at its default; the methods it drops
    are said once."""
    plan = plan_token_attributions(model, x, TOKEN_DEFAULT_METHODS if cb._default_methods else methods,
                                   embedding_layer=cb.embedding_layer, output_transform=cb.output_transform, decode=cb.decode)
    if plan.problem is None and plan.dropped:
        cb.warn_once("tokens", f"Attributions: {plan.dropped} have no token version; token ids are explained with {plan.methods}.")
    return plan


def token_markdown(
    x: torch.Tensor, maps: torch.Tensor, method: str, *, decode: Callable[[list[int]], list[str]] | None, pad_token_id: int | None,
    normalize: str, class_names: list[str] | None, captions: list[str] | None, title: str, classes: torch.Tensor | None,
) -> str:
    """The sentences with coloured tokens and, for the main entry (``classes`` given), the top tokens per class."""
    strings = token_strings(x, decode)
    keep = None if pad_token_id is None else x.cpu() != pad_token_id
    signed = method in SIGNED_TOKEN_METHODS
    text = token_sentences_markdown(strings, maps, signed=signed, captions=captions, keep=keep, normalize=normalize, title=title)
    if classes is None:
        return text
    table = top_tokens_markdown(x, strings, maps, classes, keep=keep, class_names=class_names)
    return f"{text}\n\n**Top tokens per class** (mean score of each token over the fixed samples explained for the class)\n\n{table}"
