"""The classification path of :class:`~lightning_introspect.callbacks.attributions.Attributions`: one run over
the fixed samples, each explained for its target and for every listed class.

The callback decides when and on which samples; this helper explains every target in as few passes as
possible (:func:`~lightning_introspect.methods.attribution_runs.attribute_targets`), logs the main grid and
the per-class grids (those with NaN / Inf left out and noted), and the run's faithfulness and eMPRT,
keeping the results on the callback (``maps``, ``class_maps``, ``nonfinite``, ``history``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from lightning_introspect.callbacks.attribution_scores import MAX_BATCH, log_emprt, log_faithfulness
from lightning_introspect.loggers.adapter import IntrospectionWriter
from lightning_introspect.methods.attribution_runs import (
    attribute_targets,
    class_probabilities,
    explained_classes,
    nonfinite_grids,
    skipped_grids,
)
from lightning_introspect.methods.chunks import explanation_rows
from lightning_introspect.methods.targets import target_indices
from lightning_introspect.render.attributions import attribution_captions

if TYPE_CHECKING:
    from lightning_introspect._lightning import pl
    from lightning_introspect.callbacks.attributions import Attributions

MAX_CLASSES = 32  # targets="all": the classes explained at most

__all__ = ["MAX_CLASSES", "log_classes"]


def log_classes(
    cb: Attributions, trainer: pl.Trainer, writer: IntrospectionWriter, pl_module: pl.LightningModule, x: torch.Tensor,
    y: torch.Tensor | None, out: torch.Tensor, methods: list[str], epoch: int, start: float,
) -> None:
    """Explain each sample for its target (``"pred"`` / ``"true"``) and for each listed class, log the grids."""
    step, device = int(trainer.global_step), pl_module.device
    probs = class_probabilities(out)
    predicted = explained = target_indices(out, "pred").cpu()
    labels = y.long().cpu() if (y is not None and y.ndim == 1 and not y.is_floating_point()) else None
    if cb.targets == "true":
        if labels is not None and labels.numel() == x.shape[0]:
            explained = labels
        else:
            cb.warn_once("true", "Attributions: targets='true' needs one class id per sample; explaining the predictions instead.")
    if cb.targets == "all" and out.shape[1] > MAX_CLASSES:
        cb.warn_once("all", f"Attributions: targets='all' logs the first {MAX_CLASSES} of {out.shape[1]} classes.")
    classes = explained_classes(cb.targets, int(out.shape[1]), MAX_CLASSES)
    # the main target, then each class: every target in as few passes as possible
    n = x.shape[0]
    targets = [explained] + [torch.full((n,), c, dtype=torch.long) for c in classes]
    rows = min(MAX_BATCH, explanation_rows(pl_module, x[:1].to(device)))  # large inputs: chunks within the memory budget
    flat = attribute_targets(lambda xs, t: cb._attribute(pl_module, xs, t.to(device), methods), x, targets, max_batch=rows)
    methods = [m for m in methods if m in flat]
    split = {m: flat[m].split(n) for m in methods}
    confidence = probs.gather(1, explained.to(probs.device).view(-1, 1)).squeeze(1).cpu()
    captions = attribution_captions(predicted, explained, confidence, labels, cb.class_names)
    # a class grid's tiles say, like the main grid's, what each sample is and how likely the explained class is
    class_captions = {c: attribution_captions(predicted, torch.full((n,), c), probs[:, c].cpu(), labels, cb.class_names) for c in classes}
    cb.maps = {m: split[m][0] for m in methods}
    cb.class_maps = {m: {c: split[m][j + 1] for j, c in enumerate(classes)} for m in methods} if classes else {}
    cb.nonfinite = broken = nonfinite_grids(probs, flat, [cb._class_name(c) for c in classes])
    skip = set(skipped_grids(broken, list(cb.maps)))
    for m in methods:
        if m not in skip:
            cb._write(writer, cb.tag(m), x, cb.maps[m], m, step, captions=captions, title=f"{m} (step {step})", classes=explained)
        for c, v in cb.class_maps.get(m, {}).items():
            if f"{m}/class_{cb._class_name(c)}" not in skip:
                cb._write(writer, cb.tag(m, f"class_{cb._class_name(c)}"), x, v, m, step, captions=class_captions[c],
                          title=f"{m}: class {cb._class_name(c)} (step {step})")
    if broken:
        cb._report_nonfinite(trainer, broken, n)
    finite = {m: v for m, v in cb.maps.items() if m not in skip}
    faithful = log_faithfulness(cb, trainer, writer, pl_module, x, finite, explained, step)
    randomised = log_emprt(cb, writer, pl_module, x, finite, explained.to(device), step)
    cb.history.append(
        {
            "step": step,
            "epoch": epoch,
            "explained": explained.tolist(),
            "predicted": predicted.tolist(),
            "confidence": [round(float(c), 6) for c in confidence],
            "faithfulness": faithful,
            "emprt": randomised,
            "seconds": time.perf_counter() - start,
        }
    )
