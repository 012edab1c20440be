"""``WeightHistograms``: per-layer weight (and gradient) histograms and drift from initialisation.

If the weight distribution of a layer looks the same after training as at initialisation, that layer
may not be learning. This callback logs one histogram per layer, keeps a snapshot of the initial
weights, and measures per layer how far the weights moved (relative change, cosine distance, 1-D
Wasserstein distance between the value distributions), drawn by depth so "inner vs outer layers" is
visible at a glance. Layers that barely moved are named in a summary.

The callback says when and where; its pieces: :mod:`~lightning_introspect.callbacks.weights_arguments` (the
argument checks), :mod:`~lightning_introspect.callbacks.weights_tracking` (``W0``, replaced modules, execution
order, the tensors of an evaluation), :mod:`~lightning_introspect.callbacks.weights_report` (histograms, drift,
summary and figures written). The maths lives in :mod:`lightning_introspect.methods.weights` (histograms,
distances: pure torch, batched, on the device), :mod:`~lightning_introspect.methods.weight_layers` (which layers,
replacements) and :mod:`~lightning_introspect.methods.not_learning` (the verdict); tables and figures in
:mod:`lightning_introspect.render.weights`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_introspect._lightning import pl
from lightning_introspect.callbacks import weights_report as report
from lightning_introspect.callbacks import weights_tracking as tracking
from lightning_introspect.callbacks.base import IntrospectionCallback
from lightning_introspect.callbacks.weights_arguments import check_weights_arguments
from lightning_introspect.callbacks.weights_report import write_histograms
from lightning_introspect.methods.weight_layers import own_bias, own_weight, weight_layers
from lightning_introspect.methods.weights import HistogramStats, histograms
from lightning_introspect.render.weights import weights_summary_lines

__all__ = ["WeightHistograms", "own_bias", "own_weight", "write_histograms"]


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
    initial vs the current histogram of up to 16 layers, one row per layer on its own value range (two
    charts, 10-20 ms each with their PNGs; not every epoch by default, so a long fit does not fill the
    Images dashboard with them). A layer whose relative change
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
        self.layer_spec, self.drift_threshold = check_weights_arguments(
            layers=layers, every_n_steps=every_n_steps, bins=bins, figures_every_n_epochs=figures_every_n_epochs,
            include_bias=include_bias, include_gradients=include_gradients, drift_threshold=drift_threshold,
        )
        self.every_n_steps, self.bins, self.figures_every_n_epochs = every_n_steps, bins, figures_every_n_epochs
        self.include_bias, self.include_gradients = include_bias, include_gradients
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
        fresh = tracking.snapshot_initial(self, pl_module)
        report.log_layers(self, trainer)
        if fresh and trainer.global_step == 0:
            self._evaluate(trainer, epoch=-1)

    def _trace_order(self, pl_module: nn.Module, batch: Any) -> None:
        tracking.trace_order(self, pl_module, batch)

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

    def _histograms(self, trainer: pl.Trainer, tensors: dict[str, torch.Tensor], *prefix: str) -> dict[str, Any]:
        """Bin ``tensors`` and write them (see ``weights_report.log_histograms``); the evaluation's history entry."""
        return report.log_histograms(self, trainer, histograms(tensors, bins=self.bins), *prefix)

    def _initial_histograms(self) -> dict[str, HistogramStats]:
        if self._initial_hists is None:
            self._initial_hists = histograms(self._initial or {}, bins=self.bins)
        return self._initial_hists

    def _evaluate(self, trainer: pl.Trainer, *, epoch: int | None = None) -> None:
        tracking.follow_module_replacements(self, trainer)
        if self._initial is None:
            raise RuntimeError("WeightHistograms: no initial snapshot; `on_train_start` did not run.")
        step, epoch = trainer.global_step, trainer.current_epoch if epoch is None else epoch
        entry = self._histograms(trainer, tracking.tracked_tensors(self))
        report.log_drift(self, trainer, self._initial)
        self.steps.append(step)
        self.epochs.append(epoch)
        self.history.append({**entry, "epoch": epoch})
        self._last_step = step

    def _log_gradients(self, trainer: pl.Trainer) -> None:
        tracking.follow_module_replacements(self, trainer)
        self._last_grad_step = trainer.global_step
        grads = tracking.tracked_tensors(self, grad=True)
        if grads:
            self.grad_history.append(self._histograms(trainer, grads, "grad"))

    def _epoch_end(self, trainer: pl.Trainer, epoch: int | None = None, figures: bool = False) -> None:
        # every write below joins the writer batch `run` holds around this call: one flush per epoch
        epoch = trainer.current_epoch if epoch is None else epoch
        tracking.follow_module_replacements(self, trainer)
        if trainer.global_step != self._last_step:
            self._evaluate(trainer, epoch=epoch)
        if not self.steps:
            return
        report.log_summary(self, trainer, epoch)
        if figures or self.is_due(trainer, self.figures_every_n_epochs, epoch):
            self._figures(trainer)

    def _figures(self, trainer: pl.Trainer) -> None:
        report.draw_figures(self, trainer, self._initial_histograms)
        self._figure_step = trainer.global_step

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
            "summary": report.plain(self.summary),
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
