"""``WeightHistograms``: per-layer weight (and gradient) histograms and drift from initialisation.

If the weight distribution of a layer looks the same after training as at initialisation, that layer
may not be learning. This callback logs one histogram per layer, keeps a snapshot of the initial
weights, and measures per layer how far the weights moved (relative change, cosine distance, 1-D
Wasserstein distance between the value distributions), drawn by depth so "inner vs outer layers" is
visible at a glance. Layers that barely moved are named in a summary.

The maths lives in :mod:`lightning_introspect.methods.weights` (pure torch, batched, on the device).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from typing_extensions import override

from lightning_introspect._lightning import pl
from lightning_introspect._torch.hooks import record_execution_order
from lightning_introspect._torch.layers import close_matches, resolve_layers
from lightning_introspect.callbacks.base import IntrospectionCallback, check_positive_int, split_batch
from lightning_introspect.loggers.adapter import IntrospectionWriter
from lightning_introspect.methods.weights import HistogramStats, drift, histograms

_MAX_OVERLAYS = 16  # layers shown in the initial-vs-current overlay figure (spread over depth)


# ------------------------------------------------------------------------------------ helpers
def write_histograms(writer: IntrospectionWriter, hists: Mapping[str, HistogramStats], step: int) -> None:
    """Write ``tag -> HistogramStats`` as raw histograms in one :meth:`IntrospectionWriter.histograms` call
    (one TensorBoard event); tensors with no finite value are skipped."""
    writer.histograms(
        {
            tag: (
                h.counts.numpy(),
                h.edges.numpy(),
                {"min": h.min, "max": h.max, "num": float(h.num), "sum": h.sum, "sum_squares": h.sum_squares},
            )
            for tag, h in hists.items()
            if h.num
        },
        step,
    )


def _own_param(module: nn.Module, name: str) -> torch.Tensor | None:
    param = module._parameters.get(name)
    if isinstance(param, torch.Tensor):
        return param
    if parametrize.is_parametrized(module, name):
        return getattr(module, name)
    return None


def own_weight(module: nn.Module) -> torch.Tensor | None:
    """The module's own ``weight`` parameter (also a parametrized one), else ``None``."""
    return _own_param(module, "weight")


def own_bias(module: nn.Module) -> torch.Tensor | None:
    """The module's own ``bias`` parameter (also a parametrized one), else ``None``."""
    return _own_param(module, "bias")


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists and numbers as Python floats / ints: what ``torch.load(weights_only=True)``
    reads back."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3g}"


