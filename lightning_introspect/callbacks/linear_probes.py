"""``LinearProbes``: how linearly separable the classes are at each layer, every epoch (Alain & Bengio 2016)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_introspect._lightning import pl
from lightning_introspect._torch.guards import introspection_mode, is_compiled, module_device
from lightning_introspect._torch.hooks import hooks
from lightning_introspect._torch.layers import (
    ModuleCalls,
    refuse_reused_modules,
    resolve_layers,
    trace_module_calls,
)
from lightning_introspect.callbacks.base import (
    IntrospectionCallback,
    check_callable,
    check_choice,
    check_positive_int,
    draw_samples,
    split_batch,
)
from lightning_introspect.methods.probes import (
    CACHE_POLICIES,
    POOLING_CHOICES,
    FeatureCache,
    ProbeResult,
    RandomProjection,
    blas_threads,
    downsample_input,
    fit_probes,
    pool_activation,
)

SOLVERS = ("auto", "sklearn", "torch")
INPUT_KEY = "input"
INIT_KEY = "init"
_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardtanh, nn.Softplus,
)
_MAX_AUTO_LAYERS = 6
_INLINE_FIT_VALUES = 1 << 20  # solver="auto" on CPU: fit inline with torch up to this many cached feature values


def auto_probe_layers(
    model: nn.Module, example_input: Any, max_layers: int = _MAX_AUTO_LAYERS, *, calls: ModuleCalls | None = None
) -> list[str]:
    """The layers ``layers="auto"`` stands for: the output of each block, in execution order, evenly thinned
    to ``max_layers``, plus the penultimate representation (the output of the leaf before the last).

    A block's output is found through its activation modules: an activation that runs once per forward is
    probed itself; one module object applied several times (a ResNet block's single ``self.relu``) is
    replaced by the innermost module around it that runs once (the block), whose output is the one that
    name suggests. Modules that give the same values (a block and its last norm, a wrapper ``Sequential``
    and its last child) are probed once, under the outer name. The output layer is left out. Falls back
    to the top-level children that run once (without the last) when fewer than two blocks are found.
    Every chosen module runs exactly once per forward pass. ``calls``: a trace of ``example_input`` already
    made (:func:`~lightning_introspect._torch.layers.trace_module_calls`), to save one forward pass.
    """
    calls = calls or trace_module_calls(model, example_input)
    modules = dict(model.named_modules())
    leaves = [n for n in calls.order if not any(True for _ in modules[n].children())]
    if not leaves:
        return []
    last = leaves[-1]
    picks: list[str] = []
    for name in leaves:
        if name == last or not isinstance(modules[name], _ACTIVATIONS):
            continue
        chosen = name if calls.counts[name] == 1 else calls.enclosing_single_call(name)
        if chosen is not None and chosen not in picks:
            picks.append(chosen)
    if len(picks) < 2:
        picks = [n for n in calls.order if "." not in n and n != last and n != calls.order[-1] and calls.counts[n] == 1]
    penultimate = leaves[-2] if len(leaves) >= 2 else None
    if penultimate is not None and (calls.counts[penultimate] != 1 or isinstance(modules[penultimate], nn.Dropout)):
        penultimate = None
    if picks or penultimate:
        outputs = trace_module_calls(model, example_input, keep_outputs=[*picks, *([penultimate] if penultimate else [])])
        picks = _distinct_outputs(picks, outputs)
        if penultimate is not None and any(p == penultimate or outputs.same_output(p, penultimate) for p in picks):
            penultimate = None
    if len(picks) > max_layers:
        idx = sorted({round(i * (len(picks) - 1) / (max_layers - 1)) for i in range(max_layers)})
        picks = [picks[i] for i in idx]
    if penultimate is not None:
        picks.append(penultimate)
    return picks


def _distinct_outputs(names: list[str], calls: ModuleCalls) -> list[str]:
    """``names`` without repeats of the same output; of a module and one inside it, the outer name stays."""
    kept: list[str] = []
    for name in names:
        twin = next((k for k in kept if calls.same_output(k, name)), None)
        if twin is None:
            kept.append(name)
        elif twin.startswith(name + "."):  # the wrapper came second: it names the output better
            kept[kept.index(twin)] = name
    return kept


class LinearProbes(IntrospectionCallback):
    """Linear classifier probes on intermediate layers, fitted on cached activations every scheduled epoch.

    A probe is a multinomial logistic regression trained on one layer's pooled activations to predict
    the labels; its held-out accuracy says how linearly separable the classes are at that layer. After
    training the curve usually rises with depth; at initialisation it often falls. Both baselines are
    logged so the curve can be read: the probe on the (downsampled) raw input and the probes on the
    model as initialised (``"init"``, once at fit start).

    Activations come from forward hooks during the validation pass the trainer already runs (no extra
    pass). The hooks exist only between ``on_validation_epoch_start`` and ``on_validation_epoch_end``
    (and are removed on exceptions). Outputs are detached, pooled (conv maps over space), reduced with a
    seeded random projection when wider than ``max_features`` and copied into a bounded cache
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

    Tags written (``<layer>`` is the dotted layer name):

    * ``introspect/probes/<layer>/accuracy``: probe-test accuracy at the step of each evaluated epoch;
      the "init" probe is written at the fit's first step (0), so each curve starts at its baseline;
    * ``introspect/probes/<layer>/macro_f1``: macro-averaged F1, same steps;
    * ``introspect/probes/input/accuracy``, ``introspect/probes/input/macro_f1``: the raw-input baseline;
    * ``introspect/probes/accuracy_vs_depth``: a figure (accuracy vs layer depth, with the init curve and
      the input baseline) at the ``at`` fractions, the last epoch and every ``figures_every_n_epochs``-th;
    * ``introspect/probes/table``: a markdown table per evaluated epoch;
    * ``introspect/probes/fit_seconds``: solver time of each evaluation (in the background for sklearn);
    * ``introspect/probes/seconds``: time this callback spent in the training loop's thread (base class).

    Results on the instance:

    * ``history``: ``{epoch | "init" | "input": {layer: test accuracy}}`` (``"input"`` maps ``"input"``);
    * ``macro_f1``: the same shape, with macro-F1;
    * ``results``: ``{key: {layer: ProbeResult}}`` of this process (not checkpointed);
    * ``best_layer``: the layer with the highest accuracy at the latest evaluated epoch;
    * ``layer_names``: the probed layers in execution order;
    * ``timings``: seconds spent, by kind (``capture``, ``baseline_pass``, ``own_pass``, ``fit_inline``,
      ``submit``, ``wait``, ``log``), all in the training thread.

    ``history``, ``macro_f1``, ``best_layer`` and the probes' warm-start weights are in the checkpoint
    (a resumed fit keeps them, does not redo the init baseline and fits the next epochs as an
    uninterrupted fit would). Writing a checkpoint waits for a background fit still running.

    Args:
        layers: ``"auto"`` (block outputs in execution order plus the penultimate layer, at most 7; see
            :func:`auto_probe_layers`),
            a dotted name, a glob (``"encoder.*"``) or a list of those. Resolved at ``setup``.
        pooling: ``"avg"``, ``"max"``, ``"avgmax"`` or ``"flatten"`` (conv maps pooled over space).
        max_samples: the most cached samples (rows) per layer.
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
            (the second element of a tuple, or a ``y``/``label``/``target`` key) is not right.
        figures_every_n_epochs: draw the accuracy-vs-depth figure every n-th evaluated epoch as well
            (``None``, the default: only at the ``at`` fractions and the last epoch; the scalars and the
            table are written at every evaluated epoch).
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
    transient = ("_stack", "_executor", "_jobs")

    def __init__(
        self,
        *,
        layers: str | list[str] = "auto",
        pooling: str = "avg",
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
        if not (isinstance(layers, str) or (isinstance(layers, (list, tuple)) and all(isinstance(n, str) for n in layers))):
            raise ValueError(f"Expected `layers` to be 'auto', a layer name or a list of layer names, but got {layers!r}.")
        check_choice(pooling, "pooling", POOLING_CHOICES)
        check_choice(solver, "solver", SOLVERS)
        check_choice(cache, "cache", CACHE_POLICIES)
        check_positive_int(max_samples, "max_samples")
        check_positive_int(max_features, "max_features")
        check_positive_int(max_iter, "max_iter")
        check_positive_int(figures_every_n_epochs, "figures_every_n_epochs", allow_none=True)
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
            raise ValueError(f"Expected `test_fraction` to be a float in (0, 1), but got {test_fraction!r}.")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < math.inf:
            raise ValueError(f"Expected `tol` to be a positive finite float, but got {tol!r}.")
        if isinstance(C, bool) or not isinstance(C, (int, float)) or not C > 0 or math.isinf(C):
            raise ValueError(f"Expected `C` to be a positive finite float, but got {C!r}.")
        check_callable(target_transform, "target_transform")
        if probe_dataloader is not None and not hasattr(probe_dataloader, "__iter__"):
            raise ValueError(f"Expected `probe_dataloader` to be an iterable DataLoader or None, but got {probe_dataloader!r}.")
        self.layers = layers if isinstance(layers, str) else list(layers)
        self.pooling = pooling
        self.max_samples = max_samples
        self.max_features = max_features
        self.solver = solver
        self.test_fraction = float(test_fraction)
        self.max_iter = max_iter
        self.tol = float(tol)
        self.C = float(C)
        self.cache = cache
        self.include_input = bool(include_input)
        self.include_init = bool(include_init)
        self.probe_dataloader = probe_dataloader
        self.target_transform = target_transform
        self.figures_every_n_epochs = figures_every_n_epochs

        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        """Everything that belongs to one fit: a callback object used for a second fit (another model or
        data) starts clean. A resumed fit restores the checkpointed part afterwards (``load_state_dict``
        runs after ``setup``)."""
        self.history: dict[int | str, dict[str, float]] = {}
        self.macro_f1: dict[int | str, dict[str, float]] = {}
        self.results: dict[int | str, dict[str, ProbeResult]] = {}
        self.best_layer: str | None = None
        self.layer_names: list[str] = []
        self.timings: dict[str, float] = dict.fromkeys(
            ("capture", "baseline_pass", "own_pass", "fit_inline", "submit", "wait", "log"), 0.0
        )
        self._modules: dict[str, nn.Module] = {}
        self._calls_checked = False  # the named modules' call counts were checked on an example batch
        self._resolved_solver = "sklearn"
        self._cache: FeatureCache | None = None
        self._input_cache: FeatureCache | None = None
        self._projections: dict[str, RandomProjection] = {}
        self._stack: contextlib.ExitStack | None = None
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_labels: torch.Tensor | None = None
        self._pending_input: torch.Tensor | None = None
        self._batch_active = False
        self._hook_error: BaseException | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._jobs: list[tuple[int | str, int, concurrent.futures.Future]] = []
        self._to_log: list[tuple[int | str, int, dict[str, ProbeResult]]] = []
        self._warm: dict[str, dict[str, Any]] = {}
        self._figure_key: int | None = None  # the epoch of the latest accuracy-vs-depth figure
        self._eager_pass = False  # capture with an own eager pass instead of hooks in the trainer's validation

    # ------------------------------------------------------------------------------- lightning hooks
    @override
    def reset(self) -> None:
        # only a fit starts over (the base class calls this at setup("fit")): `trainer.validate()`
        # afterwards keeps this fit's results
        self._remove_hooks()
        self._shutdown(wait=True)
        self._reset_fit_state()

    @override
    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._resolve(trainer, pl_module)

    @override
    def restore_transient(self) -> None:
        self._stack, self._executor, self._jobs = None, None, []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # the shared check before training
        if self.active(trainer):
            self.run(trainer, self._start, trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._jobs and self._jobs[0][2].done() and self.active(trainer):
            self.run(trainer, self._drain, trainer)

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._should_capture(trainer) and not self._eager_pass:
            self.run(trainer, self._begin_capture, trainer, pl_module)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._stack is not None:
            self.run(trainer, self._batch_start, batch, dataloader_idx, log_seconds=False)

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._stack is not None:
            self.run(trainer, self._batch_end, log_seconds=False)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._stack is not None:
            self.run(trainer, self._end_capture, trainer)
        elif self._eager_pass and self._should_capture(trainer):
            self.run(trainer, self._own_pass_and_fit, trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.probe_dataloader is not None and self.active(trainer) and self.is_scheduled(trainer):
            self.run(trainer, self._own_pass_and_fit, trainer, pl_module)
        elif self._jobs and self._jobs[0][2].done() and self.active(trainer):
            self.run(trainer, self._drain, trainer)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._jobs or self._to_log:
            self.run(trainer, self._drain, trainer, wait=True)
        self._shutdown(wait=True)
        # a fit that ended before its last scheduled epoch (EarlyStopping, max_time): the figure of its last probes
        latest = max((k for k in self.history if isinstance(k, int)), default=None)
        if latest is not None and latest != self._figure_key and self.active(trainer):
            self.run(trainer, self._final_figure, trainer, latest)

    def _final_figure(self, trainer: Any, key: int) -> None:
        self.writer(trainer).figure(self.tag("accuracy_vs_depth"), self._figure(key), trainer.global_step)
        self._figure_key = key

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._remove_hooks()
        self._shutdown(wait=False)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._remove_hooks()
        self._shutdown(wait=True)

    # --------------------------------------------------------------------------------- preparation
    def _example(self, trainer: Any) -> tuple[Any, torch.Tensor | None] | None:
        loader = self.probe_dataloader if self.probe_dataloader is not None else self.val_dataloader(trainer)
        if loader is None:
            return None
        try:
            x, y = draw_samples(loader, 2, seed=self.seed)
        except Exception:  # data not ready at setup (e.g. built in LightningModule.setup): check later
            return None
        return x, y

    def _resolve(self, trainer: Any, pl_module: Any) -> None:
        """Resolve the layers and check that they can be probed.

        Raises ``ValueError`` for a wrong name (with close matches) and for a named module that runs more
        than once per forward pass (naming the block to probe instead). Skips the callback for the fit
        (one warning) when the data carries no labels or ``"auto"`` cannot run the model on the bare inputs.
        The call counts need one example batch: without data yet (built in ``LightningModule.setup``) they
        are checked at fit start.
        """
        example = self._example(trainer)
        if example is not None and example[1] is not None and example[1].ndim > 1 and self.target_transform is None:
            self.skip(
                f"the labels have shape {tuple(example[1].shape)} (dense masks, as in segmentation), and a probe needs one "
                "class id per sample; pass `target_transform` (batch -> one label per sample) to probe such data."
            )
            return
        if example is not None and example[1] is None and self.target_transform is None:
            self.skip(
                "it needs labels, but the "
                + ("`probe_dataloader`" if self.probe_dataloader is not None else "validation")
                + " batches carry none. Pass `probe_dataloader` (a labelled DataLoader) or `target_transform` "
                "(batch -> labels)."
            )
            return
        auto = isinstance(self.layers, str) and self.layers == "auto"
        modules = {} if auto else resolve_layers(pl_module, self.layers, argument="layers")
        if example is None:
            self._modules, self.layer_names = modules, list(modules)
            return
        x = _to_device(example[0], _device_of(pl_module))
        try:
            calls = trace_module_calls(pl_module, x)
        except Exception as exc:
            if auto:
                self.skip(
                    "`layers='auto'` runs `model(inputs)` on two samples to find the layers, and that failed "
                    f"({type(exc).__name__}: {exc}); name the layers explicitly."
                )
                return
            calls = None  # the forward does not take the bare inputs: the given order, call counts unchecked
        if auto:
            modules = resolve_layers(pl_module, auto_probe_layers(pl_module, x, calls=calls), argument="layers")
            if not modules:
                self.skip("`layers='auto'` found no layer to probe in this model; name the layers explicitly.")
                return
        if calls is not None:
            refuse_reused_modules(calls, list(modules), argument="layers")
            rank = {n: i for i, n in enumerate(calls.order)}
            modules = dict(sorted(modules.items(), key=lambda item: rank.get(item[0], len(rank))))
        self._modules, self.layer_names = modules, list(modules)
        self._calls_checked = True

    def _start(self, trainer: Any, pl_module: Any) -> None:
        if self.probe_dataloader is None and not self._has_validation(trainer):
            self.warn_once(
                "no-validation",
                "LinearProbes probes the validation pass, but this fit has no validation data (or "
                "limit_val_batches=0): nothing will be probed. Pass `probe_dataloader` or validation data.",
            )
            return
        if not self._calls_checked:  # no data at setup: resolve (and check the call counts) now
            self._resolve(trainer, pl_module)
            if self.disabled:
                return
            if not self._modules:
                raise RuntimeError("LinearProbes could not resolve `layers='auto'`: no data to run an example through.")
        if self.probe_dataloader is None and _has_compiled(pl_module):
            # Hooks added after dynamo cached a graph do not fire in it (and fire traced, with graph breaks,
            # when they do): the trainer's compiled validation is left alone and the probes get their
            # activations from an eager pass of ours over the same validation data.
            self._eager_pass = True
            self.warn_once(
                "compiled",
                "LinearProbes: the model contains torch.compile-d modules, so the probes take their activations "
                "from an eager pass of their own over the validation data at each evaluated epoch (one extra "
                "forward pass) instead of hooks in the compiled validation.",
            )
        device = _device_of(pl_module)
        solver = self.solver
        if solver == "auto" and device.type != "cpu":
            solver = "torch"
        self._resolved_solver = solver  # "auto" left on CPU: chosen per evaluation by its size (`_solver_for`)
        cache_device = device if solver == "torch" else torch.device("cpu")
        self._cache = FeatureCache(self.max_samples, policy=self.cache, seed=self.seed, device=cache_device)
        self._input_cache = FeatureCache(self.max_samples, policy=self.cache, seed=self.seed, device=cache_device)
        want_init = self.include_init and INIT_KEY not in self.history
        want_input = self.include_input and INPUT_KEY not in self.history
        if want_init or want_input:
            start = time.perf_counter()
            self._own_pass(trainer, pl_module, layers=want_init, inputs=want_input)
            self.timings["baseline_pass"] += time.perf_counter() - start
            if want_input:
                self._fit(trainer, INPUT_KEY, self._input_cache, trainer.global_step)
            if want_init:
                self._fit(trainer, INIT_KEY, self._cache, trainer.global_step)
            self._drain(trainer)

    def _has_validation(self, trainer: Any) -> bool:
        limit = getattr(trainer, "limit_val_batches", 1.0)
        if limit is not None and not isinstance(limit, bool) and limit == 0:
            return False
        loader = self.val_dataloader(trainer)  # loads the validation data early (without a barrier under DDP)
        if loader is None or loader is getattr(trainer, "train_dataloader", None):  # the base falls back to training data
            return False
        counts = list(getattr(trainer, "num_val_batches", None) or [])
        return not counts or counts[0] != 0

    # ------------------------------------------------------------------------------------ capture
    def _should_capture(self, trainer: Any) -> bool:
        return (
            self.probe_dataloader is None
            and self._cache is not None
            and self.active(trainer)
            and self.is_scheduled(trainer)
            and not getattr(trainer, "sanity_checking", False)
            and self.trainer_fn(trainer) in ("fit", None)  # not `trainer.validate()` after the fit: an epoch that never trained
        )

    def _register_hooks(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        handles = stack.enter_context(hooks())
        for name, module in self._modules.items():
            handles.append(module.register_forward_hook(self._make_hook(name)))
        return stack

    def _remove_hooks(self) -> None:
        stack, self._stack = self._stack, None
        self._batch_active = False
        self._pending = {}
        if stack is not None:
            stack.close()

    def _make_hook(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not self._batch_active or name in self._pending:
                return
            start = time.perf_counter()
            try:
                self._pending[name] = self._features(name, pool_activation(output, self.pooling))
            except Exception as exc:  # surfaced (with the error policy) at the end of the batch
                if self._hook_error is None:
                    self._hook_error = exc
            elapsed = time.perf_counter() - start
            self.timings["capture"] += elapsed
            if self._stack is not None:  # the trainer's validation forward (outside `run`): count it here
                self.seconds_total += elapsed

        return hook

    def _features(self, name: str, feats: torch.Tensor) -> torch.Tensor:
        """Project to ``max_features`` when wider (a seeded projection per layer, the same every epoch)."""
        if feats.shape[1] <= self.max_features:
            return feats
        proj = self._projections.get(name)
        if proj is None or proj.in_features != feats.shape[1]:
            seed = self.seed * 1_000_003 + (1 + list(self._modules).index(name) if name in self._modules else 0)
            proj = RandomProjection(feats.shape[1], self.max_features, seed=seed, device=feats.device)
            self._projections[name] = proj
        return proj(feats)

    @property
    def _layer_cache(self) -> FeatureCache:
        """The cache of layer features (built in ``setup``)."""
        if self._cache is None:
            raise RuntimeError("LinearProbes: the feature cache is built in setup(), which has not run.")
        return self._cache

    @property
    def _inputs_cache(self) -> FeatureCache:
        """The cache of raw inputs, for the input baseline (built in ``setup``)."""
        if self._input_cache is None:
            raise RuntimeError("LinearProbes: the input cache is built in setup(), which has not run.")
        return self._input_cache

    def _labels(self, batch: Any) -> torch.Tensor:
        labels: torch.Tensor | None
        if self.target_transform is not None:
            labels = self.target_transform(batch)
        else:
            _, labels = split_batch(batch)
        if labels is None:
            raise ValueError(
                "LinearProbes found no labels in a batch. Pass `probe_dataloader` (a labelled DataLoader) or "
                "`target_transform` (batch -> labels)."
            )
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.is_floating_point():
            raise ValueError(
                f"Expected one integer label per sample (shape (N,)), but got {labels.dtype} labels of shape "
                f"{tuple(labels.shape)}; use `target_transform` to map a batch to class ids."
            )
        return labels.detach()

    def _begin_capture(self, trainer: Any, pl_module: Any) -> None:
        self._remove_hooks()
        self._layer_cache.reset()
        self._hook_error = None
        self._stack = self._register_hooks()

    def _batch_start(self, batch: Any, dataloader_idx: int) -> None:
        self._pending = {}
        self._batch_active = dataloader_idx == 0
        if self._batch_active:
            self._pending_labels = self._labels(batch)

    def _batch_end(self) -> None:
        start = time.perf_counter()
        try:
            if self._hook_error is not None:
                error, self._hook_error = self._hook_error, None
                raise error
            if self._batch_active:
                self._commit(self._layer_cache, layers=True)
        finally:
            self._batch_active = False
            self._pending = {}
            self.timings["capture"] += time.perf_counter() - start

    def _commit(self, cache: FeatureCache, *, layers: bool) -> None:
        labels = self._pending_labels
        if labels is None:
            return
        if layers:
            missing = [n for n in self._modules if n not in self._pending]
            if missing:
                raise RuntimeError(
                    f"LinearProbes: the layers {missing} did not run in this forward pass, so they cannot be probed. "
                    "Choose layers that the model's forward (validation step) calls."
                )
            cache.add(self._pending, labels)
        if self._pending_input is not None:
            self._inputs_cache.add({INPUT_KEY: self._pending_input}, labels)
        self._pending_labels = None
        self._pending_input = None

    def _end_capture(self, trainer: Any) -> None:
        try:
            error, self._hook_error = self._hook_error, None
            if error is not None:
                raise error
        finally:
            self._remove_hooks()
        self._fit(trainer, trainer.current_epoch, self._layer_cache, trainer.global_step)
        self._drain(trainer)

    def _own_pass(self, trainer: Any, pl_module: Any, *, layers: bool = True, inputs: bool = False) -> None:
        """An eval-mode, no-grad pass of ours over the probe data (``probe_dataloader`` or validation)."""
        loader = self.probe_dataloader if self.probe_dataloader is not None else self.val_dataloader(trainer)
        if loader is None:
            raise RuntimeError("LinearProbes needs validation data or a `probe_dataloader` to probe with.")
        max_batches = math.inf
        if self.probe_dataloader is None:
            counts = list(getattr(trainer, "num_val_batches", None) or [])
            if counts and counts[0] not in (None, math.inf):
                max_batches = counts[0]
        device = _device_of(pl_module)
        self._layer_cache.reset()
        self._inputs_cache.reset()
        with contextlib.ExitStack() as stack:
            stack.enter_context(introspection_mode(pl_module, grad=False))  # forked RNG before the iterator
            if layers:
                handle_stack = self._register_hooks()
                stack.callback(handle_stack.close)
            for i, batch in enumerate(loader):
                if i >= max_batches:
                    break
                x, _ = split_batch(batch)
                self._pending = {}
                self._pending_labels = self._labels(batch)
                self._pending_input = self._features(INPUT_KEY, downsample_input(x, self.max_features)) if inputs else None
                self._batch_active = layers
                if layers:
                    pl_module(_to_device(x, device))
                    if self._hook_error is not None:
                        error, self._hook_error = self._hook_error, None
                        raise error
                self._commit(self._layer_cache, layers=layers)
                self._batch_active = False
            self._pending = {}

    def _own_pass_and_fit(self, trainer: Any, pl_module: Any) -> None:
        start = time.perf_counter()
        self._own_pass(trainer, pl_module, layers=True, inputs=False)
        self.timings["own_pass"] += time.perf_counter() - start
        self._fit(trainer, trainer.current_epoch, self._layer_cache, trainer.global_step)
        self._drain(trainer)

    # ------------------------------------------------------------------------------------- fitting
    def _fit(self, trainer: Any, key: int | str, cache: FeatureCache, step: int) -> None:
        labels = cache.labels
        if cache.size < 4 or torch.unique(labels).numel() < 2:
            self.warn_once(
                f"few-{key}",
                f"LinearProbes: only {cache.size} labelled samples with {torch.unique(labels).numel()} class(es) for "
                f"{key!r}; a probe needs at least two classes. Skipped.",
            )
            return
        names = cache.names
        broken = [n for n in names if not bool(torch.isfinite(cache.features(n)).all())]
        if broken:
            raise ValueError(
                f"LinearProbes: the activations of {broken} hold NaN / Inf values at {key!r} (non-finite weights or "
                "inputs?), so no probe can be fitted."
            )
        solver = self._solver_for(cache)
        if solver == "torch":
            self._collect(wait=True)  # keeps the results in epoch order and the warm start sequential
            start = time.perf_counter()
            results = self._solve({n: cache.features(n) for n in names}, labels, key, solver)
            self.timings["fit_inline"] += time.perf_counter() - start
            self._to_log.append((key, step, results))
            return
        start = time.perf_counter()
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="linear-probes")
        features = {n: cache.features(n).detach().cpu().numpy().copy() for n in names}
        labels_np = labels.detach().cpu().numpy().copy()
        self._jobs.append((key, step, self._executor.submit(self._solve, features, labels_np, key, solver)))
        self.timings["submit"] += time.perf_counter() - start

    def _solver_for(self, cache: FeatureCache) -> str:
        """The solver of one evaluation. ``"auto"`` on CPU: the torch solver inline while the cached
        features are small (at most ``_INLINE_FIT_VALUES`` numbers: its few milliseconds cost less than a
        background sklearn fit takes from training's cores), sklearn in the background thread above that."""
        if self._resolved_solver != "auto":
            return self._resolved_solver
        values = cache.size * sum(cache.features(n).shape[1] for n in cache.names)
        return "torch" if values <= _INLINE_FIT_VALUES else "sklearn"

    def _solve(self, features: dict[str, Any], labels: Any, key: int | str, solver: str) -> dict[str, ProbeResult]:
        """Fit every layer's probe (background thread for sklearn). Only epochs read / write the warm start."""
        trained = isinstance(key, int)
        limit = blas_threads(1) if solver == "sklearn" else contextlib.nullcontext()
        with limit:
            results = fit_probes(
                features, labels, solver=solver, test_fraction=self.test_fraction, seed=self.seed,
                max_iter=self.max_iter, tol=self.tol, C=self.C, warm_start=self._warm if trained else None,
            )
        if trained:
            self._warm = {n: r.state for n, r in results.items() if r.state is not None}
        return results

    def _collect(self, wait: bool = False) -> None:
        """Move finished background fits (in submission order) into the results and the log queue."""
        while self._jobs:
            key, step, future = self._jobs[0]
            if not future.done():
                if not wait:
                    return
                start = time.perf_counter()
                concurrent.futures.wait([future])
                self.timings["wait"] += time.perf_counter() - start
            self._jobs.pop(0)
            self._to_log.append((key, step, future.result()))

    def _drain(self, trainer: Any, wait: bool = False) -> None:
        self._collect(wait=wait)
        start = time.perf_counter()
        while self._to_log:
            key, step, results = self._to_log.pop(0)
            self._record(key, results)
            self._log(trainer, key, step, results)
        self.timings["log"] += time.perf_counter() - start

    def _record(self, key: int | str, results: dict[str, ProbeResult]) -> None:
        self.results[key] = results
        self.history[key] = {n: float(r.accuracy) for n, r in results.items()}
        self.macro_f1[key] = {n: float(r.macro_f1) for n, r in results.items()}
        self._update_best()

    def _update_best(self) -> None:
        epochs = [k for k in self.history if isinstance(k, int)]
        if epochs:
            latest = self.history[max(epochs)]
            self.best_layer = max(latest, key=lambda n: (latest[n], -self._depth(n)))

    def _depth(self, name: str) -> int:
        return self.layer_names.index(name) if name in self.layer_names else len(self.layer_names)

    def _log(self, trainer: Any, key: int | str, step: int, results: dict[str, ProbeResult]) -> None:
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
            writer.figure(self.tag("accuracy_vs_depth"), self._figure(key), step)
            self._figure_key = key
        writer.text(self.tag("table"), self.table(key), step)

    # ------------------------------------------------------------------------------------ rendering
    def table(self, key: int | str | None = None) -> str:
        """A markdown table of the probe accuracies of ``key`` (default: the latest epoch) beside the baselines."""
        if key is None:
            epochs = [k for k in self.history if isinstance(k, int)]
            if not epochs:
                return "No probe results yet."
            key = max(epochs)
        current, f1 = self.history.get(key, {}), self.macro_f1.get(key, {})
        init = self.history.get(INIT_KEY, {})
        lines = [
            f"| layer | depth | accuracy (epoch {key}) | macro-F1 | init accuracy | change vs init |",
            "|---|---|---|---|---|---|",
        ]
        if INPUT_KEY in self.history:
            acc = self.history[INPUT_KEY].get(INPUT_KEY, float("nan"))
            lines.append(f"| input (baseline) | 0 | {acc:.3f} | {self.macro_f1[INPUT_KEY].get(INPUT_KEY, float('nan')):.3f} | | |")
        for name in sorted(current, key=self._depth):
            acc = current[name]
            base = init.get(name)
            delta = f"{acc - base:+.3f}" if base is not None else ""
            base_s = f"{base:.3f}" if base is not None else ""
            star = " **best**" if name == self.best_layer and key == max(k for k in self.history if isinstance(k, int)) else ""
            lines.append(f"| `{name}`{star} | {self._depth(name) + 1} | {acc:.3f} | {f1.get(name, float('nan')):.3f} | {base_s} | {delta} |")
        return "\n".join(lines)

    def _figure(self, key: int) -> Any:
        from matplotlib.figure import Figure

        names = sorted(self.history[key], key=self._depth)
        depth = [self._depth(n) + 1 for n in names]
        fig = Figure(figsize=(max(4.0, 0.9 * len(names) + 2), 3.4), dpi=90)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(depth, [self.history[key][n] for n in names], "o-", color="tab:blue", label=f"epoch {key}")
        init = self.history.get(INIT_KEY, {})
        if init:
            pts = [(self._depth(n) + 1, init[n]) for n in names if n in init]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "s--", color="tab:gray", label="init")
        if INPUT_KEY in self.history:
            ax.axhline(self.history[INPUT_KEY][INPUT_KEY], color="tab:orange", linestyle=":", label="raw input")
        ax.set_xticks(depth)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("layer (execution order)")
        ax.set_ylabel("probe test accuracy")
        ax.set_title(f"Linear probes, epoch {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.3)  # fixed: tight_layout costs more than drawing
        return fig

    def summary_lines(self) -> list[str]:
        epochs = [k for k in self.history if isinstance(k, int)]
        if not epochs or self.best_layer is None:
            return []
        last = max(epochs)
        acc = self.history[last][self.best_layer]
        parts = [f"best layer `{self.best_layer}`: probe accuracy {acc:.3f} at epoch {last}"]
        if self.best_layer in self.history.get(INIT_KEY, {}):
            parts.append(f"init {self.history[INIT_KEY][self.best_layer]:.3f}")
        if INPUT_KEY in self.history:
            parts.append(f"raw input {self.history[INPUT_KEY][INPUT_KEY]:.3f}")
        curve = ", ".join(f"{n} {self.history[last][n]:.2f}" for n in sorted(self.history[last], key=self._depth))
        return [" | ".join(parts), f"by depth: {curve}"]

    # ------------------------------------------------------------------------------------ plumbing
    def on_disable(self) -> None:
        self._remove_hooks()

    def _shutdown(self, *, wait: bool) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=not wait)
        if not wait:
            self._jobs = []

    # ------------------------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        # A checkpoint is written right after the validation pass that submitted this epoch's fit: wait
        # for it, so a resumed fit has every finished epoch (and the warm start the next fit begins from).
        self._collect(wait=True)
        for key, _step, results in self._to_log:  # finished but not yet logged: keep them in the checkpoint
            self._record(key, results)
        return {
            "history": [[k, dict(v)] for k, v in self.history.items()],
            "macro_f1": [[k, dict(v)] for k, v in self.macro_f1.items()],
            "best_layer": self.best_layer or "",
            "layer_names": list(self.layer_names),
            "warm": {
                n: {k: (v if isinstance(v, str) else torch.as_tensor(v)) for k, v in st.items()}
                for n, st in self._warm.items()
                if st is not None
            },
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.history = {k: {n: float(a) for n, a in v.items()} for k, v in state.get("history", [])}
        self.macro_f1 = {k: {n: float(a) for n, a in v.items()} for k, v in state.get("macro_f1", [])}
        self.best_layer = state.get("best_layer") or None
        if state.get("layer_names") and not self.layer_names:
            self.layer_names = list(state["layer_names"])
        self._warm = {
            n: {k: (v if isinstance(v, str) else torch.as_tensor(v).numpy()) for k, v in st.items()}
            for n, st in dict(state.get("warm", {})).items()
        }


def _has_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is or contains a ``torch.compile``-d module (dynamo's ``OptimizedModule``)."""
    return any(is_compiled(m) for m in model.modules()) or getattr(model, "_compiler_ctx", None) is not None


def _device_of(module: nn.Module) -> torch.device:
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    return module_device(module)


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    return x
