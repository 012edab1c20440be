"""The segmentation path of :class:`~lightning_introspect.callbacks.attributions.Attributions`: one run over
the class regions of the fixed samples.

The callback decides when and on which samples; this helper picks the regions to explain
(:func:`~lightning_introspect.methods.attribution_runs.region_pairs`, and with true masks the objects to
localise), explains them all in one batched attribution, and logs the outlined grids, the localisation
scores and the run's faithfulness and eMPRT, keeping the results on the callback (``pairs``, ``maps``,
``nonfinite``, ``history``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from lightning_introspect.callbacks.attribution_scores import MAX_BATCH, log_emprt, log_faithfulness
from lightning_introspect.loggers.adapter import IntrospectionWriter
from lightning_introspect.methods.attribution_runs import (
    attribute_pairs,
    concat_pairs,
    localization_pairs,
    localization_scores,
    region_confidence,
    region_pairs,
)
from lightning_introspect.methods.chunks import explanation_rows
from lightning_introspect.methods.targets import dominant_class
from lightning_introspect.methods.task import as_masks
from lightning_introspect.render.attributions import localization_markdown, region_captions

if TYPE_CHECKING:
    from lightning_introspect._lightning import pl
    from lightning_introspect.callbacks.attributions import Attributions

MAX_REGIONS = 4  # the largest class regions explained per sample
MIN_REGION = 0.005  # regions below this fraction of the image (stray pixels) are not explained

__all__ = ["MAX_REGIONS", "MIN_REGION", "log_regions"]


def log_regions(
    cb: Attributions, trainer: pl.Trainer, writer: IntrospectionWriter, pl_module: pl.LightningModule, x: torch.Tensor,
    y: torch.Tensor | None, out: torch.Tensor, methods: list[str], epoch: int, start: float,
) -> None:
    """Explain each sample's class regions (one ``RegionTarget`` per region) for the grids and, when the true
    masks are known, each true object's class for the localisation scores -- all in one batched attribution."""
    step = int(trainer.global_step)
    truth = as_masks(y) if y is not None and y.ndim in (3, 4) and y.shape[-2:] == out.shape[-2:] else None
    source = "true" if cb.targets == "true" else cb.region
    if source == "true" and truth is None:
        cb.warn_once("true", "Attributions: the regions of the true masks need masks with the samples; explaining the predicted regions instead.")
        source = "pred"
    if cb._background is None:  # the class the objects stand on: not explained by default
        cb._background = dominant_class(truth if truth is not None else out.argmax(1).cpu(), ignore_index=cb.ignore_index)
    sizes: dict[str, Any] = {
        "ignore_index": cb.ignore_index, "max_per_sample": MAX_REGIONS, "min_pixels": round(MIN_REGION * out.shape[-2] * out.shape[-1]),
    }
    classes = "present" if cb.targets in ("pred", "true") else cb.targets
    masks = truth if source == "true" and truth is not None else out.argmax(1).cpu()
    cb.pairs = pairs = region_pairs(masks, classes, background=cb._background, source=source, **sizes)
    located = localization_pairs(truth, int(out.shape[1]), background=cb._background, **sizes) if truth is not None else None
    both = pairs if located is None else concat_pairs(pairs, located)
    if not len(both):
        writer.text(cb.tag("warnings"), f"**Step {step}:** no region of the classes {cb.targets} in the {source} masks of the fixed samples; nothing explained.", step)
        return
    rows = min(MAX_BATCH, explanation_rows(pl_module, x[:1].to(pl_module.device)))  # large inputs: chunks within the memory budget
    flat = attribute_pairs(lambda xs, t: cb._attribute(pl_module, xs, t, methods), x.to(pl_module.device), both, max_batch=rows)
    methods = [m for m in methods if m in flat]
    cb.maps, cb.class_maps = {m: flat[m][: len(pairs)] for m in methods}, {}
    cb.nonfinite = broken = ([] if bool(torch.isfinite(out).all()) else ["outputs"]) + [m for m in methods if not bool(torch.isfinite(flat[m]).all())]
    confidence = region_confidence(out, pairs)
    shown = x[pairs.sample]
    captions = region_captions(pairs.class_id, pairs.sample, pairs.masks.flatten(1).sum(1), confidence, source, cb.class_names)
    per_class = sorted(set(pairs.class_id.tolist())) if not isinstance(cb.targets, str) or cb.targets == "all" else []
    scores: dict[str, Any] = {}
    for m in (m for m in methods if "outputs" not in broken and m not in broken):
        if len(pairs):
            title = f"{m}: class regions, outlined (step {step})"
            cb._write(writer, cb.tag(m), shown, cb.maps[m], m, step, captions=captions, title=title, regions=pairs.masks)
        for c in per_class:
            keep = pairs.class_id == c
            cb._write(writer, cb.tag(m, f"class_{cb._class_name(c)}"), shown[keep], cb.maps[m][keep], m, step,
                      captions=None, title="", regions=pairs.masks[keep])
        if located is not None and truth is not None:
            scores[m] = localization_scores(flat[m][len(pairs) :], located, truth)
            scores[m]["skipped"] = int(x.shape[0]) - len(set(located.sample.tolist()))  # samples without an object
    if broken:
        cb._report_nonfinite(trainer, broken, x.shape[0])
    if scores:
        scalars = {cb.tag("localization", m, k): r[k] for m, r in scores.items() for k in ("pointing_game", "energy_in_mask", "chance") if r[k] is not None}
        writer.scalars(scalars, step)
        writer.text(cb.tag("localization"), localization_markdown(scores, step), step)
    ok = {m: cb.maps[m] for m in methods if len(pairs) and "outputs" not in broken and m not in broken}
    faithful = log_faithfulness(cb, trainer, writer, pl_module, shown, ok, pairs.target(), step)  # each region's class over the region
    randomised = log_emprt(cb, writer, pl_module, shown.to(pl_module.device), ok, pairs.target(), step)
    cb.history.append(
        {
            "step": step,
            "epoch": epoch,
            "explained": pairs.class_id.tolist(),
            "samples": pairs.sample.tolist(),
            "region": source,
            "region_pixels": pairs.masks.flatten(1).sum(1).tolist(),
            "confidence": [round(float(c), 6) for c in confidence],
            "localization": scores,
            "faithfulness": faithful,
            "emprt": randomised,
            "seconds": time.perf_counter() - start,
        }
    )
