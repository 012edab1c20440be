"""The segmentation path of :class:`~lightning_introspect.callbacks.misclassifications.Misclassifications`:
what it gathers from each validation batch and what it logs at the end of a reviewed epoch.

The callback decides when (its schedule, its hooks) and keeps the results; this helper only fills a
:class:`~lightning_introspect.methods.segmentation_review.SegmentationReviewBuffer`, runs the perturbation
test and writes the tags under ``introspect/misclassifications/segmentation/``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from lightning_introspect._torch.guards import introspection_mode, module_device
from lightning_introspect.callbacks.outputs import extract_logits
from lightning_introspect.errors import IntrospectionInputError
from lightning_introspect.methods.image_stats import normalize, unnormalize
from lightning_introspect.methods.per_class import check_label_range
from lightning_introspect.methods.segmentation_review import SegmentationReviewBuffer, perturbation_iou
from lightning_introspect.methods.task import as_masks
from lightning_introspect.render.review import perturbation_chart, statistics_chart
from lightning_introspect.render.segmentation_review import (
    boundary_markdown,
    iou_perturbation_markdown,
    miou_statistics_markdown,
    segmentation_gallery,
    worst_markdown,
)

if TYPE_CHECKING:
    from lightning_introspect._lightning import pl
    from lightning_introspect.callbacks.misclassifications import Misclassifications

_CHUNK = 32  # images per forward of the perturbation test: dense outputs and U-Net activations are large


class SegmentationReview:
    """One callback's segmentation review: :meth:`add` per validation batch, :meth:`finish` at the epoch's end.

    Args:
        callback: the :class:`Misclassifications` it works for (options, tags, writer, fixed samples).
    """

    def __init__(self, callback: Misclassifications) -> None:
        self.cb = callback
        self.new_epoch()

    def new_epoch(self) -> None:
        cb = self.cb
        self.buffer = SegmentationReviewBuffer(
            top_k=cb.top_k, boundary_width=cb.boundary_width, ignore_index=cb.ignore_index, statistics=cb.statistics
        )

    def add(self, logits: torch.Tensor, target: torch.Tensor, images: Callable[[], torch.Tensor | None]) -> None:
        self.buffer.add(logits, target, images=images)

    def tag(self, *parts: Any) -> str:
        return self.cb.tag("segmentation", *parts)

    # ------------------------------------------------------------------------------ analyse + log
    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, epoch: int) -> dict[str, Any] | None:
        """Log the review of the epoch's batches at ``step``; the report, or ``None`` when no image could be
        reviewed (every one non-finite or unlabelled)."""
        cb, buffer = self.cb, self.buffer
        if buffer.nonfinite:
            cb._report_nonfinite(trainer, buffer.nonfinite, buffer.seen, outputs="logits", samples="images")
        if buffer.empty:
            return None
        writer = cb.writer(trainer)
        names = cb._class_labels(int(buffer.num_classes or 0))
        report: dict[str, Any] = {
            "task": "segmentation", "epoch": epoch, "step": step, "num_samples": sum(int(m.numel()) for m in buffer.miou),
            "nonfinite": buffer.nonfinite, "unlabelled": buffer.unlabelled, "miou": buffer.mean_miou(),
            "class_iou": buffer.class_iou(), "worst": buffer.worst_rows(), "boundary": buffer.boundary_errors(),
            "bins": {}, "perturbations": {},
        }
        scalars = {self.tag("miou"): report["miou"]}
        boundary = report["boundary"]
        for region in ("boundary", "interior"):
            scalars.update({self.tag(f"{region}_error", n.replace("/", "_")): v
                            for n, v in zip(names, boundary[f"{region}_error"]) if v is not None})
        writer.text(self.tag("worst"), worst_markdown(report["worst"], report["miou"], report["num_samples"]), step)
        writer.text(self.tag("boundary"), boundary_markdown(boundary, names), step)
        worst = buffer.worst
        if worst is not None:
            cb.worst_samples = {"index": worst["index"], "miou": -worst["conf"], "image": worst["image"],
                                "mask": worst["mask"], "pred": worst["pred"]}
            gallery = segmentation_gallery(worst, names, ignore_index=cb.ignore_index, unnormalized=cb.mean is not None)
            writer.image(self.tag("gallery"), gallery, step)
        if cb._images and buffer.stats:
            report["bins"] = buffer.bins(cb.num_bins)
            for stat, binned in report["bins"].items():
                scalars.update({self.tag("miou_by", stat, f"q{i + 1}"): v for i, v in enumerate(binned["miou"]) if v is not None})
            writer.text(self.tag("statistics"), miou_statistics_markdown(report["bins"], report["miou"]), step)
            if cb.run_figures:
                cb.figure(trainer, self.tag("statistics_figure"), lambda: statistics_chart(
                    report["bins"], report["miou"], value="miou", label="mean IoU per image", color="#2ca02c"), step)
        if cb._images and cb.perturbations:
            results = self._perturbation_test(trainer, pl_module, len(names))
            if results:
                report["perturbations"] = results
                for kind, res in results.items():
                    scalars.update({self.tag("perturbation", kind, f"{s:g}"): v
                                    for s, v in zip(res["strengths"][1:], res["miou"][1:]) if v is not None})
                writer.text(self.tag("perturbations"), iou_perturbation_markdown(results, names), step)
                if cb.run_figures:
                    cb.figure(trainer, self.tag("perturbations_figure"), lambda: perturbation_chart(
                        results, names, value="miou", label="IoU (mean: black)"), step)
        writer.scalars(scalars, step)
        return report

    def _perturbation_test(self, trainer: pl.Trainer, pl_module: pl.LightningModule, n_classes: int) -> dict[str, Any]:
        cb = self.cb
        inputs = cb.perturbation_inputs(trainer, labels="masks")
        if inputs is None:
            return {}
        (x, y), strengths = inputs, cb.run_strengths()
        masks = as_masks(y)
        check_label_range(masks, n_classes, cb.ignore_index)
        device = module_device(pl_module)
        raw = unnormalize(x.to(device), cb.mean, cb.std)
        nonfinite: list[int] = []  # images with NaN / Inf logits, per call of `predict` (one chunk of a pass)

        progress: list[Any] = []

        def predict(inputs: torch.Tensor) -> torch.Tensor:
            for bar in progress:
                bar.update()
            logits = extract_logits(pl_module(normalize(inputs, cb.mean, cb.std)), cb.output_transform)
            if logits is None or logits.ndim != 4:
                raise IntrospectionInputError("Misclassifications: the model's forward output holds no per-pixel logits "
                                              "(N, C, H, W); pass `output_transform`.")
            nonfinite.append(int((~torch.isfinite(logits).flatten(1).all(dim=1)).sum()))
            return logits

        passes = 1 + sum(len(v) for v in strengths.values())
        calls = passes * -(-int(x.shape[0]) // _CHUNK)
        with introspection_mode(pl_module, grad=False), cb.timed_perturbations(trainer, passes, int(x.shape[0]), calls) as bar:
            progress.append(bar)
            results = perturbation_iou(predict, raw, masks, num_classes=n_classes, strengths=strengths, seed=cb.seed,
                                       noise_scale=float(raw.std()) or 1.0, ignore_index=cb.ignore_index,
                                       batch_size=_CHUNK)
        if any(nonfinite):  # argmax over NaN is arbitrary: such IoUs would be silently wrong numbers
            chunks = -(-int(x.shape[0]) // _CHUNK)  # calls of `predict` per pass over the subset
            worst = max(sum(nonfinite[i : i + chunks]) for i in range(0, len(nonfinite), chunks))
            cb._report_nonfinite_perturbation(trainer, worst, int(x.shape[0]), outputs="logits", samples="images",
                                               results="IoUs")
            return {}
        return {kind: {"strengths": r.strengths, "miou": r.miou, "per_class": r.per_class} for kind, r in results.items()}
