"""``WeightHistograms``: per-layer weight (and gradient) histograms and drift from initialisation.

If the weight distribution of a layer looks the same after training as at initialisation, that layer
may not be learning. This callback logs one histogram per layer, keeps a snapshot of the initial
weights, and measures per layer how far the weights moved (relative change, cosine distance, 1-D
Wasserstein distance between the value distributions), drawn by depth so "inner vs outer layers" is
visible at a glance. Layers that barely moved are named in a summary.

The maths lives in :mod:`lightning_introspect.methods.weights` (histograms, distances: pure torch, batched,
on the device), :mod:`~lightning_introspect.methods.weight_layers` (which layers, replacements) and
:mod:`~lightning_introspect.methods.not_learning` (the verdict); tables and figures in
:mod:`lightning_introspect.render.weights`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_introspect._lightning import pl
from lightning_introspect.callbacks.base import IntrospectionCallback, check_positive_int, split_batch
from lightning_introspect.callbacks.checks import check_bool
from lightning_introspect.loggers.adapter import IntrospectionWriter
from lightning_introspect.methods.not_learning import not_learning_summary
from lightning_introspect.methods.weight_layers import (
    depth_order,
    follow_replacements,
    own_bias,
    own_weight,
    weight_layers,
)
from lightning_introspect.methods.weights import HistogramStats, drift, histograms
from lightning_introspect.render.weights import (
    drift_by_depth_figure,
    drift_summary_markdown,
    initial_vs_current_figure,
    layers_table,
    weights_summary_lines,
)

__all__ = ["WeightHistograms", "own_bias", "own_weight", "write_histograms"]


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

    # per-fit state, set by `reset`
    _initial: dict[str, torch.Tensor] | None
    _model: nn.Module | None  # the model of this fit, to notice submodules replaced mid-fit
    _initial_hists: dict[str, HistogramStats] | None
    _last_step: int | None
    _figure_step: int | None  # global step of the latest figures
    _last_grad_step: int | None
    steps: list[int]
    epochs: list[int]
    drift: dict[str, list[float]]
    cosine: dict[str, list[float]]
    wasserstein: dict[str, list[float]]
    history: list[dict[str, Any]]
    grad_history: list[dict[str, Any]]
    histograms: dict[str, HistogramStats]
    summary: dict[str, Any]

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
            check_bool(value, arg)
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
        self.reset()

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
        self._initial, self._initial_hists, self._model = None, None, None
        self._last_step = self._last_grad_step = self._figure_step = None
        self.steps, self.epochs, self.history, self.grad_history = [], [], [], []
        self.drift, self.cosine, self.wasserstein, self.histograms, self.summary = {}, {}, {}, {}, {}

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
        return weight_layers(model, self.layer_spec)

    def _weights(self) -> dict[str, torch.Tensor]:
        return {n: own_weight(m) for n, m in self._modules.items()}  # type: ignore[misc]

    def _start(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        """Snapshot ``W0`` (kept from the checkpoint on resume), list the layers, evaluate before the first step."""
        if not self._modules:
            self._modules = self.resolve(pl_module)
        self._model = pl_module
        weights = self._weights()
        fresh = self._initial is None
        if self._initial is None:
            self._initial = {n: w.detach().to("cpu", copy=True) for n, w in weights.items()}
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
        rows = [(n, type(m).__name__, tuple(weights[n].shape), weights[n].requires_grad) for n, m in self._modules.items()]
        self.writer(trainer).text(self.tag("layers"), layers_table(rows), trainer.global_step)
        if fresh and trainer.global_step == 0:
            self._evaluate(trainer, epoch=-1)

    def _follow_replacements(self, trainer: pl.Trainer) -> None:
        """Track the modules now in the model when tracked ones were replaced since the last look: the new
        modules' weights become their ``W0`` (said once per layer), and layers that are gone are dropped."""
        if self._model is None or self._initial is None:
            return
        changes = follow_replacements(self._model, self._modules, self._initial, self.layer_spec)
        if changes is None:
            return
        self._modules = changes.modules
        for n in changes.gone:
            self._initial.pop(n, None)
            self.warn_once(
                f"gone-{n}",
                f"WeightHistograms: layer {n!r} was removed from the model (or no longer has a weight) at step "
                f"{trainer.global_step}; it is no longer tracked.",
            )
        for n in changes.renewed:
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
        try:
            order = depth_order(pl_module, split_batch(batch)[0], list(self._modules))
        except Exception as err:  # a model whose forward does not take the batch's inputs
            self.warn_once(
                "order",
                f"WeightHistograms: could not trace the execution order ({type(err).__name__}: {err}); "
                "the drift-by-depth figure uses registration order.",
            )
            return
        self._modules = {n: self._modules[n] for n in order}

    # ------------------------------------------------------------------------------ the work
    def _step_due(self, trainer: pl.Trainer) -> bool:
        step = trainer.global_step
        return step > 0 and step % self.every_n_steps == 0 and step != self._last_step

    def _gradients_due(self, trainer: pl.Trainer) -> bool:
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
                t = t.grad if grad and t is not None else t
                if t is not None:
                    out[key] = t
        return out

    def _histograms(self, trainer: pl.Trainer, tensors: dict[str, torch.Tensor], *prefix: str) -> dict[str, Any]:
        """Bin ``tensors``, write the histograms and the non-finite counts (one warning per tensor that has
        any); return the history entry of the evaluation."""
        hists = histograms(tensors, bins=self.bins)
        writer, step = self.writer(trainer), trainer.global_step
        write_histograms(writer, {self.tag(*prefix, *key.split("/", 1)): h for key, h in hists.items()}, step)
        what = "gradient of" if prefix else "weight"
        scalars = {self.tag(*prefix, "nonfinite"): float(sum(h.nonfinite for h in hists.values()))}
        for key, h in hists.items():
            if h.nonfinite:
                scalars[self.tag(*prefix, "nonfinite", key)] = float(h.nonfinite)
                self.warn_once(
                    f"nonfinite-{what}-{key}",
                    f"WeightHistograms: {what} {key!r} has {h.nonfinite} non-finite values "
                    f"(NaN {h.nan}, +Inf {h.posinf}, -Inf {h.neginf}) at step {step}; "
                    "they are left out of its histogram.",
                )
        writer.scalars(scalars, step)
        if not prefix:
            self.histograms = dict(hists)
        return {
            "step": step,
            "epoch": trainer.current_epoch,
            "weights": {k: h.summary() for k, h in hists.items() if not k.startswith("bias/")},
            "bias": {k[5:]: h.summary() for k, h in hists.items() if k.startswith("bias/")},
        }

    def _evaluate(self, trainer: pl.Trainer, *, epoch: int | None = None) -> None:
        self._follow_replacements(trainer)
        if self._initial is None:
            raise RuntimeError("WeightHistograms: no initial snapshot; `on_train_start` did not run.")
        step, epoch = trainer.global_step, trainer.current_epoch if epoch is None else epoch
        entry = self._histograms(trainer, self._tensors())
        scalars = {}
        for n, d in drift(self._weights(), self._initial, seed=self.seed).items():
            for tag, series, value in (
                ("drift", self.drift, d.relative_change),
                ("cosine", self.cosine, d.cosine_distance),
                ("wasserstein", self.wasserstein, d.wasserstein),
            ):
                scalars[self.tag(tag, n)] = value
                series.setdefault(n, []).append(value)
        self.writer(trainer).scalars(scalars, step)
        self.steps.append(step)
        self.epochs.append(epoch)
        self.history.append({**entry, "epoch": epoch})
        self._last_step = step

    def _log_gradients(self, trainer: pl.Trainer) -> None:
        self._follow_replacements(trainer)
        self._last_grad_step = trainer.global_step
        grads = self._tensors(grad=True)
        if grads:
            self.grad_history.append(self._histograms(trainer, grads, "grad"))

    def _epoch_end(self, trainer: pl.Trainer, epoch: int | None = None, figures: bool = False) -> None:
        # every write below joins the writer batch `run` holds around this call: one flush per epoch
        epoch = trainer.current_epoch if epoch is None else epoch
        self._follow_replacements(trainer)
        if trainer.global_step != self._last_step:
            self._evaluate(trainer, epoch=epoch)
        if not self.steps:
            return
        weights = self._weights()
        trainable = {n: w.requires_grad for n, w in weights.items()}
        self.summary = not_learning_summary(
            self.drift, trainable, threshold=self.drift_threshold, epoch=epoch, step=trainer.global_step,
            total_epochs=self.total_epochs(trainer), nonfinite={k: h.nonfinite for k, h in self.histograms.items()},
        )
        shapes = {n: tuple(w.shape) for n, w in weights.items()}
        markdown = drift_summary_markdown(self.summary, shapes, trainable, self.drift, self.cosine, self.wasserstein)
        self.writer(trainer).text(self.tag("summary"), markdown, trainer.global_step)
        if figures or self.is_due(trainer, self.figures_every_n_epochs, epoch):
            self._figures(trainer)

    def _figures(self, trainer: pl.Trainer) -> None:
        step, epoch, final = trainer.global_step, self.summary.get("epoch"), self.is_final(trainer)
        latest = {n: self.drift[n][-1] for n in self._modules if self.drift.get(n)}
        cosine = {n: self.cosine[n][-1] for n in latest}
        self.figure(trainer, self.tag("drift_by_depth"), lambda: drift_by_depth_figure(
            latest, cosine, threshold=self.drift_threshold, not_learning=self.summary.get("not_learning", []),
            frozen=self.summary.get("frozen", []), epoch=epoch,
        ), step, final=final)
        if self._initial_hists is None:
            self._initial_hists = histograms(self._initial or {}, bins=self.bins)
        initial, current = self._initial_hists, {n: self.histograms[n] for n in self._modules if n in self.histograms}
        self.figure(trainer, self.tag("initial_vs_current"),
                    lambda: initial_vs_current_figure(initial, current, latest, epoch=epoch), step, final=final)
        self._figure_step = step

    @override
    def summary_lines(self) -> list[str]:
        """One line on the drift range, one on the not-learning layers, one on non-finite values."""
        return weights_summary_lines(self.summary, len(self._modules), len(self.steps), self.drift_threshold)

    # --------------------------------------------------------------------------------- state
    @override
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

    @override
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
