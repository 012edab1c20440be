"""``Misclassifications``: the most confidently wrong validation examples (classification) or the images of
lowest mean IoU (segmentation), and why they go wrong.

Looking at errors is the fastest way to find out what a model has not learned; this callback shows them
and puts numbers on the usual suspects (blur, noise, lighting, colour filters). The gathering and the
numbers are :mod:`lightning_introspect.methods.review`, :mod:`~lightning_introspect.methods.segmentation_review`
and :mod:`~lightning_introspect.methods.image_stats`, the galleries, tables and figures
:mod:`lightning_introspect.render.review` and :mod:`~lightning_introspect.render.segmentation_review`; the
segmentation path is orchestrated by :mod:`lightning_introspect.callbacks.segmentation_review`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from typing_extensions import override

from lightning_introspect._lightning import pl
from lightning_introspect._torch.guards import introspection_mode, module_device
from lightning_introspect.callbacks.base import (
    IntrospectionCallback,
    IntrospectionInputError,
    Option,
    check_callable,
    check_choice,
    check_positive_int,
    split_batch,
)
from lightning_introspect.callbacks.budget import best_of
from lightning_introspect.callbacks.checks import check_int
from lightning_introspect.callbacks.outputs import (
    LogitsSource,
    example_logits,
    extract_logits,
    extract_targets,
    logits_only,
    validation_batches,
)
from lightning_introspect.callbacks.progress import IntrospectionProgress
from lightning_introspect.callbacks.segmentation_review import SegmentationReview
from lightning_introspect.methods.image_stats import (
    PERTURBATIONS,
    STATISTICS,
    is_image_batch,
    normalize,
    perturbation_accuracy,
    unnormalize,
)
from lightning_introspect.methods.review import ReviewBuffer, class_probabilities
from lightning_introspect.methods.task import TASK_KINDS, resolve_task
from lightning_introspect.methods.token_attribution import gradient_x_embedding
from lightning_introspect.render.review import (
    per_class_gallery,
    perturbation_figure,
    perturbation_markdown,
    review_summary_lines,
    statistics_figure,
    statistics_markdown,
    wrong_gallery,
    wrong_markdown,
    wrong_sentences_markdown,
)
from lightning_introspect.render.segmentation_review import segmentation_summary_lines


def _check_floats(values: Any, argument: str, *, low: float = 0.0, high: float = math.inf) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"Expected `{argument}` to be a list of numbers, but got {values!r}.") from err
    for v in out:
        if not low <= v <= high or math.isnan(v):
            raise ValueError(f"Expected every entry of `{argument}` to be in [{low}, {high}], but got {v!r}.")
    return out


MAX_TOKENS = 128  # text inputs: the tokens of a wrong sample kept for its row in `top_wrong_text`


def _subset(values: Sequence[float], k: int | None) -> list[float]:
    """``k`` of the strengths ``values`` spread over their range (``None``: all; 1: the middle one)."""
    values = sorted(values)
    if k is None or k >= len(values):
        return list(values)
    if k <= 0:
        return []
    if k == 1:
        return [values[len(values) // 2]]
    return [values[round(i * (len(values) - 1) / (k - 1))] for i in range(k)]


def _normalization(value: Any, argument: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, (int, float)) else tuple(value)
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Expected `{argument}` to be a number, a list of numbers or None, but got {value!r}.") from err


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
    ``{kind: {"strengths", "accuracy", "per_class"}}``; ``wrong_images`` holds the top-K inputs. A
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
        check_choice(task, "task", TASK_KINDS)
        check_positive_int(top_k, "top_k")
        check_positive_int(num_bins, "num_bins")
        check_positive_int(boundary_width, "boundary_width")
        check_int(ignore_index, "ignore_index")
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 0:
            raise ValueError(f"Expected `per_class` to be a non-negative int, but got {per_class!r}.")
        statistics = [statistics] if isinstance(statistics, str) else list(statistics)
        bad = [s for s in statistics if s not in STATISTICS]
        if bad:
            raise ValueError(f"Expected `statistics` to be among {', '.join(map(repr, STATISTICS))}, but got {bad}.")
        perturbations = [perturbations] if isinstance(perturbations, str) else list(perturbations)
        bad = [p for p in perturbations if p not in PERTURBATIONS]
        if bad:
            raise ValueError(f"Expected `perturbations` to be among {', '.join(map(repr, PERTURBATIONS))}, but got {bad}.")
        check_callable(output_transform, "output_transform")
        check_callable(target_transform, "target_transform")
        check_callable(decode, "decode")
        self.decode = decode
        self.task = task
        self.top_k = top_k
        self.per_class = per_class
        self.ignore_index = ignore_index
        self.boundary_width = boundary_width
        self.statistics = statistics
        self.num_bins = num_bins
        self.perturbations = perturbations
        self.strengths = {
            "blur": _check_floats(blur_sigmas, "blur_sigmas"),
            "noise": _check_floats(noise_stds, "noise_stds"),
            "color": _check_floats(color_strengths, "color_strengths", high=1.0),
        }
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.output_transform = output_transform
        self.target_transform = target_transform
        self.mean = _normalization(mean, "mean")
        self.std = _normalization(std, "std")
        if (self.mean is None) != (self.std is None):
            raise ValueError("Expected `mean` and `std` to be given together (or neither), but got only one.")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"Expected every entry of `std` to be positive, but got {list(self.std)}.")
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
        self._buffer = ReviewBuffer(top_k=self.top_k, per_class=self.per_class, statistics=self.statistics)
        self._segmentation = SegmentationReview(self)
        self._images = True  # the inputs are images: gallery, statistics and perturbation test apply

    def _class_labels(self, n: int) -> list[str]:
        if self.class_names is not None:
            if len(self.class_names) != n:
                raise IntrospectionInputError(
                    f"Expected `class_names` to have one entry per class ({n} from the logits' width), "
                    f"but got {len(self.class_names)}."
                )
            return list(self.class_names)
        return [str(i) for i in range(n)]

    @staticmethod
    def _probabilities(logits: torch.Tensor) -> torch.Tensor:
        if logits.ndim not in (1, 2):
            raise IntrospectionInputError(
                f"Misclassifications expects classification logits of shape (N, C), but got {tuple(logits.shape)}; "
                "use `output_transform`."
            )
        return class_probabilities(logits)

    # ------------------------------------------------------------------------------ collect
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

    # ------------------------------------------------------------------------------- sizes (budget)
    def _size_review(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fix this review's sizes: as configured, or the budget's choice (see the class docstring)."""
        self.run_sizes = {"num_samples": self.num_samples, "strengths": "all", "figures": self.figures}
        if self.budget is None:
            return
        option = self.sized(trainer, self._review_options(trainer, pl_module))
        if option is not None:  # the smallest option (tables only) costs nothing and always fits
            self.run_sizes = dict(option.sizes)

    def _review_options(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Option]:
        given = set(self._given)
        per_sample = self._seconds_per_sample(trainer, pl_module) if self._images and self.perturbations else 0.0
        figure = self.unit_costs.get("figure", 0.25)
        most = max((len(self.strengths[kind]) for kind in self.perturbations), default=0)

        def option(n: int, k: int | None, figures: bool) -> Option:
            passes = sum(len(_subset(self.strengths[kind], k)) for kind in self.perturbations) + 1 if k != 0 and most else 0
            seconds = per_sample * n * passes + figure * figures * (1 + bool(passes))
            return Option({"num_samples": n, "strengths": "all" if k is None else k, "figures": figures}, seconds)

        n, k, figures = self.num_samples, None, self.figures
        options = [option(n, k, figures)]
        if "num_samples" not in given and n > 64 and most:
            n = max(64, n // 2)
            options.append(option(n, k, figures))
        if not given & {"perturbations", "blur_sigmas", "noise_stds", "color_strengths"} and most > 1:
            n, k = (n if "num_samples" in given else min(n, 64)), 1
            options.append(option(n, k, figures))
        if "perturbations" not in given and most:
            k = 0
            options.append(option(n, k, figures))
        if "figures" not in given and figures:
            options.append(option(n, k, False))
        return options

    def _seconds_per_sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Seconds of one forward per image: measured in earlier perturbation tests, else by a probe batch
        (the best of three: the first call of a model pays one-off set-up costs)."""
        if not self.unit_costs.known("forward_sample"):
            x, _ = self.fixed_samples(trainer)
            probe = x[: min(128, int(x.shape[0]))].to(module_device(pl_module))
            with introspection_mode(pl_module, grad=False):
                self.unit_costs.observe("forward_sample", best_of(3, lambda: pl_module(probe)), int(probe.shape[0]))
        return self.unit_costs.get("forward_sample", 0.0)

    @property
    def run_figures(self) -> bool:
        """Whether this review draws its figures."""
        return bool(getattr(self, "run_sizes", {}).get("figures", self.figures))

    def run_strengths(self) -> dict[str, list[float]]:
        """The perturbation strengths of this review, per kind."""
        k = getattr(self, "run_sizes", {}).get("strengths", "all")
        return {kind: _subset(self.strengths[kind], None if k == "all" else k) for kind in self.perturbations}

    def run_subset(self, x: torch.Tensor, y: Any) -> tuple[torch.Tensor, Any]:
        """The first ``num_samples`` of this review of the fixed subset (a prefix: results compare across sizes)."""
        n = int(getattr(self, "run_sizes", {}).get("num_samples", self.num_samples))
        return x[:n], (None if y is None else y[:n])

    @contextmanager
    def timed_perturbations(self, trainer: pl.Trainer, passes: int, n: int, calls: int) -> Iterator[IntrospectionProgress]:
        """Time a perturbation test of ``passes`` passes over ``n`` images (``calls`` model calls in all, for
        the progress bar): its unit cost, and the budget."""
        start = time.perf_counter()
        with IntrospectionProgress(trainer, "perturbation test", total=calls) as bar:
            yield bar
        elapsed = time.perf_counter() - start
        self.unit_costs.observe("forward_sample", elapsed, passes * n)
        self.charge(elapsed)

    def _begin(self, pl_module: pl.LightningModule) -> None:
        self._reset_epoch()
        self._source.attach(pl_module)
        self._collecting = True

    def _collect(self, outputs: Any, batch: Any, pl_module: pl.LightningModule) -> None:
        logits = self.batch_logits(self._source, outputs, batch, pl_module)
        self._collect_rows(logits, batch)

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
            self._segmentation.add(logits, target, images=lambda: self._batch_images(batch))
            return
        self._buffer.add(self._probabilities(logits), target.flatten(), images=lambda: self._batch_images(batch),
                         tokens=lambda: self._batch_tokens(batch))

    def _batch_tokens(self, batch: Any) -> torch.Tensor | None:
        """Text inputs' token ids ``(N, MAX_TOKENS)`` (padded with -1, longer texts cut), or ``None``."""
        try:
            x = split_batch(batch)[0]
        except ValueError:
            return None
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.dtype.is_floating_point or x.dtype == torch.bool:
            return None
        ids = x[:, :MAX_TOKENS].detach().long().cpu()
        return torch.nn.functional.pad(ids, (0, MAX_TOKENS - ids.shape[1]), value=-1)

    def _wrong_token_scores(self, pl_module: pl.LightningModule, rows: list[list[int]], preds: list[int]) -> list[torch.Tensor | None] | None:
        """Gradient x embedding of each wrong sentence for its predicted class (one call per sentence length,
        at the output of the embedding layer; :func:`~lightning_introspect.methods.token_attribution.gradient_x_embedding`),
        or ``None`` when the model cannot be explained that way (warned once, the table keeps its text)."""
        out: list[torch.Tensor | None] = [None] * len(rows)
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(rows):
            if ids and len(ids) < MAX_TOKENS:  # a text cut at MAX_TOKENS is not the sentence the model saw
                by_length.setdefault(len(ids), []).append(i)
        try:
            with logits_only(pl_module, self.output_transform):
                for length, members in by_length.items():
                    sentences = torch.tensor([rows[i] for i in members], dtype=torch.long)
                    target = torch.tensor([preds[i] for i in members], dtype=torch.long)
                    scores = gradient_x_embedding(pl_module, sentences, target)
                    for j, i in enumerate(members):
                        out[i] = scores[j, :length].cpu()
        except (ValueError, RuntimeError, IndexError) as err:
            if self.on_error == "raise":
                raise
            self.warn_once("token-scores", f"Misclassifications: the token scores of the wrong texts are left out: {err}")
            return None
        return out

    def _token_strings(self, ids: list[int]) -> list[str]:
        """One string per token: ``decode``'s list when it returns one item per id, else the ids."""
        if self.decode is not None:
            got = self.decode(ids)
            if not isinstance(got, str) and isinstance(got, Sequence) and len(got) == len(ids):
                return [str(t) for t in got]
        return [str(i) for i in ids]

    def sample_text(self, ids: Sequence[int]) -> str:
        """One text sample as shown: ``decode`` of its token ids (padding marks removed), else the ids."""
        ids = [int(i) for i in ids if int(i) >= 0]
        if self.decode is None:
            return " ".join(map(str, ids))
        text = self.decode(ids)
        return text if isinstance(text, str) else " ".join(map(str, text))

    def _batch_images(self, batch: Any) -> torch.Tensor | None:
        """The batch's inputs un-normalised, or ``None`` (once they are found not to be images: warned once)."""
        if not self._images:
            return None
        try:
            x = split_batch(batch)[0]
        except ValueError:  # a batch structure we cannot read inputs from: treat as non-image
            x = None
        if not is_image_batch(x):
            self._images = False
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            kept = ("the gallery's image column, image statistics and perturbation test are skipped (the worst-image and "
                    "boundary tables remain)" if self.resolved_task == "segmentation" else
                    "gallery, image statistics and perturbation test are skipped (error rates per class remain)")
            self.warn_once(
                "non-image",
                f"Misclassifications: the inputs ({shape}) are not images (N, C, H, W) with 1 or 3 channels; the {kept}.",
            )
            return None
        return unnormalize(x, self.mean, self.std)

    # ------------------------------------------------------------------------------ analyse + log
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int | None = None) -> None:
        self._stop()
        self._last_step = int(trainer.global_step)  # reviewed at this step (also when nothing could be logged)
        self._size_review(trainer, pl_module)
        if self.resolved_task == "segmentation":
            step, epoch = int(trainer.global_step), int(trainer.current_epoch if epoch is None else epoch)
            seg_report = self._segmentation.finish(trainer, pl_module, step, epoch)
            if seg_report is not None:
                self.report = seg_report
                self.history.append(seg_report)
                self._reset_epoch()
            return
        buffer = self._buffer
        if buffer.nonfinite:
            self._report_nonfinite(trainer, buffer.nonfinite, buffer.seen)
        if buffer.empty:
            return
        step, epoch = int(trainer.global_step), int(trainer.current_epoch if epoch is None else epoch)
        writer = self.writer(trainer)
        n_classes = int(buffer.num_classes or 0)
        names = self._class_labels(n_classes)
        report: dict[str, Any] = {"epoch": epoch, "step": step, **buffer.errors(), "wrong": buffer.wrong_rows(),
                                  "bins": {}, "perturbations": {}, "nonfinite": buffer.nonfinite}
        error_rate = report["error_rate"]
        scalars = {self.tag("error_rate", "overall"): error_rate}
        scalars.update({self.tag("error_rate", "class", n.replace("/", "_")): v
                        for n, v in zip(names, report["per_class_error"]) if v is not None})
        writer.text(self.tag("top_wrong"), wrong_markdown(report["wrong"], names, error_rate, report["num_samples"]), step)
        tokens = buffer.top["tokens"] if buffer.top is not None else None
        if tokens is not None:  # text inputs: the confidently wrong texts themselves, with their token scores
            report["wrong_texts"] = texts = [self.sample_text(row.tolist()) for row in tokens]
            rows = [[int(i) for i in row.tolist() if int(i) >= 0] for row in tokens]
            scores = self._wrong_token_scores(pl_module, rows, [int(r["pred"]) for r in report["wrong"]])
            report["wrong_token_scores"] = [None if v is None else v.tolist() for v in scores] if scores is not None else None
            table = wrong_sentences_markdown(
                report["wrong"], texts, names, tokens=[self._token_strings(ids) for ids in rows] if scores is not None else None, scores=scores,
            )
            writer.text(self.tag("top_wrong_text"), table, step)
        top, shown_raw = buffer.top, self.mean is not None
        self.wrong_images = top["image"] if top is not None else None
        if self._images and top is not None and top["image"] is not None and top["image"].shape[0]:
            writer.image(self.tag("gallery"), wrong_gallery(top, names, unnormalized=shown_raw), step)
            if self.per_class and buffer.top_per_class:
                gallery = per_class_gallery(buffer.top_per_class, names, self.per_class, unnormalized=shown_raw)
                writer.image(self.tag("gallery_per_class"), gallery, step)
        if self._images and buffer.stats:
            report["bins"] = buffer.bins(self.num_bins)
            for stat, binned in report["bins"].items():
                scalars.update({self.tag("error_rate", stat, f"q{i + 1}"): r for i, r in enumerate(binned["rate"]) if r is not None})
            writer.text(self.tag("statistics"), statistics_markdown(report["bins"], error_rate), step)
            if self.run_figures:
                self.figure(trainer, self.tag("statistics_figure"), lambda: statistics_figure(report["bins"], error_rate), step)
        if self._images and self.perturbations:
            results = self._perturbation_test(trainer, pl_module, n_classes)
            if results:
                report["perturbations"] = results
                for kind, res in results.items():
                    scalars.update({self.tag("perturbation", kind, f"{s:g}"): acc
                                    for s, acc in zip(res["strengths"][1:], res["accuracy"][1:])})
                writer.text(self.tag("perturbations"), perturbation_markdown(results, names), step)
                if self.run_figures:
                    self.figure(trainer, self.tag("perturbations_figure"), lambda: perturbation_figure(results, names), step)
        writer.scalars(scalars, step)
        self.report = report
        self.history.append(report)
        self._reset_epoch()

    def perturbation_inputs(self, trainer: pl.Trainer, labels: str = "labels") -> tuple[torch.Tensor, Any] | None:
        """This review's share of the fixed subset for the perturbation test, or ``None`` (said once) when
        there is nothing to perturb: no strengths left, no ``labels`` (or masks), or not images."""
        if not any(self.run_strengths().values()):
            return None
        x, y = self.run_subset(*self.fixed_samples(trainer))
        if y is None or not is_image_batch(x):
            self.warn_once("perturb-no-labels", f"Misclassifications: the fixed samples have no {labels} or are not images; "
                           "the perturbation test is skipped.")
            return None
        return x, y

    def _perturbation_test(self, trainer: pl.Trainer, pl_module: pl.LightningModule, n_classes: int) -> dict[str, Any]:
        inputs = self.perturbation_inputs(trainer)
        if inputs is None:
            return {}
        (x, y), strengths = inputs, self.run_strengths()
        device = module_device(pl_module)
        raw = unnormalize(x, self.mean, self.std)
        nonfinite: list[int] = []  # samples with NaN / Inf probabilities, per call of `predict`

        progress: list[IntrospectionProgress] = []

        def predict(inputs: torch.Tensor) -> torch.Tensor:
            for bar in progress:
                bar.update()
            logits = extract_logits(pl_module(normalize(inputs, self.mean, self.std).to(device)), self.output_transform)
            if logits is None:
                raise IntrospectionInputError("Misclassifications: the model's forward output holds no logits; pass `output_transform`.")
            probs = self._probabilities(logits)
            if not bool(torch.isfinite(probs).all()):
                nonfinite.append(int((~torch.isfinite(probs).all(dim=1)).sum()))
            return probs

        passes = 1 + sum(len(v) for v in strengths.values())
        with introspection_mode(pl_module, grad=False), self.timed_perturbations(trainer, passes, int(x.shape[0]), passes) as bar:
            progress.append(bar)
            results = perturbation_accuracy(
                predict, raw, y, num_classes=n_classes, strengths=strengths, seed=self.seed, noise_scale=float(raw.std()) or 1.0
            )
        if nonfinite:  # argmax over NaN is arbitrary: such accuracies would be silently wrong numbers
            self._report_nonfinite_perturbation(trainer, max(nonfinite), int(x.shape[0]))
            return {}
        return {kind: {"strengths": r.strengths, "accuracy": r.accuracy, "per_class": r.per_class} for kind, r in results.items()}

    # ------------------------------------------------------------------------- non-finite values
    def _report_nonfinite(
        self, trainer: pl.Trainer, k: int, total: int, *, outputs: str = "probabilities", samples: str = "samples"
    ) -> None:
        """Warn once, and note at this step, that validation samples with NaN / Inf outputs were left out."""
        what = f"the model's outputs ({outputs}) are non-finite (NaN / Inf) for {k} of {total} validation {samples}"
        if k >= total:
            action = ("Nothing of this review is logged (no gallery, error rates, statistics or perturbation test, "
                      "no report)")
        else:
            action = f"Those {samples} are left out of the review (error rates, gallery, statistics; `report['nonfinite']`)"
        self.note_nonfinite(trainer, "nonfinite", what, action, "reviews normally again once the outputs are finite")

    def _report_nonfinite_perturbation(
        self, trainer: pl.Trainer, k: int, total: int, *, outputs: str = "probabilities", samples: str = "samples",
        results: str = "accuracies",
    ) -> None:
        """Warn once, and note at this step, that the perturbation test's results were dropped for NaN / Inf outputs."""
        what = (f"the model's outputs ({outputs}) in the perturbation test are non-finite (NaN / Inf) for up to "
                f"{k} of its {total} fixed {samples}")
        self.note_nonfinite(trainer, "nonfinite-perturbation", what, f"The perturbation test's {results} are not logged at this step")

    def summary_lines(self) -> list[str]:
        """The latest review: error rate (segmentation: mean IoU), where errors concentrate, the perturbation results."""
        if self.report is not None and self.report.get("task") == "segmentation":
            return segmentation_summary_lines(self.report)
        return review_summary_lines(self.report)
