"""``LinearProbes``: how linearly separable the classes are at each layer, every epoch (Alain & Bengio 2016).

The callback decides when (the validation pass of scheduled epochs, the baselines at fit start), on what
(the layers :mod:`~lightning_introspect.callbacks.probe_setup` resolves, their activations read by
:class:`~lightning_introspect.callbacks.probe_pass.ProbePass`) and where (TensorBoard); its arguments are checked by
:mod:`~lightning_introspect.callbacks.probe_arguments`, the fits are
:class:`~lightning_introspect.methods.probes.ProbeEvaluations`, the drawing :mod:`lightning_introspect.render.probes`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from typing_extensions import override

from lightning_introspect._lightning import pl
from lightning_introspect.callbacks.base import IntrospectionCallback
from lightning_introspect.callbacks.probe_arguments import SOLVERS, check_probe_arguments
from lightning_introspect.callbacks.probe_pass import (
    COMPILED_EAGER_PASS,
    NO_VALIDATION,
    ProbePass,
    device_of,
    has_compiled,
    has_validation,
    validation_batches,
)
from lightning_introspect.callbacks.probe_report import (
    INIT_KEY,
    depth_chart,
    evaluation_table,
    latest_summary_lines,
)
from lightning_introspect.callbacks.probe_setup import (
    CannotProbe,
    ProbeSetup,
    merged_layers_note,
    resolve_probe_setup,
)
from lightning_introspect.methods.probe_capture import INPUT_KEY
from lightning_introspect.methods.probe_layers import auto_probe_layers
from lightning_introspect.methods.probes import (
    FeatureCache,
    LayerCaches,
    ProbeEvaluations,
    ProbeResult,
    RandomProjection,
)
from lightning_introspect.render.probes import probe_notes

__all__ = ["INIT_KEY", "INPUT_KEY", "SOLVERS", "LinearProbes", "auto_probe_layers"]


class LinearProbes(IntrospectionCallback):
    """Linear classifier probes on intermediate layers, fitted on cached activations every scheduled epoch.

    A probe is a multinomial logistic regression trained on one layer's pooled activations to predict
    the labels; its held-out accuracy says how linearly separable the classes are at that layer. After
    training the curve usually rises with depth; at initialisation it often falls. Both baselines are
    logged so the curve can be read: the probe on the (downsampled) raw input and the probes on the
    model as initialised (``"init"``, once at fit start).

    Activations come from forward hooks during the validation pass the trainer already runs (no extra
    pass). The hooks exist only between ``on_validation_epoch_start`` and ``on_validation_epoch_end``
    (and are removed on exceptions). Outputs are detached, pooled (conv maps over space, token sequences as
    below), reduced with a seeded random projection when wider than ``max_features`` and copied into a bounded cache
    (``max_samples`` rows per layer; reservoir sampling re-seeded every epoch, so every epoch and the
    init baseline probe the same samples). With ``probe_dataloader`` (models trained without labels,
    e.g. autoencoders) the callback instead runs its own eval-mode, no-grad pass over that loader at the
    end of each scheduled training epoch.

    Fitting: features are standardised, split (stratified, seeded: the same split every epoch) into
    probe-train / probe-test, and a probe per layer is fitted with L-BFGS, warm-started from the previous
    epoch. ``solver="torch"`` fits the layers' probes inline with ``torch.optim.LBFGS`` on the model's
    device (tens of milliseconds per layer for a few thousand cached samples on a CPU). ``solver="sklearn"``
    fits them one by one with scikit-learn in a background thread so training continues; results are
    logged (at the step of the epoch they belong to) as soon as they are ready and at the latest at fit
    end. ``"auto"`` picks torch on an accelerator; on CPU, torch while the cached features hold at most
    about a million numbers (e.g. 2,000 samples x 512 features in all layers together) and sklearn in
    the background above that.

    Every probed module must run exactly once per forward pass: one module object applied several times
    (torchvision's BasicBlock applies its one ``self.relu`` twice) would give one name to several different
    tensors. ``"auto"`` probes the enclosing block instead; a name in ``layers`` that runs more than once is
    refused at ``setup`` with a ``ValueError`` naming the block to probe. The call counts come from one
    eval-mode, no-grad forward pass of two validation samples
    (:func:`~lightning_introspect._torch.layers.trace_module_calls`); a model whose forward does not take
    the bare inputs is not checked. The callback is
    skipped for the fit (one ``IntrospectionSkipWarning``) when the data carries no labels or ``"auto"``
    cannot run the model; each fit starts with clean results (``trainer.validate()`` afterwards keeps them).

    Tokens (transformers, RNNs): a 3-D output is read as tokens ``(N, T, D)`` or as a 1-D conv map
    ``(N, C, L)`` by the module that made it (``Linear``, ``LayerNorm``, ``Embedding``, attention, RNNs and
    transformer layers give tokens; ``Conv1d``, ``BatchNorm1d`` and 1-D pooling give channels; a block, an
    activation or dropout takes the layout of the last such module in it or before it; see
    :func:`~lightning_introspect.methods.probe_layers.token_layers`), decided at ``setup`` on two samples. A
    token layer gives one vector per sample by ``token_pooling``: ``"auto"`` takes the class token where there
    is one (image inputs whose ``T - k`` tokens form the image's patch grid after ``k >= 1`` prefix tokens:
    token 0) and otherwise the mean over the tokens that are not padding (the batch's ``attention_mask`` when
    a dict batch or dict inputs carry one, else the token ids that differ from ``pad_token_id``; neither: every
    token; prefix tokens left out); ``"cls"`` / ``"mean"`` force one. What was decided is in
    ``resolved_token_pooling`` and above the table. Layers that give the same output on those samples (a block
    and its last norm, a wrapper and its only child) are probed once, under the outer name (one warning
    when they were named). ``layers="auto"`` in a model with attention probes the embedding and the
    transformer blocks (:func:`~lightning_introspect.methods.probe_layers.transformer_blocks`).

    Segmentation (per-pixel probes, no ``target_transform`` needed): the task is detected once, at ``setup``,
    from one forward pass of two samples and their labels (``task="auto"``: dense logits ``(N, C, H, W)``
    with integer masks ``(N, H, W)`` of their size; :func:`~lightning_introspect.methods.task.resolve_task`).
    Then every probed layer's feature map ``(N, D, h, w)`` gives samples that are *pixels*: up to
    ``pixels_per_image`` positions per image, drawn uniformly among the positions whose label is not
    ``ignore_index`` (a private generator, re-seeded every pass: the same positions every epoch and in the
    init baseline, so the curves compare the same pixels), each labelled by the mask resized to ``(h, w)``
    by nearest neighbour (``F.interpolate(mode="nearest")``'s choice of pixel), and its ``D`` features
    (projected to ``max_features`` when wider; ``pooling`` is not used). The same logistic-regression
    probe is fitted per layer, each on its own pixels (the split is stratified over pixels, not images).
    The input baseline is the probe on the input's channel values at sampled pixels. ``layers="auto"``
    probes the encoder and decoder stages of a U-Net (block outputs that run once per forward, see
    :func:`auto_probe_layers`) and leaves out layers without a feature map and a 1x1 conv with one
    channel per class (the head: a probe on the logits only measures the model's own accuracy). Bounds:
    at most ``pixels_per_image`` pixels per image enter the reservoir, which keeps at most
    ``max_samples`` pixels per layer: ``max_samples x (min(D, max_features) + 2)`` x 4 bytes per layer
    (5,000 x 64 channels: about 1.3 MB), whatever the image size. Cost per evaluated epoch: the hooks'
    ``nearest resize + sampling + gather`` on each validation batch (no extra pass) and one probe fit per
    layer on at most ``max_samples`` rows. Accuracy is over pixels, so the background's share of the
    pixels is the majority baseline; macro-F1 weighs the classes equally.

    Tags written (``<layer>`` is the dotted layer name):

    * ``introspect/probes/<layer>/accuracy``: probe-test accuracy at the step of each evaluated epoch;
      the "init" probe is written at the fit's first step (0), so each curve starts at its baseline;
    * ``introspect/probes/<layer>/macro_f1``: macro-averaged F1, same steps;
    * ``introspect/probes/input/accuracy``, ``introspect/probes/input/macro_f1``: the raw-input baseline;
    * ``introspect/probes/accuracy_vs_depth``: a figure (accuracy vs layer depth, with the init curve and
      the input baseline) at the ``at`` fractions, the last epoch and every ``figures_every_n_epochs``-th;
    * ``introspect/probes/table``: a markdown table per evaluated epoch (how token layers were pooled above it);
    * ``introspect/probes/fit_seconds``: solver time of each evaluation (in the background for sklearn);
    * ``introspect/probes/seconds``: time this callback spent in the training loop's thread (base class).

    Results on the instance:

    * ``history``: ``{epoch | "init" | "input": {layer: test accuracy}}`` (``"input"`` maps ``"input"``);
    * ``macro_f1``: the same shape, with macro-F1;
    * ``results``: ``{key: {layer: ProbeResult}}`` of this process (not checkpointed);
    * ``best_layer``: the layer with the highest accuracy at the latest evaluated epoch;
    * ``layer_names``: the probed layers in execution order;
    * ``resolved_task``: ``"classification"`` or ``"segmentation"`` (per-pixel probes), detected at ``setup``;
    * ``resolved_token_pooling``: ``{layer: how its tokens are pooled}`` for the token layers, decided at ``setup``;
    * ``thinned_epochs``: the epochs a budget (``introspection_callbacks``) left unevaluated: under a budget
      the evaluations between the ``at`` fractions and the last epoch run only when it covers them (an
      explicit ``every_n_epochs`` keeps the fixed schedule);
    * ``timings``: seconds spent, by kind (``capture``, ``baseline_pass``, ``own_pass``, ``fit_inline``,
      ``submit``, ``wait``, ``log``), all in the training thread.

    ``history``, ``macro_f1``, ``best_layer`` and the probes' warm-start weights are in the checkpoint
    (a resumed fit keeps them, does not redo the init baseline and fits the next epochs as an
    uninterrupted fit would). Writing a checkpoint waits for a background fit still running.

    Args:
        layers: ``"auto"`` (block outputs in execution order plus the penultimate layer, at most 7; see
            :func:`auto_probe_layers`),
            a dotted name, a glob (``"encoder.*"``) or a list of those. Resolved at ``setup``.
        pooling: ``"avg"``, ``"max"``, ``"avgmax"`` or ``"flatten"`` (conv maps pooled over space; not
            used by per-pixel probes nor by token layers).
        token_pooling: token layers ``(N, T, D)``: ``"auto"`` (the class token where the patch grid shows one,
            else the mean over the tokens that are not padding), ``"cls"`` (token 0) or ``"mean"``.
        pad_token_id: the padding token id, left out of the token mean when the batch carries no
            ``attention_mask`` (token-id inputs ``(N, T)`` only).
        max_samples: the most cached samples (rows) per layer (per-pixel probes: pixels per layer).
        max_features: wider pooled features are reduced to this width by a seeded random projection.
        solver: ``"auto"``, ``"torch"`` (inline, model device) or ``"sklearn"`` (background thread, CPU).
        test_fraction: share of each class held out to score the probes.
        max_iter: L-BFGS iterations per probe.
        tol: gradient tolerance of the fits (largest absolute entry of the mean loss's gradient; sklearn's
            default is 1e-4). 1e-3 needs about half the iterations; on the digits demo the probe accuracies
            moved by at most one test sample (0.006) against 1e-4.
        C: inverse L2 regularisation strength (sklearn's convention).
        cache: ``"reservoir"`` (uniform sample of the whole pass) or ``"first"`` (the first ``max_samples``).
        include_input: fit the raw-input baseline probe (once, at fit start).
        include_init: fit the probes on the model as initialised (once, at fit start).
        probe_dataloader: a labelled ``DataLoader`` to probe with instead of the validation data (for
            models trained without labels). Not expressible in YAML; pass it from Python.
        target_transform: ``f(batch) -> (N,) int tensor``: the labels of a batch, where ``split_batch``
            (the second element of a tuple, or a ``y``/``label``/``target`` key) is not right. With it,
            ``task="auto"`` stays classification (one label per sample); with ``task="segmentation"`` it
            must give the masks ``(N, H, W)``.
        figures_every_n_epochs: draw the accuracy-vs-depth figure every n-th evaluated epoch as well
            (``None``, the default: only at the ``at`` fractions and the last epoch; the scalars and the
            table are written at every evaluated epoch).
        task: ``"auto"`` (detected at ``setup``), ``"classification"`` (one label per sample, pooled
            features) or ``"segmentation"`` (per-pixel probes); an explicit task the output and labels
            contradict is refused at ``setup``, with the shapes named.
        pixels_per_image: per-pixel probes: the most positions drawn from each image's feature map, per layer.
        ignore_index: per-pixel probes: the mask value of pixels that are never drawn (e.g. 255).
        enabled, every_n_epochs, at, num_samples, seed, on_error: see :class:`IntrospectionCallback`
            (``seed`` seeds the projection, the reservoir and the probe split).

    Example:
        >>> import tempfile
        >>> from lightning_introspect.demo import DigitsCNN, DigitsDataModule
        >>> from lightning_introspect._lightning import Trainer
        >>> probes = LinearProbes(layers=["features.2", "features.9"], solver="torch")
        >>> trainer = Trainer(max_epochs=1, callbacks=[probes], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2,
        ...                   default_root_dir=tempfile.mkdtemp())  # figures and tables go to files there
        >>> trainer.fit(DigitsCNN(), datamodule=DigitsDataModule(limit=128))
        >>> sorted(probes.history, key=str)
        [0, 'init', 'input']
        >>> probes.best_layer in probes.layer_names
        True
    """

    name = "probes"
    # the layer is not the tag's last part: one chart per score, a line per layer (custom-scalars layout)
    scalar_charts = {"accuracy per layer": r"[^/]+/accuracy", "macro_f1 per layer": r"[^/]+/macro_f1"}

    def __init__(
        self,
        *,
        layers: str | list[str] = "auto",
        pooling: str = "avg",
        token_pooling: str = "auto",
        pad_token_id: int | None = None,
        max_samples: int = 5000,
        max_features: int = 512,
        solver: str = "auto",
        test_fraction: float = 0.3,
        max_iter: int = 100,
        tol: float = 1e-3,
        C: float = 1.0,
        cache: str = "reservoir",
        include_input: bool = True,
        include_init: bool = True,
        probe_dataloader: Any = None,
        target_transform: Callable[[Any], torch.Tensor] | None = None,
        figures_every_n_epochs: int | None = None,
        task: str = "auto",
        pixels_per_image: int = 64,
        ignore_index: int | None = None,
        enabled: bool = True,
        every_n_epochs: int | None = 1,
        at: Sequence[float] | None = (0.5,),
        num_samples: int = 16,
        seed: int = 0,
        on_error: str = "warn",
    ) -> None:
        super().__init__(
            enabled=enabled, every_n_epochs=every_n_epochs, at=at, num_samples=num_samples, seed=seed, on_error=on_error
        )
        check_probe_arguments(
            layers=layers, pooling=pooling, token_pooling=token_pooling, pad_token_id=pad_token_id,
            max_samples=max_samples, max_features=max_features, solver=solver, test_fraction=test_fraction,
            max_iter=max_iter, tol=tol, C=C, cache=cache, probe_dataloader=probe_dataloader,
            target_transform=target_transform, figures_every_n_epochs=figures_every_n_epochs, task=task,
            pixels_per_image=pixels_per_image, ignore_index=ignore_index,
        )
        self.layers = layers if isinstance(layers, str) else list(layers)
        self.pooling, self.token_pooling, self.pad_token_id = pooling, token_pooling, pad_token_id
        self.max_samples, self.max_features, self.cache = max_samples, max_features, cache
        self.solver, self.test_fraction, self.max_iter = solver, float(test_fraction), max_iter
        self.tol, self.C = float(tol), float(C)
        self.include_input, self.include_init = bool(include_input), bool(include_init)
        self.probe_dataloader, self.target_transform = probe_dataloader, target_transform
        self.figures_every_n_epochs = figures_every_n_epochs
        self.task, self.pixels_per_image, self.ignore_index = task, pixels_per_image, ignore_index
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        """Everything that belongs to one fit: a callback object used for a second fit (another model or
        data) starts clean. A resumed fit restores the checkpointed part afterwards (``load_state_dict``
        runs after ``setup``)."""
        self.layer_names: list[str] = []
        self.resolved_task: str | None = None  # "classification" / "segmentation", detected on an example batch
        self.resolved_token_pooling: dict[str, str] = {}
        self.thinned_epochs: list[int] = []  # epochs whose evaluation the budget left out
        self._evaluations = ProbeEvaluations(
            solver=self.solver, test_fraction=self.test_fraction, seed=self.seed, max_iter=self.max_iter, tol=self.tol,
            C=self.C,
        )
        self._timings: dict[str, float] = dict.fromkeys(("baseline_pass", "own_pass", "log"), 0.0)
        self._setup = ProbeSetup()  # the layers and how they are probed (resolved at setup or fit start)
        self._pass: ProbePass | None = None  # the capture and its caches, built at fit start
        self._eager_pass = False  # capture with an own eager pass instead of hooks in the trainer's validation
        self._figure_key: int | None = None  # the epoch of the latest accuracy-vs-depth figure

    # the results on the instance (the class docstring says what they hold), kept by the evaluations
    @property
    def history(self) -> dict[int | str, dict[str, float]]:
        return self._evaluations.history

    @property
    def macro_f1(self) -> dict[int | str, dict[str, float]]:
        return self._evaluations.macro_f1

    @property
    def results(self) -> dict[int | str, dict[str, ProbeResult]]:
        return self._evaluations.results

    @property
    def best_layer(self) -> str | None:
        return self._evaluations.best_layer

    @property
    def timings(self) -> dict[str, float]:
        t = {**self._timings, **self._evaluations.timings, "capture": self._pass.seconds if self._pass else 0.0}
        return {k: t[k] for k in ("capture", "baseline_pass", "own_pass", "fit_inline", "submit", "wait", "log")}

    # the capture's parts (the tests read them): the latest pass's features, the projections, the live hooks
    @property
    def _cache(self) -> FeatureCache | LayerCaches | None:
        return self._pass.cache if self._pass is not None else None

    @property
    def _projections(self) -> dict[str, RandomProjection]:
        return self._pass.projections if self._pass is not None else {}

    @property
    def _stack(self) -> contextlib.ExitStack | None:
        return self._pass.stack if self._pass is not None else None

    # ------------------------------------------------------------------------------- lightning hooks
    @override
    def reset(self) -> None:
        # only a fit starts over (the base class calls this at setup("fit")): `trainer.validate()`
        # afterwards keeps this fit's results
        self._remove_hooks()
        self._evaluations.shutdown(wait=True)
        self._reset_fit_state()

    @override
    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._resolve(trainer, pl_module)

    @override
    def on_disable(self) -> None:
        self._remove_hooks()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # the shared check before training
        if self.active(trainer):
            self.run(trainer, self._start, trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._evaluations.ready() and self.active(trainer):
            self.run(trainer, self._drain, trainer)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_capture(trainer) and not self._eager_pass:
            self.run(trainer, self._begin_capture)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if (hooked := self._hooked()) is not None:
            self.run(trainer, hooked.batch_start, batch, dataloader_idx, log_seconds=False)

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if (hooked := self._hooked()) is not None:
            self.run(trainer, hooked.batch_end, log_seconds=False)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (hooked := self._hooked()) is not None:
            self.run(trainer, self._end_capture, trainer, hooked)
        elif self._eager_pass and self._should_capture(trainer):
            self.run(trainer, self._evaluate_own_pass, trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe_dataloader is not None and self.active(trainer) and self.is_scheduled(trainer) and self._within_budget(trainer):
            self.run(trainer, self._evaluate_own_pass, trainer, pl_module)
        elif self._evaluations.ready() and self.active(trainer):
            self.run(trainer, self._drain, trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.thinned_epochs and self.thinned_epochs[-1] == self.last_epoch(trainer) and self.active(trainer):
            self.run(trainer, self._evaluate_own_pass, trainer, pl_module, self.thinned_epochs.pop())
        if self._evaluations.pending:
            self.run(trainer, self._drain, trainer, wait=True)
        self._evaluations.shutdown(wait=True)
        # a fit that ended before its last scheduled epoch (EarlyStopping, max_time): the figure of its last probes
        latest = self._evaluations.latest_epoch()
        if latest is not None and latest != self._figure_key and self.active(trainer):
            self.run(trainer, self._write_figure, trainer, latest, trainer.global_step)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()
        self._evaluations.shutdown(wait=False)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._evaluations.shutdown(wait=True)

    # --------------------------------------------------------------------------------- preparation
    def _loader(self, trainer: pl.Trainer) -> Any:
        return self.probe_dataloader if self.probe_dataloader is not None else self.val_dataloader(trainer)

    def _resolve(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resolve the layers (:func:`resolve_probe_setup`): a wrong name raises ``ValueError``, a model or data
        that cannot be probed skips the callback for the fit. Without data yet (built in
        ``LightningModule.setup``) the call counts are checked at fit start."""
        try:
            setup = resolve_probe_setup(
                pl_module, self._loader(trainer), layers=self.layers, task=self.task, token_pooling=self.token_pooling,
                target_transform=self.target_transform, seed=self.seed,
                source="`probe_dataloader`" if self.probe_dataloader is not None else "validation",
            )
        except CannotProbe as reason:
            self.skip(str(reason))
            return
        if setup.merged:
            self.warn_once("merged", merged_layers_note(setup.merged))
        self._setup, self.resolved_task = setup, setup.task
        self.layer_names = self._evaluations.order = list(setup.modules)
        self.resolved_token_pooling = {n: t.describe() for n, t in setup.tokens.items()}

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the data, pick the capture path and the solver, build the caches, fit the baselines."""
        if self.probe_dataloader is None and not has_validation(trainer, self.val_dataloader(trainer)):
            self.warn_once("no-validation", NO_VALIDATION)
            return
        if self._setup.task is None:  # no data at setup: resolve (and check the call counts) now
            self._resolve(trainer, pl_module)
            if self.disabled:
                return
            if not self._setup.modules:
                raise RuntimeError("LinearProbes could not resolve `layers='auto'`: no data to run an example through.")
        if self.probe_dataloader is None and has_compiled(pl_module):
            # Hooks added after dynamo cached a graph do not fire in it (and fire traced, with graph breaks,
            # when they do): the trainer's compiled validation is left alone and the probes get their
            # activations from an eager pass of ours over the same validation data.
            self._eager_pass = True
            self.warn_once("compiled", COMPILED_EAGER_PASS)
        device = device_of(pl_module)
        # "auto" left on CPU: chosen per evaluation by the size of the cached features (ProbeEvaluations.fit)
        self._evaluations.solver = "torch" if self.solver == "auto" and device.type != "cpu" else self.solver
        self._pass = ProbePass(
            self._setup.modules, tokens=self._setup.tokens, pooling=self.pooling, max_features=self.max_features,
            max_samples=self.max_samples, cache=self.cache, seed=self.seed, ignore_index=self.ignore_index,
            pixels_per_image=self.pixels_per_image if self.resolved_task == "segmentation" else None,
            pad_token_id=self.pad_token_id, target_transform=self.target_transform, on_hook_time=self._hook_seconds,
            device=device if self._evaluations.solver == "torch" else torch.device("cpu"),
        )
        self._fit_baselines(trainer, pl_module)

    def _fit_baselines(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The probes on the raw input and on the model as initialised, once per fit (not after a resume)."""
        want_init = self.include_init and INIT_KEY not in self.history
        want_input = self.include_input and INPUT_KEY not in self.history
        if not (want_init or want_input):
            return
        start = time.perf_counter()
        probe_pass = self._own_pass(trainer, pl_module, layers=want_init, inputs=want_input)
        self._timings["baseline_pass"] += time.perf_counter() - start
        if want_input:
            self._fit(INPUT_KEY, probe_pass.input_cache, trainer.global_step)
        if want_init:
            with self._evaluation_timed(charge=False):  # the first estimate of an evaluation's cost
                self._fit(INIT_KEY, probe_pass.cache, trainer.global_step)
        self._drain(trainer)
        self.charge(time.perf_counter() - start)  # once per fit: not recurring work

    # ------------------------------------------------------------------------------------ capture
    def _should_capture(self, trainer: pl.Trainer) -> bool:
        return (
            self.probe_dataloader is None
            and self._pass is not None
            and self.active(trainer)
            and self.is_scheduled(trainer)
            and not getattr(trainer, "sanity_checking", False)
            and self.trainer_fn(trainer) in ("fit", None)  # not `trainer.validate()` after the fit: an epoch that never trained
            and self._within_budget(trainer)
        )

    def _within_budget(self, trainer: pl.Trainer) -> bool:
        """Under a budget the evaluations between the ``at`` fractions and the last epoch are extras: they run
        when the allowance covers one (the cost of the latest evaluation) on top of every analysis still to
        come. An explicit ``every_n_epochs`` is kept."""
        if self.budget is None or "every_n_epochs" in self._given:
            return True
        epoch = int(trainer.current_epoch)
        if epoch in self.fraction_epochs(trainer).values() or self.is_final(trainer):
            return True
        if self.budget.affords(trainer, self, self.unit_costs.get("evaluation", 0.0)):
            return True
        self.thinned_epochs.append(epoch)
        if len(self.thinned_epochs) == 1:
            self.writer(trainer).text(
                self.tag("budget"),
                f"LinearProbes: the budget ({self.budget.fraction:g} of the fit's own time) does not cover an evaluation "
                f"at every epoch (about {self.unit_costs.get('evaluation', 0.0):.2f} s each): from epoch {epoch} on, the "
                "probes are evaluated at the `at` fractions, the last epoch and whenever the budget allows. Set "
                "`every_n_epochs` to keep a fixed schedule.",
                trainer.global_step,
            )
        return False

    def _probe_pass(self) -> ProbePass:
        """The capture of this fit (built at fit start)."""
        if self._pass is None:
            raise RuntimeError("LinearProbes: the feature caches are built at fit start, which has not run.")
        return self._pass

    def _hooked(self) -> ProbePass | None:
        """The capture while its hooks sit in the trainer's validation pass, else ``None``."""
        return self._pass if self._pass is not None and self._pass.hooked else None

    def _hook_seconds(self, elapsed: float) -> None:
        self.seconds_total += elapsed  # the trainer's validation forward runs outside `run`: count it here

    def _remove_hooks(self) -> None:
        if self._pass is not None:
            self._pass.remove_hooks()

    def _begin_capture(self) -> None:
        self._probe_pass().begin()

    def _end_capture(self, trainer: pl.Trainer, probe_pass: ProbePass) -> None:
        probe_pass.end()
        with self._evaluation_timed():
            self._fit(trainer.current_epoch, probe_pass.cache, trainer.global_step)
        self._drain(trainer)

    def _own_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, layers: bool = True, inputs: bool = False) -> ProbePass:
        """An eval-mode, no-grad pass of ours over the probe data (``probe_dataloader`` or validation)."""
        loader = self._loader(trainer)
        if loader is None:
            raise RuntimeError("LinearProbes needs validation data or a `probe_dataloader` to probe with.")
        max_batches = math.inf if self.probe_dataloader is not None else validation_batches(trainer)
        probe_pass = self._probe_pass()
        probe_pass.run(pl_module, loader, max_batches=max_batches, layers=layers, inputs=inputs)
        return probe_pass

    def _evaluate_own_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int | None = None) -> None:
        """One evaluation on a pass of ours (``probe_dataloader``, a compiled model, or the final model of a fit
        that stopped early on an epoch the budget left out)."""
        with self._evaluation_timed():
            start = time.perf_counter()
            probe_pass = self._own_pass(trainer, pl_module)
            self._timings["own_pass"] += time.perf_counter() - start
            self._fit(trainer.current_epoch if epoch is None else epoch, probe_pass.cache, trainer.global_step)
        self._drain(trainer)

    @contextlib.contextmanager
    def _evaluation_timed(self, *, charge: bool = True) -> Iterator[None]:
        """Time one evaluation (its unit cost, for the budget) and count it as one-off work, not recurring."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.unit_costs.observe("evaluation", elapsed)
            if charge:
                self.charge(elapsed)

    # --------------------------------------------------------------------------- fitting and logging
    def _fit(self, key: int | str, cache: FeatureCache | LayerCaches, step: int) -> None:
        """Fit the probes of one evaluation: inline (torch) or in the background (sklearn)."""
        skipped = self._evaluations.fit(key, cache, step)
        if skipped is not None:
            ignored = f" (ignore_index={self.ignore_index})" if isinstance(cache, LayerCaches) else ""
            self.warn_once(f"few-{key}", f"LinearProbes: {skipped}{ignored}")

    def _drain(self, trainer: pl.Trainer, wait: bool = False) -> None:
        """Log every finished evaluation, in order."""
        for key, step, results in self._evaluations.finished(wait=wait):
            start = time.perf_counter()
            self._log(trainer, key, step, results)
            self._timings["log"] += time.perf_counter() - start

    def _log(self, trainer: pl.Trainer, key: int | str, step: int, results: dict[str, ProbeResult]) -> None:
        writer = self.writer(trainer)
        values: dict[str, float] = {}
        for name, r in results.items():
            values[self.tag(name, "accuracy")] = r.accuracy
            values[self.tag(name, "macro_f1")] = r.macro_f1
        writer.scalars(values, step)
        if not isinstance(key, int):
            return
        writer.scalar(self.tag("fit_seconds"), sum(r.seconds for r in results.values()), step)
        if self.is_due(trainer, self.figures_every_n_epochs, key):
            self._write_figure(trainer, key, step, final=self.is_final(trainer, key))
        writer.text(self.tag("table"), self.table(key), step)

    def _write_figure(self, trainer: pl.Trainer, key: int, step: int, *, final: bool = True) -> None:
        """The accuracy-vs-depth figure of epoch ``key``; before the last epoch an extra the budget may leave out."""
        build = functools.partial(depth_chart, self._evaluations, key, order=self.layer_names)
        if self.figure(trainer, self.tag("accuracy_vs_depth"), build, step, final=final):
            self._figure_key = key

    def table(self, key: int | str | None = None) -> str:
        """A markdown table of the probe accuracies of ``key`` (default: the latest epoch) beside the baselines."""
        notes = probe_notes(
            token_pooling=self.resolved_token_pooling, ignore_index=self.ignore_index, max_samples=self.max_samples,
            pixels_per_image=self.pixels_per_image if self.resolved_task == "segmentation" else None,
        )
        return evaluation_table(self._evaluations, key, order=self.layer_names, notes=notes)

    @override
    def summary_lines(self) -> list[str]:
        return latest_summary_lines(self._evaluations, order=self.layer_names)

    # ------------------------------------------------------------------------------------ state
    @override
    def extra_state(self) -> dict[str, Any]:
        # A checkpoint is written right after the validation pass that submitted this epoch's fit: the
        # evaluations wait for it, so a resumed fit has every finished epoch (and the next warm start).
        return {**self._evaluations.state_dict(), "layer_names": list(self.layer_names)}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._evaluations.load_state_dict(state)
        if state.get("layer_names") and not self.layer_names:
            self.layer_names = list(state["layer_names"])
            self._evaluations.order = self.layer_names

