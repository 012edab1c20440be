"""``Misclassifications``: the most confidently wrong validation examples, and why they go wrong.

Looking at errors is the fastest way to find out what a classifier has not learned; this callback
shows them and puts numbers on the usual suspects (blur, noise, lighting, colour filters).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from typing_extensions import override

from lightning_introspect._lightning import pl
from lightning_introspect._torch.guards import introspection_mode, module_device
from lightning_introspect.callbacks.base import (
    NONFINITE_CAUSE,
    IntrospectionCallback,
    IntrospectionInputError,
    check_callable,
    check_positive_int,
    split_batch,
)
from lightning_introspect.callbacks.outputs import LogitsSource, extract_logits, extract_targets
from lightning_introspect.loggers.adapter import markdown_cell
from lightning_introspect.methods.image_stats import (
    PERTURBATIONS,
    STATISTICS,
    error_rate_by_bin,
    image_statistics,
    perturbation_accuracy,
)
from lightning_introspect.render.charts import bar_polygons
from lightning_introspect.render.figures import set_margins
from lightning_introspect.render.heatmap import to_display

_KIND_LABEL = {"blur": "blur sigma", "noise": "noise std", "color": "colour filter"}


def _check_floats(values: Any, argument: str, *, low: float = 0.0, high: float = math.inf) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"Expected `{argument}` to be a list of numbers, but got {values!r}.") from err
    for v in out:
        if not low <= v <= high or math.isnan(v):
            raise ValueError(f"Expected every entry of `{argument}` to be in [{low}, {high}], but got {v!r}.")
    return out


def _normalization(value: Any, argument: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, (int, float)) else tuple(value)
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Expected `{argument}` to be a number, a list of numbers or None, but got {value!r}.") from err


class Misclassifications(IntrospectionCallback):
    """The validation set's most confidently wrong examples, error rates by image statistic, and a perturbation test.

    On each scheduled validation epoch (``every_n_epochs`` / ``at``; always during ``trainer.validate``)
    the callback reads the logits ``validation_step`` returns (``on_validation_batch_end`` outputs, or
    the module's own forward output when the step returns none; see :class:`PerClassMetrics` for the
    extraction rules) and, as the batches pass, keeps per sample the confidence, prediction and label and
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

    Non-image inputs (anything but ``(N, C, H, W)`` with 1 or 3 channels) skip the gallery, statistics
    and perturbations with one warning; the confident-error table and error rates per class remain.

    Tags written:

    * ``introspect/misclassifications/gallery`` -- image: top-K confidently wrong examples;
    * ``introspect/misclassifications/gallery_per_class`` -- image, one row per true class (``per_class``);
    * ``introspect/misclassifications/top_wrong`` -- markdown: index, true, predicted, confidence;
    * ``introspect/misclassifications/error_rate/overall`` and ``.../error_rate/class/<class>`` -- scalars;
    * ``introspect/misclassifications/error_rate/<statistic>/q<i>`` -- scalar, error rate in quantile bin
      ``i`` (1 = lowest values) of the statistic;
    * ``introspect/misclassifications/statistics`` -- markdown table and ``.../statistics_figure`` -- figure;
    * ``introspect/misclassifications/perturbation/<kind>/<strength>`` -- scalar, accuracy on the subset;
    * ``introspect/misclassifications/perturbations`` -- markdown table (classes x kind@strength) and
      ``.../perturbations_figure`` -- figure (accuracy vs strength, one line per class);
    * ``introspect/misclassifications/warnings`` -- markdown, only when the model's outputs hold NaN / Inf
      (non-finite weights or inputs): what was left out of the review at that step and why;
    * ``introspect/misclassifications/seconds`` -- own wall time.

    Non-finite values: validation samples whose probabilities hold NaN / Inf (from non-finite logits) are
    left out of the review (``report["nonfinite"]`` counts them); when every sample is non-finite nothing
    but the note is logged that epoch (no report). When the perturbation test's outputs are non-finite
    its results are not logged. Each case warns once and writes a note to
    ``introspect/misclassifications/warnings`` at each such step; the callback stays on and reviews
    normally again once the outputs are finite.

    Results on the instance: ``report`` (the latest run: ``epoch``, ``step``, ``num_samples`` (reviewed),
    ``nonfinite`` (samples left out for NaN / Inf outputs), ``error_rate``,
    ``per_class_error``, ``wrong`` (top-K rows ``{"index", "label", "pred", "confidence"}``), ``bins``
    ``{statistic: {"edges", "counts", "errors", "rate"}}``, ``perturbations`` ``{kind: {"strengths",
    "accuracy", "per_class"}}``), ``history`` (every report) and ``wrong_images`` (the top-K inputs).
    ``history`` is kept in the ``state_dict``.

    Args:
        every_n_epochs: run every n-th validation epoch as well (``None``, the default: only at ``at``
            and the last epoch; a run renders a gallery and two figures and makes ``1 + sum(strengths)``
            forward passes over ``num_samples`` images, so per-epoch runs cost).
        at: fractions of training at which to run; default ``(0.5,)``: half way (and the last epoch).
        top_k: number of confidently wrong examples in the gallery.
        per_class: wrong examples kept per true class for the per-class gallery (0: off).
        statistics: image statistics among ``"sharpness"``, ``"noise"``, ``"brightness"``, ``"contrast"``,
            ``"saturation"`` (3-channel images only).
        num_bins: quantile bins per statistic.
        perturbations: among ``"blur"``, ``"noise"``, ``"color"``; empty: no perturbation test.
        blur_sigmas, noise_stds, color_strengths: strengths of each perturbation.
        num_samples: size of the fixed validation subset of the perturbation test.
        class_names: display names, one per class.
        output_transform, target_transform: as in :class:`PerClassMetrics`.
        mean, std: the input normalisation (a number or one per channel). When given, images are shown
            and measured un-normalised and perturbations are applied in that space.
        figures: log the statistics and perturbation figures (the tables are always logged).
        enabled, seed, on_error: see :class:`IntrospectionCallback`.

    Limits: classification logits ``(N, C)`` (or one binary logit) only; under DDP only rank zero's shard
    of the validation data is reviewed. Errors are not causes: a statistic's bins tell where errors
    concentrate, the perturbation test tells what the model is sensitive to.

    Example:
        >>> cb = Misclassifications(top_k=8, perturbations=["blur", "noise"], num_samples=128)
        >>> trainer = Trainer(max_epochs=2, callbacks=[cb])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=dm)  # doctest: +SKIP
        >>> cb.report["perturbations"]["blur"]["accuracy"]  # doctest: +SKIP
        [0.95, 0.93, 0.81, 0.42]
    """

    name = "misclassifications"
    rank_zero_only = True

    def __init__(
        self,
        *,
        every_n_epochs: int | None = None,
        at: Sequence[float] | None = (0.5,),
        top_k: int = 16,
        per_class: int = 0,
        statistics: Sequence[str] = STATISTICS,
        num_bins: int = 5,
        perturbations: Sequence[str] = PERTURBATIONS,
        blur_sigmas: Sequence[float] = (0.5, 1.0, 2.0),
        noise_stds: Sequence[float] = (0.1, 0.25, 0.5),
        color_strengths: Sequence[float] = (0.1, 0.25, 0.5),
        num_samples: int = 256,
        class_names: Sequence[str] | None = None,
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
        check_positive_int(top_k, "top_k")
        check_positive_int(num_bins, "num_bins")
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
        self.top_k = top_k
        self.per_class = per_class
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
        self._reset_epoch()

    @override
    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Two samples through the model: dense (segmentation) outputs are skipped, ``class_names`` of the
        wrong length and labels out of range are refused, before training."""
        batch = self.example(trainer, 16)
        if batch is None:
            return
        x = split_batch(batch)[0]
        with introspection_mode(pl_module, grad=False):
            output = pl_module(x)
        logits = extract_logits(output, self.output_transform, batch_size=None if self.output_transform else len(x))
        if logits is None:
            self.skip(
                f"the model's forward returns no logits tensor (got {type(output).__name__}); return one (or a dict with "
                "'logits', or an object with `.logits`) or pass `output_transform`."
            )
            return
        if logits.ndim > 2:
            self.skip(
                f"the model returns dense outputs {tuple(logits.shape)} (segmentation); this review ranks whole images "
                "by the confidence of one class prediction, which dense outputs do not have."
            )
            return
        self._collect_rows(logits, batch)  # the same checks as at every batch, on two samples
        self._reset_epoch()
        if logits.ndim == 2:
            self._class_labels(2 if logits.shape[1] == 1 else int(logits.shape[1]))  # `class_names` of the right length

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active(trainer) and (self._validating(trainer) or self.is_scheduled(trainer)):
            self.run(trainer, self._begin, pl_module, log_seconds=False)  # cheap: reset the buffers, attach the hook

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

    # ------------------------------------------------------------------------------ helpers
    def _validating(self, trainer: pl.Trainer) -> bool:
        return self.trainer_fn(trainer) == "validate"

    def _stop(self) -> None:
        self._collecting = False
        self._source.detach()

    def _reset_epoch(self) -> None:
        self._conf: list[torch.Tensor] = []
        self._pred: list[torch.Tensor] = []
        self._label: list[torch.Tensor] = []
        self._stats: dict[str, list[torch.Tensor]] = {}
        self._seen = 0
        self._images = True
        self._num_classes: int | None = None
        self._top: dict[str, Any] | None = None
        self._top_per_class: dict[int, dict[str, Any]] = {}
        self._nonfinite = 0  # validation samples left out this epoch: their probabilities hold NaN / Inf

    def _class_labels(self, n: int) -> list[str]:
        if self.class_names is not None:
            if len(self.class_names) != n:
                raise IntrospectionInputError(
                    f"Expected `class_names` to have one entry per class ({n} from the logits' width), "
                    f"but got {len(self.class_names)}."
                )
            return list(self.class_names)
        return [str(i) for i in range(n)]

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs as they were before normalisation (``x * std + mean``) when ``mean`` / ``std`` are known."""
        x = x.detach().float()
        if self.mean is None or self.std is None:
            return x
        shape = (1, -1, 1, 1)
        m = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        s = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return x * s + m

    def _normalized(self, raw: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.std is None:
            return raw
        shape = (1, -1, 1, 1)
        m = torch.tensor(self.mean, dtype=raw.dtype, device=raw.device).view(shape)
        s = torch.tensor(self.std, dtype=raw.dtype, device=raw.device).view(shape)
        return (raw - m) / s

    @staticmethod
    def _is_image(x: Any) -> bool:
        return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] in (1, 3) and min(x.shape[-2:]) >= 3

    @staticmethod
    def _probabilities(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.detach().float()
        if logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1):
            p = logits.flatten()
            if (p < 0).any() or (p > 1).any():
                p = p.sigmoid()
            return torch.stack([1 - p, p], dim=1)
        if logits.ndim != 2:
            raise IntrospectionInputError(
                f"Misclassifications expects classification logits of shape (N, C), but got {tuple(logits.shape)}; "
                "use `output_transform`."
            )
        return logits.softmax(dim=1)

    # -------------------------------------------------------------------------------- work
    def _review_now(self, trainer: Any, pl_module: Any) -> None:
        """The review of the model as it is: one own pass (eval mode, no grad) over the validation data."""
        loader = self.val_dataloader(trainer)
        if trainer.limit_val_batches == 0 or getattr(trainer, "val_dataloaders", None) is None or loader is None:
            return
        max_batches = (trainer.num_val_batches or [math.inf])[0]
        self._begin(pl_module)
        try:
            with introspection_mode(pl_module, grad=False):
                for i, batch in enumerate(loader):
                    if i >= max_batches:
                        break
                    batch = trainer.strategy.batch_to_device(batch)
                    output = pl_module(split_batch(batch)[0])
                    self._collect_rows(extract_logits(output, self.output_transform), batch)
            self._finish(trainer, pl_module, epoch=self.last_epoch(trainer))
        finally:
            self._stop()

    def _begin(self, pl_module: Any) -> None:
        self._reset_epoch()
        self._source.attach(pl_module)
        self._collecting = True

    def _collect(self, outputs: Any, batch: Any, pl_module: Any) -> None:
        logits = self._source.logits(outputs, batch, pl_module)
        if self._source.used_own_forward:
            self.warn_once(
                "own-forward", "Misclassifications: `validation_step` returns no logits (a tensor with one row per "
                "sample), so the logits come from one extra forward of each reviewed validation batch (eval mode, no grad)."
            )
        self._collect_rows(logits, batch)

    def _collect_rows(self, logits: torch.Tensor | None, batch: Any) -> None:
        if logits is None:
            raise IntrospectionInputError(
                "Misclassifications found no logits: return them from `validation_step` (a tensor, or a dict with a "
                "'logits' key), call `self(x)` in it, or pass `output_transform`."
            )
        target = extract_targets(batch, self.target_transform).detach().flatten()
        probs = self._probabilities(logits)
        n, c = probs.shape
        if target.numel() != n:
            raise IntrospectionInputError(f"Expected {n} labels for {n} logits rows, but got labels of shape {tuple(target.shape)}.")
        if self._num_classes is None:
            self._num_classes = c
        elif c != self._num_classes:
            raise IntrospectionInputError(f"The logits' width changed from {self._num_classes} to {c} between batches.")
        target = target.long().to(probs.device)
        if target.numel() and (target.min() < 0 or target.max() >= c):
            raise IntrospectionInputError(
                f"Labels out of range: expected values in [0, {c - 1}] for {c} classes, but got min {int(target.min())} "
                f"and max {int(target.max())}."
            )
        conf, pred = probs.max(dim=1)
        conf, pred, target = conf.cpu(), pred.cpu(), target.cpu()
        index = torch.arange(self._seen, self._seen + n)
        self._seen += n
        keep = None
        if not bool(torch.isfinite(probs).all()):  # NaN / Inf logits: leave those samples out of the review
            keep = torch.isfinite(probs).all(dim=1).cpu()
            self._nonfinite += int((~keep).sum())
            if not bool(keep.any()):
                return
            conf, pred, target, index = conf[keep], pred[keep], target[keep], index[keep]
        wrong = pred != target
        self._conf.append(conf)
        self._pred.append(pred)
        self._label.append(target)
        x = None
        if self._images:
            try:
                x = split_batch(batch)[0]
            except ValueError:  # a batch structure we cannot read inputs from: treat as non-image
                x = None
        if self._images and not self._is_image(x):
            self._images = False
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            self.warn_once(
                "non-image",
                f"Misclassifications: the inputs ({shape}) are not images (N, C, H, W) with 1 or 3 channels; the "
                "gallery, image statistics and perturbation test are skipped (error rates per class remain).",
            )
        raw = None
        if self._images and x is not None:  # _is_image(x) held: not None
            raw = self._raw(x)
            if keep is not None:
                raw = raw[keep.to(raw.device)]
            for key, value in image_statistics(raw, self.statistics).items():
                self._stats.setdefault(key, []).append(value.cpu())
        if not bool(wrong.any()):
            return
        sel = wrong.nonzero().flatten()
        rows = {
            "conf": conf[sel],
            "pred": pred[sel],
            "label": target[sel],
            "index": index[sel],
            "image": raw[sel.to(raw.device)].cpu() if raw is not None else None,
        }
        self._top = self._merge(self._top, rows, self.top_k)
        if self.per_class:
            for cls in target[sel].unique().tolist():
                mask = rows["label"] == cls
                part = {k: (v[mask] if v is not None else None) for k, v in rows.items()}
                self._top_per_class[cls] = self._merge(self._top_per_class.get(cls), part, self.per_class)

    @staticmethod
    def _merge(buffer: dict[str, Any] | None, rows: dict[str, Any], k: int) -> dict[str, Any]:
        """Keep the ``k`` most confident rows of ``buffer`` + ``rows`` (ties: earlier samples first)."""
        if buffer is not None:
            rows = {key: (torch.cat([buffer[key], v]) if v is not None else None) for key, v in rows.items()}
        order = sorted(range(rows["conf"].numel()), key=lambda i: (-float(rows["conf"][i]), int(rows["index"][i])))[:k]
        idx = torch.tensor(order, dtype=torch.long)
        return {key: (v[idx] if v is not None else None) for key, v in rows.items()}

    def _finish(self, trainer: Any, pl_module: Any, epoch: int | None = None) -> None:
        self._stop()
        self._last_step = int(trainer.global_step)  # reviewed at this step (also when nothing could be logged)
        if self._nonfinite:
            self._report_nonfinite(trainer)
        if not self._conf:
            return
        step, epoch = int(trainer.global_step), int(trainer.current_epoch if epoch is None else epoch)
        writer = self.writer(trainer)
        conf, pred, label = torch.cat(self._conf), torch.cat(self._pred), torch.cat(self._label)
        wrong = pred != label
        n_classes = int(self._num_classes or 0)
        names = self._class_labels(n_classes)
        total = torch.bincount(label, minlength=n_classes)
        errors = torch.bincount(label[wrong], minlength=n_classes)
        per_class_error = [None if int(t) == 0 else float(e) / float(t) for e, t in zip(errors, total)]
        error_rate = float(wrong.float().mean())
        top = self._top
        wrong_rows = []
        if top is not None:
            wrong_rows = [
                {"index": int(i), "label": int(y), "pred": int(p), "confidence": float(c)}
                for i, y, p, c in zip(top["index"], top["label"], top["pred"], top["conf"])
            ]
        report: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "num_samples": int(label.numel()),
            "error_rate": error_rate,
            "per_class_error": per_class_error,
            "confidence_wrong": float(conf[wrong].mean()) if bool(wrong.any()) else None,
            "confidence_right": float(conf[~wrong].mean()) if bool((~wrong).any()) else None,
            "wrong": wrong_rows,
            "bins": {},
            "perturbations": {},
            "nonfinite": self._nonfinite,
        }
        scalars = {self.tag("error_rate", "overall"): error_rate}
        scalars.update({self.tag("error_rate", "class", n.replace("/", "_")): v for n, v in zip(names, per_class_error) if v is not None})
        writer.text(self.tag("top_wrong"), self._wrong_markdown(wrong_rows, names, error_rate, int(label.numel())), step)
        self.wrong_images = top["image"] if top is not None else None
        if self._images and top is not None and top["image"] is not None and top["image"].shape[0]:
            writer.image(self.tag("gallery"), self._gallery(top, names), step)
            if self.per_class and self._top_per_class:
                writer.image(self.tag("gallery_per_class"), self._gallery_per_class(names), step)
        if self._images and self._stats:
            for stat, chunks in self._stats.items():
                binned = error_rate_by_bin(torch.cat(chunks), wrong, num_bins=self.num_bins)
                report["bins"][stat] = {
                    "edges": binned.edges, "counts": binned.counts, "errors": binned.errors, "rate": binned.rate
                }
                for i, rate in enumerate(binned.rate):
                    if rate is not None:
                        scalars[self.tag("error_rate", stat, f"q{i + 1}")] = rate
            writer.text(self.tag("statistics"), statistics_markdown(report["bins"], error_rate), step)
            if self.figures:
                writer.figure(self.tag("statistics_figure"), statistics_figure(report["bins"], error_rate), step)
        if self._images and self.perturbations:
            results = self._perturbation_test(trainer, pl_module, n_classes)
            if results:
                report["perturbations"] = results
                for kind, res in results.items():
                    for s, acc in zip(res["strengths"][1:], res["accuracy"][1:]):
                        scalars[self.tag("perturbation", kind, f"{s:g}")] = acc
                writer.text(self.tag("perturbations"), perturbation_markdown(results, names), step)
                if self.figures:
                    writer.figure(self.tag("perturbations_figure"), perturbation_figure(results, names), step)
        writer.scalars(scalars, step)
        self.report = report
        self.history.append(report)
        self._reset_epoch()

    def _perturbation_test(self, trainer: Any, pl_module: Any, n_classes: int) -> dict[str, Any]:
        x, y = self.fixed_samples(trainer)
        if y is None or not self._is_image(x):
            self.warn_once("perturb-no-labels", "Misclassifications: the fixed samples have no labels or are not images; "
                           "the perturbation test is skipped.")
            return {}
        device = module_device(pl_module)
        raw = self._raw(x)
        spread = float(raw.std()) or 1.0

        nonfinite: list[int] = []  # samples with NaN / Inf probabilities, per call of `predict`

        def predict(inputs: torch.Tensor) -> torch.Tensor:
            logits = extract_logits(pl_module(self._normalized(inputs).to(device)), self.output_transform)
            if logits is None:
                raise IntrospectionInputError("Misclassifications: the model's forward output holds no logits; pass `output_transform`.")
            probs = self._probabilities(logits)
            if not bool(torch.isfinite(probs).all()):
                nonfinite.append(int((~torch.isfinite(probs).all(dim=1)).sum()))
            return probs

        strengths = {kind: self.strengths[kind] for kind in self.perturbations}
        with introspection_mode(pl_module, grad=False):
            results = perturbation_accuracy(
                predict, raw, y, num_classes=n_classes, strengths=strengths, seed=self.seed, noise_scale=spread
            )
        if nonfinite:  # argmax over NaN is arbitrary: such accuracies would be silently wrong numbers
            self._report_nonfinite_perturbation(trainer, max(nonfinite), int(x.shape[0]))
            return {}
        return {
            kind: {"strengths": r.strengths, "accuracy": r.accuracy, "per_class": r.per_class}
            for kind, r in results.items()
        }

    # ------------------------------------------------------------------------- non-finite values
    def _report_nonfinite(self, trainer: Any) -> None:
        """Warn once, and note at this step, that validation samples with NaN / Inf outputs were left out."""
        step, k, total = int(trainer.global_step), self._nonfinite, self._seen
        what = f"the model's outputs (probabilities) are non-finite (NaN / Inf) for {k} of {total} validation samples"
        if k >= total:
            action = ("Nothing of this review is logged (no gallery, error rates, statistics or perturbation test, "
                      "no report)")
        else:
            action = "Those samples are left out of the review (error rates, gallery, statistics; `report['nonfinite']`)"
        self.warn_once(
            "nonfinite",
            f"Misclassifications: {what} at step {step}. {NONFINITE_CAUSE} {action}; a note goes to "
            f"`{self.tag('warnings')}` instead, at every step where this happens. The callback stays on and reviews "
            "normally again once the outputs are finite. (Warned once.)",
        )
        self.writer(trainer).text(self.tag("warnings"), f"**Step {step}:** {what}. {action}. {NONFINITE_CAUSE}", step)

    def _report_nonfinite_perturbation(self, trainer: Any, k: int, total: int) -> None:
        """Warn once, and note at this step, that the perturbation test's results were dropped for NaN / Inf outputs."""
        step = int(trainer.global_step)
        what = (f"the model's outputs (probabilities) in the perturbation test are non-finite (NaN / Inf) for up to "
                f"{k} of its {total} fixed samples")
        action = "The perturbation test's accuracies are not logged at this step"
        self.warn_once(
            "nonfinite-perturbation",
            f"Misclassifications: {what} at step {step}. {NONFINITE_CAUSE} {action}; a note goes to `{self.tag('warnings')}` "
            "instead, at every step where this happens. The callback stays on. (Warned once.)",
        )
        self.writer(trainer).text(self.tag("warnings"), f"**Step {step}:** {what}. {action}. {NONFINITE_CAUSE}", step)

    # ------------------------------------------------------------------------------ render
    def _display(self, raw: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            return raw.clamp(0, 1) if raw.min() >= -0.05 and raw.max() <= 1.05 else to_display(raw)
        return to_display(raw)

    def _gallery(self, top: dict[str, Any], names: list[str]) -> Any:
        from lightning_introspect.render.grid import captioned_grid

        captions = [
            f"true {names[int(y)]} / pred {names[int(p)]}\n{float(c):.2f}"
            for y, p, c in zip(top["label"], top["pred"], top["conf"])
        ]
        return captioned_grid(self._display(top["image"]), captions, nrow=min(8, len(captions)),
                              title="most confidently wrong (true / predicted, confidence)")

    def _gallery_per_class(self, names: list[str]) -> Any:
        from lightning_introspect.render.grid import captioned_grid

        classes = sorted(self._top_per_class)
        k = self.per_class
        sample = next(iter(self._top_per_class.values()))["image"]
        blank = torch.ones_like(sample[0])
        images, captions, rows = [], [], []
        for cls in classes:
            buf = self._top_per_class[cls]
            shown = self._display(buf["image"])
            rows.append(f"true {names[cls]}")
            for j in range(k):
                if j < shown.shape[0]:
                    images.append(shown[j])
                    captions.append(f"pred {names[int(buf['pred'][j])]} {float(buf['conf'][j]):.2f}")
                else:
                    images.append(blank)
                    captions.append("")
        return captioned_grid(torch.stack(images), captions, nrow=k, row_labels=rows,
                              title="confidently wrong, per true class")

    @staticmethod
    def _wrong_markdown(rows: list[dict[str, Any]], names: list[str], error_rate: float, n: int) -> str:
        lines = [f"Error rate {error_rate:.1%} on {n} validation samples.", ""]
        if not rows:
            return "\n".join(lines + ["No misclassified sample."])
        lines += ["| rank | index | true | predicted | confidence |", "|---|---|---|---|---|"]
        lines += [
            f"| {r + 1} | {row['index']} | {markdown_cell(names[row['label']], max_chars=48)} | "
            f"{markdown_cell(names[row['pred']], max_chars=48)} | {row['confidence']:.3f} |"
            for r, row in enumerate(rows)
        ]
        return "\n".join(lines)

    def summary_lines(self) -> list[str]:
        if self.report is None:
            return ["no review yet"]
        r = self.report
        out = [f"epoch {r['epoch']}: error rate {r['error_rate']:.3f} on {r['num_samples']} samples"]
        finding = strongest_bin(r["bins"], r["error_rate"])
        if finding:
            out.append(finding)
        for kind, res in r["perturbations"].items():
            out.append(
                f"{kind}: accuracy " + " -> ".join(f"{a:.2f}" for a in res["accuracy"])
                + f" at strengths {', '.join(f'{s:g}' for s in res['strengths'])}"
            )
        return out


# ----------------------------------------------------------------------------- text & figures
def strongest_bin(bins: dict[str, dict[str, Any]], overall: float, *, ratio: float = 1.5) -> str | None:
    """One sentence on the statistic bin with the highest error rate (bins of at least 5 samples).

    It says "errors concentrate" only when that rate is at least ``ratio`` times the overall rate.
    """
    best = None
    for stat, b in bins.items():
        n = len(b["rate"])
        for i, (rate, count) in enumerate(zip(b["rate"], b["counts"])):
            if rate is None or count < 5:
                continue
            if best is None or rate > best[0]:
                side = " (lowest values)" if i == 0 else " (highest values)" if i == n - 1 else ""
                best = (rate, f"{stat} quantile bin q{i + 1} of {n}{side}", b["edges"][i], b["edges"][i + 1])
    if best is None or overall <= 0:
        return None
    rate, where, lo, hi = best
    detail = f"{where}, values [{lo:.3g}, {hi:.3g}]: error rate {rate:.1%} vs {overall:.1%} overall ({rate / overall:.1f}x)"
    if rate >= ratio * overall:
        return f"errors concentrate in {detail}"
    return f"no statistic bin stands out; the worst is {detail}"


def statistics_markdown(bins: dict[str, dict[str, Any]], overall: float) -> str:
    """Error rate per quantile bin of each statistic, as a markdown table."""
    width = max((len(b["rate"]) for b in bins.values()), default=0)
    lines = [f"Overall error rate {overall:.1%}. Bins are quantiles, q1 = lowest values.", ""]
    lines.append("| statistic | " + " | ".join(f"q{i + 1}" for i in range(width)) + " | worst / overall |")
    lines.append("|---" * (width + 2) + "|")
    for stat, b in bins.items():
        cells = []
        for i in range(width):
            if i < len(b["rate"]) and b["rate"][i] is not None:
                cells.append(f"{b['rate'][i]:.1%} (n={b['counts'][i]}, [{b['edges'][i]:.3g}, {b['edges'][i + 1]:.3g}])")
            else:
                cells.append("-")
        rates = [r for r in b["rate"] if r is not None]
        ratio = f"{max(rates) / overall:.2f}x" if rates and overall > 0 else "-"
        lines.append(f"| {stat} | " + " | ".join(cells) + f" | {ratio} |")
    finding = strongest_bin(bins, overall)
    if finding:
        lines += ["", f"**Finding:** {finding}."]
    return "\n".join(lines)


def statistics_figure(bins: dict[str, dict[str, Any]], overall: float) -> Any:
    """Bar chart per statistic: error rate in each quantile bin, the overall rate dashed.

    A plain ``Figure`` (no pyplot state); each panel's bars are one ``PolyCollection``.
    """
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    stats = list(bins)
    fig = Figure(figsize=(2.6 * max(1, len(stats)), 2.6))
    axes = fig.subplots(1, max(1, len(stats)), squeeze=False)
    for ax, stat in zip(axes[0], stats):
        b = bins[stat]
        rates = [0.0 if r is None else r for r in b["rate"]]
        bars = PolyCollection(bar_polygons(range(len(rates)), rates, 0.8), facecolors="tab:red", edgecolors="none",
                              alpha=0.7)
        bars.sticky_edges.y.append(0.0)  # no margin below zero, as with ``ax.bar``
        ax.add_collection(bars)
        ax.axhline(overall, color="black", linestyle="--", linewidth=1)
        if max(rates, default=0.0) > 0 or overall > 0:
            ax.autoscale_view()
        else:  # nothing above zero: the symmetric range ``ax.bar`` falls back to
            ax.set_ylim(-0.055, 0.055)
        ax.set_xticks(range(len(rates)), [f"q{i + 1}" for i in range(len(rates))], fontsize=7)
        ax.set_title(stat, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].set_ylabel("error rate", fontsize=8)
    set_margins(fig, left=0.55, bottom=0.35, top=0.3)
    return fig


def perturbation_markdown(results: dict[str, dict[str, Any]], names: list[str]) -> str:
    """Per-class accuracy under each perturbation and strength, as a markdown table."""
    columns = ["clean"]
    cells: list[list[Any]] = []
    first = next(iter(results.values()))
    cells.append([first["accuracy"][0], *first["per_class"][0]])
    for kind, res in results.items():
        for s, acc, per in zip(res["strengths"][1:], res["accuracy"][1:], res["per_class"][1:]):
            columns.append(f"{_KIND_LABEL.get(kind, kind)} {s:g}")
            cells.append([acc, *per])
    lines = ["Accuracy on the fixed validation subset.", "", "| class | " + " | ".join(columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for row, label in enumerate(["all", *names]):
        lines.append(
            f"| {markdown_cell(label, max_chars=48)} | " + " | ".join("no support" if col[row] is None else f"{col[row]:.2f}" for col in cells) + " |"
        )
    for kind, res in results.items():
        clean, worst = res["per_class"][0], res["per_class"][-1]
        pairs = [(c - w, n) for n, c, w in zip(names, clean, worst) if c is not None and w is not None]
        if pairs and len(res["strengths"]) > 1:
            drop, name = max(pairs)
            lines.append(f"\n**{kind}:** class {name} breaks most (accuracy -{drop:.2f} at strength {res['strengths'][-1]:g}).")
    return "\n".join(lines)


def perturbation_figure(results: dict[str, dict[str, Any]], names: list[str]) -> Any:
    """Accuracy vs strength, one panel per perturbation: a thin line per class, the overall in black."""
    import matplotlib
    from matplotlib.figure import Figure

    kinds = list(results)
    fig = Figure(figsize=(3.0 * len(kinds) + 1.2, 2.8))
    axes = fig.subplots(1, len(kinds), squeeze=False)
    cmap = matplotlib.colormaps["tab20" if len(names) > 10 else "tab10"]
    for ax, kind in zip(axes[0], kinds):
        res = results[kind]
        s = res["strengths"]
        for c, name in enumerate(names):
            ys = [None if per[c] is None else per[c] for per in res["per_class"]]
            if all(v is None for v in ys):
                continue
            ax.plot(s, [float("nan") if v is None else v for v in ys], color=cmap(c % cmap.N), linewidth=0.9,
                    alpha=0.8, label=name)
        ax.plot(s, res["accuracy"], color="black", linewidth=2.2, label="all")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(_KIND_LABEL.get(kind, kind), fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("accuracy", fontsize=8)
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    set_margins(fig, left=0.55, right=1.2, bottom=0.45, top=0.15, wspace=0.25)
    return fig
