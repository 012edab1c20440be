"""How a callback explains token-id inputs: which methods have a token version and at which embedding
layer the scores are taken, decided once per fit from one sample."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_introspect._torch.guards import module_device
from lightning_introspect.callbacks.outputs import logits_only
from lightning_introspect.errors import IntrospectionInputError
from lightning_introspect.methods.token_attribution import TOKEN_METHODS, find_embedding, token_attributions
from lightning_introspect.render.tokens import token_strings


@dataclass(frozen=True)
class TokenPlan:
    """What :func:`plan_token_attributions` decided.

    Attributes:
        methods: the methods to run (empty: nothing can be explained; ``problem`` says why).
        embedding_layer: the layer whose output is explained (``None`` when ``methods`` is empty).
        note: one line on the layer and how it was chosen (or the problem).
        dropped: the requested methods without a token version.
    """

    methods: list[str]
    embedding_layer: str | None
    note: str
    dropped: list[str] = field(default_factory=list)

    @property
    def problem(self) -> str | None:
        return None if self.methods else self.note


def plan_token_attributions(
    model: Any, x: torch.Tensor, methods: Sequence[str], *, embedding_layer: str = "auto",
    output_transform: Callable[[Any], Any] | None = None, decode: Callable[[list[int]], list[str]] | None = None,
) -> TokenPlan:
    """The token methods among ``methods`` and the embedding layer, checked on ``x[:1]`` (on the model's device).

    Raises:
        IntrospectionInputError: ``decode`` fails on the sample (a user argument the data contradict).
    """
    dropped = [m for m in methods if m not in TOKEN_METHODS]
    kept = [m for m in methods if m in TOKEN_METHODS]
    if not kept:
        return TokenPlan([], None, f"the inputs are token ids {tuple(x.shape)}, and none of the methods {list(methods)} explains "
                                   f"tokens; use {', '.join(TOKEN_METHODS)}.", dropped)
    named = None if embedding_layer == "auto" else embedding_layer
    sample = x[:1].to(module_device(model))
    try:
        with logits_only(model, output_transform):
            layer = find_embedding(model, sample, named)
            check = token_attributions(model, sample, "pred", ["saliency"], embedding_layer=layer)
    except ValueError as err:
        return TokenPlan([], None, f"the inputs are token ids, explained at the output of the embedding layer, but: {err}", dropped)
    if not bool(check["saliency"].any()):
        return TokenPlan([], None, f"autograd does not connect the model's output to the output of the embedding layer {layer!r} "
                                   "(run under torch.no_grad() or detached?), so there is no gradient to explain.", dropped)
    if decode is not None:
        try:
            token_strings(x[:1], decode)
        except ValueError as err:
            raise IntrospectionInputError(str(err)) from err
    how = "given" if named else "found automatically: the first nn.Embedding that takes the token ids"
    return TokenPlan(kept, layer, f"Token scores at the output of the embedding layer `{layer}` ({how}).", dropped)


__all__ = ["TokenPlan", "plan_token_attributions"]
