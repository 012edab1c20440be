"""What :class:`~lightning_introspect.callbacks.misclassifications.Misclassifications` logs at the end of a
reviewed classification epoch: the report of its :class:`~lightning_introspect.methods.review.ReviewBuffer`
(error rates, the confidently wrong rows, the statistic bins, the perturbation test) and its tags, drawn by
:mod:`lightning_introspect.render.review`; and the notes when outputs were non-finite. The segmentation
report is :mod:`lightning_introspect.callbacks.segmentation_review`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_introspect.callbacks.review_images import perturbation_test
from lightning_introspect.callbacks.review_text import log_wrong_texts
from lightning_introspect.render.review import (
    per_class_gallery,
    perturbation_chart,
    perturbation_markdown,
    statistics_chart,
    statistics_markdown,
    wrong_gallery,
    wrong_markdown,
)

if TYPE_CHECKING:
    from lightning_introspect._lightning import pl
    from lightning_introspect.callbacks.misclassifications import Misclassifications
    from lightning_introspect.methods.review import ReviewBuffer

__all__ = ["classification_report", "note_nonfinite_perturbation", "note_nonfinite_samples"]


def classification_report(
    cb: Misclassifications, trainer: pl.Trainer, pl_module: pl.LightningModule, buffer: ReviewBuffer, step: int, epoch: int
) -> dict[str, Any] | None:
    """Log the review of the epoch's batches at ``step`` (and keep the top-K inputs in ``cb.wrong_images``);
    the report, or ``None`` when no sample could be reviewed (every one non-finite)."""
    if buffer.nonfinite:
        cb._report_nonfinite(trainer, buffer.nonfinite, buffer.seen)
    if buffer.empty:
        return None
    writer = cb.writer(trainer)
    n_classes = int(buffer.num_classes or 0)
    names = cb._class_labels(n_classes)
    report: dict[str, Any] = {"epoch": epoch, "step": step, **buffer.errors(), "wrong": buffer.wrong_rows(),
                              "bins": {}, "perturbations": {}, "nonfinite": buffer.nonfinite}
    error_rate = report["error_rate"]
    scalars = {cb.tag("error_rate", "overall"): error_rate}
    scalars.update({cb.tag("error_rate", "class", n.replace("/", "_")): v
                    for n, v in zip(names, report["per_class_error"]) if v is not None})
    writer.text(cb.tag("top_wrong"), wrong_markdown(report["wrong"], names, error_rate, report["num_samples"]), step)
    tokens = buffer.top["tokens"] if buffer.top is not None else None
    if tokens is not None:  # text inputs: the confidently wrong texts themselves, with their token scores
        log_wrong_texts(cb, writer, pl_module, report, tokens, names, step)
    top, shown_raw = buffer.top, cb.mean is not None
    cb.wrong_images = top["image"] if top is not None else None
    if cb._images and top is not None and top["image"] is not None and top["image"].shape[0]:
        writer.image(cb.tag("gallery"), wrong_gallery(top, names, unnormalized=shown_raw), step)
        if cb.per_class and buffer.top_per_class:
            gallery = per_class_gallery(buffer.top_per_class, names, cb.per_class, unnormalized=shown_raw)
            writer.image(cb.tag("gallery_per_class"), gallery, step)
    if cb._images and buffer.stats:
        report["bins"] = buffer.bins(cb.num_bins)
        for stat, binned in report["bins"].items():
            scalars.update({cb.tag("error_rate", stat, f"q{i + 1}"): r for i, r in enumerate(binned["rate"]) if r is not None})
        writer.text(cb.tag("statistics"), statistics_markdown(report["bins"], error_rate), step)
        if cb.run_figures:
            cb.figure(trainer, cb.tag("statistics_figure"), lambda: statistics_chart(report["bins"], error_rate), step)
    if cb._images and cb.perturbations:
        results = perturbation_test(cb, trainer, pl_module, n_classes)
        if results:
            report["perturbations"] = results
            for kind, res in results.items():
                scalars.update({cb.tag("perturbation", kind, f"{s:g}"): acc
                                for s, acc in zip(res["strengths"][1:], res["accuracy"][1:])})
            writer.text(cb.tag("perturbations"), perturbation_markdown(results, names), step)
            if cb.run_figures:
                cb.figure(trainer, cb.tag("perturbations_figure"), lambda: perturbation_chart(results, names), step)
    writer.scalars(scalars, step)
    return report


def note_nonfinite_samples(
    cb: Misclassifications, trainer: pl.Trainer, k: int, total: int, *, outputs: str = "probabilities",
    samples: str = "samples",
) -> None:
    """Warn once, and note at this step, that validation samples with NaN / Inf outputs were left out."""
    what = f"the model's outputs ({outputs}) are non-finite (NaN / Inf) for {k} of {total} validation {samples}"
    if k >= total:
        action = ("Nothing of this review is logged (no gallery, error rates, statistics or perturbation test, "
                  "no report)")
    else:
        action = f"Those {samples} are left out of the review (error rates, gallery, statistics; `report['nonfinite']`)"
    cb.note_nonfinite(trainer, "nonfinite", what, action, "reviews normally again once the outputs are finite")


def note_nonfinite_perturbation(
    cb: Misclassifications, trainer: pl.Trainer, k: int, total: int, *, outputs: str = "probabilities",
    samples: str = "samples", results: str = "accuracies",
) -> None:
    """Warn once, and note at this step, that the perturbation test's results were dropped for NaN / Inf outputs."""
    what = (f"the model's outputs ({outputs}) in the perturbation test are non-finite (NaN / Inf) for up to "
            f"{k} of its {total} fixed {samples}")
    cb.note_nonfinite(trainer, "nonfinite-perturbation", what, f"The perturbation test's {results} are not logged at this step")
