"""What a run of :class:`~lightning_introspect.callbacks.sanity_checks.SanityChecks` costs, and the sizes it may
take under a budget.

A run's cost is counted in attribution passes over the fixed samples: ``1 + repeats x blocks`` per full
randomisation curve, the top-down verdict's passes when no full top-down curve runs, and the fixed extras
(class sensitivity, the references, eMPRT), plus its figures. One pass is timed once on the samples (in
memory-sized chunks, as the check explains) and kept in the callback's unit costs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lightning_introspect._torch.guards import introspection_mode, module_device
from lightning_introspect.callbacks.budget import Option, best_of
from lightning_introspect.callbacks.checks import lrp_problem
from lightning_introspect.callbacks.sanity_methods import token_methods
from lightning_introspect.methods.attribution import LAYER_METHODS
from lightning_introspect.methods.chunks import explain_in_chunks, explanation_rows
from lightning_introspect.methods.explainers import DEFAULT_METHODS, Explainer
from lightning_introspect.methods.randomization import randomization_blocks
from lightning_introspect.methods.token_attribution import find_embedding, is_token_ids

if TYPE_CHECKING:
    from lightning_introspect.callbacks.sanity_checks import SanityChecks

__all__ = ["attribution_passes", "full_curves", "progress_total", "run_options"]


def full_curves(mode: str, order: str) -> int:
    """How many full randomisation curves a run computes."""
    return int(mode in ("independent", "both")) + int(mode != "independent") * (2 if order == "both" else 1)


def progress_total(cb: SanityChecks, repeats: int, blocks: int) -> int:
    """The progress bar's steps: class sensitivity, eMPRT, one per block and repeat of every full curve."""
    return int(cb.run_class_sensitivity) + int(cb.run_emprt) + full_curves(cb.mode, cb.order) * repeats * blocks


def attribution_passes(cb: SanityChecks, repeats: int, blocks: int) -> int:
    """Attribution passes of the randomisation runs: ``1 + repeats x blocks`` per full curve, and the
    top-down verdict's ``1 + repeats x verdict_depth`` when no full top-down curve runs."""
    passes = full_curves(cb.mode, cb.order) * (1 + repeats * blocks)
    if cb.mode == "independent" or cb.order == "bottom_up":
        passes += 1 + repeats * min(cb.verdict_depth, blocks)
    return int(passes)


def run_options(cb: SanityChecks, model: torch.nn.Module, x: torch.Tensor) -> list[Option]:
    """The sizes a run may take under a budget, largest first: as configured, then one repeat, then only the
    two blocks each cascade starts from; arguments given explicitly are kept."""
    given = set(cb._given)
    sample = x.to(module_device(model))
    methods = list(cb._resolved_methods or DEFAULT_METHODS)
    tokens = is_token_ids(x)
    if tokens:
        methods = token_methods(cb, methods, x)
    blocks = len(randomization_blocks(model, sample[:1], cb.layers, bn_mode=cb.bn_mode))
    if not cb.unit_costs.known("pass"):
        _time_one_pass(cb, model, sample, methods, tokens)
    # the report's figures and grids: as its last writing took, else four figures at what figures cost here
    per_pass, report = cb.unit_costs.get("pass", 0.0), cb.unit_costs.get("report", 4 * cb.figure_seconds())
    # class sensitivity: one call over every compared class, the reference noise copy and the prediction;
    # the references: one pass; eMPRT: two
    extra = (len(cb.others) + 2 if cb.run_class_sensitivity else 0) + 1 + (2 if cb.run_emprt else 0)

    def option(repeats: int, top: int | None) -> Option:
        k = blocks if top is None else min(top, blocks)
        sizes = {"repeats": repeats, "blocks": k, **({} if top is None else {"layers": top})}
        return Option(sizes, per_pass * (attribution_passes(cb, repeats, k) + extra) + report)

    repeats, top = cb.repeats, None
    options = [option(repeats, top)]
    if "repeats" not in given and repeats > 1:
        repeats = 1
        options.append(option(repeats, top))
    if "layers" not in given and cb.layers == "auto" and blocks > 2:
        top = 2
        options.append(option(repeats, top))
    return options


def _time_one_pass(cb: SanityChecks, model: torch.nn.Module, sample: torch.Tensor, methods: list[str], tokens: bool) -> None:
    """One attribution pass over the samples with the methods that can run, timed (best of two) into
    ``cb.unit_costs["pass"]``; ``0.0`` when it fails (only an estimate: the check reports what fails)."""
    usable = [m for m in methods if (m != "lrp" or lrp_problem(model, None, sample[:2]) is None) and (sample.ndim == 4 or m not in LAYER_METHODS)]
    explain = Explainer(usable or ["saliency"])
    layer = cb.cam_layer if any(m in LAYER_METHODS for m in usable) else None
    if tokens:  # token scores at the embedding output
        layer = find_embedding(model, sample[:1])
    try:
        with introspection_mode(model, grad=True):
            resolved = None if layer is None else explain.resolve_layer(model, sample[:1], layer)
            rows = explanation_rows(model, sample)  # in chunks, as the check explains
            cb.unit_costs.observe("pass", best_of(2, lambda: explain_in_chunks(explain, model, sample, "pred", resolved, rows=rows)))
    except Exception:
        cb.unit_costs.observe("pass", 0.0)
