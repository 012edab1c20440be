"""``Misclassifications``: the most confidently wrong validation examples (classification) or the images of
lowest mean IoU (segmentation), and why they go wrong.

Looking at errors is the fastest way to find out what a model has not learned; this callback shows them
and puts numbers on the usual suspects (blur, noise, lighting, colour filters). The callback decides when
(its schedule, its hooks), what (the validation batches, the fixed subset) and where (TensorBoard); its
arguments are checked by :mod:`~lightning_introspect.callbacks.review_arguments`, the image part (which inputs
are images, the perturbation test, the sizes under a budget) is :mod:`~lightning_introspect.callbacks.review_images`,
text inputs :mod:`~lightning_introspect.callbacks.review_text`, the classification report
:mod:`~lightning_introspect.callbacks.review_report` and the segmentation path
:mod:`~lightning_introspect.callbacks.segmentation_review`. The numbers are :mod:`lightning_introspect.methods.review`,
:mod:`~lightning_introspect.methods.segmentation_review` and :mod:`~lightning_introspect.methods.image_stats`, the
galleries, tables and figures :mod:`lightning_introspect.render.review` and
:mod:`~lightning_introspect.render.segmentation_review`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from typing_extensions import override

from lightning_introspect._lightning import pl
from lightning_introspect._torch.guards import introspection_mode
from lightning_introspect.callbacks.base import IntrospectionCallback, IntrospectionInputError, split_batch
from lightning_introspect.callbacks.outputs import (
    LogitsSource,
    example_logits,
    extract_logits,
    extract_targets,
    validation_batches,
)
from lightning_introspect.callbacks.progress import IntrospectionProgress
from lightning_introspect.callbacks.review_arguments import check_review_arguments, class_labels
from lightning_introspect.callbacks.review_images import (
    batch_images,
    perturbation_inputs,
    review_sizes,
    subset,
    timed_perturbations,
)
from lightning_introspect.callbacks.review_report import (
    classification_report,
    note_nonfinite_perturbation,
    note_nonfinite_samples,
)
from lightning_introspect.callbacks.review_text import MAX_TOKENS, batch_tokens, sample_text
from lightning_introspect.callbacks.segmentation_review import SegmentationReview
from lightning_introspect.methods.image_stats import PERTURBATIONS, STATISTICS
from lightning_introspect.methods.review import ReviewBuffer, class_probabilities
from lightning_introspect.methods.task import resolve_task
from lightning_introspect.render.grid import shown_images
from lightning_introspect.render.review import review_summary_lines
from lightning_introspect.render.segmentation_review import segmentation_summary_lines

__all__ = ["MAX_TOKENS", "Misclassifications"]


class Misclassifications(IntrospectionCallback):
    """The validation set's most confidently wrong examples (or, for segmentation, its images of lowest mean
    IoU), error rates by image statistic, and a perturbation test.

    On each scheduled validation epoch (``every_n_epochs`` / ``at``; always during ``trainer.validate``)
    the callback reads the logits ``validation_step`` returns (``on_validation_batch_end`` outputs, or
    the module's own forward output when the step returns none; see :class:`PerClassMetrics` for the
    extraction rules). The task is read once from the logits and labels (``task="auto"``): per-pixel logits
    ``(N, C, H, W)`` with integer masks ``(N, H, W)`` of the same size are *segmentation*, everything else
    *classification*.

    **Classification.** As the batches pass it keeps per sample the confidence, prediction and label and
    the image statistics of the input (sharpness, noise, brightness, contrast, saturation). Memory stays
    bounded: only the images of the ``top_k`` most confidently wrong examples (and ``per_class`` per
    class) are kept. At the end of the epoch it logs:

    * a captioned grid of the top-K confidently wrong images (true / predicted / confidence), and with
      ``per_class > 0`` one row of wrong examples per true class;
    * the error rate in each quantile bin of each statistic (table, figure, scalars), so "errors
      concentrate on blurry images" is a number;
    * a perturbation test on a fixed validation subset (``num_samples`` items drawn once with the
      callback's seed): per-class accuracy of the current model under Gaussian blur (sigma in pixels),
      Gaussian noise (std as a fraction of the subset's standard deviation, private generator, the same
      noise every time) and a colour / contrast filter (strength in [0, 1]); run in eval mode without
      gradients, the global RNG forked.

    **Segmentation.** Per image it keeps the mean IoU (over the classes present in the image's truth or
    prediction) and the image statistics; the image, true mask and prediction only for the ``top_k`` images
    of lowest mean IoU; and two pixel confusion matrices: at class *boundaries* (pixels within
    ``boundary_width`` pixels of a class change in the true mask) and in class *interiors*. Pixels labelled
    ``ignore_index`` are left out everywhere. At the end of the epoch it logs:

    * a gallery, one row per worst image: image / ground truth / prediction / error map (correct pixels
      light grey; a wrong pixel split between the true class's colour, upper left, and the predicted
      class's colour, lower right), captioned with the index and mean IoU, a colour legend below;
    * per class the pixel error rate at boundaries vs in interiors and the classes it is mistaken for;
    * the mean IoU per image in each quantile bin of each statistic (table, figure, scalars);
    * the perturbation test as above in IoU per class (pixels pooled over the fixed subset, whose labels
      are the masks) and its mean.

    Non-image inputs (anything but ``(N, C, H, W)`` with 1 or 3 channels) skip the gallery (its image column
    for segmentation), statistics and perturbations with one warning; the confident-error table and error
    rates per class (the worst-image and boundary tables) remain.

    Tags written (classification):

    * ``introspect/misclassifications/gallery`` -- image: top-K confidently wrong examples;
    * ``introspect/misclassifications/gallery_per_class`` -- image, one row per true class (``per_class``);
    * ``introspect/misclassifications/top_wrong`` -- markdown: index, true, predicted, confidence;
    * ``introspect/misclassifications/top_wrong_text`` -- markdown, text inputs (token ids): the same rows
      with each text (``decode``d, else its ids) and its tokens coloured by their gradient x embedding score
      for the predicted class (at the output of the embedding layer; ``report["wrong_token_scores"]``);
    * ``introspect/misclassifications/error_rate/overall`` and ``.../error_rate/class/<class>`` -- scalars;
    * ``introspect/misclassifications/error_rate/<statistic>/q<i>`` -- scalar, error rate in quantile bin
      ``i`` (1 = lowest values) of the statistic;
    * ``introspect/misclassifications/statistics`` -- markdown table and ``.../statistics_figure`` -- figure;
    * ``introspect/misclassifications/perturbation/<kind>/<strength>`` -- scalar, accuracy on the subset;
    * ``introspect/misclassifications/perturbations`` -- markdown table (classes x kind@strength) and
      ``.../perturbations_figure`` -- figure (accuracy vs strength, one line per class).

    Tags written (segmentation), under ``introspect/misclassifications/segmentation/``:

    * ``gallery`` -- image: the images of lowest mean IoU with truth, prediction and error map;
    * ``worst`` -- markdown: index, mean IoU; ``miou`` -- scalar, the mean over images of their mean IoU;
    * ``boundary`` -- markdown: per class boundary error, interior error, most confused classes;
    * ``boundary_error/<class>`` and ``interior_error/<class>`` -- scalars, pixel error rates;
    * ``miou_by/<statistic>/q<i>`` -- scalar, mean IoU per image in quantile bin ``i`` of the statistic;
    * ``statistics`` -- markdown table and ``statistics_figure`` -- figure;
    * ``perturbation/<kind>/<strength>`` -- scalar, mean IoU on the subset;
    * ``perturbations`` -- markdown table (classes x kind@strength) and ``perturbations_figure`` -- figure.

    Both tasks:

    * ``introspect/misclassifications/warnings`` -- markdown, only when the model's outputs hold NaN / Inf
      (non-finite weights or inputs): what was left out of the review at that step and why;
    * ``introspect/misclassifications/seconds`` -- own wall time.

    Non-finite values: validation samples (images) whose probabilities (logits) hold NaN / Inf are left
    out of the review (``report["nonfinite"]`` counts them); when every sample is non-finite nothing but
    the note is logged that epoch (no report). When the perturbation test's outputs are non-finite its
    results are not logged. Each case warns once and writes a note to
    ``introspect/misclassifications/warnings`` at each such step; the callback stays on and reviews
    normally again once the outputs are finite.

    Results on the instance: ``resolved_task`` (``task`` with ``"auto"`` resolved), ``report`` (the latest
    run) and ``history`` (every report; kept in the ``state_dict``). A classification report holds
    ``epoch``, ``step``, ``num_samples`` (reviewed), ``nonfinite`` (samples left out for NaN / Inf
    outputs), ``error_rate``, ``per_class_error``, ``wrong`` (top-K rows ``{"index", "label", "pred",
    "confidence"}``), ``wrong_texts`` (text inputs: the texts of those rows), ``bins`` ``{statistic: {"edges", "counts", "errors", "rate"}}``, ``perturbations``
    ``{kind: {"strengths", "accuracy", "per_class"}}``; ``wrong_images`` holds the top-K inputs (un-normalised) as the gallery shows them: images with a side over
    :data:`~lightning_introspect.render.grid.SHOWN_SIDE` pixels shrunk to it once their statistics are measured
    (``wrong`` gives their indices in the validation set). A
    segmentation report holds ``task`` (``"segmentation"``), ``epoch``, ``step``, ``num_samples`` (images
    reviewed), ``nonfinite``, ``unlabelled`` (images without a labelled pixel, left out), ``miou`` (the
    mean over images), ``class_iou`` (per class over every pixel), ``worst`` (rows ``{"index", "miou"}``,
    lowest first), ``boundary`` (``width``, per class ``boundary_error`` / ``interior_error`` /
    ``boundary_pixels`` / ``interior_pixels`` / ``boundary_confused_with`` / ``interior_confused_with``,
    ``overall`` and the top ``confusions`` ``{"true", "pred", "pixels", "share"}`` of each region), ``bins``
    ``{statistic: {"edges", "counts", "miou"}}`` and ``perturbations`` ``{kind: {"strengths", "miou",
    "per_class"}}``; ``worst_samples`` holds the worst images' ``index``, ``miou``, ``image``, ``mask`` and
    ``pred`` tensors.

    Args:
        every_n_epochs: run every n-th validation epoch as well (``None``, the default: only at ``at``
            and the last epoch; a run renders a gallery and two figures and makes ``1 + sum(strengths)``
            forward passes over ``num_samples`` images, so per-epoch runs cost).
        at: fractions of training at which to run; default ``(0.5,)``: half way (and the last epoch).
        task: ``"auto"`` (read from the first logits and labels), ``"classification"`` or
            ``"segmentation"``; an explicit task that contradicts the shapes is refused before training.
        top_k: number of confidently wrong examples (segmentation: images of lowest mean IoU) in the gallery.
        per_class: wrong examples kept per true class for the per-class gallery (0: off; classification).
        ignore_index: a mask label left out of the segmentation review (e.g. 255 for "void"); classification
            labels are not filtered.
        boundary_width: segmentation: a pixel within this many pixels of a class change in the true mask
            counts as boundary.
        statistics: image statistics among ``"sharpness"``, ``"noise"``, ``"brightness"``, ``"contrast"``,
            ``"saturation"`` (3-channel images only).
        num_bins: quantile bins per statistic.
        perturbations: among ``"blur"``, ``"noise"``, ``"color"``; empty: no perturbation test.
        blur_sigmas, noise_stds, color_strengths: strengths of each perturbation.
        num_samples: size of the fixed validation subset of the perturbation test.
        class_names: display names, one per class.
        decode: text inputs (token ids ``(N, T)``): a callable turning one sample's token ids (a list of
            ints, padding included) into its text (a string, or a list of tokens joined by spaces) for
            ``top_wrong_text``; ``None``: the ids themselves. Set it from Python (a config file cannot
            name code).
        output_transform, target_transform: as in :class:`PerClassMetrics`.
        mean, std: the input normalisation (a number or one per channel). When given, images are shown
            and measured un-normalised and perturbations are applied in that space.
        figures: log the statistics and perturbation figures (the tables are always logged).
        enabled, seed, on_error: see :class:`IntrospectionCallback`.

    Under a budget (``introspection_callbacks(config, budget=...)``) each review is sized to its share:
    first half the perturbation subset (not below 64 images), then 64 images at one strength per
    perturbation (the middle one), then no perturbation test, then no figures; arguments given
    explicitly are kept. The choice is in ``budget_choice`` and ``introspect/misclassifications/budget``.

    Limits: under DDP only rank zero's shard of the validation data is reviewed. Errors are not causes: a
    statistic's bins tell where errors concentrate, the perturbation test tells what the model is
    sensitive to.

    Example:
        >>> cb = Misclassifications(top_k=8, perturbations=["blur", "noise"], num_samples=128)
        >>> trainer = Trainer(max_epochs=2, callbacks=[cb])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=dm)  # doctest: +SKIP
        >>> cb.report["perturbations"]["blur"]["accuracy"]  # doctest: +SKIP
        [0.95, 0.93, 0.81, 0.42]
        >>> seg = Misclassifications(ignore_index=255)  # a U-Net: the segmentation review, found by itself
        >>> trainer.fit(unet, datamodule=shapes)  # doctest: +SKIP
        >>> seg.report["worst"][0]  # doctest: +SKIP
        {'index': 17, 'miou': 0.31}
    """

    name = "misclassifications"
    rank_zero_only = True
    sized_runs = True
    draws_samples = True

    def __init__(
        self,
        *,
        every_n_epochs: int | None = None,
        at: Sequence[float] | None = (0.5,),
        task: str = "auto",
        top_k: int = 16,
        per_class: int = 0,
        ignore_index: int | None = None,
        boundary_width: int = 2,
        statistics: Sequence[str] = STATISTICS,
        num_bins: int = 5,
        perturbations: Sequence[str] = PERTURBATIONS,
        blur_sigmas: Sequence[float] = (0.5, 1.0, 2.0),
        noise_stds: Sequence[float] = (0.1, 0.25, 0.5),
        color_strengths: Sequence[float] = (0.1, 0.25, 0.5),
        num_samples: int = 256,
        class_names: Sequence[str] | None = None,
        decode: Callable[[list[int]], Any] | None = None,
        output_transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        figures: bool = True,
        enabled: bool = True,
        seed: int = 0,
        on_error: str = "warn",
    ) -> None:
        super().__init__(
            enabled=enabled, every_n_epochs=every_n_epochs, at=at, num_samples=num_samples, seed=seed, on_error=on_error
        )
        args = check_review_arguments(
            task=task, top_k=top_k, per_class=per_class, ignore_index=ignore_index, boundary_width=boundary_width,
            statistics=statistics, num_bins=num_bins, perturbations=perturbations, blur_sigmas=blur_sigmas,
            noise_stds=noise_stds, color_strengths=color_strengths, class_names=class_names, decode=decode,
            output_transform=output_transform, target_transform=target_transform, mean=mean, std=std,
        )
        self.task, self.top_k, self.per_class, self.class_names = task, top_k, per_class, args.class_names
        self.ignore_index, self.boundary_width = ignore_index, boundary_width  # segmentation
        self.statistics, self.num_bins = args.statistics, num_bins
        self.perturbations, self.strengths = args.perturbations, args.strengths
        self.output_transform, self.target_transform, self.decode = output_transform, target_transform, decode
        self.mean, self.std = args.mean, args.std
        self.figures = bool(figures)
        self._source = LogitsSource(output_transform)
        self._collecting = False
        self.reset()

    # ------------------------------------------------------------------------ Lightning hooks
    @override
    def reset(self) -> None:
        self.report: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self._last_step: int | None = None  # global step of the latest review: the fit-end catch-up compares it
        self.wrong_images: torch.Tensor | None = None
        self.worst_samples: dict[str, torch.Tensor | None] | None = None
        self.resolved_task: str | None = None  # `task` with "auto" resolved from the first logits and labels
        self._reset_epoch()

    @override
    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":  # `trainer.validate()` may get another model: its task is read at its first batch
            self.resolved_task = None

    @override
    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Example samples through the model: the task is resolved (a wrong explicit ``task`` is refused with
        the shapes named), dense outputs without per-pixel masks are skipped, ``class_names`` of the wrong
        length and labels out of range are refused, before training."""
        example = example_logits(self, trainer, pl_module)
        if example is None:
            return
        batch, logits = example
        try:
            target: torch.Tensor | None = extract_targets(batch, self.target_transform)
        except IntrospectionInputError:  # no labels: refused below by the same check as at every batch
            target = None
        self.resolved_task = resolve_task(self.task, logits, target)
        if self.resolved_task == "classification" and logits.ndim > 2:
            labels = "" if target is None else f" with labels {tuple(target.shape)}"
            self.skip(
                f"the model returns dense outputs {tuple(logits.shape)}{labels}, which are not per-pixel masks of the "
                "same size (a segmentation review needs masks (N, H, W)); a classification review ranks whole images "
                "by the confidence of one class prediction, which dense outputs do not have."
            )
            return
        self._collect_rows(logits, batch)  # the same checks as at every batch, on the example samples
        self._reset_epoch()
        if logits.ndim == 2 or self.resolved_task == "segmentation":
            self._class_labels(2 if logits.shape[1] == 1 else int(logits.shape[1]))  # `class_names` of the right length

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active(trainer) and (self.trainer_fn(trainer) == "validate" or self.is_scheduled(trainer)):
            self.run(trainer, self._begin, pl_module, log_seconds=False)  # cheap: reset the buffers, attach the hook

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._collecting:
            self._source.new_batch()  # a forward captured during an earlier batch must not be read for this one

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._collecting and dataloader_idx == 0:
            self.run(trainer, self._collect, outputs, batch, pl_module, log_seconds=False)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._collecting:
            self.run(trainer, self._finish, trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the final model, when the fit ended before its last scheduled epoch (EarlyStopping, max_time, no max_epochs)
        if self.final_run_missed(trainer, self._last_step):
            self.run(trainer, self._review_now, trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop()

    @override
    def on_disable(self) -> None:
        self._stop()

    # ------------------------------------------------------------------------------- state
    @override
    def extra_state(self) -> dict[str, Any]:
        return {"history": self.history}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
        self._last_step = self.history[-1].get("step") if self.history else None
        self.report = self.history[-1] if self.history else None

    def _stop(self) -> None:
        self._collecting = False
        self._source.detach()

    def _reset_epoch(self) -> None:
        self._buffer = ReviewBuffer(top_k=self.top_k, per_class=self.per_class, statistics=self.statistics, shrink=shown_images)
        self._segmentation = SegmentationReview(self)
        self._images = True  # the inputs are images: gallery, statistics and perturbation test apply

    def _class_labels(self, n: int) -> list[str]:
        return class_labels(self.class_names, n)

    @staticmethod
    def _probabilities(logits: torch.Tensor) -> torch.Tensor:
        if logits.ndim not in (1, 2):
            raise IntrospectionInputError(
                f"Misclassifications expects classification logits of shape (N, C), but got {tuple(logits.shape)}; "
                "use `output_transform`."
            )
        return class_probabilities(logits)

    # ------------------------------------------------------------------------------ collect
    def _begin(self, pl_module: pl.LightningModule) -> None:
        self._reset_epoch()
        self._source.attach(pl_module)
        self._collecting = True

    def _collect(self, outputs: Any, batch: Any, pl_module: pl.LightningModule) -> None:
        self._collect_rows(self.batch_logits(self._source, outputs, batch, pl_module), batch)

    def _collect_rows(self, logits: torch.Tensor | None, batch: Any) -> None:
        if logits is None:
            raise IntrospectionInputError(
                "Misclassifications found no logits: return them from `validation_step` (a tensor, or a dict with a "
                "'logits' key), call `self(x)` in it, or pass `output_transform`."
            )
        target = extract_targets(batch, self.target_transform).detach()
        if self.resolved_task is None:  # a `trainer.validate()` without a fit: resolved at its first batch
            self.resolved_task = resolve_task(self.task, logits, target)
        if self.resolved_task == "segmentation":
            self._segmentation.add(logits, target, images=lambda: batch_images(self, batch))
            return
        self._buffer.add(self._probabilities(logits), target.flatten(), images=lambda: batch_images(self, batch),
                         tokens=lambda: batch_tokens(batch))

    def _review_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The review of the model as it is: one own pass (eval mode, no grad) over the validation data."""
        loader = self.val_dataloader(trainer)
        if trainer.limit_val_batches == 0 or getattr(trainer, "val_dataloaders", None) is None or loader is None:
            return
        self._begin(pl_module)
        try:
            with introspection_mode(pl_module, grad=False):
                for batch in validation_batches(trainer, loader):
                    output = pl_module(split_batch(batch)[0])
                    self._collect_rows(extract_logits(output, self.output_transform), batch)
            self._finish(trainer, pl_module, epoch=self.last_epoch(trainer))
        finally:
            self._stop()

    def _batch_tokens(self, batch: Any) -> torch.Tensor | None:
        """Text inputs' token ids ``(N, MAX_TOKENS)`` (padded with -1, longer texts cut), or ``None``."""
        return batch_tokens(batch)

    def sample_text(self, ids: Sequence[int]) -> str:
        """One text sample as shown: ``decode`` of its token ids (padding marks removed), else the ids."""
        return sample_text(self.decode, ids)

    # ------------------------------------------------------------------------------ analyse + log
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int | None = None) -> None:
        self._stop()
        self._last_step = int(trainer.global_step)  # reviewed at this step (also when nothing could be logged)
        self.run_sizes = review_sizes(self, trainer, pl_module)  # as configured, or the budget's choice
        step, epoch = int(trainer.global_step), int(trainer.current_epoch if epoch is None else epoch)
        if self.resolved_task == "segmentation":
            report = self._segmentation.finish(trainer, pl_module, step, epoch)
        else:
            report = classification_report(self, trainer, pl_module, self._buffer, step, epoch)
        if report is not None:
            self.report = report
            self.history.append(report)
            self._reset_epoch()

    @property
    def run_figures(self) -> bool:
        """Whether this review draws its figures."""
        return bool(getattr(self, "run_sizes", {}).get("figures", self.figures))

    def run_strengths(self) -> dict[str, list[float]]:
        """The perturbation strengths of this review, per kind."""
        k = getattr(self, "run_sizes", {}).get("strengths", "all")
        return {kind: subset(self.strengths[kind], None if k == "all" else k) for kind in self.perturbations}

    def run_subset(self, x: torch.Tensor, y: Any) -> tuple[torch.Tensor, Any]:
        """The first ``num_samples`` of this review of the fixed subset (a prefix: results compare across sizes)."""
        n = int(getattr(self, "run_sizes", {}).get("num_samples", self.num_samples))
        return x[:n], (None if y is None else y[:n])

    def perturbation_inputs(self, trainer: pl.Trainer, labels: str = "labels") -> tuple[torch.Tensor, Any] | None:
        """This review's share of the fixed subset for the perturbation test (see ``review_images``)."""
        return perturbation_inputs(self, trainer, labels)

    def timed_perturbations(self, trainer: pl.Trainer, passes: int, n: int, calls: int) -> AbstractContextManager[IntrospectionProgress]:
        """Time a perturbation test (see ``review_images``): its unit cost, and the budget."""
        return timed_perturbations(self, trainer, passes, n, calls)

    def _report_nonfinite(self, trainer: pl.Trainer, k: int, total: int, **words: str) -> None:
        """Warn once, and note at this step, that validation samples with NaN / Inf outputs were left out."""
        note_nonfinite_samples(self, trainer, k, total, **words)

    def _report_nonfinite_perturbation(self, trainer: pl.Trainer, k: int, total: int, **words: str) -> None:
        """Warn once, and note at this step, that the perturbation test's results were dropped for NaN / Inf outputs."""
        note_nonfinite_perturbation(self, trainer, k, total, **words)

    def summary_lines(self) -> list[str]:
        """The latest review: error rate (segmentation: mean IoU), where errors concentrate, the perturbation results."""
        if self.report is not None and self.report.get("task") == "segmentation":
            return segmentation_summary_lines(self.report)
        return review_summary_lines(self.report)
