"""``FeatureVisualization``: what do channels and classes respond to, and which regulariser shows it best?"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from lightning_introspect._lightning import pl
from lightning_introspect._torch.guards import introspection_mode, module_device
from lightning_introspect._torch.hooks import layer_outputs
from lightning_introspect._torch.layers import resolve_layers
from lightning_introspect.callbacks.base import (
    IntrospectionCallback,
    IntrospectionInputError,
    Option,
    check_callable,
    check_choice,
    check_positive_int,
    input_gradient_problem,
)
from lightning_introspect.callbacks.budget import best_of
from lightning_introspect.callbacks.outputs import logits_only
from lightning_introspect.callbacks.progress import IntrospectionProgress
from lightning_introspect.methods.featviz import (
    PARAMS,
    PENALTIES,
    FeatureVisualizationResult,
    Objective,
    channel,
    class_logit,
    dense_class_logit,
    infer_latent_dim,
    patch_token_channels,
    stack_objectives,
    token_channel,
    visualize_features,
)
from lightning_introspect.methods.featviz.layers import (
    PatchTokens,
    main_conv_chain,
    patch_token_layouts,
    vit_blocks,
)
from lightning_introspect.methods.featviz_plan import (
    REGULARIZERS,
    channel_spread,
    check_units,
    comparison_columns,
    concat_results,
    image_shape,
    nonfinite_units,
    optimisation_space,
    resolve_prior,
    setting_options,
    spread_picks,
    top_channels,
    unit_keys,
)
from lightning_introspect.methods.targets import dominant_class
from lightning_introspect.methods.task import TASK_KINDS, as_masks, resolve_task
from lightning_introspect.render.featviz import (
    class_objective_text,
    featviz_summary_lines,
    featviz_table,
    nonfinite_units_text,
    unit_image,
)

_MAX_AUTO_CLASSES = 10


def _float_list(value: Any, argument: str, *, length: int | None = None) -> list[float] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else list(value)
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"Expected `{argument}` to be a number or a list of numbers, but got {value!r}.") from err
    if length is not None and len(out) != length or not out or any(math.isnan(v) for v in out):
        need = f"{length} numbers" if length is not None else "a number or a list of numbers"
        raise ValueError(f"Expected `{argument}` to be {need}, but got {value!r}.")
    return out


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
        if not (isinstance(layers, str) or (isinstance(layers, (list, tuple)) and all(isinstance(n, str) for n in layers))):
            raise ValueError(f"Expected `layers` to be 'auto', a layer name or a list of names, but got {layers!r}.")
        if isinstance(channels, str):
            check_choice(channels, "channels", ("auto",))
        elif not (isinstance(channels, (list, tuple)) and channels and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in channels)):
            raise ValueError(f"Expected `channels` to be 'auto' or a non-empty list of channel ids (ints >= 0), but got {channels!r}.")
        if isinstance(classes, str):
            check_choice(classes, "classes", ("auto",))
        elif classes is not None and not (isinstance(classes, (list, tuple)) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes)):
            raise ValueError(f"Expected `classes` to be 'auto', None or a list of class ids (ints >= 0), but got {classes!r}.")
        self.prior_module = resolve_prior(prior)
        if regularizers is None:
            regs = ["frequency", "transform"] + (["prior"] if self.prior_module is not None else [])
        else:
            if isinstance(regularizers, str) or not isinstance(regularizers, (list, tuple)):
                raise ValueError(f"Expected `regularizers` to be a list drawn from {list(REGULARIZERS)}, but got {regularizers!r}.")
            for r in regularizers:
                check_choice(r, "regularizers", REGULARIZERS)
            regs = [r for r in REGULARIZERS if r in regularizers]
            if "prior" in regs and self.prior_module is None:
                raise ValueError("`regularizers` contains 'prior' but no `prior` decoder was given; pass `prior` or drop 'prior'.")
        check_positive_int(steps, "steps")
        check_positive_int(image_size, "image_size", allow_none=True)
        check_positive_int(num_layers, "num_layers")
        check_positive_int(num_channels, "num_channels")
        check_positive_int(batch_size, "batch_size", allow_none=True)
        self.batch_size = batch_size
        check_positive_int(latent_dim, "latent_dim", allow_none=True)
        check_choice(frequency_param, "frequency_param", PARAMS)
        check_choice(penalty, "penalty", PENALTIES)
        check_choice(task, "task", TASK_KINDS)
        if isinstance(class_region, bool) or not isinstance(class_region, (int, float)) or not 0.0 < class_region <= 1.0:
            raise ValueError(f"Expected `class_region` to be a fraction in (0, 1], but got {class_region!r}.")
        for argument, value in (("lr", lr), ("frequency_penalty", frequency_penalty), ("transform_strength", transform_strength), ("latent_penalty", latent_penalty)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (argument == "lr" and value == 0):
                raise ValueError(f"Expected `{argument}` to be a {'positive' if argument == 'lr' else 'non-negative'} number, but got {value!r}.")
        self.mean = _float_list(mean, "mean")
        self.std = _float_list(std, "std")
        if self.std is not None and any(s == 0 for s in self.std):
            raise ValueError(f"Expected `std` to be non-zero, but got {std!r}.")
        vr = _float_list(value_range, "value_range", length=2)
        if vr is not None and not vr[0] < vr[1]:
            raise ValueError(f"Expected `value_range` to be [low, high] with low < high, but got {value_range!r}.")
        self.value_range = None if vr is None else (vr[0], vr[1])
        self.layers = layers
        self.channels = channels
        self.classes = classes
        self.regularizers = regs
        self.compare = bool(compare)
        self.steps = steps
        self.lr = float(lr)
        self.image_size = image_size
        self.frequency_param = frequency_param
        self.frequency_penalty = float(frequency_penalty)
        self.penalty = penalty
        self.transform_strength = float(transform_strength)
        self.latent_dim = latent_dim
        self.latent_penalty = float(latent_penalty)
        self.num_layers = num_layers
        self.num_channels = num_channels
        check_callable(output_transform, "output_transform")
        self.output_transform = output_transform
        self.task = task
        self.class_region = float(class_region)
        self.columns = comparison_columns(regs, self.compare)
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
        """``num_layers`` layers spread evenly over the network, the last one included: a vision transformer's
        blocks whose outputs are patch tokens (:func:`vit_blocks`), else the conv layers on the main path
        (:func:`main_conv_chain` on ``example``); without either, the hidden ``nn.Linear`` layers."""
        blocks = vit_blocks(model, example)
        if blocks:  # a ViT's patch embedding is a conv too, but its blocks are where the features are
            return spread_picks(blocks, self.num_layers)
        try:
            convs = main_conv_chain(model, example)
        except ValueError:  # no spatial feature map at all
            convs = []
        if self.resolved_task == "segmentation" and len(convs) > 1:
            head = model.get_submodule(convs[-1])  # a 1x1 conv giving the class logits: the class images show those
            if isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1) and head.out_channels == self._num_outputs:
                convs = convs[:-1]
        if not convs:
            convs = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:-1]
        if not convs:
            raise ValueError("`layers='auto'` found no nn.Conv2d (or hidden nn.Linear) layers; name the layers in `layers`.")
        return spread_picks(convs, self.num_layers)

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
        """The task, detected once per fit from one forward pass of two samples at the data's size and their
        labels (:func:`~lightning_introspect.methods.task.resolve_task`), and, for segmentation, the class
        covering most pixels of the samples' masks (the background ``classes="auto"`` leaves out).
        Call with the model returning its logits (``logits_only``)."""
        if self.resolved_task is None:
            _, out = layer_outputs(model, x[:2], [])
            if self.task == "auto" and y is None:  # an image-to-image model (an autoencoder) is dense too: masks decide
                self.resolved_task = "classification"
            else:
                self.resolved_task = resolve_task(self.task, out, None if y is None else y[:2])
            self._num_outputs = int(out.shape[1]) if out.ndim >= 2 else None
            self.background = None
            if self.resolved_task == "segmentation" and y is not None:
                masks = as_masks(y)
                valid = masks[(masks >= 0) & (masks < out.shape[1])]
                self.background = dominant_class(valid) if valid.numel() else None
        return self.resolved_task

    def _display(self, x: torch.Tensor) -> tuple[tuple[float, float], list[float], list[float]]:
        """(value_range, mean, std) for the optimisation, inferred from the samples where not given."""
        return optimisation_space(x, self.mean, self.std, self.value_range)

    def _input_shape(self, x: torch.Tensor) -> tuple[int, int, int]:
        return image_shape(x, self.image_size)

    def _record_shapes(self, model: nn.Module, x: torch.Tensor) -> tuple[dict[str, tuple[int, ...]], tuple[int, ...]]:
        outs, out = layer_outputs(model, x, self.layer_names)
        return {name: tuple(o.shape) for name, o in outs.items()}, tuple(out.shape)

    def validate(self, pl_module: nn.Module, x: torch.Tensor) -> None:
        """Check channels, classes and the prior against the model (one forward on 2 samples ``x``)."""
        with logits_only(pl_module, self.output_transform):
            self._validate(pl_module, x)

    def _validate(self, pl_module: nn.Module, x: torch.Tensor) -> None:
        c, h, w = self._input_shape(x)
        probe = F.interpolate(x[:2].float(), size=(h, w), mode="bilinear", align_corners=False) if (h, w) != tuple(x.shape[-2:]) else x[:2]
        shapes, out_shape = self._record_shapes(pl_module, probe)
        named = {name: shapes.get(name) for name in self.layer_names}
        three_d = [name for name, shape in named.items() if shape is not None and len(shape) == 3]
        self.token_layouts = patch_token_layouts(pl_module, probe, three_d) if three_d else {}
        self.classes_chosen = check_units(
            named, out_shape, self.channels, self.classes, max_auto_classes=_MAX_AUTO_CLASSES,
            task=self.resolved_task or "classification", background=self.background, tokens=set(self.token_layouts),
        )
        if self.prior_module is not None and "prior" in self.regularizers:
            dim = self.latent_dim or infer_latent_dim(self.prior_module)
            pdev = module_device(self.prior_module)
            with introspection_mode(self.prior_module, grad=False):
                decoded = self.prior_module(torch.zeros(1, dim, device=pdev))
            if tuple(decoded.shape[1:]) != (c, h, w):
                raise ValueError(f"Expected `prior` to decode latents of size {dim} to images of shape {(c, h, w)}, but it gives {tuple(decoded.shape[1:])}.")
        self._validated = True

    def choose_channels(self, model: nn.Module, x: torch.Tensor) -> dict[str, list[int]]:
        """``channels="auto"``: per layer the ``num_channels`` channels (embedding dimensions of a token layer)
        whose activation varies most over the samples and positions (patch tokens)."""
        if isinstance(self.channels, (list, tuple)):
            return {name: list(self.channels) for name in self.layer_names}
        outs, _ = layer_outputs(model, x, self.layer_names)
        spread = {name: channel_spread(self._as_channels(name, out)) for name, out in outs.items()}
        self._unsettled = {name for name, v in spread.items() if not bool(torch.isfinite(v).all())}
        return {name: top_channels(spread[name], self.num_channels) for name in self.layer_names}

    def _as_channels(self, name: str, activation: torch.Tensor) -> torch.Tensor:
        """A token layer's output as its embedding dimensions over the patch tokens ``(N, D, P)``; others as they are."""
        layout = self.token_layouts.get(name)
        if layout is None:
            return activation
        return patch_token_channels(activation, layout.prefix, sequence_first=layout.sequence_first)

    def channel_objective(self, name: str, ids: Sequence[int]) -> Objective:
        """The objective of the channel images of layer ``name``: a channel's mean activation over its positions;
        for a token layer the embedding dimension's mean over the patch tokens
        (:func:`~lightning_introspect.methods.featviz.objectives.token_channel`)."""
        layout = self.token_layouts.get(name)
        if layout is None:
            return channel(name, list(ids))
        return token_channel(name, list(ids), prefix=layout.prefix, sequence_first=layout.sequence_first)

    # ------------------------------------------------------------------------------------ the work
    def setting_kwargs(self, setting: str, size: int) -> dict[str, Any]:
        """``visualize_features`` keyword arguments of one column (see :func:`setting_options`)."""
        return setting_options(
            setting,
            self.regularizers,
            size,
            frequency_param=self.frequency_param,
            frequency_penalty=self.frequency_penalty,
            penalty=self.penalty,
            transform_strength=self.transform_strength,
            prior=self.prior_module,
            latent_dim=self.latent_dim,
            latent_penalty=self.latent_penalty,
        )

    def units(self) -> list[tuple[str, Objective, int]]:
        """(unit key prefix, objective, number of images) parts of the batch."""
        parts: list[tuple[str, Objective, int]] = []
        for name in self.layer_names:
            chans = self.chosen.get(name, [])
            if chans:
                parts.append((name, self.channel_objective(name, chans), len(chans)))
        if self.classes_chosen:
            parts.append(("class", self.class_objective(), len(self.classes_chosen)))
        return parts

    def class_objective(self, classes: Sequence[int] | None = None) -> Objective:
        """The objective of the class images (default: every chosen class): the class logit of a classifier;
        for segmentation the class's mean logit over the central ``class_region`` of the output
        (:func:`~lightning_introspect.methods.featviz.objectives.dense_class_logit`)."""
        classes = list(self.classes_chosen if classes is None else classes)
        if self.resolved_task == "segmentation":
            return dense_class_logit(classes, region=self.class_region)
        return class_logit(classes)

    def chunk_objectives(self, size: int) -> list[tuple[Objective, int]]:
        """The images of a run split into chunks of at most ``size``: per chunk its objective and image count
        (in batch order: layer channels, then classes)."""
        units = [(name, c) for name in self.layer_names for c in self.chosen.get(name, [])]
        units += [("class", c) for c in self.classes_chosen]
        chunks = []
        for start in range(0, len(units), size):
            part = units[start : start + size]
            groups: list[tuple[str, list[int]]] = []
            for prefix, unit in part:
                if groups and groups[-1][0] == prefix:
                    groups[-1][1].append(unit)
                else:
                    groups.append((prefix, [unit]))
            objective = stack_objectives([
                (self.class_objective(ids) if prefix == "class" else self.channel_objective(prefix, ids), len(ids)) for prefix, ids in groups
            ])
            chunks.append((objective, len(part)))
        return chunks

    def chunk_size(self, trainer: pl.Trainer) -> int:
        """Images optimised together: ``batch_size``, else a quarter of the training batch size (at least 1):
        one image under optimisation holds about three times the memory of a training sample (its
        parameterisation, transforms and their gradients), so the extra memory stays near a training step's."""
        if self.batch_size is not None:
            return self.batch_size
        loader = getattr(trainer, "train_dataloader", None)
        size = getattr(loader, "batch_size", None)
        return max(1, int(size) // 4) if isinstance(size, int) and size > 0 else 16

    def unit_keys(self) -> list[str]:
        """``"<layer>/<channel>"`` and ``"class/<c>"`` keys, in batch order."""
        return unit_keys(self.layer_names, self.chosen, self.classes_chosen)

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
        parts = self.units()
        if not parts:
            self.warn_once("nothing", "FeatureVisualization has no channels or classes to visualise; set `layers`/`channels` or `classes`.")
            return {}
        chunks = self.chunk_objectives(self.chunk_size(trainer))
        c, h, w = self._input_shape(x)
        value_range, mean, std = self._display(x)
        device = module_device(pl_module)
        if self.prior_module is not None and "prior" in self.regularizers:
            self.prior_module.to(device)

        def optimise(setting: str, steps: int) -> FeatureVisualizationResult:
            start, parts = 0, []
            for objective, k in chunks:  # each chunk seeded by its first image's position: a given size is deterministic
                parts.append(visualize_features(pl_module, objective, shape=(k, c, h, w), steps=steps, lr=self.lr,
                                                value_range=value_range, mean=mean, std=std, seed=self.seed + start,
                                                **self.setting_kwargs(setting, min(h, w))))
                start += k
            return concat_results(parts)

        option = self.sized(trainer, self._options(optimise))
        if option is None:
            return {}
        self.run_columns, self.run_steps = list(option.sizes["settings"]), int(option.sizes["steps"])
        start = time.perf_counter()
        results: dict[str, FeatureVisualizationResult] = {}
        with IntrospectionProgress(trainer, "feature visualisation", total=len(self.run_columns)) as bar:
            for setting in self.run_columns:
                results[setting] = optimise(setting, self.run_steps)
                bar.update(message=setting)
        elapsed = time.perf_counter() - start
        self.unit_costs.observe("setting_step", elapsed, len(self.run_columns) * self.run_steps)
        self.charge(elapsed)
        self.results = results
        self.log_results(trainer, results, value_range, epoch=epoch)
        for name in self._unsettled:  # chosen from NaN / Inf activations: choose again at the next run
            self.chosen.pop(name, None)
        self._unsettled = set()
        return results

    def _options(self, optimise: Callable[[str, int], Any]) -> list[Option]:
        """The sizes a run may take under a budget, largest first: the configured settings and steps, then
        only the ``all`` setting, then half the steps (not below 16); explicit arguments are kept."""
        given = set(self._given)
        if not self.unit_costs.known("setting_step") and self.budget is not None:
            self._probe_step(optimise)
        per_step = self.unit_costs.get("setting_step", 0.0)

        def option(settings: list[str], steps: int) -> Option:
            return Option({"settings": settings, "steps": steps}, per_step * len(settings) * steps)

        settings, steps = list(self.columns), self.steps
        options = [option(settings, steps)]
        if "compare" not in given and len(settings) > 1:
            settings = comparison_columns(self.regularizers, False)
            options.append(option(settings, steps))
        while "steps" not in given and steps > 16:
            steps = max(16, steps // 2)
            options.append(option(settings, steps))
        return options

    def _probe_step(self, optimise: Callable[[str, int], Any]) -> None:
        """Estimate one optimisation step of one setting before the first run: the most regularised setting
        run for 1 and for 3 steps; the difference leaves out the set-up both share."""
        setting = self.columns[-1]
        one, three = best_of(1, lambda: optimise(setting, 1)), best_of(1, lambda: optimise(setting, 3))
        self.unit_costs.observe("setting_step", max((three - one) / 2, one / 4))

    def log_results(
        self, trainer: pl.Trainer, results: dict[str, FeatureVisualizationResult], value_range: tuple[float, float], *, epoch: int | None = None
    ) -> None:
        writer = self.writer(trainer)
        step, epoch = trainer.global_step, trainer.current_epoch if epoch is None else epoch
        keys = self.unit_keys()
        scalars: dict[str, float] = {}
        self.nonfinite = nonfinite_units(keys, results, self.run_columns)
        for i, key in enumerate(keys):
            tiles = torch.stack([results[s].images[i] for s in self.run_columns])
            self.images[key] = tiles.clone()
            if key not in self.nonfinite:  # a NaN / Inf image would be drawn as a silently wrong picture
                writer.image(self.tag(key), unit_image(tiles, value_range), step)
            for s in self.run_columns:
                r = results[s]
                obj, hf = float(r.objective[i]), float(r.high_frequency_fraction[i])
                if s not in self.nonfinite.get(key, ()):
                    scalars[self.tag("objective", s, key)] = obj
                    scalars[self.tag("hf_fraction", s, key)] = hf
                self.history.append({"epoch": epoch, "step": step, "unit": key, "setting": s, "objective": obj, "initial_objective": float(r.initial_objective[i]), "hf_fraction": hf})
        for s in self.run_columns:
            good = [i for i, key in enumerate(keys) if s not in self.nonfinite.get(key, ())]
            if good:
                scalars[self.tag("hf_fraction", s)] = float(results[s].high_frequency_fraction[good].mean())
        writer.scalars(scalars, step)
        writer.text(self.tag("table"), self.table(keys, results), step)
        if self.nonfinite:
            self._report_nonfinite(trainer)

    def _report_nonfinite(self, trainer: pl.Trainer) -> None:
        """Warn once, and note at this step, which units were not logged because of NaN / Inf values."""
        units = nonfinite_units_text(self.nonfinite, self.run_columns)
        self.note_nonfinite(trainer, "nonfinite", f"non-finite values (NaN / Inf) in the optimised images or final objective of {units}",
                            "Their images and non-finite objective / hf_fraction scalars are not logged",
                            "logs these units again once they are finite")

    def table(self, keys: Sequence[str], results: dict[str, FeatureVisualizationResult]) -> str:
        """A markdown table: one row per unit, objective and high-frequency fraction per setting."""
        chosen = [self._layer_text(n) for n in self.layer_names]
        if self.classes_chosen:
            left_out = self.background if self.classes == "auto" else None
            chosen.append(class_objective_text(self.classes_chosen, task=self.resolved_task or "classification", region=self.class_region, background=left_out))
        return featviz_table(keys, results, self.run_columns, steps=self.run_steps, lr=self.lr, chosen=chosen, nonfinite=self.nonfinite)

    def _layer_text(self, name: str) -> str:
        """One layer's chosen units for the table's "Chosen" line."""
        layout = self.token_layouts.get(name)
        if layout is None:
            return f"{name}: channels {self.chosen.get(name, [])}"
        return f"{name}: embedding dimensions {self.chosen.get(name, [])} ({layout.describe()})"

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
