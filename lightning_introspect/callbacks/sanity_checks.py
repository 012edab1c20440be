"""``SanityChecks``: at fit end, test whether the attribution maps depend on the model at all."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from typing_extensions import override

from lightning_introspect._lightning import pl
from lightning_introspect._torch.guards import introspection_mode, module_device
from lightning_introspect._torch.layers import get_layer, resolve_layers
from lightning_introspect._torch.memory import release_free_memory
from lightning_introspect.callbacks.base import (
    IntrospectionCallback,
    input_gradient_problem,
)
from lightning_introspect.callbacks.checks import gradient_problem
from lightning_introspect.callbacks.outputs import logits_only
from lightning_introspect.callbacks.progress import IntrospectionProgress
from lightning_introspect.callbacks.sanity_arguments import check_sanity_arguments
from lightning_introspect.callbacks.sanity_methods import default_methods, servable_methods
from lightning_introspect.callbacks.sanity_sizes import progress_total, run_options
from lightning_introspect.callbacks.sanity_writer import write_report
from lightning_introspect.callbacks.token_inputs import plan_token_attributions
from lightning_introspect.errors import IntrospectionInputError
from lightning_introspect.loggers.adapter import IntrospectionWriter
from lightning_introspect.methods.explainers import DEFAULT_METHODS
from lightning_introspect.methods.sanity_report import (
    DEFAULT_TOKEN_METHODS,
    DEFAULT_VERDICT_METRIC,
    TOKEN_VERDICT_METRICS,
    SanityReport,
    run_sanity_checks,
)
from lightning_introspect.methods.task import resolve_task
from lightning_introspect.methods.token_attribution import (
    is_token_ids,
)
from lightning_introspect.render.sanity import (
    class_maps_grid,
    curve_figure,
    curve_figures,
    maps_grid,
    sanity_summary_lines,
)


class SanityChecks(IntrospectionCallback):
    """Sanity checks for attribution maps (Adebayo et al. 2018): do the maps change when the model does?

    Once at fit end (and on demand with :meth:`check`), on global rank zero and on a deep copy of the
    model (the trained weights are never touched), the callback:

    * re-initialises the model's layers cumulatively (``mode="cascading"``; ``order="bottom_up"``: from
      the input side, ``"top_down"``: from the output side, or ``"both"``) and / or one at a time
      (``"independent"``), recomputing each method's maps for a few fixed validation samples after each
      step, and measures how similar they stay to the trained model's maps (Spearman rank correlation of
      ``|map|`` and of the signed map, SSIM);
    * measures eMPRT (Hedström et al. 2023): the relative rise of the maps' histogram entropy from the
      trained to the fully randomised model (two attribution passes);
    * compares the map for the predicted class with the maps for the least likely class and the
      runner-up (class sensitivity), against the same class's map under a 1 % input noise;
    * gives each method verdicts with a bootstrap interval over the samples (and repeats): ``"pass"``
      when the whole interval lies below a threshold relative to reference maps, ``"fail"`` when it lies
      at or above it, ``"inconclusive"`` when it straddles it. Randomisation (top-down, after the top
      ``verdict_depth`` blocks: Adebayo et al.'s test): threshold ``f + thresholds["randomization"] x (1 - f)``,
      ``f`` the larger similarity of the trained map to a random map and to the input's Sobel edges.
      Class sensitivity (the least likely class): threshold ``f + thresholds["class_sensitivity"] x (c - f)``,
      ``c`` the same-class similarity under noise. The numbers are in ``report.details`` and the table;
    * warns about caveats: BatchNorm, in-place / functional / hidden ReLU, non-ReLU activations,
      negative inputs for input x gradient, probability or segmentation-style outputs.

    ``order="bottom_up"`` by default, as Hedström et al. (2023) recommend: top-down randomisation keeps
    the lower layers, and the forward signal they carry, intact, so the first steps of a top-down curve
    still show what those layers compute; bottom-up cuts the signal first. The randomisation verdict
    stays top-down (Adebayo et al.'s reading, which the thresholds were set on): its first
    ``verdict_depth`` steps always run (``repeats x verdict_depth`` passes on top of the bottom-up curve),
    and the bottom-up curve has its own verdict after its first ``verdict_depth`` blocks.

    Segmentation (the task detected once before training from the output and labels: dense logits
    ``(N, C, H, W)`` with masks ``(N, H, W)``; ``task`` overrides): a whole-image class target would
    explain the background, so each sample's explained target is its largest non-background object of
    the predicted masks (``target="pred"``; of the true masks for ``"true"``), the class's logits summed
    over the object's region (:func:`~lightning_introspect.methods.targets.object_targets`). Class
    sensitivity compares the map of that class with the map of another class present in the prediction
    (or the least likely class) and of a random class, over the same region. ``report.target`` and the
    verdict text say what was explained. Grad-CAM's ``"auto"`` layer is
    :func:`~lightning_introspect.methods.attribution.auto_layer` (for an encoder-decoder, a feature map
    before the output head).

    Text models (token ids ``(N, T)``): the maps are token scores ``(N, T)`` computed at the output of the
    embedding layer (found automatically, :func:`~lightning_introspect.methods.token_attribution.find_embedding`),
    with saliency, gradient x embedding and integrated gradients by default (``methods`` left at ``None``;
    named methods without a token version are dropped with one warning). Every check runs on these 1-D
    score vectors: the curves and verdicts with the Spearman correlations (SSIM, an image measure, is left
    out with a note; ``verdict_metric="ssim"`` is refused before the first step), the class check's
    same-class reference with its noise on the embedding output, eMPRT on the scores. The maps figures show
    each sentence's tokens (their ids) as a heat strip per randomisation step / class.

    A method that fails is not explaining what the model learned: guided backprop and guided Grad-CAM
    typically fail (they reconstruct edges of the input whatever the weights), vanilla gradient and
    Grad-CAM pass. See ``lightning_introspect.methods.randomization`` for the exact definitions.

    Args:
        methods: attribution method names (``saliency``, ``input_x_gradient``, ``guided_backprop``,
            ``deconvnet``, ``grad_cam``, ``guided_grad_cam``, ``lrp``). ``None``: the methods of an
            ``Attributions`` callback on the same trainer, else saliency, guided backprop, Grad-CAM
            and input x gradient; for token ids saliency, input x gradient and integrated gradients.
        layers: the blocks to randomise: ``"auto"`` (every parametrised layer with its following
            normalisation layers), an int ``k`` (the ``k`` blocks each cascade starts from: nearest the
            output top-down, nearest the input bottom-up; cheaper), or a list of dotted names / glob
            patterns (a container is one block). A submodule whose parameters its parent reads without
            calling it (``nn.MultiheadAttention.out_proj``) is randomised with its parent's block;
            parameters held by the model itself (a bare ``nn.Parameter`` class token or position
            embedding) go with the input-side block, drawn again from their trained mean and spread.
        mode: ``"cascading"``, ``"independent"`` or ``"both"``.
        order: the cascade's sequence: ``"bottom_up"`` (default, see above), ``"top_down"`` or ``"both"``
            (twice the cost).
        thresholds: ``{"randomization": 0.5, "class_sensitivity": 1.0}``, fractions in [0, 1] of the way
            from a reference floor to a ceiling (above); a float sets the first.
        verdict_metric: ``"spearman_max"`` (of the two Spearman correlations the one with the larger mean;
            default), ``"spearman_abs"``, ``"spearman"`` or ``"ssim"``.
        verdict_depth: the verdict is taken after randomising this many blocks (1: the output layer
            top-down, the first layer bottom-up).
        resamples: bootstrap resamples of every interval (a private generator seeded from ``seed``).
        confidence: the intervals' coverage (0.95).
        run_emprt: measure eMPRT.
        bn_mode: normalisation layers: ``"affine"`` (reset scale / shift, keep running stats; default),
            ``"stats"`` (reset running stats), ``"both"`` or ``"keep"``.
        cam_layer: Grad-CAM's feature map (dotted name) or ``"auto"``.
        target: explain each sample's ``"pred"`` (predicted) or ``"true"`` class; for segmentation the
            largest object of the predicted / true masks, over its region.
        task: ``"auto"`` (detected before training), ``"classification"`` or ``"segmentation"``; an explicit
            task the shapes contradict refuses the fit before the first step, with the shapes named.
        run_class_sensitivity: run the class-sensitivity check.
        others: the other classes compared with the predicted one: ``"least"`` (least likely; the class
            verdict), ``"second"`` (runner-up), ``"random"`` (uniform among the other classes, private
            generator from ``seed``). Default ``["least", "second"]``.
        metrics: similarity metrics to compute and plot (the verdict's metrics are always added).
        repeats: how many independent re-initialisations are averaged (verdicts from one random draw
            of a small head are noisy: Grad-CAM's score varies by about 0.15 between draws on the digits
            CNN). The cost grows linearly.
        progress: show the check's progress in the trainer's progress bar (an ``introspection: sanity
            checks`` line once it has taken two seconds; nothing without a progress bar).
        output_transform: callable ``forward output -> logits`` for a model that returns more than the
            logits (as in :class:`Attributions`; default: a tuple's first tensor, a dict's ``"logits"``).
        enabled: switch the callback off.
        every_n_epochs: also run at the end of every n-th training epoch (``None``: only at fit end).
        at: also run at the end of the epochs at these fractions of training (0.0, the untrained model, is
            skipped: there is nothing learned to check).
        num_samples: how many fixed validation samples are explained (a few suffice).
        seed: seed of the sample choice, of the per-layer re-initialisation and of the random class.
        on_error: ``"warn"`` (warn once, disable, training continues) or ``"raise"``.
        layer: the former name of ``cam_layer`` (deprecated; works with a ``DeprecationWarning``).
        class_sensitivity: the former name of ``run_class_sensitivity`` (deprecated, as ``layer``).

    Tags written (``<mode>`` is ``cascading`` (top-down) / ``bottom_up`` / ``independent``, ``<metric>``
    one of ``metrics``):

    * ``introspect/sanity/curve/<mode>/<metric>``: similarity vs randomised layer, one line per method,
      each method's threshold dashed (image of a figure, Adebayo's figure 2 layout);
    * ``introspect/sanity/maps/<mode>``: the maps of the first sample, rows = randomisation depth
      (original first), columns = methods (image);
    * ``introspect/sanity/class_maps``: the maps for the predicted and the other classes (image);
    * ``introspect/sanity/verdicts``: the verdict table with intervals and thresholds, the references
      and the caveats (markdown text);
    * ``introspect/sanity/<method>/<metric>/<mode>/<layer>``: the similarity after randomising ``<layer>``;
    * ``introspect/sanity/<method>/score``, ``.../score_low``, ``.../score_high``, ``.../threshold`` and
      ``.../passed`` (1.0 pass / 0.5 inconclusive / 0.0 fail): the top-down randomisation verdict;
      ``.../bottom_up_score`` (``_low``, ``_high``), ``.../bottom_up_threshold``, ``.../bottom_up_passed``:
      the bottom-up one;
    * ``introspect/sanity/<method>/class_score`` (``_low``, ``_high``), ``.../class_threshold`` and
      ``.../class_passed``: the class-sensitivity verdict (least likely class); ``.../class_second_*``:
      the runner-up;
    * ``introspect/sanity/<method>/emprt``: eMPRT (mean relative entropy rise);
    * ``introspect/sanity/seconds``: wall time of the check.

    Results: ``report`` (the latest :class:`~lightning_introspect.methods.randomization.SanityReport`:
    ``.verdicts``, ``.class_sensitivity_verdicts``, ``.curves``, ``.caveats``, ``.task``, ``.target``
    (what was explained, e.g. ``"object regions of the predicted masks"``), ...), ``history``
    (``[(global_step, report)]``), ``resolved_task`` (``task`` with ``"auto"`` resolved); the report is
    saved in the checkpoint as plain values.

    Example:
        >>> from lightning_introspect.demo import DigitsCNN
        >>> cb = SanityChecks(methods=["saliency", "guided_backprop"], num_samples=2, layers=1, repeats=1, progress=False)
        >>> report = cb.check(DigitsCNN().eval(), torch.randn(2, 1, 32, 32))
        >>> sorted(report.verdicts)
        ['guided_backprop', 'saliency']
    """

    name = "sanity"
    sized_runs = True
    draws_samples = True
    # the verdicts end in their quantity, not the method: one chart each, a line per method (custom scalars)
    #: one Custom Scalars chart per quantity, a line per method (render/sanity.py `report_scalars` names them)
    scalar_charts = {
        f"{what} per method": rf"[^/]+/{what}$"
        for check in ("", "bottom_up_", "class_", "class_second_")
        for what in (f"{check}score", f"{check}score_low", f"{check}score_high", f"{check}threshold", f"{check}passed")
    } | {"emprt per method": r"[^/]+/emprt$"}

    def __init__(
        self,
        *,
        methods: list[str] | None = None,
        layers: str | int | list[str] = "auto",
        mode: str = "cascading",
        order: str = "bottom_up",
        thresholds: dict[str, float] | float | None = None,
        verdict_metric: str = DEFAULT_VERDICT_METRIC,
        verdict_depth: int = 1,
        bn_mode: str = "affine",
        cam_layer: str = "auto",
        target: str = "pred",
        task: str = "auto",
        run_class_sensitivity: bool = True,
        others: list[str] | None = None,
        metrics: list[str] | None = None,
        repeats: int = 3,
        resamples: int = 1000,
        confidence: float = 0.95,
        run_emprt: bool = True,
        progress: bool = True,
        output_transform: Callable[[Any], Any] | None = None,
        enabled: bool = True,
        every_n_epochs: int | None = None,
        at: list[float] | None = None,
        num_samples: int = 8,
        seed: int = 0,
        on_error: str = "warn",
        layer: str | None = None,
        class_sensitivity: bool | None = None,
    ) -> None:
        super().__init__(enabled=enabled, every_n_epochs=every_n_epochs, at=at, num_samples=num_samples, seed=seed, on_error=on_error)
        checked = check_sanity_arguments(
            methods=methods, layers=layers, mode=mode, order=order, thresholds=thresholds, verdict_metric=verdict_metric,
            verdict_depth=verdict_depth, bn_mode=bn_mode, cam_layer=cam_layer, target=target, task=task,
            run_class_sensitivity=run_class_sensitivity, others=others, metrics=metrics, repeats=repeats, resamples=resamples,
            confidence=confidence, output_transform=output_transform, layer=layer, class_sensitivity=class_sensitivity,
        )
        self.methods, self.layers, self.cam_layer = checked.methods, checked.layers, checked.cam_layer
        self.mode, self.order, self.bn_mode, self.target, self.task = mode, order, bn_mode, target, task
        self.thresholds, self.verdict_metric, self.verdict_depth = checked.thresholds, verdict_metric, verdict_depth
        self.run_class_sensitivity, self.others, self.metrics = checked.run_class_sensitivity, checked.others, checked.metrics
        self.repeats, self.resamples, self.confidence = repeats, resamples, checked.confidence
        self.run_emprt, self.progress, self.output_transform = bool(run_emprt), bool(progress), output_transform
        self._resolved_methods: list[str] | None = None
        self.reset()

    # ------------------------------------------------------------------------------- hooks
    @override
    def reset(self) -> None:
        self.report: SanityReport | None = None
        self.history: list[tuple[int, SanityReport]] = []
        self.resolved_task: str | None = None  # `task` with "auto" resolved from the example output and labels
        self.run_sizes: dict[str, Any] = {}  # the budget's sizes for the current run (empty: as configured)
        self._bar: IntrospectionProgress | None = None

    @override
    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._validate_model(pl_module, trainer)

    @override
    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Inputs that are neither images nor tabular, and models without an input gradient, are skipped
        (without validation data the training loader is not built yet: then at the first run); the task is
        resolved from two samples (a wrong explicit ``task`` is refused with the shapes named)."""
        if self.val_dataloader(trainer) is None:
            return
        x, y = self.fixed_samples(trainer)
        if x.ndim not in (2, 4):
            self.skip(f"the inputs of shape {tuple(x.shape)} are neither images (N, C, H, W) nor tabular (N, F).")
            return
        if is_token_ids(x):
            if not self._token_preflight(pl_module, x):
                return
        else:
            problem = gradient_problem(pl_module, x[:2].to(module_device(pl_module)), self.output_transform, reraise=self.on_error == "raise")
            if problem is not None:
                self.skip(problem)
                return
        self.resolved_task = self._resolve_task(pl_module, x[:2], None if y is None else y[:2])

    def _token_preflight(self, pl_module: pl.LightningModule, x: torch.Tensor) -> bool:
        """Token ids: the verdict metric, the methods with a token version and a gradient at the embedding
        output; ``False`` after a skip."""
        if self.verdict_metric not in TOKEN_VERDICT_METRICS:
            raise IntrospectionInputError(
                f"Expected `verdict_metric` to be one of {', '.join(repr(m) for m in TOKEN_VERDICT_METRICS)} for token ids "
                f"{tuple(x.shape)} (SSIM needs 2-D maps; token scores are one value per token), but got {self.verdict_metric!r}."
            )
        requested = list(DEFAULT_TOKEN_METHODS) if self.methods is None else list(self._resolved_methods or [])
        plan = plan_token_attributions(pl_module, x, requested, output_transform=self.output_transform)
        if plan.problem is not None:
            self.skip(plan.problem)
            return False
        if plan.dropped:
            self.warn_once("tokens", f"SanityChecks: {plan.dropped} have no token version; token ids {tuple(x.shape)} are checked with {plan.methods}.")
        return True

    def _resolve_task(self, model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor | None) -> str:
        """``task`` resolved from one forward pass of ``x`` (eval mode, no gradients, global RNG forked)."""
        with logits_only(model, self.output_transform), introspection_mode(model, grad=False):
            output = model(x.to(module_device(model, x.device)))
        return resolve_task(self.task, output, labels if isinstance(labels, torch.Tensor) else None)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active(trainer) and self._due_mid_fit(trainer):
            self.run(trainer, self._check_trainer, trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active(trainer):
            self.run(trainer, self._check_trainer, trainer, pl_module)

    # ------------------------------------------------------------------------------- work
    def _validate_model(self, model: torch.nn.Module, trainer: pl.Trainer | None = None) -> None:
        """Layer names and the method list, checked before any training step."""
        if isinstance(self.layers, list):
            resolve_layers(model, self.layers, argument="layers")
        if self.cam_layer != "auto":
            get_layer(model, self.cam_layer, argument="cam_layer")
        self._resolved_methods = default_methods(self, trainer)

    def _due_mid_fit(self, trainer: pl.Trainer) -> bool:
        if self.every_n_epochs is None and not self.at:
            return False
        total = self.total_epochs(trainer)
        last = total is not None and trainer.current_epoch == total - 1
        return not last and self.is_scheduled(trainer)  # the last epoch is covered by on_fit_end

    def _check_trainer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> SanityReport | None:
        x, y = self.fixed_samples(trainer)
        if x.ndim not in (2, 4):
            self.warn_once(
                "shape",
                f"SanityChecks: inputs of shape {tuple(x.shape)} are neither images (N, C, H, W) nor tabular (N, F); "
                "the checks are skipped.",
            )
            return None
        targets = y if self.target == "true" and y is not None else None
        if self.target == "true" and y is None:
            self.warn_once("no-labels", "SanityChecks: target='true' but the validation data has no labels; explaining the predictions.")
        with logits_only(pl_module, self.output_transform):
            problem = None if is_token_ids(x) else input_gradient_problem(pl_module, x)  # token ids: checked in preflight
        if problem is not None:
            self.warn_once("no-input-gradient", f"SanityChecks: {problem} The checks are skipped.")
            return None
        self.run_sizes = {}
        if self.budget is not None:
            with logits_only(pl_module, self.output_transform):
                option = self.sized(trainer, run_options(self, pl_module, x))
            if option is None:
                return None
            self.run_sizes = dict(option.sizes)
        blocks = self.run_sizes.get("blocks")
        total = progress_total(self, int(self.run_sizes.get("repeats", self.repeats)), blocks) if blocks else None
        with IntrospectionProgress(trainer if self.progress else None, "sanity checks", total=total) as self._bar:
            try:
                return self.check(pl_module, x, targets, writer=self.writer(trainer), step=trainer.global_step, trainer=trainer)
            finally:
                self._bar, self.run_sizes = None, {}

    def check(
        self,
        model: torch.nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor | Sequence[int] | None = None,
        *,
        writer: IntrospectionWriter | None = None,
        step: int = 0,
        trainer: pl.Trainer | None = None,
    ) -> SanityReport:
        """Run the checks now on ``model`` (untouched: a deep copy is randomised) and return the report.

        Args:
            model: the model to check.
            inputs: a batch of inputs ``(N, ...)`` (all of them are used).
            targets: class ids to explain, one per sample (segmentation: masks ``(N, H, W)``, whose largest
                objects are explained); ``None``: each sample's predicted class (segmentation: its largest
                predicted object).
            writer: where to log (figures, grid, table, scalars); ``None``: nothing is logged.
            step: the step the logs are written at.
            trainer: the trainer, if any (its ``Attributions`` callback gives the default methods).

        Raises:
            ValueError: a bad layer name, inputs that are neither images ``(N, C, H, W)`` nor tabular
                ``(N, F)``, or NaN / Inf weights in ``model`` (the maps would be meaningless).
        """
        if inputs.ndim not in (2, 4):
            raise ValueError(
                f"SanityChecks needs `inputs` of shape (N, C, H, W) (images) or (N, F) (tabular), but got {tuple(inputs.shape)}."
            )
        if self._resolved_methods is None or trainer is not None:
            self._validate_model(model, trainer)
        broken = [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
        if broken:  # NaN maps become zeros in the similarity measures: every method would "pass"
            raise ValueError(
                f"SanityChecks: the model has NaN / Inf weights in {broken[:5]}{' ...' if len(broken) > 5 else ''}; "
                "attribution maps and verdicts would be meaningless, so the check is not run."
            )
        methods = servable_methods(self, model, inputs, list(self._resolved_methods or DEFAULT_METHODS))
        tokens = is_token_ids(inputs)
        layer = None if self.cam_layer == "auto" and not any(m in ("grad_cam", "guided_grad_cam") for m in methods) else self.cam_layer
        if tokens:  # the embedding layer, found by run_sanity_checks
            layer = "auto"
        with logits_only(model, self.output_transform):
            class_check = self.run_class_sensitivity
            if class_check and self._num_outputs(model, inputs) < 2:
                self.warn_once(
                    "one-output",
                    "SanityChecks: the model has one output (a binary logit), so there is no other class to compare "
                    "with; the class-sensitivity check is skipped.",
                )
                class_check = False
            report = self._run_checks(model, inputs, targets, methods, layer, class_check)
        release_free_memory()  # the checks' copies and maps are free: the grids are drawn without their footprint
        return self._finish(report, inputs, writer, step)

    @staticmethod
    def _num_outputs(model: torch.nn.Module, inputs: torch.Tensor) -> int:
        """The number of output classes (dim 1 of the logits), from one forward pass on one sample."""
        with introspection_mode(model, grad=False):
            out = model(inputs[:1].to(module_device(model, inputs.device)))
        return int(out.shape[1]) if out.ndim >= 2 else 1

    def _run_checks(
        self, model: torch.nn.Module, inputs: torch.Tensor, targets: Any, methods: list[str], layer: str | None, class_check: bool
    ) -> SanityReport:
        return run_sanity_checks(
            model,
            inputs,
            target="pred" if targets is None else torch.as_tensor(targets),
            methods=methods,
            mode=self.mode,
            order=self.order,
            layers=self.run_sizes.get("layers", self.layers),
            seed=self.seed,
            bn_mode=self.bn_mode,
            layer=layer,
            thresholds=self.thresholds,
            verdict_depth=self.verdict_depth,
            verdict_metric=self.verdict_metric,
            class_check=class_check,
            others=self.others,
            metrics=self.metrics,
            keep_maps=1,
            repeats=int(self.run_sizes.get("repeats", self.repeats)),
            warn=False,
            progress=self._advance if self.progress else None,
            task=self.resolved_task or self.task,
            resamples=self.resamples,
            confidence=self.confidence,
            run_emprt=self.run_emprt,
        )

    def _finish(self, report: SanityReport, inputs: torch.Tensor, writer: IntrospectionWriter | None, step: int) -> SanityReport:
        for caveat in report.caveats:
            self.warn_once(f"caveat-{caveat.kind}", f"SanityChecks: {caveat}")
        self.report = report
        self.history.append((int(step), report))
        if writer is not None:
            with self.unit_costs.timed("report"):  # the next run's estimate (sanity_sizes.run_options)
                write_report(writer, self.tag, report, inputs, step, self.metrics)
        return report

    def _advance(self, message: str) -> None:
        """One step of the check done (``message``: what runs next); shown in the trainer's progress bar."""
        if self._bar is not None:
            self._bar.update(message=message)

    # ------------------------------------------------------------------------------- results
    @override
    def summary_lines(self) -> list[str]:
        """The verdict of each method (randomisation, class sensitivity) and the caveats found in the model."""
        return sanity_summary_lines(self.report)

    @override
    def extra_state(self) -> dict[str, Any]:
        return {"report": self.report.to_dict()} if self.report is not None else {}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("report"):
            self.report = SanityReport.from_dict(state["report"])


__all__ = ["SanityChecks", "class_maps_grid", "curve_figure", "curve_figures", "maps_grid"]
