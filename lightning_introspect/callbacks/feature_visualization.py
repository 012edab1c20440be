"""``FeatureVisualization``: what do channels and classes respond to, and which regulariser shows it best?

The callback decides when (train-epoch end on its schedule, before training for ``at=0.0``, the final model
after an early stop), what (the units :mod:`~lightning_introspect.callbacks.featviz_setup` decides on the model
and the fixed samples) and where (TensorBoard); its arguments are checked by
:mod:`~lightning_introspect.callbacks.featviz_arguments`, a run is :mod:`~lightning_introspect.callbacks.featviz_run`
(the optimisation itself :func:`~lightning_introspect.methods.featviz.render.visualize_features`) and what it writes
:mod:`~lightning_introspect.callbacks.featviz_report` (drawn by :mod:`lightning_introspect.render.featviz`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_introspect._lightning import pl
from lightning_introspect._torch.layers import resolve_layers
from lightning_introspect.callbacks.base import (
    IntrospectionCallback,
    IntrospectionInputError,
    input_gradient_problem,
)
from lightning_introspect.callbacks.featviz_arguments import check_featviz_arguments
from lightning_introspect.callbacks.featviz_report import log_results, results_table
from lightning_introspect.callbacks.featviz_run import optimise_settings
from lightning_introspect.callbacks.featviz_setup import (
    auto_layers,
    channel_objective,
    check_run_units,
    choose_channels,
    chunk_objectives,
    chunk_size,
    class_objective,
    detect_task,
)
from lightning_introspect.callbacks.outputs import logits_only
from lightning_introspect.methods.featviz import FeatureVisualizationResult, Objective
from lightning_introspect.methods.featviz.layers import PatchTokens
from lightning_introspect.methods.featviz_plan import (
    comparison_columns,
    resolve_prior,
    setting_options,
    unit_keys,
)
from lightning_introspect.render.featviz import featviz_summary_lines


class FeatureVisualization(IntrospectionCallback):
    """Activation maximisation at train-epoch end: images that drive chosen channels and class logits.

    For each chosen ``(layer, channel)`` and class, images are optimised to maximise the channel's
    mean activation / the class logit, once per *regulariser setting*, and logged side by side: by
    default ``none`` (plain pixels, the high-frequency optimum), each regulariser alone, and ``all``
    together. There is no rule for which regulariser suits a model and data set -- the grid lets you
    see it, and the high-frequency fraction (a "how natural" number: spectral energy above half the
    Nyquist frequency) and the final objective measure it.

    Regularisers (the column names):

    * ``frequency``: the ``frequency_param`` parameterisation (default ``"fourier"``: 1/f-scaled spectrum)
      plus a ``frequency_penalty`` (total variation by default);
    * ``transform``: random pad / jitter / scale / rotation every step, scaled to the image size
      (``transform_strength``);
    * ``prior``: optimise the latent of a decoder ``prior`` (an ``nn.Module`` or an import path);
      only when a prior is given.

    Runs at train-epoch end on global rank zero (never inside validation: it needs gradients), in
    eval mode, with the global RNG forked; the model's weights, modes, hooks and ``.grad`` are left as
    they were (see :func:`~lightning_introspect.methods.featviz.render.visualize_features`).

    Segmentation: the task is detected once per fit, before training, from one forward pass of two
    samples and their labels (``task="auto"``: dense ``(N, C, H, W)`` logits with integer masks of their
    size are segmentation; see :func:`~lightning_introspect.methods.task.resolve_task`; data without
    labels are not taken for segmentation, since an autoencoder's output is dense too: pass
    ``task="segmentation"`` then). A segmentation
    model has one logit per pixel, so its class images maximise the class's *mean logit over the central
    ``class_region``* of the output (default: the central half of the height and the width;
    :func:`~lightning_introspect.methods.featviz.objectives.dense_class_logit`): one object of the class
    in the middle of the image, with context around it, rather than the class from edge to edge; the mean
    keeps the objective on the scale of one logit whatever the output size. ``classes="auto"`` then takes
    every class but the one covering most pixels of the samples' masks (the background), at most 10, and
    ``layers="auto"`` leaves out a final 1x1 conv that gives the class logits (its channels are what the
    class images already show). The table's "Chosen" line names the objective. Cost: the same as a
    classifier's class images (one batch per setting, ``steps`` forward and backward passes of the model
    at the image size).

    Vision transformers: a block of a ViT outputs tokens ``(N, T, D)``: class / register tokens, then one
    token per image patch. There an *embedding dimension* plays the part of a channel and the patch tokens
    the part of the positions: a channel image maximises the dimension's mean over the patch tokens (the
    class and register tokens left out: they belong to no place in the image, and the class token is what
    the class images already show; :func:`~lightning_introspect.methods.featviz.objectives.token_channel`).
    Which outputs are tokens and how many tokens come before the patches is found as for the linear probes
    and Grad-CAM (the module types, then the patch grid of the image's aspect; see
    :func:`~lightning_introspect.methods.featviz.layers.patch_token_layouts`); the table's "Chosen" line
    says so (``encoder: embedding dimensions [3, 7, 9] (mean over the 4x4 patch tokens; 1 prefix token
    left out)``). Class images need nothing special. Tags, results and costs are as for a CNN.

    Args:
        layers: layer names / glob patterns, or ``"auto"``: ``num_layers`` layers spread over the network,
            the last one included. A vision transformer: its blocks whose outputs are patch tokens (found as
            the linear probes find them; see :func:`~lightning_introspect.methods.featviz.layers.vit_blocks`).
            Otherwise conv layers on the network's main path: the convolutions on the longest chain that leads to
            the feature map Attributions' Grad-CAM uses by default (so a residual block's 1x1 shortcut conv
            is never taken for the last conv; see :func:`~lightning_introspect.methods.featviz.layers.main_conv_chain`;
            a network without convs: its hidden ``nn.Linear`` layers). Logged in ``introspect/featviz/table``.
            ``[]`` for classes only.
        channels: a list of channel ids used for every layer (embedding dimensions for a token layer), or
            ``"auto"``: the ``num_channels`` channels with the largest activation spread over the fixed samples
            (and positions, or patch tokens) at the first run (then kept).
        classes: class ids to visualise (class logits), ``"auto"`` (the first 10 classes of a
            classifier's ``(N, C)`` output; for segmentation every class but the background, at most 10;
            nothing for other outputs) or ``None``.
        regularizers: a subset of ``"frequency"``, ``"transform"``, ``"prior"``; default: the first two,
            plus ``"prior"`` when a ``prior`` is given.
        compare: log ``none``, each regulariser and ``all`` (True) or only ``all`` (False).
        steps: optimisation steps per setting.
        lr: Adam learning rate.
        image_size: side of the optimised images (default: the size of the data).
        frequency_param: parameterisation of the ``frequency`` setting: ``"fourier"`` or ``"pixels"``.
        frequency_penalty: relative weight of the frequency penalty (see ``visualize_features``).
        penalty: ``"tv"`` or ``"highfreq"``.
        transform_strength: scales the transformation-robustness amounts (1 = Lucid's defaults scaled to
            the image size: at 32 px pad 3, jitter 2, scale 0.9-1.1, rotate 10 degrees, jitter 1).
        prior: a decoder ``latent -> image`` in ``value_range`` (an ``nn.Module``, or an import path
            ``"package.module:attribute"`` naming a module or a zero-argument factory). Moved to the
            model's device; its weights are not changed.
        latent_dim: the prior's latent size (default: inferred from a leading ``nn.Linear``).
        latent_penalty: relative weight of the mean squared latent.
        mean: the data normalisation's mean (number or per channel); with ``std`` and ``value_range``.
        std: the data normalisation's std.
        value_range: the valid image range in display space, e.g. ``[0.0, 1.0]``. When ``mean``, ``std``
            and ``value_range`` are all ``None``, images are optimised directly in the model's input
            space within the min / max of the fixed samples.
        num_layers: layers chosen by ``layers="auto"``.
        num_channels: channels per layer chosen by ``channels="auto"``.
        output_transform: callable ``forward output -> logits`` for a model that returns more than the
            logits (class objectives; as in :class:`Attributions`).
        task: ``"auto"`` (detected from the output and labels), ``"classification"`` or ``"segmentation"``;
            an explicit task the data contradict is refused before training, with the shapes named.
        class_region: segmentation only: the fraction of the output's height and width, centred, over which
            a class image's mean logit is maximised (1.0: the whole output).
        batch_size: images optimised together (a run optimises its units in chunks of this size; each
            chunk's start noise is seeded by its position, so a given size gives the same images). ``None``:
            a quarter of the training batch size, at least 1 (an image under optimisation holds about three
            times the memory of a training sample: its parameterisation, transforms and their gradients).
        enabled, every_n_epochs, at, num_samples, seed, on_error: see ``IntrospectionCallback``. By
            default it runs at half of training and at the last epoch (it costs seconds, not milliseconds).

    Under a budget (``introspection_callbacks(config, budget=...)``) each run is sized to its share: first
    only the ``all`` setting (no comparison), then half the steps (not below 16); when even that does not
    fit the run is skipped with a note. ``compare`` and ``steps`` given explicitly are kept. The sizes
    of the latest run are ``run_columns`` / ``run_steps``, the decision ``budget_choice`` and
    ``introspect/featviz/budget`` (text).

    Tags written:
        * ``introspect/featviz/<layer>/<channel>`` -- image: one tile per setting, columns in the order
          of ``columns`` (e.g. none, frequency, transform, all); for a token layer ``<channel>`` is the
          embedding dimension;
        * ``introspect/featviz/class/<class>`` -- image: the same for a class logit (segmentation: the class's
          mean logit over the central region);
        * ``introspect/featviz/objective/<setting>/<layer>/<channel>`` and ``.../objective/<setting>/class/<class>``
          -- the final objective of each image (untransformed);
        * ``introspect/featviz/hf_fraction/<setting>/<layer>/<channel>`` and ``.../class/<class>`` -- its
          high-frequency energy fraction;
        * ``introspect/featviz/hf_fraction/<setting>`` -- the mean over the setting's images;
        * ``introspect/featviz/table`` -- text: the chosen units and a table of objective and
          high-frequency fraction per setting;
        * ``introspect/featviz/warnings`` -- text, only when a unit's images or objective hold NaN / Inf
          (non-finite weights or inputs): which units were not logged at that step and why;
        * ``introspect/featviz/seconds`` -- wall time of each run.

    Non-finite values: a unit (channel or class) whose optimised image or final objective holds NaN / Inf
    in any setting is not drawn (it would be a silently wrong picture) and its non-finite scalars are
    not written; the table shows ``non-finite`` there. The callback warns once, writes a note to
    ``introspect/featviz/warnings`` at each such step and stays on: later runs log the unit again once
    it is finite. ``channels="auto"`` does not keep a choice made from non-finite activations.

    Results on the instance:
        ``columns`` (setting names), ``chosen`` (layer -> channel ids), ``token_layouts`` (token layer ->
        :class:`~lightning_introspect.methods.featviz.layers.PatchTokens`: its prefix tokens and patch grid),
        ``classes_chosen``, ``resolved_task``
        (``"classification"`` or ``"segmentation"``), ``background`` (segmentation: the class
        ``classes="auto"`` left out),
        ``images`` (unit key ``"<layer>/<channel>"`` or ``"class/<c>"`` -> ``(S, C, H, W)`` tensor in
        ``value_range``, one image per setting), ``results`` (setting -> ``FeatureVisualizationResult`` of
        the latest run), ``history`` (list of dicts: epoch, step, unit, setting, objective,
        initial_objective, hf_fraction), ``nonfinite`` (unit key -> the settings whose image or objective
        held NaN / Inf in the latest run; empty when all was finite).

    Example:
        >>> from lightning_introspect.demo import DigitsCNN, DigitsDataModule
        >>> from lightning_introspect._lightning import Trainer
        >>> cb = FeatureVisualization(layers=["features.8"], channels=[0, 1], classes=[3], steps=4)
        >>> trainer = Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[cb],
        ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False)
        >>> trainer.fit(DigitsCNN(), datamodule=DigitsDataModule(limit=64))  # doctest: +SKIP
        >>> cb.columns, sorted(cb.images)  # doctest: +SKIP
        (['none', 'frequency', 'transform', 'all'], ['class/3', 'features.8/0', 'features.8/1'])
    """

    name = "featviz"
    sized_runs = True
    draws_samples = True

    def __init__(
        self,
        *,
        layers: str | list[str] = "auto",
        channels: str | list[int] = "auto",
        classes: str | list[int] | None = "auto",
        regularizers: list[str] | None = None,
        compare: bool = True,
        steps: int = 32,
        lr: float = 0.1,
        image_size: int | None = None,
        frequency_param: str = "fourier",
        frequency_penalty: float = 2.0,
        penalty: str = "tv",
        transform_strength: float = 1.0,
        prior: str | nn.Module | None = None,
        latent_dim: int | None = None,
        latent_penalty: float = 0.1,
        mean: float | list[float] | None = None,
        std: float | list[float] | None = None,
        value_range: list[float] | tuple[float, float] | None = None,
        num_layers: int = 2,
        num_channels: int = 3,
        output_transform: Callable[[Any], Any] | None = None,
        task: str = "auto",
        class_region: float = 0.5,
        batch_size: int | None = None,
        enabled: bool = True,
        every_n_epochs: int | None = None,
        at: list[float] | tuple[float, ...] | None = (0.5,),
        num_samples: int = 32,
        seed: int = 0,
        on_error: str = "warn",
    ) -> None:
        super().__init__(enabled=enabled, every_n_epochs=every_n_epochs, at=at, num_samples=num_samples, seed=seed, on_error=on_error)
        args = check_featviz_arguments(
            layers=layers, channels=channels, classes=classes, regularizers=regularizers, steps=steps, lr=lr,
            image_size=image_size, frequency_param=frequency_param, frequency_penalty=frequency_penalty, penalty=penalty,
            transform_strength=transform_strength, prior=prior, latent_dim=latent_dim, latent_penalty=latent_penalty,
            mean=mean, std=std, value_range=value_range, num_layers=num_layers, num_channels=num_channels,
            output_transform=output_transform, task=task, class_region=class_region, batch_size=batch_size,
        )
        self.layers, self.channels, self.classes = layers, channels, classes  # what to visualise
        self.num_layers, self.num_channels = num_layers, num_channels
        self.task, self.class_region, self.output_transform = task, float(class_region), output_transform
        self.regularizers, self.compare = args.regularizers, bool(compare)  # how
        self.steps, self.lr, self.image_size, self.batch_size = steps, float(lr), image_size, batch_size
        self.frequency_param, self.frequency_penalty, self.penalty = frequency_param, float(frequency_penalty), penalty
        self.transform_strength = float(transform_strength)
        self.prior_module, self.latent_dim, self.latent_penalty = args.prior_module, latent_dim, float(latent_penalty)
        self.mean, self.std, self.value_range = args.mean, args.std, args.value_range  # the image space
        self.columns = comparison_columns(self.regularizers, self.compare)
        self.reset()

    # ------------------------------------------------------------------------------ Lightning hooks
    @override
    def reset(self) -> None:
        self.layer_names: list[str] = []
        self.token_layouts: dict[str, PatchTokens] = {}  # token layers among layer_names: where their patches are
        self.chosen: dict[str, list[int]] = {}
        self.classes_chosen: list[int] = []
        self.resolved_task: str | None = None  # "classification" / "segmentation", detected once per fit
        self.background: int | None = None  # segmentation: the class classes="auto" leaves out
        self._num_outputs: int | None = None  # channels of the model output (classes)
        self.images: dict[str, torch.Tensor] = {}
        self.results: dict[str, FeatureVisualizationResult] = {}
        self.history: list[dict[str, Any]] = []
        self.nonfinite: dict[str, list[str]] = {}
        self._last_step: int | None = None  # global step of the latest run: the fit-end catch-up compares it
        self._validated = False
        self._unsettled: set[str] = set()  # layers whose "auto" channels came from non-finite activations
        self.run_columns: list[str] = list(self.columns)  # the settings and steps of the latest run (budget)
        self.run_steps: int = self.steps

    @override
    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.resolve(pl_module)  # bad layer names fail here, before any training step ("auto" waits for data)

    @override
    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Inputs that are not images and models without an input gradient are skipped; bad channels,
        classes or prior are refused; all before the first training step."""
        if self.val_dataloader(trainer) is None:  # no data reachable yet: checked at the first run instead
            return
        x, y = self.fixed_samples(trainer)
        if x.ndim != 4:  # like Attributions and SanityChecks: the rest of the set still runs on such data
            self.skip(f"the inputs of shape {tuple(x.shape)} are not images (N, C, H, W), so there is nothing to visualise.")
            return
        try:
            with logits_only(pl_module, self.output_transform):
                problem = input_gradient_problem(pl_module, x)
        except Exception:  # the model failed on the samples: left to `on_error` at the first run
            if self.on_error == "raise":
                raise
            problem = None
        if problem is not None:
            self.skip(problem)
            return
        try:
            with logits_only(pl_module, self.output_transform):
                self._detect_task(pl_module, x, y)  # an explicit `task` the data contradict is refused here
            self.resolve(pl_module, x)
            self.validate(pl_module, x)  # bad channels / classes / prior raise ValueError here
        except IntrospectionInputError:
            raise
        except ValueError as err:
            raise IntrospectionInputError(str(err)) from err
        except Exception:  # the model itself failed on the samples: left to `on_error` at the first run
            self._validated = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # `at=0.0` is "before training": not again in a fit resumed from a checkpoint (global_step > 0)
        if self.active(trainer) and trainer.global_step == 0 and -1 in self.fraction_epochs(trainer).values():
            self.run(trainer, self.visualize, trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active(trainer) and self.is_scheduled(trainer):
            self.run(trainer, self.visualize, trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the final model, when the fit ended before its last scheduled epoch (EarlyStopping, max_time, no max_epochs)
        if self.final_run_missed(trainer, self._last_step):
            self.run(trainer, self.visualize, trainer, pl_module, epoch=self.last_epoch(trainer))

    # ------------------------------------------------------------------------------------ choices
    def auto_layers(self, model: nn.Module, example: torch.Tensor) -> list[str]:
        """``num_layers`` layers spread evenly over the network, the last one included (see ``featviz_setup``)."""
        return auto_layers(model, example, self.num_layers, task=self.resolved_task, num_outputs=self._num_outputs)

    def resolve(self, model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
        """Resolve ``layers`` to names (ValueError with the closest names for a bad one). ``"auto"`` needs
        ``example`` inputs (one forward pass); without them the names are left empty until a run has data."""
        if (isinstance(self.layers, (list, tuple)) and not self.layers) or (self.layers == "auto" and example is None):
            self.layer_names = []
        else:
            auto = self.auto_layers(model, example) if self.layers == "auto" and example is not None else None
            self.layer_names = list(resolve_layers(model, self.layers, argument="layers", auto=auto))
        return self.layer_names

    def _detect_task(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> str:
        """The task, detected once per fit (see ``featviz_setup.detect_task``); call with ``logits_only``."""
        if self.resolved_task is None:
            self.resolved_task, self._num_outputs, self.background = detect_task(model, x, y, self.task)
        return self.resolved_task

    def validate(self, pl_module: nn.Module, x: torch.Tensor) -> None:
        """Check channels, classes and the prior against the model (one forward on 2 samples ``x``)."""
        with logits_only(pl_module, self.output_transform):
            self._validate(pl_module, x)

    def _validate(self, pl_module: nn.Module, x: torch.Tensor) -> None:
        self.token_layouts, self.classes_chosen = check_run_units(self, pl_module, x)
        self._validated = True

    def choose_channels(self, model: nn.Module, x: torch.Tensor) -> dict[str, list[int]]:
        """``channels="auto"``: per layer the ``num_channels`` channels (embedding dimensions of a token layer)
        whose activation varies most over the samples and positions (patch tokens)."""
        if isinstance(self.channels, (list, tuple)):
            return {name: list(self.channels) for name in self.layer_names}
        chosen, self._unsettled = choose_channels(model, x, self.layer_names, self.token_layouts, self.num_channels)
        return chosen

    def channel_objective(self, name: str, ids: Sequence[int]) -> Objective:
        """The objective of the channel images of layer ``name`` (a token layer: over its patch tokens)."""
        return channel_objective(name, ids, self.token_layouts.get(name))

    def class_objective(self, classes: Sequence[int] | None = None) -> Objective:
        """The objective of the class images (default: every chosen class; segmentation: over ``class_region``)."""
        return class_objective(self.classes_chosen if classes is None else classes, self.resolved_task, self.class_region)

    def units(self) -> list[tuple[str, Objective, int]]:
        """(unit key prefix, objective, number of images) parts of the batch."""
        parts = [(name, self.channel_objective(name, self.chosen[name]), len(self.chosen[name]))
                 for name in self.layer_names if self.chosen.get(name)]
        if self.classes_chosen:
            parts.append(("class", self.class_objective(), len(self.classes_chosen)))
        return parts

    def chunk_objectives(self, size: int) -> list[tuple[Objective, int]]:
        """The images of a run split into chunks of at most ``size``: per chunk its objective and image count
        (in batch order: layer channels, then classes)."""
        units = [(name, c) for name in self.layer_names for c in self.chosen.get(name, [])]
        units += [("class", c) for c in self.classes_chosen]
        return chunk_objectives(units, size, lambda prefix, ids: (
            self.class_objective(ids) if prefix == "class" else self.channel_objective(prefix, ids)))

    def chunk_size(self, trainer: pl.Trainer) -> int:
        """Images optimised together: ``batch_size``, else a quarter of the training batch size (at least 1)."""
        return chunk_size(self.batch_size, trainer)

    def unit_keys(self) -> list[str]:
        """``"<layer>/<channel>"`` and ``"class/<c>"`` keys, in batch order."""
        return unit_keys(self.layer_names, self.chosen, self.classes_chosen)

    def setting_kwargs(self, setting: str, size: int) -> dict[str, Any]:
        """``visualize_features`` keyword arguments of one column (see :func:`setting_options`)."""
        return setting_options(
            setting, self.regularizers, size, frequency_param=self.frequency_param, frequency_penalty=self.frequency_penalty,
            penalty=self.penalty, transform_strength=self.transform_strength, prior=self.prior_module,
            latent_dim=self.latent_dim, latent_penalty=self.latent_penalty,
        )

    # ------------------------------------------------------------------------------------ the work
    def visualize(self, trainer: pl.Trainer, pl_module: nn.Module, *, epoch: int | None = None) -> dict[str, FeatureVisualizationResult]:
        """Optimise one batch per setting (all chosen channels and classes at once) and log the grids
        (recorded under ``epoch``, default ``trainer.current_epoch``)."""
        with logits_only(pl_module, self.output_transform):
            return self._visualize(trainer, pl_module, epoch)

    def _visualize(self, trainer: pl.Trainer, pl_module: nn.Module, epoch: int | None) -> dict[str, FeatureVisualizationResult]:
        self._last_step = int(trainer.global_step)
        x, y = self.fixed_samples(trainer)
        if not self._validated:
            self._detect_task(pl_module, x, y)
            self.resolve(pl_module, x)
            self._validate(pl_module, x)  # `visualize` already made the model return its logits
        if any(name not in self.chosen for name in self.layer_names):
            fresh = self.choose_channels(pl_module, x)
            self.chosen.update({n: c for n, c in fresh.items() if n not in self.chosen})
        if not self.units():
            self.warn_once("nothing", "FeatureVisualization has no channels or classes to visualise; set `layers`/`channels` or `classes`.")
            return {}
        run = optimise_settings(self, trainer, pl_module, x)
        if run is None:  # the budget leaves no room for this run (noted)
            return {}
        self.results, value_range = run
        self.log_results(trainer, self.results, value_range, epoch=epoch)
        for name in self._unsettled:  # chosen from NaN / Inf activations: choose again at the next run
            self.chosen.pop(name, None)
        self._unsettled = set()
        return self.results

    def log_results(
        self, trainer: pl.Trainer, results: dict[str, FeatureVisualizationResult], value_range: tuple[float, float], *, epoch: int | None = None
    ) -> None:
        """Write a run's images, scalars and table (see ``featviz_report``)."""
        log_results(self, trainer, results, value_range, epoch=epoch)

    def table(self, keys: Sequence[str], results: dict[str, FeatureVisualizationResult]) -> str:
        """A markdown table: one row per unit, objective and high-frequency fraction per setting."""
        return results_table(self, keys, results)

    # ---------------------------------------------------------------------------------- reporting
    @override
    def summary_lines(self) -> list[str]:
        """The units visualised, and per setting the mean objective and high-frequency fraction of the latest run."""
        return featviz_summary_lines(self.results, self.run_columns, len(self.unit_keys()))

    @override
    def extra_state(self) -> dict[str, Any]:
        return {"chosen": {k: list(v) for k, v in self.chosen.items()}, "history": list(self.history)}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.chosen = {str(k): [int(c) for c in v] for k, v in dict(state.get("chosen", {})).items()}
        self.history = list(state.get("history", []))
        self._last_step = self.history[-1].get("step") if self.history else None


__all__ = ["FeatureVisualization", "resolve_prior"]