# ----------------------------------------------------------------------------------- callback
class WeightHistograms(IntrospectionCallback):
    """Per-layer weight histograms, drift from initialisation and "not learning" flags.

    At fit start (before the first optimizer step) the weights of the tracked layers are copied to the
    CPU: that snapshot ``W0`` is kept in the callback's checkpoint state, so a resumed fit compares with
    the true initialisation (it is not re-taken on resume). At each evaluation (every ``every_n_epochs``
    epoch end, the ``at`` fractions, the last epoch, and every ``every_n_steps`` optimizer steps) the
    callback bins every tracked weight on its own device (only counts, edges and five numbers per tensor
    come to the CPU), writes them as raw TensorBoard histograms, and measures per layer, against ``W0``:

    * relative change ``||W - W0|| / ||W0||`` (the "drift"; typically 0.3-0.7 after tens of epochs);
    * cosine distance ``1 - cos(W, W0)`` (rotation, ignoring scale);
    * the 1-D Wasserstein distance between the value distributions of ``W`` and ``W0`` (in weight units;
      up to 8192 values per tensor, at fixed random positions).

    At each epoch-end evaluation it writes a summary; at the ``at`` fractions, the last epoch and every
    ``figures_every_n_epochs``-th epoch it also draws the drift by depth (layers in execution order,
    input side to output side; registration order if the order cannot be traced) and an overlay of the
    initial vs the current histogram of up to 16 layers (two matplotlib figures, ~0.3 s of CPU, most of
    the callback's cost on a small model, hence not every epoch by default). A layer whose relative change
    is below ``drift_threshold`` at an epoch-end evaluation from the second epoch on (or at the end of
    a one-epoch fit) is flagged as *not learning* (frozen layers, ``requires_grad=False``, are marked
    as such). Execution order is traced once, at the first training batch, with one extra forward
    pass of two of its samples in eval mode under ``no_grad`` (nothing of training changes).

    With ``include_gradients=True`` the gradients of the tracked layers are binned too, read from
    ``.grad`` in ``on_before_optimizer_step`` (after gradient accumulation and AMP unscaling; never
    modified), at the optimizer steps where ``global_step`` is a multiple of ``every_n_steps`` and at the
    last training batch of each scheduled epoch.

    Non-finite values (NaN / Inf) are counted, reported (scalar + one warning per tensor) and left out
    of the bins; they never break the binning.

    Tags written (``<layer>`` is the dotted module name):

    * ``introspect/weights/<layer>`` -- histogram of the layer's weight;
    * ``introspect/weights/bias/<layer>`` -- histogram of its bias (``include_bias``);
    * ``introspect/weights/grad/<layer>``, ``introspect/weights/grad/bias/<layer>`` -- gradient
      histograms (``include_gradients``);
    * ``introspect/weights/drift/<layer>`` -- scalar: relative change ``||W - W0|| / ||W0||``;
    * ``introspect/weights/cosine/<layer>`` -- scalar: cosine distance ``1 - cos(W, W0)``;
    * ``introspect/weights/wasserstein/<layer>`` -- scalar: Wasserstein-1 distance to the initial distribution;
    * ``introspect/weights/nonfinite`` -- scalar: NaN + Inf values over all tracked tensors;
      ``introspect/weights/nonfinite/<layer>`` (``.../nonfinite/bias/<layer>``) when a tensor has any;
      ``introspect/weights/grad/nonfinite`` (and per layer) for gradients;
    * ``introspect/weights/drift_by_depth`` -- figure: relative change and cosine distance per layer by
      depth (figure epochs, see ``figures_every_n_epochs``);
    * ``introspect/weights/initial_vs_current`` -- figure: initial vs current histogram per layer (figure epochs);
    * ``introspect/weights/summary`` -- markdown table per layer + the not-learning list (epoch ends);
    * ``introspect/weights/layers`` -- markdown: the tracked layers (fit start);
    * ``introspect/weights/seconds`` -- the callback's own wall time per call.

    Results on the instance:

    * ``layers``: tracked layer names (execution order once traced);
    * ``initial``: ``{layer: W0}`` CPU tensors (the snapshot);
    * ``steps`` / ``epochs``: global step and epoch of each evaluation (epoch -1: fit start);
    * ``drift``, ``cosine``, ``wasserstein``: ``{layer: [value per evaluation]}`` (aligned with ``steps``);
    * ``history``: per evaluation ``{"step", "epoch", "weights": {layer: {min, max, mean, std, num,
      nonfinite}}, "bias": {...}}``; ``grad_history`` the same for gradients;
    * ``histograms``: the latest :class:`HistogramStats` per tensor (``"<layer>"``, ``"bias/<layer>"``);
    * ``summary``: ``{"epoch", "step", "checked", "threshold", "not_learning": [...], "frozen": [...],
      "latest_drift": {layer: value}, "nonfinite": {tensor: count}}``.

    Args:
        layers: ``"auto"`` (every module with its own ``weight``: conv, linear, norm, embedding...), a
            dotted module name, a glob (``"features.*"``, keeps the matches that have a weight) or a list
            of those. Resolved at ``setup``; a wrong name raises ``ValueError`` listing close matches.
        every_n_steps: also evaluate every n optimizer steps (``None``: epoch ends only).
        bins: number of equal-width bins per histogram (over each tensor's own finite range). 32 by
            default, like TensorBoard's own ~30 (each bin adds 16 bytes to every event).
        include_bias: also log bias histograms (drift is measured on weights only).
        include_gradients: also log gradient histograms (see above).
        drift_threshold: relative change under which a layer is flagged as not learning.
        figures_every_n_epochs: draw the two figures every n-th epoch as well (``None``, the default:
            only at the ``at`` fractions and the last epoch; ``1``: at every evaluated epoch end).
        enabled, every_n_epochs, at, seed, on_error: see :class:`IntrospectionCallback`
            (``seed`` picks the Wasserstein sample positions).

    A tracked module replaced during the fit (``model.fc = nn.Linear(...)`` between epochs, or a weight
    swapped for one of another shape) is noticed at the next evaluation: the layers are re-resolved, the
    new module's current weights become its ``W0`` and one warning says so; its earlier drift values
    belong to the old module.

    Each fit starts clean (``setup`` of a fit resets the results; a resumed fit then restores them from
    the checkpoint, ``summary`` included); ``trainer.validate()`` after a fit keeps them.

    Limits: ``W0`` is a CPU copy of the tracked weights (4 bytes per fp32 parameter). Under FSDP /
    DeepSpeed ZeRO-3 each rank holds parameter shards: rank zero bins its shard only.

    Example:
        >>> from lightning_introspect.demo import DigitsCNN
        >>> cb = WeightHistograms(layers="features.*", bins=32, drift_threshold=1e-3)
        >>> cb.setup(None, DigitsCNN(), "fit")
        >>> cb.layers
        ['features.0', 'features.1', 'features.4', 'features.5', 'features.8']
    """

    name = "weights"

    def __init__(
        self,
        *,
        layers: str | list[str] = "auto",
        every_n_steps: int | None = None,
        bins: int = 32,
        include_bias: bool = False,
        include_gradients: bool = False,
        drift_threshold: float = 1e-3,
        figures_every_n_epochs: int | None = None,
        enabled: bool = True,
        every_n_epochs: int | None = 1,
        at: list[float] | tuple[float, ...] | None = (0.5,),
        seed: int = 0,
        on_error: str = "warn",
    ) -> None:
        super().__init__(enabled=enabled, every_n_epochs=every_n_epochs, at=at, num_samples=1, seed=seed, on_error=on_error)
        if isinstance(layers, str):
            if not layers:
                raise ValueError("Expected `layers` to be 'auto', a layer name, a glob or a list of those, but got ''.")
        elif not isinstance(layers, (list, tuple)) or not layers or not all(isinstance(n, str) and n for n in layers):
            raise ValueError(
                f"Expected `layers` to be 'auto', a layer name, a glob or a non-empty list of those, but got {layers!r}."
            )
        check_positive_int(every_n_steps, "every_n_steps", allow_none=True)
        check_positive_int(bins, "bins")
        check_positive_int(figures_every_n_epochs, "figures_every_n_epochs", allow_none=True)
        for arg, value in (("include_bias", include_bias), ("include_gradients", include_gradients)):
            if not isinstance(value, bool):
                raise ValueError(f"Expected `{arg}` to be a bool, but got {value!r}.")
        if isinstance(drift_threshold, bool) or not isinstance(drift_threshold, (int, float)) or not drift_threshold >= 0:
            raise ValueError(f"Expected `drift_threshold` to be a non-negative float, but got {drift_threshold!r}.")
        if not math.isfinite(drift_threshold):
            raise ValueError(f"Expected `drift_threshold` to be a finite non-negative float, but got {drift_threshold!r}.")
        self.layer_spec: str | list[str] = layers if isinstance(layers, str) else list(layers)
        self.every_n_steps = every_n_steps
        self.bins = bins
        self.include_bias = include_bias
        self.include_gradients = include_gradients
        self.drift_threshold = float(drift_threshold)
        self.figures_every_n_epochs = figures_every_n_epochs

        self._modules: dict[str, nn.Module] = {}
        self._ordered = False
        self._initial: dict[str, torch.Tensor] | None = None
        self._model: nn.Module | None = None  # the model of this fit, to notice submodules replaced mid-fit
        self._initial_hists: dict[str, HistogramStats] | None = None
        self._last_step: int | None = None
        self._figure_step: int | None = None  # global step of the latest figures
        self._last_grad_step: int | None = None
        self.steps: list[int] = []
        self.epochs: list[int] = []
        self.drift: dict[str, list[float]] = {}
        self.cosine: dict[str, list[float]] = {}
        self.wasserstein: dict[str, list[float]] = {}
        self.history: list[dict[str, Any]] = []
        self.grad_history: list[dict[str, Any]] = []
        self.histograms: dict[str, HistogramStats] = {}
        self.summary: dict[str, Any] = {}

    # ----------------------------------------------------------------------------- properties
    @property
    def layers(self) -> list[str]:
        """The tracked layer names (execution order once traced, registration order before)."""
        return list(self._modules)

    @property
    def initial(self) -> dict[str, torch.Tensor]:
        """The initial weights ``{layer: W0}`` (CPU), empty before fit start."""
        return dict(self._initial or {})

    # ------------------------------------------------------------------------- Lightning hooks
    @override
    def reset(self) -> None:
        # a fit starts over (a resumed one restores its checkpoint afterwards); `trainer.validate()` keeps
        # the fit's results
        self._reset_results()
        self._model = None

    @override
    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._modules = self.resolve(pl_module)
            self._ordered = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active(trainer):
            self.run(trainer, self._start, trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._ordered and self.active(trainer):
            self.run(trainer, self._trace_order, pl_module, batch)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.include_gradients and self.active(trainer) and self._gradients_due(trainer):
            self.run(trainer, self._log_gradients, trainer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps and self.active(trainer) and self._step_due(trainer):
            self.run(trainer, self._evaluate, trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active(trainer) and self.is_scheduled(trainer):
            self.run(trainer, self._epoch_end, trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a fit stopped early (EarlyStopping, should_stop) before its last scheduled epoch: final state
        if not (self.active(trainer) and self._initial is not None):
            return
        if self._last_step != trainer.global_step:
            self.run(trainer, self._epoch_end, trainer, epoch=self.last_epoch(trainer), figures=True)
        elif self.steps and self._figure_step != trainer.global_step:  # evaluated, but not a figure epoch
            self.run(trainer, self._figures, trainer)

    # ---------------------------------------------------------------------------- resolution
    def resolve(self, model: nn.Module) -> dict[str, nn.Module]:
        """``{name: module}`` of the layers ``layers`` names, each with its own weight (registration order).

        Raises:
            ValueError: a name that is not a submodule (with close matches), a named module without a
                weight (listing layers that have one), or a pattern that matches no module with a weight.
        """
        with_weight = {n: m for n, m in model.named_modules() if n and own_weight(m) is not None}
        if not with_weight:
            raise ValueError("`layers`: the model has no submodule with its own `weight` parameter to track.")
        if self.layer_spec == "auto":
            return with_weight
        specs = [self.layer_spec] if isinstance(self.layer_spec, str) else self.layer_spec
        chosen: dict[str, nn.Module] = {}
        for spec in specs:
            found = resolve_layers(model, spec, argument="layers")
            is_glob = any(ch in spec for ch in "*?[")
            if is_glob:
                found = {n: m for n, m in found.items() if n in with_weight}
                if not found:
                    raise ValueError(
                        f"Expected the pattern {spec!r} in `layers` to match a module with its own weight, but none "
                        f"of its matches has one. Layers with weights include: {close_matches(spec, list(with_weight))}."
                    )
            elif spec not in with_weight:
                raise ValueError(
                    f"Expected `layers` to name modules with their own `weight`, but {spec!r} "
                    f"({type(found[spec]).__name__}) has none. Closest layers with weights: {close_matches(spec, list(with_weight))}."
                )
            chosen.update(found)
        order = list(with_weight)
        return {n: chosen[n] for n in sorted(chosen, key=order.index)}

    # ------------------------------------------------------------------------------ the work
    def _weights(self) -> dict[str, torch.Tensor]:
        return {n: own_weight(m) for n, m in self._modules.items()}  # type: ignore[misc]

    def _start(self, trainer: Any, pl_module: nn.Module) -> None:
        if not self._modules:
            self._modules = self.resolve(pl_module)
        self._model = pl_module
        weights = self._weights()
        fresh = False
        if self._initial is None:
            self._initial = {n: w.detach().to("cpu", copy=True) for n, w in weights.items()}
            fresh = True
        else:
            for n, w in weights.items():
                w0 = self._initial.get(n)
                if w0 is None or tuple(w0.shape) != tuple(w.shape):
                    self.warn_once(
                        f"resnap-{n}",
                        f"WeightHistograms: the checkpointed initial weights lack layer {n!r} (or its shape changed); "
                        "its drift is measured from now on.",
                    )
                    self._initial[n] = w.detach().to("cpu", copy=True)
        self._initial_hists = None
        writer = self.writer(trainer)
        rows = [
            f"| {n} | {type(m).__name__} | {tuple(weights[n].shape)} | {'' if weights[n].requires_grad else 'frozen'} |"
            for n, m in self._modules.items()
        ]
        writer.text(
            self.tag("layers"),
            "| layer | type | weight shape | |\n|---|---|---|---|\n" + "\n".join(rows),
            trainer.global_step,
        )
        if fresh and trainer.global_step == 0:
            self._evaluate(trainer, epoch=-1)

    def _reset_results(self) -> None:
        self._initial, self._initial_hists = None, None
        self._last_step = self._last_grad_step = self._figure_step = None
        self.steps, self.epochs, self.history, self.grad_history = [], [], [], []
        self.drift, self.cosine, self.wasserstein, self.histograms, self.summary = {}, {}, {}, {}, {}

    def _follow_replacements(self, trainer: Any) -> None:
        """Track the modules now in the model when tracked ones were replaced since the last look.

        ``model.fc = nn.Linear(...)`` between epochs (a new head for fine-tuning), or a weight parameter
        swapped for one of another shape, leaves the tracked object out of the model: its histograms would
        stay frozen and its drift would be measured for a module that no longer trains. The layers are
        re-resolved, the new modules' weights become their ``W0`` (said once per layer), and layers that
        are gone (or lost their weight) are dropped.
        """
        model = self._model
        if model is None or self._initial is None:
            return
        current = dict(model.named_modules())
        replaced = [n for n, m in self._modules.items() if current.get(n) is not m]
        reshaped = [
            n for n, m in self._modules.items()
            if n not in replaced and n in self._initial and tuple(self._initial[n].shape) != tuple(own_weight(m).shape)  # type: ignore[union-attr]
        ]
        if not replaced and not reshaped:
            return
        try:
            resolved = self.resolve(model)
        except ValueError:  # a named module is gone or lost its weight: keep tracking the rest
            resolved = {n: current[n] for n in self._modules if n in current and own_weight(current[n]) is not None}
        order = [n for n in self._modules if n in resolved] + [n for n in resolved if n not in self._modules]
        gone = [n for n in self._modules if n not in resolved]
        renewed = [n for n in order if n in replaced or n in reshaped or n not in self._modules]
        self._modules = {n: resolved[n] for n in order}
        for n in gone:
            self._initial.pop(n, None)
            self.warn_once(
                f"gone-{n}",
                f"WeightHistograms: layer {n!r} was removed from the model (or no longer has a weight) at step "
                f"{trainer.global_step}; it is no longer tracked.",
            )
        for n in renewed:
            weight = own_weight(self._modules[n])
            self._initial[n] = weight.detach().to("cpu", copy=True)  # type: ignore[union-attr]
            self.warn_once(
                f"replaced-{n}",
                f"WeightHistograms: layer {n!r} was replaced at step {trainer.global_step} (now a "
                f"{type(self._modules[n]).__name__} with weight {tuple(weight.shape)}); its histograms follow the new "  # type: ignore[union-attr]
                "module and its drift is measured from the new module's weights as they are now.",
            )
        self._initial_hists = None
        self._ordered = False  # trace the depth of the new modules at the next training batch

    def _trace_order(self, pl_module: nn.Module, batch: Any) -> None:
        self._ordered = True
        names = list(self._modules)
        try:
            x, _ = split_batch(batch)
            x = x[:2]
            param = next((p for p in pl_module.parameters() if p.is_floating_point()), None)
            if param is not None:
                x = x.to(param.device, dtype=param.dtype) if x.is_floating_point() else x.to(param.device)
            ran = [n for n in record_execution_order(pl_module, x) if n in self._modules]
        except Exception as err:  # a model whose forward does not take the batch's inputs
            self.warn_once(
                "order",
                f"WeightHistograms: could not trace the execution order ({type(err).__name__}: {err}); "
                "the drift-by-depth figure uses registration order.",
            )
            return
        order = ran + [n for n in names if n not in ran]
        self._modules = {n: self._modules[n] for n in order}

    def _step_due(self, trainer: Any) -> bool:
        step = trainer.global_step
        return step > 0 and step % self.every_n_steps == 0 and step != self._last_step

    def _gradients_due(self, trainer: Any) -> bool:
        step = trainer.global_step
        if step == self._last_grad_step:
            return False
        if self.every_n_steps and step % self.every_n_steps == 0:
            return True
        progress = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "batch_progress", None)
        return bool(getattr(progress, "is_last_batch", False)) and self.is_scheduled(trainer)

    def _tensors(self, *, grad: bool = False) -> dict[str, torch.Tensor]:
        """``{key: tensor}`` with keys ``<layer>`` and ``bias/<layer>`` (gradients where they exist if ``grad``)."""
        out: dict[str, torch.Tensor] = {}
        for n, m in self._modules.items():
            w, b = own_weight(m), own_bias(m) if self.include_bias else None
            for key, t in ((n, w), (f"bias/{n}", b)):
                if t is None:
                    continue
                t = t.grad if grad else t
                if t is not None:
                    out[key] = t
        return out

    def _nonfinite(self, trainer: Any, hists: Mapping[str, HistogramStats], prefix: tuple[str, ...], what: str) -> dict[str, float]:
        scalars = {self.tag(*prefix, "nonfinite"): float(sum(h.nonfinite for h in hists.values()))}
        for key, h in hists.items():
            if h.nonfinite:
                scalars[self.tag(*prefix, "nonfinite", key)] = float(h.nonfinite)
                self.warn_once(
                    f"nonfinite-{what}-{key}",
                    f"WeightHistograms: {what} {key!r} has {h.nonfinite} non-finite values "
                    f"(NaN {h.nan}, +Inf {h.posinf}, -Inf {h.neginf}) at step {trainer.global_step}; "
                    "they are left out of its histogram.",
                )
        return scalars

    def _evaluate(self, trainer: Any, *, epoch: int | None = None) -> None:
        self._follow_replacements(trainer)
        step = trainer.global_step
        epoch = trainer.current_epoch if epoch is None else epoch
        hists = histograms(self._tensors(), bins=self.bins)
        weights = self._weights()
        if self._initial is None:
            raise RuntimeError("WeightHistograms: no initial snapshot; `on_train_start` did not run.")
        distances = drift(weights, self._initial, seed=self.seed)
        writer = self.writer(trainer)
        scalars = self._nonfinite(trainer, hists, (), "weight")
        for n, d in distances.items():
            scalars[self.tag("drift", n)] = d.relative_change
            scalars[self.tag("cosine", n)] = d.cosine_distance
            scalars[self.tag("wasserstein", n)] = d.wasserstein
            self.drift.setdefault(n, []).append(d.relative_change)
            self.cosine.setdefault(n, []).append(d.cosine_distance)
            self.wasserstein.setdefault(n, []).append(d.wasserstein)
        write_histograms(writer, {self.tag(*key.split("/", 1)): h for key, h in hists.items()}, step)
        writer.scalars(scalars, step)
        self.steps.append(step)
        self.epochs.append(epoch)
        self.histograms = dict(hists)
        self.history.append(
            {
                "step": step,
                "epoch": epoch,
                "weights": {k: h.summary() for k, h in hists.items() if not k.startswith("bias/")},
                "bias": {k[5:]: h.summary() for k, h in hists.items() if k.startswith("bias/")},
            }
        )
        self._last_step = step

    def _log_gradients(self, trainer: Any) -> None:
        self._follow_replacements(trainer)
        step = trainer.global_step
        self._last_grad_step = step
        grads = self._tensors(grad=True)
        if not grads:
            return
        hists = histograms(grads, bins=self.bins)
        writer = self.writer(trainer)
        write_histograms(writer, {self.tag("grad", *key.split("/", 1)): h for key, h in hists.items()}, step)
        writer.scalars(self._nonfinite(trainer, hists, ("grad",), "gradient of"), step)
        self.grad_history.append(
            {
                "step": step,
                "epoch": trainer.current_epoch,
                "weights": {k: h.summary() for k, h in hists.items() if not k.startswith("bias/")},
                "bias": {k[5:]: h.summary() for k, h in hists.items() if k.startswith("bias/")},
            }
        )

    def _epoch_end(self, trainer: Any, epoch: int | None = None, figures: bool = False) -> None:
        # every write below joins the writer batch `run` holds around this call: one flush per epoch
        epoch = trainer.current_epoch if epoch is None else epoch
        self._follow_replacements(trainer)
        if trainer.global_step != self._last_step:
            self._evaluate(trainer, epoch=epoch)
        if not self.steps:
            return
        step = trainer.global_step
        total = self.total_epochs(trainer)
        checked = epoch >= 1 or (total is not None and epoch >= total - 1)
        weights = self._weights()
        latest = {n: self.drift[n][-1] for n in self._modules if self.drift.get(n)}
        frozen = [n for n in self._modules if not weights[n].requires_grad]
        not_learning = [n for n, v in latest.items() if checked and v < self.drift_threshold]
        nonfinite = {k: h.nonfinite for k, h in self.histograms.items() if h.nonfinite}
        self.summary = {
            "epoch": epoch,
            "step": step,
            "checked": checked,
            "threshold": self.drift_threshold,
            "not_learning": not_learning,
            "frozen": frozen,
            "latest_drift": latest,
            "nonfinite": nonfinite,
        }
        writer = self.writer(trainer)
        writer.text(self.tag("summary"), self._summary_markdown(weights), step)
        if figures or self.is_due(trainer, self.figures_every_n_epochs, epoch):
            self._figures(trainer)

    def _figures(self, trainer: Any) -> None:
        writer, step = self.writer(trainer), trainer.global_step
        writer.figure(self.tag("drift_by_depth"), self._drift_figure(), step)
        writer.figure(self.tag("initial_vs_current"), self._overlay_figure(), step)
        self._figure_step = step

    # ---------------------------------------------------------------------------- reporting
    def _status(self, n: str, weights: Mapping[str, torch.Tensor]) -> str:
        latest = self.summary.get("latest_drift", {}).get(n, math.nan)
        parts = []
        if n in self.summary.get("not_learning", []):
            parts.append("**not learning**")
        if not weights[n].requires_grad:
            parts.append("frozen")
        if math.isnan(latest) or self.summary.get("nonfinite", {}).get(n):
            parts.append("non-finite")
        return ", ".join(parts)

    def _summary_markdown(self, weights: Mapping[str, torch.Tensor]) -> str:
        s = self.summary
        head = (
            f"Drift from initialisation at epoch {s['epoch']} (step {s['step']}), layers from input to output. "
            f"Not learning = relative change below {self.drift_threshold:g}"
            + ("" if s["checked"] else " (checked from the second epoch on)")
            + ".\n\n"
        )
        if s["not_learning"]:
            head += "**Not learning:** " + ", ".join(f"`{n}`" for n in s["not_learning"]) + "\n\n"
        elif s["checked"]:
            head += "Every tracked layer moved more than the threshold.\n\n"
        rows = ["| depth | layer | shape | relative change | cosine distance | Wasserstein | status |", "|---|---|---|---|---|---|---|"]
        for i, n in enumerate(self._modules):
            if not self.drift.get(n):
                continue
            rows.append(
                f"| {i} | `{n}` | {tuple(weights[n].shape)} | {_fmt(self.drift[n][-1])} | {_fmt(self.cosine[n][-1])} "
                f"| {_fmt(self.wasserstein[n][-1])} | {self._status(n, weights)} |"
            )
        return head + "\n".join(rows)

    def _drift_figure(self) -> Any:
        from matplotlib.figure import Figure

        names = [n for n in self._modules if self.drift.get(n)]
        rel = [self.drift[n][-1] for n in names]
        cos = [self.cosine[n][-1] for n in names]
        flagged = set(self.summary.get("not_learning", []))
        frozen = set(self.summary.get("frozen", []))
        colors = ["#d62728" if n in flagged else "#7f7f7f" if n in frozen else "#1f77b4" for n in names]
        width = min(24.0, max(6.5, 0.3 * len(names) + 2.5))
        fig = Figure(figsize=(width, 5.6), dpi=80)
        longest = max((len(n) for n in names), default=1)
        fig.subplots_adjust(left=0.8 / width + 0.04, right=0.98, top=0.88, bottom=min(0.45, 0.05 + 0.011 * longest), hspace=0.12)
        ax1, ax2 = fig.subplots(2, 1, sharex=True)
        x = list(range(len(names)))
        ax1.bar(x, [v if math.isfinite(v) else 0.0 for v in rel], color=colors)
        ax1.axhline(self.drift_threshold, color="#d62728", linestyle="--", linewidth=0.8)
        low = [i for i, n in enumerate(names) if n in flagged or n in frozen]
        if low:  # a zero-height bar is invisible: mark the flagged / frozen layers on the axis
            ax1.scatter(low, [0.0] * len(low), marker="x", color=[colors[i] for i in low], zorder=3, clip_on=False)
        ax1.set_ylabel("||W - W0|| / ||W0||")
        ax1.set_title(
            f"Drift from initialisation by depth (input -> output), epoch {self.summary.get('epoch')}\n"
            f"red x: not learning (< {self.drift_threshold:g}, dashed), grey: frozen",
            fontsize=9,
        )
        ax2.bar(x, [v if math.isfinite(v) else 0.0 for v in cos], color=colors)
        ax2.set_ylabel("1 - cos(W, W0)")
        step = max(1, math.ceil(len(names) / 60))
        ax2.set_xticks(x[::step])
        ax2.set_xticklabels(names[::step], rotation=90, fontsize=7)
        return fig

    def _overlay_figure(self) -> Any:
        from matplotlib.figure import Figure

        if self._initial_hists is None:
            self._initial_hists = histograms(self._initial or {}, bins=self.bins)
        names = [n for n in self._modules if n in self.histograms and n in self._initial_hists]
        if len(names) > _MAX_OVERLAYS:
            picks = sorted({round(i * (len(names) - 1) / (_MAX_OVERLAYS - 1)) for i in range(_MAX_OVERLAYS)})
            names = [names[i] for i in picks]
        cols = min(4, max(1, len(names)))
        rows = max(1, math.ceil(len(names) / cols))
        height = 1.9 * rows + 0.7
        fig = Figure(figsize=(3.0 * cols, height), dpi=80)
        fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.75 / height, hspace=0.5, wspace=0.08)
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax, n in zip(axes, names):
            h0, h = self._initial_hists[n], self.histograms[n]
            lo = min(v for v in (h0.min, h.min) if math.isfinite(v))
            hi = max(v for v in (h0.max, h.max) if math.isfinite(v))
            pad = 0.05 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-3)
            top = 0.0
            for hist, style in ((h, dict(color="#1f77b4", fill=True, alpha=0.5, label="now")), (h0, dict(color="#333333", label="init"))):
                if hist.num == 0:
                    continue
                if hist.min == hist.max:  # a constant tensor (e.g. norm weights at init): a line at its value
                    ax.axvline(hist.min, color=style["color"], linewidth=1.2, label=f"{style['label']} = {hist.min:.3g}")
                    continue
                widths = (hist.edges[1:] - hist.edges[:-1]).clamp_min(1e-30)
                density = (hist.counts.double() / (hist.num * widths)).numpy()
                top = max(top, float(density.max()))
                ax.stairs(density, hist.edges.numpy(), **style)
            ax.set_xlim(lo - pad, hi + pad)
            if top > 0:
                ax.set_ylim(0, top * 1.1)
            # no tick labels (they cost most of the drawing time): the value range is in the title
            ax.set_title(f"{n}  drift {_fmt(self.drift.get(n, [math.nan])[-1])}\n[{lo:.3g}, {hi:.3g}]", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if ax is axes[0] or h0.min == h0.max or h.min == h.max:
                ax.legend(fontsize=6, loc="upper right", frameon=False)
        for ax in axes[len(names):]:
            ax.axis("off")
        fig.suptitle(
            f"Weight distribution: initial (black) vs current (blue), epoch {self.summary.get('epoch')}", fontsize=9, y=1 - 0.12 / height
        )
        return fig

    def summary_lines(self) -> list[str]:
        """One line on the drift range, one on the not-learning layers, one on non-finite values."""
        s = self.summary
        if not s:
            return []
        latest = {n: v for n, v in s["latest_drift"].items() if math.isfinite(v)}
        lines = [f"{len(self._modules)} layers tracked, {len(self.steps)} evaluations"]
        if latest:
            lo, hi = min(latest, key=latest.get), max(latest, key=latest.get)  # type: ignore[arg-type]
            lines[0] += f"; drift ||W-W0||/||W0|| from {latest[lo]:.3g} ({lo}) to {latest[hi]:.3g} ({hi})"
        if s["not_learning"]:
            lines.append(f"not learning (drift < {self.drift_threshold:g}): {', '.join(s['not_learning'])}")
        elif s["checked"]:
            lines.append(f"every layer moved more than {self.drift_threshold:g}")
        if s["nonfinite"]:
            lines.append(f"non-finite values in: {', '.join(f'{k} ({v})' for k, v in s['nonfinite'].items())}")
        return lines

    # --------------------------------------------------------------------------------- state
    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "steps": list(self.steps),
            "epochs": list(self.epochs),
            "drift": {k: list(v) for k, v in self.drift.items()},
            "cosine": {k: list(v) for k, v in self.cosine.items()},
            "wasserstein": {k: list(v) for k, v in self.wasserstein.items()},
            "summary": _plain(self.summary),
        }
        if self._initial is not None:
            state["initial"] = dict(self._initial)
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        initial = state.get("initial")
        if initial is not None:
            self._initial = {str(k): torch.as_tensor(v).cpu() for k, v in initial.items()}
            self._initial_hists = None
        self.steps = [int(s) for s in state.get("steps", [])]
        self.epochs = [int(e) for e in state.get("epochs", [])]
        self.drift = {k: [float(x) for x in v] for k, v in state.get("drift", {}).items()}
        self.cosine = {k: [float(x) for x in v] for k, v in state.get("cosine", {}).items()}
        self.wasserstein = {k: [float(x) for x in v] for k, v in state.get("wasserstein", {}).items()}
        self.summary = dict(state.get("summary", {}))
        self._last_step = self.steps[-1] if self.steps else None

