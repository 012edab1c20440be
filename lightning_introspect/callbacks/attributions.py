"""``Attributions``: saliency, guided backprop, Grad-CAM and LRP maps of fixed samples, epoch by epoch.

The callback decides when (fit start, the ``at`` fractions, every ``every_n_epochs``, the last epoch), on what
(the fixed samples; the methods, task and layer resolved once per fit by
:mod:`~lightning_introspect.callbacks.attribution_setup`) and where (TensorBoard). Its arguments are checked by
:mod:`~lightning_introspect.callbacks.attribution_arguments`; a run is
:mod:`~lightning_introspect.callbacks.attribution_classes` (classification) or
:mod:`~lightning_introspect.callbacks.attribution_regions` (segmentation), each followed by the faithfulness and
eMPRT of :mod:`~lightning_introspect.callbacks.attribution_scores`; token ids are planned and written as text by
:mod:`~lightning_introspect.callbacks.attribution_tokens`. The maps are :mod:`lightning_introspect.methods.attribution`
and :mod:`~lightning_introspect.methods.attribution_runs`, the drawing :mod:`lightning_introspect.render.attributions`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from typing_extensions import override

from lightning_introspect._lightning import pl
from lightning_introspect._torch.guards import introspection_mode
from lightning_introspect._torch.layers import get_layer
from lightning_introspect.callbacks.attribution_arguments import (
    DEFAULT_METHODS,
    check_attribution_arguments,
    is_default_methods,
)
from lightning_introspect.callbacks.attribution_classes import log_classes
from lightning_introspect.callbacks.attribution_regions import log_regions
from lightning_introspect.callbacks.attribution_setup import CannotExplain, resolve_attribution_setup
from lightning_introspect.callbacks.attribution_tokens import token_markdown
from lightning_introspect.callbacks.base import IntrospectionCallback
from lightning_introspect.callbacks.outputs import logits_only
from lightning_introspect.loggers.adapter import IntrospectionWriter
from lightning_introspect.methods.attribution import SIGNED_METHODS, attribute
from lightning_introspect.methods.attribution_runs import RegionPairs, skipped_grids
from lightning_introspect.methods.token_attribution import is_token_ids
from lightning_introspect.render.attributions import (
    attribution_overlays,
    attribution_summary_lines,
    class_label,
    display_inputs,
    feature_bar_chart,
    grid_list,
    nonfinite_what,
    outline_regions,
)
from lightning_introspect.render.grid import captioned_grid, shown_images, shown_size, shrink_images


class Attributions(IntrospectionCallback):
    """Attribution maps of the same fixed samples over training: which pixels the model uses, and how that evolves.

    At fit start (the untrained model, ``at`` fraction 0.0), half way, at the last epoch and every
    ``every_n_epochs`` epochs if set (at the end of validation, or at the end of the training epoch when
    no validation ran) the callback explains a
    fixed set of validation samples with each method in ``methods`` (one shared forward pass, see
    :func:`lightning_introspect.methods.attribution.attribute`) and logs one overlay grid per method.
    The captions give the true class, the prediction, the explained class and the model's
    probability for it. Signed methods (input x gradient, guided backprop, deconvnet, LRP) use a
    diverging colormap centred on 0.

    Inputs ``(N, F)`` (tabular) get a bar chart per method of the mean ``|attribution|`` per feature
    instead, the features named by ``feature_names`` (Grad-CAM methods are dropped with a warning); inputs
    of other ranks than 2 and 4 are skipped with one warning.

    Token ids (integer inputs ``(N, T)``, a text model) are explained at the output of the model's
    embedding layer (``embedding_layer``; ``"auto"``: the first ``nn.Embedding`` that takes the ids, see
    :func:`~lightning_introspect.methods.token_attribution.find_embedding`), one score per token: the
    methods of :data:`~lightning_introspect.methods.token_attribution.TOKEN_METHODS` (saliency: the
    gradient's norm; input x gradient: gradient x embedding; integrated gradients from the embedding of
    ``baseline_token_id``, or zeros; LRP where the LRP package serves the model). With ``methods`` left at
    its default a text model gets ``saliency``, ``input_x_gradient``, ``integrated_gradients`` and
    ``lrp``; other methods given explicitly are dropped with one warning. Each method logs text: every
    fixed sentence with its tokens coloured by score (detokenised by ``decode``, else the ids;
    ``pad_token_id`` hidden), then the top tokens per class (the mean score of each token id over the
    samples explained for the class). See :mod:`lightning_introspect.render.tokens` for the colours.

    Segmentation (per-pixel logits ``(N, C, H, W)`` with integer masks, detected once before training;
    ``task`` overrides): each sample is explained for each class present in its predicted mask, over
    that class's predicted region (a :class:`~lightning_introspect.methods.targets.RegionTarget` per
    region: the class's logits summed over the region), so the grid shows the evidence for the objects.
    The background -- the class covering most pixels of the fixed samples' true masks -- is explained only
    for a sample showing nothing else; at most 4 regions per sample (the largest), none smaller than 0.5 %
    of the image (stray pixels). Each tile is one region, outlined in cyan and captioned with the sample,
    the class, the region's size and the model's mean probability over it.
    Grad-CAM's automatic layer is the deepest feature map before the output head (the last decoder stage,
    not the 1x1 classifier). With the true masks known, every run also explains each object class of each
    sample's true mask for the class's whole-image score (its logits over all pixels: a region target
    would tell the method where to look) and scores the map against the object's true mask: the
    pointing-game hit rate (the map's maximum on the object) and the share of positive attribution inside
    the mask, next to chance (the mask's area fraction) -- a training curve of how well the explanations
    find the objects, defined from the untrained model on. A sample whose true mask shows only the
    background is left out and counted in the note, never scored as a miss.

    Faithfulness (``faithfulness=True``, the default): every run also scores how much the model's output
    depends on what each map calls important (:func:`~lightning_introspect.methods.attribution_runs.faithfulness_scores`):
    the explained class's probability as the pixels (features) are removed in the map's order, most
    important first (deletion, RISE: a low area is good), and as they are put back on the baseline
    (insertion: a high area is good), each over ``faithfulness_steps`` steps; the same for two reference
    maps, a random map and the Sobel edges of the input (images only). A method that does not beat the
    edge detector explains the image, not the model. Segmentation: the grid's pairs are scored, each for
    its region target -- the class's mean probability over the explained region. Cost:
    about ``samples x 2 x (faithfulness_steps - 1) x (methods + 2)`` perturbed inputs (the curves' ends,
    the input and the baseline, run once for all maps), 128 per forward pass without gradients (8 samples,
    4 methods, 20 steps: 1,840 inputs in 17 forwards; fewer per forward for large images, see below).

    eMPRT (``run_emprt=True``, the default): every run also measures, per method, how much more disordered
    the maps become when every layer of a copy of the model is re-initialised
    (:func:`~lightning_introspect.methods.emprt.emprt`, Hedström et al. 2023): the relative rise of the map
    entropy, the same re-initialisation (seeded by ``seed``) at every run. A curve that rises as the network
    learns says the maps come to depend on what it learnt; one that stays near 0 says they would look the same
    for a random network. Cost: a copy of the model and one attribution pass per method on it (the trained
    model's maps are those the run has just logged; images and tabular inputs; token ids are checked by
    ``SanityChecks``).

    Large inputs (e.g. 3x384x384): the explanations, the faithfulness curves and eMPRT's maps run a few samples
    at a time, as many as :data:`~lightning_introspect.methods.chunks.DEFAULT_MEMORY_BUDGET` holds
    (:func:`~lightning_introspect.methods.chunks.explanation_rows`,
    :func:`~lightning_introspect.methods.faithfulness.perturbation_rows`): each sample is explained and scored
    on its own, so the maps and scores are those of one pass. The grids draw images with a side over
    :data:`~lightning_introspect.render.grid.SHOWN_SIDE` pixels shrunk to it (the tiles' size); ``maps`` keep the inputs' size.

    Args:
        methods: names from ``METHODS``: ``saliency``, ``input_x_gradient``, ``guided_backprop``,
            ``deconvnet``, ``grad_cam``, ``guided_grad_cam``, ``lrp``, ``attention_rollout``, ``grad_rollout``
            (vision transformers; skipped with one warning for a model without self-attention). ``lrp`` is skipped with one
            warning when ``lightning_introspect.methods.lrp`` is not available or fails on the model.
        cam_layer: the feature map for Grad-CAM (and guided backprop's ``top_k``): a dotted module name or
            ``"auto"`` (the last conv feature map, see ``auto_layer``; the choice is logged as text).
        targets: what each sample is explained for: ``"pred"`` (its predicted class), ``"true"`` (its
            label), a list of class ids (also one grid per class), or ``"all"`` (one grid per class, up
            to 32 classes). With a list or ``"all"``, the main grid explains the prediction.
            Segmentation: ``"pred"`` -- the classes present in the predicted mask, over their predicted
            regions; ``"true"`` -- the classes of the true mask over their true regions; a list -- those
            classes where present, over the regions ``region`` names (one grid per class too); ``"all"``
            -- every class present, the background included.
        class_names: names for the captions and the ``class_<name>`` tags (default: the class ids).
        per_class: draw up to this many samples of each class instead of ``num_samples`` random ones.
        mean: per-channel mean used to normalise the inputs, to un-normalise them for display
            (with ``std``); ``None``: min-max per image.
        std: per-channel std, see ``mean``.
        colormap: matplotlib colormap of unsigned maps.
        signed_colormap: diverging matplotlib colormap of signed maps.
        normalize: ``"per_map"`` (each map scaled by its own max) or ``"per_batch"`` (one scale for all
            maps of a grid, so magnitudes compare across samples).
        alpha: opacity of the heat map over the (grey) input.
        top_k: guided backprop keeps only the K strongest positions at ``cam_layer`` (see
            ``guided_backprop``); ``None``: plain guided backprop.
        lrp_rule: ``"epsilon"``, ``"zplus"`` or ``"alpha_beta"`` (passed as ``rule`` to ``lrp``).
        output_transform: callable ``forward output -> logits`` for a model that returns more than the
            logits; without it a tuple's first tensor, a dict's ``"logits"`` / ``"preds"`` or an output
            object's ``.logits`` is explained (as in :class:`PerClassMetrics`).
        task: ``"auto"`` (segmentation for per-pixel logits with masks of their size, else
            classification), ``"classification"`` (a dense output's class logits summed over all pixels)
            or ``"segmentation"``; an explicit task the shapes contradict is refused before training.
        region: segmentation: the mask a listed / ``"all"`` class's region is cut from, ``"pred"`` or
            ``"true"``.
        ignore_index: segmentation: a mask value that is never a region (e.g. 255).
        faithfulness: score every run's maps by deletion / insertion curves next to a random and an
            edge-detector map (see "Faithfulness" above); ``False`` saves their forward passes.
        faithfulness_steps: removal steps per curve (each curve has ``faithfulness_steps + 1`` points). Under
            a budget (``introspection_callbacks``) a run may use half of them (not below 5) or none, unless
            given explicitly; the steps used are in the run's ``faithfulness`` table. A run before the first
            training step explains the samples without curves or eMPRT under a budget (the fit's length is
            not known yet), and the last run always has both.
        run_emprt: log eMPRT at every run (see "eMPRT" above); ``False`` saves its model copy and passes.
            Under a budget eMPRT is sized with the faithfulness curves: a run without curves has none.
        faithfulness_baseline: what a removed pixel becomes: ``"blur"`` (the image blurred with a Gaussian of
            ``max(H, W) / 16`` pixels; tabular inputs use ``"mean"``), ``"mean"`` (the fixed samples' mean per
            channel / feature) or ``"zero"``.
        enabled: switch the callback off.
        every_n_epochs: run every n-th epoch as well (``None``, the default: only at ``at`` and the last
            epoch; each run renders one captioned grid per method and class, so per-epoch runs cost).
        at: fractions of training to run at; the default ``(0.0, 0.5)`` logs the untrained model at fit
            start and the model half way (the last epoch always runs).
        num_samples: number of fixed samples (ignored with ``per_class``).
        seed: seed of the private generator that draws the samples.
        on_error: ``"warn"`` (disable the callback with a warning, training goes on) or ``"raise"``.
        layer: the former name of ``cam_layer`` (deprecated; works with a ``DeprecationWarning``).
        decode: token ids: a callable ``list of ids -> list of strings`` (one per id, e.g. a tokenizer's
            ``convert_ids_to_tokens``) for the sentences; ``None``: the ids are shown.
        embedding_layer: token ids: the embedding module whose output is explained (dotted name) or ``"auto"``.
        baseline_token_id: token ids: the token whose embedding is the integrated-gradients baseline at every
            position (a pad or mask token); ``None``: the zero embedding.
        pad_token_id: token ids: a token left out of the sentences and of the top tokens (padding).
        feature_names: tabular inputs: the names of the features on the bar charts (default: their index).

    Tags:
        * ``introspect/attributions/<method>`` -- overlay grid (bar chart for tabular inputs; text for token
          ids: the coloured sentences and the top tokens per class);
        * ``introspect/attributions/<method>/class_<name>`` -- one grid per class for a list / ``"all"``
          (tiles in the same order as the main grid, captioned and titled like it: true class, prediction, the
          class and its probability);
        * ``introspect/attributions/inputs`` -- the fixed samples, once;
        * ``introspect/attributions/layer`` -- text: the Grad-CAM layer (token ids: the embedding layer) and
          how it was chosen, once;
        * ``introspect/attributions/localization/<method>/{pointing_game,energy_in_mask,chance}`` --
          segmentation with true masks: scalars at every run, and ``introspect/attributions/localization``
          -- text: the table of the run, with the regions left out;
        * ``introspect/attributions/faithfulness/<method>/{deletion_auc,insertion_auc}`` -- scalars at every run
          (``faithfulness=True``), the same for the references ``faithfulness/random/...`` and
          ``faithfulness/edges/...`` (images), and ``introspect/attributions/faithfulness`` -- text: the
          table of the run, each method against the references;
        * ``introspect/attributions/emprt/<method>`` -- scalars at every run (``run_emprt=True``): the mean eMPRT
          over the samples (regions);
        * ``introspect/attributions/warnings`` -- text, only when a grid holds NaN / Inf (non-finite weights
          or inputs): which grids were not logged at that step and why (see "Non-finite values" below);
        * ``introspect/attributions/seconds`` -- wall time of each run.

    Results on the instance:
        * ``maps``: ``{method: Tensor}`` of the latest run (CPU, raw maps, batch order of the samples;
          segmentation: one map per explained region, in the order of ``pairs``);
        * ``pairs``: segmentation: the latest run's explained regions
          (:class:`~lightning_introspect.methods.attribution_runs.RegionPairs`: ``sample``, ``class_id``,
          ``masks``, ``source``);
        * ``resolved_task``: ``"classification"`` or ``"segmentation"``;
        * ``class_maps``: ``{method: {class_id: Tensor}}`` of the latest run (list / ``"all"``);
        * ``resolved_cam_layer``: the Grad-CAM layer in use (``cam_layer`` resolved; ``None`` when no
          method needs one);
        * ``resolved_embedding_layer``: token ids: the embedding layer explained (``None`` otherwise);
        * ``nonfinite``: the grids of the latest run that held NaN / Inf and were not logged (``"outputs"``
          when the model's outputs on the samples were non-finite; empty when all was finite);
        * ``history``: one dict per run: ``step``, ``epoch`` (-1 before training), ``explained``,
          ``predicted``, ``confidence`` (lists per sample), ``seconds``; segmentation: ``explained``,
          ``samples``, ``region_pixels``, ``confidence`` per region, ``region`` (``"pred"`` / ``"true"``)
          and ``localization`` ``{method: {"pointing_game", "energy_in_mask", "chance", "pairs", "skipped"}}``;
          both: ``faithfulness`` ``{method or "random" / "edges": {"deletion_auc", "insertion_auc"}}`` (means
          over the samples or regions; empty when ``faithfulness=False`` or the outputs were non-finite) and
          ``emprt`` ``{method: mean eMPRT}`` (empty when ``run_emprt=False``).

    Non-finite values: when the maps of a method (or of one class) hold NaN / Inf, that grid is not
    logged (it would be a silently wrong picture); when the model's outputs on the samples are
    non-finite, no main grid is logged (its captions and ``"pred"`` targets rest on them) while finite
    per-class grids still are. The callback warns once, writes a note to ``introspect/attributions/warnings``
    at each such step, stays on and logs the grids again as soon as they are finite.

    Example:
        >>> from lightning_introspect.demo import DigitsCNN, DigitsDataModule  # doctest: +SKIP
        >>> cb = Attributions(methods=["saliency", "grad_cam"], targets=[3, 8], num_samples=8)  # doctest: +SKIP
        >>> Trainer(max_epochs=2, callbacks=[cb]).fit(DigitsCNN(), datamodule=DigitsDataModule())  # doctest: +SKIP
        >>> cb.maps["grad_cam"].shape  # doctest: +SKIP
        torch.Size([8, 1, 32, 32])
    """


    name = "attributions"
    sized_runs = True  # the faithfulness curves: sized by a budget
    draws_samples = True

    def __init__(
        self,
        *,
        methods: Sequence[str] = DEFAULT_METHODS,
        cam_layer: str = "auto",
        targets: str | list[int] = "pred",
        class_names: list[str] | None = None,
        per_class: int | None = None,
        mean: float | list[float] | None = None,
        std: float | list[float] | None = None,
        colormap: str = "inferno",
        signed_colormap: str = "bwr",
        normalize: str = "per_map",
        alpha: float = 0.5,
        top_k: int | None = None,
        lrp_rule: str = "epsilon",
        output_transform: Callable[[Any], Any] | None = None,
        task: str = "auto",
        region: str = "pred",
        ignore_index: int | None = None,
        faithfulness: bool = True,
        faithfulness_steps: int = 20,
        faithfulness_baseline: str = "blur",
        run_emprt: bool = True,
        decode: Callable[[list[int]], list[str]] | None = None,
        embedding_layer: str = "auto",
        baseline_token_id: int | None = None,
        pad_token_id: int | None = None,
        feature_names: list[str] | None = None,
        layer: str | None = None,
        enabled: bool = True,
        every_n_epochs: int | None = None,
        at: Sequence[float] | None = (0.0, 0.5),
        num_samples: int = 8,
        seed: int = 0,
        on_error: str = "warn",
    ) -> None:
        super().__init__(enabled=enabled, every_n_epochs=every_n_epochs, at=at, num_samples=num_samples, seed=seed, on_error=on_error)
        checked = check_attribution_arguments(
            methods=methods, cam_layer=cam_layer, layer=layer, embedding_layer=embedding_layer, targets=targets, per_class=per_class,
            top_k=top_k, normalize=normalize, lrp_rule=lrp_rule, task=task, region=region, faithfulness_baseline=faithfulness_baseline,
            ignore_index=ignore_index, baseline_token_id=baseline_token_id, pad_token_id=pad_token_id, faithfulness=faithfulness,
            run_emprt=run_emprt, faithfulness_steps=faithfulness_steps, colormap=colormap, signed_colormap=signed_colormap,
            decode=decode, output_transform=output_transform, mean=mean, std=std, alpha=alpha, class_names=class_names,
            feature_names=feature_names,
        )
        self.methods, self.cam_layer, self.targets = checked.methods, checked.cam_layer, checked.targets
        self.mean, self.std, self.alpha = checked.mean, checked.std, checked.alpha
        self.class_names, self.feature_names = checked.class_names, checked.feature_names
        self.per_class, self.top_k, self.normalize, self.lrp_rule = per_class, top_k, normalize, lrp_rule
        self.colormap, self.signed_colormap = colormap, signed_colormap
        self.task, self.region, self.ignore_index = task, region, ignore_index
        self.faithfulness, self.faithfulness_steps, self.faithfulness_baseline = faithfulness, faithfulness_steps, faithfulness_baseline
        self.run_emprt = run_emprt
        self.decode, self.output_transform = decode, output_transform
        self.embedding_layer, self.baseline_token_id, self.pad_token_id = embedding_layer, baseline_token_id, pad_token_id
        self._default_methods = is_default_methods(methods)
        self.reset()

    @override
    def reset(self) -> None:
        self.resolved_cam_layer: str | None = None
        self.resolved_task: str | None = None
        self.pairs: RegionPairs | None = None
        self._background: int | None = None
        self.maps: dict[str, torch.Tensor] = {}
        self.class_maps: dict[str, dict[int, torch.Tensor]] = {}
        self.history: list[dict[str, Any]] = []
        self.nonfinite: list[str] = []
        self._active_methods: list[str] | None = None
        self._last_epoch: int | None = None
        self._last_step: int | None = None  # global step of the latest run: the fit-end catch-up compares it
        self._logged_static = False
        self._layer_note: str | None = None
        self.resolved_embedding_layer: str | None = None
        self.emprt_now = True  # whether the current run measures eMPRT (a budget may leave it out)

    # ------------------------------------------------------------------------------ Lightning hooks
    @override
    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.cam_layer != "auto":
            get_layer(pl_module, self.cam_layer, argument="cam_layer")
        if self.embedding_layer != "auto":
            get_layer(pl_module, self.embedding_layer, argument="embedding_layer")

    @override
    def sample_request(self) -> int | None:
        return None if self.per_class is not None else self.num_samples

    @override
    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw the samples and resolve the layer and methods before the first training step (without
        validation data the training loader is not built yet: then at the first run)."""
        if self.val_dataloader(trainer) is None:
            return
        x, y = self.fixed_samples(trainer, per_class=self.per_class)
        with introspection_mode(pl_module, grad=False), logits_only(pl_module, self.output_transform):
            out = pl_module(x[:1].to(pl_module.device))
        self._resolve(pl_module, x, out, None if y is None else y[:1])

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # `at=0.0` is "before training": a fit resumed from a checkpoint (global_step > 0) has it already
        if self.active(trainer) and trainer.global_step == 0 and -1 in self.fraction_epochs(trainer).values():
            self.run(trainer, self._log, trainer, pl_module, -1)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer):
            self.run(trainer, self._log, trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer):
            self.run(trainer, self._log, trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the final model, when the fit ended before its last scheduled epoch (EarlyStopping, max_time, no max_epochs)
        if self.final_run_missed(trainer, self._last_step):
            self.run(trainer, self._log, trainer, pl_module, self.last_epoch(trainer))

    def _due(self, trainer: pl.Trainer) -> bool:
        return self.active(trainer) and self._last_epoch != trainer.current_epoch and self.is_scheduled(trainer)

    # ------------------------------------------------------------------------------ what
    def _resolve(self, pl_module: pl.LightningModule, x: torch.Tensor, out: Any, y: torch.Tensor | None) -> None:
        """The methods and the layer this model and these inputs allow (:func:`resolve_attribution_setup`): a
        skip for what cannot be explained at all, ``IntrospectionInputError`` for explicit arguments the model
        contradicts."""
        try:
            setup = resolve_attribution_setup(self, pl_module, x, out, y)
        except CannotExplain as reason:
            self.skip(str(reason))
            return
        self.resolved_task, self._active_methods = setup.task, setup.methods
        if setup.embedding_layer is not None:
            self.resolved_embedding_layer = setup.embedding_layer
        if setup.cam_layer is not None:
            self.resolved_cam_layer = setup.cam_layer
        if setup.note is not None:
            self._layer_note = setup.note

    def _attribute(self, model: Any, x: torch.Tensor, target: Any, methods: list[str]) -> dict[str, torch.Tensor]:
        """The maps of ``methods``; LRP apart, so that a model LRP cannot serve drops LRP (one warning) and keeps the rest."""
        plain = [m for m in methods if m != "lrp"]
        options: dict[str, dict[str, Any]] = {"guided_backprop": {"top_k": self.top_k}} if self.top_k is not None and "guided_backprop" in plain else {}
        layer = self.resolved_cam_layer
        if is_token_ids(x):  # token scores at the embedding output
            layer = self.resolved_embedding_layer
            options = {"integrated_gradients": {"baseline": self.baseline_token_id}} if "integrated_gradients" in plain else {}
        maps = attribute(model, x, target, plain, layer=layer, options=options) if plain else {}
        if "lrp" in methods and "lrp" in (self._active_methods or []):
            try:
                maps.update(attribute(model, x, target, ["lrp"], layer=self.resolved_embedding_layer, options={"lrp": {"rule": self.lrp_rule}}))
            except (TypeError, ValueError, NotImplementedError, RuntimeError) as err:
                if self.on_error == "raise":
                    raise
                self.warn_once("lrp-failed", f"Attributions: LRP failed on this model and is skipped from now on: {err}")
                self._active_methods = [m for m in self._active_methods or [] if m != "lrp"]
        return {m: maps[m] for m in methods if m in maps}

    # ---------------------------------------------------------------------------------------- work
    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        with logits_only(pl_module, self.output_transform):
            self._log_run(trainer, pl_module, epoch)

    def _log_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        start = time.perf_counter()
        self._last_epoch = trainer.current_epoch if epoch >= 0 else None
        self.emprt_now = True  # unless the budget's sizing of this run's faithfulness curves leaves it out
        self._last_step = step = int(trainer.global_step)
        x, y = self.fixed_samples(trainer, per_class=self.per_class)
        with introspection_mode(pl_module, grad=False):
            out = pl_module(x.to(pl_module.device)).float()
        if self._active_methods is None:
            self._resolve(pl_module, x, out, y)
        methods = list(self._active_methods or [])
        if not methods:
            return
        writer = self.writer(trainer)
        if not self._logged_static:
            self._logged_static = True
            if x.ndim == 4:
                writer.image_grid(self.tag("inputs"), shown_images(self._display(x)), step)
            if self._layer_note:
                writer.text(self.tag("layer"), self._layer_note, step)
        run = log_regions if self.resolved_task == "segmentation" else log_classes
        run(self, trainer, writer, pl_module, x, y, out, methods, epoch, start)

    def _report_nonfinite(self, trainer: pl.Trainer, broken: list[str], n: int) -> None:
        """The base class's NaN / Inf note, naming the grids not logged at this step."""
        counts = {m: len(self.class_maps.get(m, {})) for m in self.maps}
        skipped = grid_list(skipped_grids(broken, list(self.maps)), counts)
        self.note_nonfinite(trainer, "nonfinite", f"non-finite values (NaN / Inf) in {nonfinite_what(broken, counts, n)}",
                            f"Not logged: {skipped}", "logs these grids again once they are finite")

    # ------------------------------------------------------------------------------------ where: rendering
    def _class_name(self, c: int) -> str:
        return class_label(c, self.class_names)

    def _display(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean, self.std
        if mean is not None and std is not None and len(mean) not in (1, x.shape[1]):
            self.warn_once("mean", f"Attributions: `mean`/`std` have {len(mean)} entries for {x.shape[1]} channels; showing min-max scaled inputs.")
            mean = std = None
        return display_inputs(x, mean, std)

    def _write(
        self, writer: IntrospectionWriter, tag: str, x: torch.Tensor, maps: torch.Tensor, method: str, step: int, *,
        captions: list[str] | None, title: str, regions: torch.Tensor | None = None, classes: torch.Tensor | None = None,
    ) -> None:
        """One method's maps as an overlay grid (images), a bar chart (tabular) or coloured sentences (token ids)."""
        if is_token_ids(x):
            text = token_markdown(x, maps, method, decode=self.decode, pad_token_id=self.pad_token_id, normalize=self.normalize,
                                  class_names=self.class_names, captions=captions, title=title, classes=classes)
            writer.text(tag, text, step)
            return
        if x.ndim == 2:
            writer.image(tag, feature_bar_chart(maps, title=title, feature_names=self.feature_names).render(), step)
            return
        cmaps = {"colormap": self.colormap, "signed_colormap": self.signed_colormap}
        display, size = self._display(x), shown_size(*x.shape[-2:])  # large images drawn at the tiles' size
        if maps.ndim == 4 and maps.shape[-2:] == x.shape[-2:]:
            display, maps = shrink_images(display, size), shrink_images(maps, size)
        images = attribution_overlays(display, maps, signed=method in SIGNED_METHODS, normalize=self.normalize, alpha=self.alpha, **cmaps)
        if regions is not None:
            images = outline_regions(images, regions)
        if captions is None:  # per-class grids: fast torch grid, tiles in the main grid's order
            writer.image_grid(tag, images, step, nrow=8)
        else:
            writer.image(tag, captioned_grid(images, captions, nrow=8, title=title), step)

    # --------------------------------------------------------------------------------- state / text
    @override
    def extra_state(self) -> dict[str, Any]:
        return {"layer": self.resolved_cam_layer, "history": [{k: v for k, v in h.items()} for h in self.history]}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.resolved_cam_layer = state.get("layer", self.resolved_cam_layer)
        self.history = list(state.get("history", []))
        self._last_step = self.history[-1].get("step") if self.history else None

    @override
    def summary_lines(self) -> list[str]:
        return attribution_summary_lines(self.history, list(self.maps), self.resolved_cam_layer)


__all__ = ["Attributions"]
