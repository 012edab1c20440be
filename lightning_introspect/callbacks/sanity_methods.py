"""Which attribution methods a run of :class:`~lightning_introspect.callbacks.sanity_checks.SanityChecks` checks.

The methods asked for (or, left at ``None``, those of the trainer's ``Attributions`` callback, else the
defaults; for token ids the token defaults), less those this model or input kind cannot serve: LRP where
the model has an operation without a rule, the attention rollouts where no self-attention runs, the layer
methods on tabular inputs, the methods without a token version on token ids. Each kind of drop is warned
once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lightning_introspect._torch.guards import module_device
from lightning_introspect.callbacks.checks import lrp_problem
from lightning_introspect.methods.attention import ATTENTION_METHODS, attention_problem
from lightning_introspect.methods.attribution import LAYER_METHODS
from lightning_introspect.methods.explainers import DEFAULT_METHODS
from lightning_introspect.methods.sanity_report import DEFAULT_TOKEN_METHODS
from lightning_introspect.methods.token_attribution import TOKEN_METHODS, is_token_ids

if TYPE_CHECKING:
    from lightning_introspect.callbacks.sanity_checks import SanityChecks

__all__ = ["default_methods", "servable_methods", "token_methods"]


def default_methods(cb: SanityChecks, trainer: Any = None) -> list[str]:
    """``cb.methods``; left at ``None``: the methods of the trainer's enabled ``Attributions``, else the defaults."""
    if cb.methods is not None:
        return list(cb.methods)
    for other in getattr(trainer, "callbacks", None) or []:
        if getattr(other, "name", None) == "attributions" and getattr(other, "methods", None) and getattr(other, "enabled", True):
            return list(other.methods)
    return list(DEFAULT_METHODS)


def token_methods(cb: SanityChecks, methods: list[str], x: torch.Tensor) -> list[str]:
    """The methods that explain token ids: the token defaults when ``cb.methods`` was left at ``None``, else
    those of ``methods`` with a token version (the others dropped with one warning)."""
    if cb.methods is None:
        return list(DEFAULT_TOKEN_METHODS)
    dropped = [m for m in methods if m not in TOKEN_METHODS]
    kept = [m for m in methods if m in TOKEN_METHODS]
    if dropped and kept:
        cb.warn_once("tokens", f"SanityChecks: {dropped} have no token version; token ids {tuple(x.shape)} are checked with {kept}.")
    return kept


def servable_methods(cb: SanityChecks, model: torch.nn.Module, inputs: torch.Tensor, methods: list[str]) -> list[str]:
    """``methods`` less those ``model`` and ``inputs`` cannot serve (one warning per kind).

    Raises:
        ValueError: when nothing is left: token ids and no method with a token version, or tabular inputs and
            only layer methods.
    """
    tokens = is_token_ids(inputs)
    if tokens:
        methods = token_methods(cb, methods, inputs)
        if not methods:
            raise ValueError(
                f"SanityChecks: none of the methods {cb.methods} explains token ids {tuple(inputs.shape)}; "
                f"use {', '.join(TOKEN_METHODS)}."
            )
    problem = lrp_problem(model, cb.output_transform, inputs[:2].to(module_device(model))) if "lrp" in methods else None
    if problem is not None:
        cb.warn_once("lrp-skipped", f"SanityChecks: {problem}")
        methods.remove("lrp")
    rollouts = [m for m in methods if m in ATTENTION_METHODS]
    problem = attention_problem(model, inputs[:1]) if rollouts else None
    if problem is not None:
        cb.warn_once("attention-skipped", f"SanityChecks: {rollouts} are skipped for this model: {problem}")
        methods = [m for m in methods if m not in ATTENTION_METHODS]
    if inputs.ndim == 2 and not tokens and any(m in LAYER_METHODS for m in methods):
        dropped = [m for m in methods if m in LAYER_METHODS]
        cb.warn_once("tabular", f"SanityChecks: {dropped} need a spatial feature map; tabular inputs (N, F) skip them.")
        methods = [m for m in methods if m not in LAYER_METHODS]
        if not methods:
            raise ValueError(
                f"SanityChecks: every method in `methods` ({dropped}) needs a spatial feature map, which tabular inputs "
                "(N, F) do not have; add e.g. 'saliency' or 'input_x_gradient'."
            )
    return methods
