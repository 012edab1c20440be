"""What every :class:`~lightning_introspect.callbacks.attributions.Attributions` run measures about its own
maps, and logs: faithfulness (deletion / insertion curves next to the random and edge references, their
steps sized under a budget) and eMPRT (the rise in map entropy on a randomised copy of the model).

Both take the maps the run has just logged, for the targets they explain; the numbers are those of
:func:`~lightning_introspect.methods.attribution_runs.faithfulness_scores` and
:func:`~lightning_introspect.methods.emprt.emprt`, written under ``introspect/attributions/faithfulness``
and ``introspect/attributions/emprt``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from lightning_introspect._torch.guards import introspection_mode, module_device
from lightning_introspect.callbacks.base import Option
from lightning_introspect.callbacks.budget import best_of
from lightning_introspect.loggers.adapter import IntrospectionWriter
from lightning_introspect.methods.attribution_runs import faithfulness_scores
from lightning_introspect.methods.chunks import chunk_slices, chunk_target, explanation_rows
from lightning_introspect.methods.emprt import emprt
from lightning_introspect.methods.token_attribution import is_token_ids
from lightning_introspect.render.attributions import faithfulness_markdown

if TYPE_CHECKING:
    from lightning_introspect._lightning import pl
    from lightning_introspect.callbacks.attributions import Attributions

MAX_BATCH = 128  # samples x targets explained (or perturbed inputs scored) in one pass

__all__ = ["MAX_BATCH", "log_emprt", "log_faithfulness"]


def log_faithfulness(
    cb: Attributions, trainer: pl.Trainer, writer: IntrospectionWriter, pl_module: pl.LightningModule, x: torch.Tensor,
    maps: dict[str, torch.Tensor], target: Any, step: int,
) -> dict[str, dict[str, float]]:
    """Deletion / insertion areas of the finite maps and of the references: scalars, a table, and the numbers for ``history``."""
    if not cb.faithfulness or not maps or is_token_ids(x):  # removing tokens is not defined here: images and tabular only
        return {}
    steps = _faithfulness_steps(cb, trainer, pl_module, x, len(maps))
    if not steps:
        return {}
    inputs = int(x.shape[0]) * (2 + 2 * (steps - 1) * (len(maps) + 2))  # perturbed inputs of one run
    start = time.perf_counter()
    scores = faithfulness_scores(pl_module, x, maps, target, steps=steps, baseline=cb.faithfulness_baseline,
                                 seed=cb.seed, max_batch=MAX_BATCH)
    elapsed = time.perf_counter() - start
    cb.unit_costs.observe("faithfulness_input", elapsed, inputs)
    cb.charge(elapsed)
    writer.scalars({cb.tag("faithfulness", name, k): v for name, row in scores.items() for k, v in row.items()}, step)
    score = "each region's mean probability of its class" if cb.resolved_task == "segmentation" else "the explained class's probability"
    baseline = "mean" if x.ndim == 2 and cb.faithfulness_baseline == "blur" else cb.faithfulness_baseline
    writer.text(cb.tag("faithfulness"), faithfulness_markdown(scores, step, steps=steps, baseline=baseline, score=score), step)
    return scores


def _faithfulness_steps(cb: Attributions, trainer: pl.Trainer, pl_module: pl.LightningModule, x: torch.Tensor, methods: int) -> int:
    """The curves' steps this run: ``faithfulness_steps``, or under a budget half of them (at least 5), or none
    (the run skips the curves; never the last run); an explicit ``faithfulness_steps`` is kept. eMPRT is sized
    with them: a run the budget leaves without curves leaves it out too (:attr:`Attributions.emprt_now`), and
    so does a run before the first training step, which explains the samples only (the fit's length is not
    known yet; the maps of the untrained model are what that run is for). Cost: perturbed inputs x seconds
    per input (from earlier runs, else three timed forwards of the samples), plus eMPRT's last time (else a
    gradient pass per method, as three forwards)."""
    if cb.budget is None:
        return cb.faithfulness_steps
    if not cb.unit_costs.known("faithfulness_input"):
        sample = x.to(module_device(pl_module))
        with introspection_mode(pl_module, grad=False):
            cb.unit_costs.observe("faithfulness_input", best_of(3, lambda: pl_module(sample)), int(x.shape[0]))
    per_input, n = cb.unit_costs.get("faithfulness_input", 0.0), int(x.shape[0])
    randomised = cb.run_emprt and not is_token_ids(x)
    emprt_seconds = cb.unit_costs.get("emprt", 3 * per_input * n * methods) if randomised else 0.0

    def option(steps: int, with_emprt: bool = True) -> Option:
        inputs = n * (2 + 2 * (steps - 1) * (methods + 2)) if steps else 0
        sizes: dict[str, Any] = {"faithfulness_steps": steps, **({"emprt": with_emprt} if randomised else {})}
        return Option(sizes, per_input * inputs + (emprt_seconds if with_emprt else 0.0))

    steps = cb.faithfulness_steps
    options = [option(steps)]
    if "faithfulness_steps" not in cb._given:
        while steps > 5:
            steps = max(5, steps // 2)
            options.append(option(steps))
        if cb.budget.projection(trainer) is None and not cb.is_final(trainer):
            options.append(option(0, False))  # before the first step: the untrained model's maps only
    chosen = cb.sized(trainer, options)
    cb.emprt_now = bool(chosen.sizes.get("emprt", True)) if chosen is not None else False
    return int(chosen.sizes["faithfulness_steps"]) if chosen is not None else 0


def log_emprt(
    cb: Attributions, writer: IntrospectionWriter, pl_module: pl.LightningModule, x: torch.Tensor, maps: dict[str, torch.Tensor],
    target: Any, step: int,
) -> dict[str, float]:
    """eMPRT of the methods whose maps were finite: the rise in map entropy from the trained to the fully
    randomised model (a copy), the same re-initialisation at every run (seeded by ``seed``). ``maps`` are the
    trained model's maps of ``x`` for ``target``, which the run has already made: only the copy is explained."""
    if not cb.run_emprt or not cb.emprt_now or not maps or is_token_ids(x):  # token scores: the sanity check, not this curve
        return {}
    explain = {m: _single_method(cb, m) for m in maps}
    with cb.unit_costs.timed("emprt"):  # the budget's estimate of the next run
        result = emprt(pl_module, x, target, explain, generator=torch.Generator().manual_seed(cb.seed), layer=None, trained_maps=maps)
    means = {m: v for m, v in result.mean.items() if math.isfinite(v)}
    writer.scalars({cb.tag("emprt", m): v for m, v in means.items()}, step)
    return means


def _single_method(cb: Attributions, method: str) -> Callable[..., torch.Tensor]:
    """``fn(model, inputs, target, layer=None)`` for eMPRT: the maps of one method, as the callback makes them
    (its Grad-CAM / embedding layer by name, which the randomised copy shares)."""
    def one(model: Any, inputs: torch.Tensor, target: Any) -> torch.Tensor:
        maps = cb._attribute(model, inputs, target, [method])
        if method not in maps:
            raise RuntimeError(f"Attributions: {method} gave no maps on the randomised copy of the model.")
        return maps[method]

    def explain(model: Any, inputs: torch.Tensor, target: Any, layer: str | None = None) -> torch.Tensor:
        # large inputs in chunks within the memory budget; a target that cannot be cut: in one piece
        n = int(inputs.shape[0])
        parts = chunk_slices(n, explanation_rows(model, inputs[:1].to(module_device(model, inputs.device))))
        cuts = [chunk_target(target, n, part) for part in parts]
        if len(parts) == 1 or not all(ok for ok, _ in cuts):
            return one(model, inputs, target)
        return torch.cat([one(model, inputs[part], cut) for part, (_, cut) in zip(parts, cuts)])
    return explain
