"""``IntrospectionCallback``: the policies every introspection callback shares, written once.

A concrete callback decides WHEN (Lightning hooks, as one-line guards), WHAT (a ``methods`` call) and
WHERE (``self.writer(trainer)``); the base class owns per-fit state, the check before training, the
error policy, timing, the DDP disable decision, ``state_key``, pickling and the fixed sample set. See
:class:`IntrospectionCallback` for the pieces a callback supplies.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from typing_extensions import override

from lightning_introspect._collector import collector_paused
from lightning_introspect._lightning import CALLBACK_BASES
from lightning_introspect._torch.guards import fork_global_rng
from lightning_introspect._torch.memory import release_free_memory
from lightning_introspect._warnings import warn
from lightning_introspect.callbacks.budget import Choice, IntrospectionBudget, Option, UnitCosts
from lightning_introspect.callbacks.checks import (
    NO_INPUT_GRADIENT,
    check_callable,
    check_choice,
    check_fractions,
    check_positive_int,
    input_gradient_problem,
    lrp_problem,
    renamed_argument,
)
from lightning_introspect.callbacks.data import (
    draw_samples,
    example_batch,
    forget_shared_samples,
    shared_samples,
    split_batch,
)
from lightning_introspect.callbacks.outputs import LogitsSource
from lightning_introspect.errors import (
    IntrospectionFailureWarning,
    IntrospectionInputError,
    IntrospectionSkipWarning,
)
from lightning_introspect.loggers.adapter import IntrospectionWriter, TensorBoardWriter, start_fit, writer_for
from lightning_introspect.methods.chunks import DEFAULT_MEMORY_BUDGET
from lightning_introspect.render.plot import Chart

#: seconds one chart is assumed to cost before any was measured (a PIL chart and its PNG take 10-40 ms)
FIGURE_GUESS = 0.05

if TYPE_CHECKING:
    from lightning_introspect._lightning import pl

T = TypeVar("T")

ON_ERROR_CHOICES = ("warn", "raise")
#: the advice every callback gives when what it computed holds NaN / Inf
NONFINITE_CAUSE = (
    "Likely cause: non-finite weights or inputs (see WeightHistograms' `introspect/weights/nonfinite` counts, "
    "or run a training step under `torch.autograd.detect_anomaly()`)."
)

__all__ = [  # the helpers below live in checks / data / errors; callbacks import them from here too
    "NONFINITE_CAUSE",
    "NO_INPUT_GRADIENT",
    "ON_ERROR_CHOICES",
    "IntrospectionCallback",
    "IntrospectionFailureWarning",
    "IntrospectionInputError",
    "IntrospectionSkipWarning",
    "check_callable",
    "check_choice",
    "check_fractions",
    "check_positive_int",
    "draw_samples",
    "example_batch",
    "input_gradient_problem",
    "lrp_problem",
    "renamed_argument",
    "split_batch",
]


#: free heap bytes above which a run gives the allocator's free pages back to the system (a few ms): one chunk's
#: working memory; the digits demo's runs leave less, so short fits on small inputs do not pay for it
RELEASE_AFTER_RUN = DEFAULT_MEMORY_BUDGET


class IntrospectionCallback(*CALLBACK_BASES):  # type: ignore[misc]
    """Base class of every lightning_introspect callback: the policies every callback shares, once.

    A callback supplies small pieces and the base class calls them at the right time:

    * :meth:`reset` -- forget the results of a previous fit (called at ``setup`` of every fit, so the
      same callback object can serve a second fit with other data);
    * :meth:`prepare` -- resolve layers and options against the model (``setup``; a user error here
      raises ``ValueError`` naming the argument before anything runs);
    * :meth:`preflight` -- look at the model and two samples once before the first training step: call
      :meth:`skip` for a model or data the callback cannot serve (one clear warning, training goes
      on), raise :class:`IntrospectionInputError` when the data contradict an explicit argument;
    * the work itself, wrapped in :meth:`run` from one-line Lightning hook guards.

    The base class owns: the schedule (``every_n_epochs`` and ``at`` fractions, :meth:`is_scheduled`),
    the rank-zero guard (:meth:`active`), the fixed sample set (:meth:`fixed_samples`), the error
    policy (:meth:`run`: every failure, its writes and flushes included, is contained), its own wall
    time (``introspect/<name>/seconds`` per call, ``seconds_total`` in all), the collective disable
    decision of callbacks that sync under DDP (:meth:`agree`), ``state_key`` (two differently
    configured instances of one class in one Trainer keep separate checkpoint state) and pickling
    (writers, hooks and locks are not part of the pickled state).

    Args:
        enabled: switch the callback off without removing it from the config.
        every_n_epochs: run at the end of every n-th epoch (``None``: only at ``at`` fractions).
            The last epoch of a bounded fit always runs, so panels are never left empty.
        at: fractions of training (0.0 = before the first step, 1.0 = the last epoch) at which to run
            as well. Resolved from ``max_epochs`` or, failing that, ``max_steps``; when both are
            unbounded only 0.0 and 1.0 (fit end) can be placed and the others are skipped with a warning.
        num_samples: size of the fixed sample set drawn from the validation data; unless given, fewer for
            large inputs (the set's inputs hold at most ``DEFAULT_MEMORY_BUDGET`` bytes, see :meth:`fixed_samples`).
        seed: seed of the callback's private random generator.
        on_error: ``"warn"`` (warn once with the traceback and disable the callback; training goes
            on) or ``"raise"`` (for tests and debugging).

    Subclasses set ``name`` (the tag component: ``introspect/<name>/...``).
    """

    name: ClassVar[str] = "base"
    #: ``False`` for callbacks that take part in collectives (metric sync) on every rank
    rank_zero_only: ClassVar[bool] = True
    #: whether the scheduled runs are one-off analyses the budget sizes (:meth:`sized`)
    sized_runs: ClassVar[bool] = False
    #: whether the callback draws a fixed random sample set (:meth:`fixed_samples`), shared with the others'
    draws_samples: ClassVar[bool] = False
    #: attributes that hold live objects (hooks, writers, workers): dropped when pickled, rebuilt on use
    transient: ClassVar[tuple[str, ...]] = ()
    #: charts of TensorBoard's custom-scalars layout for tags that do not end in their item (layer, class,
    #: method): ``{title: pattern}``, the pattern matched against the tag after ``introspect/<name>/``.
    #: Every other tag gets the chart of its tag without the last component (see ``loggers.adapter.ScalarLayout``).
    scalar_charts: ClassVar[Mapping[str, str]] = {}

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        self = super().__new__(cls)
        # the arguments the user gave: they tell two differently configured instances apart (state_key)
        self._given = {k: v for k, v in kwargs.items() if k not in ("enabled", "on_error")}
        return self

    def __init__(
        self,
        *,
        enabled: bool = True,
        every_n_epochs: int | None = 1,
        at: Sequence[float] | None = None,
        num_samples: int = 16,
        seed: int = 0,
        on_error: str = "warn",
    ) -> None:
        super().__init__()
        check_positive_int(every_n_epochs, "every_n_epochs", allow_none=True)
        check_positive_int(num_samples, "num_samples")
        check_choice(on_error, "on_error", ON_ERROR_CHOICES)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Expected `seed` to be an int, but got {seed!r}.")
        self.enabled = bool(enabled)
        self.every_n_epochs = every_n_epochs
        self.at = check_fractions(at, "at")
        self.num_samples = num_samples
        self.seed = seed
        self.on_error = on_error
        self.disabled = False
        self.skip_reason: str | None = None
        self.seconds_total = 0.0
        self._samples: Any = None
        self._warned: set[str] = set()
        self._writer_cache: tuple[Any, IntrospectionWriter] | None = None
        #: shared with the other callbacks of a set by ``introspection_callbacks(..., budget=...)``
        self.budget: IntrospectionBudget | None = None
        self.budget_choice: Choice | None = None  # the budget's decision for the latest sized run
        self.budget_full_seconds: float | None = None  # estimated seconds of one run at the configured sizes
        self.unit_costs = UnitCosts()  # seconds per unit of work, measured in this callback's own runs

    # ------------------------------------------------------------------------- what subclasses supply
    def reset(self) -> None:
        """Forget the results of a previous fit (called at the ``setup`` of every fit). Default: nothing."""

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve layers and options against the model at ``setup``. Default: nothing."""

    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Look at the model (and :meth:`example` samples) once before the first training step, on every
        rank. Call :meth:`skip` for what the callback cannot serve; raise :class:`IntrospectionInputError`
        when the data contradict an explicit argument. Default: nothing."""

    def on_disable(self) -> None:
        """Release what the callback holds (hooks, workers) when it is disabled or skipped. Default: nothing."""

    def summary_lines(self) -> list[str]:
        """A few plain-text lines on what this callback found (the demo prints them)."""
        return []

    # -------------------------------------------------------------------------------- Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # per-fit state; a resumed fit restores its part from the checkpoint afterwards
            self.disabled = False
            self.skip_reason = None
            self.seconds_total = 0.0
            self._samples = None
            forget_shared_samples()  # a new fit draws its own
            self._warned = set()
            self._writer_cache = None
            self.budget_choice = None
            self.budget_full_seconds = None
            self.unit_costs = UnitCosts()
            start_fit(trainer, self)  # a new fit: a new fallback directory when there is no logger
            if self.budget is not None:
                self.budget.begin_fit()
            self.reset()
        if self.enabled:
            self.prepare(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.budget is not None:
            self.budget.start_clock(trainer)
        if not self.enabled or self.disabled or trainer.global_step > 0:
            return
        try:
            self.preflight(trainer, pl_module)
        except IntrospectionInputError:
            self.on_disable()
            raise  # the data contradict an explicit argument: refused before any training step
        except Exception as err:
            if self.on_error == "raise":
                raise
            self.skip(f"the check before training failed ({type(err).__name__}: {err}).")

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"disabled": self.disabled, "seconds_total": self.seconds_total}
        if self._samples is not None:
            state["samples"] = list(self._samples)
        state.update(self.extra_state())
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.disabled = bool(state_dict.get("disabled", False))
        self.seconds_total = float(state_dict.get("seconds_total", 0.0))
        if "samples" in state_dict:
            x, y = state_dict["samples"]
            self._samples = (x, y)
        self.load_extra_state(state_dict)

    def extra_state(self) -> dict[str, Any]:
        """Subclass state for the checkpoint: tensors, numbers, strings, lists and dicts only."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    @property
    @override
    def state_key(self) -> str:
        """The class name, plus the arguments given when there are any: two instances of one class with
        different settings keep separate checkpoint state (Lightning's ``state_key`` convention)."""
        given = getattr(self, "_given", {})
        if not given:
            return type(self).__qualname__
        return self._generate_state_key(**{k: given[k] for k in sorted(given)})

    # ------------------------------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_writer_cache"] = None  # holds the trainer and its logger's SummaryWriter (locks, files)
        for key in self.transient:
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.restore_transient()

    def restore_transient(self) -> None:
        """Rebuild the :attr:`transient` attributes after unpickling (fresh, empty). Default: nothing."""

    # --------------------------------------------------------------------------------------- guards
    def active(self, trainer: pl.Trainer) -> bool:
        """Enabled, not disabled or skipped, not in the sanity check, on rank zero where required."""
        if not self.enabled or self.disabled or getattr(trainer, "sanity_checking", False):
            return False
        return trainer.is_global_zero or not self.rank_zero_only

    @staticmethod
    def trainer_fn(trainer: pl.Trainer) -> str | None:
        """What the trainer is running: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` (``None`` if unknown)."""
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        return None if fn is None else str(getattr(fn, "value", fn))

    def final_run_missed(self, trainer: pl.Trainer, last_step: int | None) -> bool:
        """At train end: whether the final model has not been looked at, because the fit ended before its
        last scheduled epoch (EarlyStopping, ``max_time``, no ``max_epochs``, a last epoch without
        validation). ``last_step``: the global step of the callback's latest run."""
        return self.active(trainer) and trainer.global_step > 0 and last_step != trainer.global_step

    # ------------------------------------------------------------------------------------- schedule
    @staticmethod
    def last_epoch(trainer: pl.Trainer) -> int:
        """The index of the epoch that ran last (or runs now). At ``on_train_end`` ``trainer.current_epoch``
        already counts a finished epoch, so the started-epochs counter is used where Lightning has it."""
        progress = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_progress", None), "current", None)
        started = getattr(progress, "started", None)
        if isinstance(started, int) and started > 0:
            return started - 1
        return max(int(trainer.current_epoch) - 1, 0)

    def total_epochs(self, trainer: pl.Trainer) -> int | None:
        """The number of epochs this fit will run, from ``max_epochs`` or ``max_steps``; ``None`` if unbounded."""
        max_epochs = getattr(trainer, "max_epochs", None)
        if max_epochs is not None and max_epochs >= 0:
            return int(max_epochs)
        max_steps = getattr(trainer, "max_steps", -1)
        batches = getattr(trainer, "num_training_batches", math.inf)
        accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
        if max_steps is not None and max_steps > 0 and batches not in (None, math.inf) and batches > 0:
            return max(1, math.ceil(max_steps * accumulate / batches))
        return None

    def fraction_epochs(self, trainer: pl.Trainer, fractions: Sequence[float] | None = None) -> dict[float, int]:
        """Map fractions of training to epoch indices: 0.0 -> -1 (before training), f -> ceil(f*E) - 1.

        Unbounded runs map only 0.0 (to -1) and 1.0 (to -2, meaning "fit end").
        """
        fractions = self.at if fractions is None else tuple(fractions)
        total = self.total_epochs(trainer)
        out: dict[float, int] = {}
        for f in fractions:
            if f == 0.0:
                out[f] = -1
            elif total is None:
                if f == 1.0:
                    out[f] = -2
                else:
                    self.warn_once(
                        f"unbounded-{f}",
                        f"{type(self).__name__}: the fit has no max_epochs / max_steps, so the fraction {f} in "
                        "`at` cannot be placed and is skipped (0.0 and 1.0 still run).",
                    )
            else:
                out[f] = min(total - 1, max(0, math.ceil(f * total) - 1))
        return out

    def is_scheduled(self, trainer: pl.Trainer, epoch: int | None = None) -> bool:
        """Whether the epoch (default: the current one) is due: every n-th, an ``at`` fraction, or the last."""
        return self.is_due(trainer, self.every_n_epochs, epoch)

    def is_due(self, trainer: pl.Trainer, every_n_epochs: int | None, epoch: int | None = None) -> bool:
        """Like :meth:`is_scheduled` with another period: every ``every_n_epochs``-th epoch (``None``:
        none), an ``at`` fraction, or the last epoch. Callbacks use it to draw their figures less often
        than they log scalars (``figures_every_n_epochs``)."""
        epoch = trainer.current_epoch if epoch is None else epoch
        if every_n_epochs is not None and (epoch + 1) % every_n_epochs == 0:
            return True
        if epoch in self.fraction_epochs(trainer).values():
            return True
        total = self.total_epochs(trainer)
        return total is not None and epoch == total - 1

    # ------------------------------------------------------------------------------------- budget
    def is_final(self, trainer: pl.Trainer, epoch: int | None = None) -> bool:
        """Whether ``epoch`` (default: the current one) is the fit's last planned epoch, or the fit ended."""
        epoch = trainer.current_epoch if epoch is None else epoch
        total = self.total_epochs(trainer)
        return total is None or epoch >= total - 1 or bool(getattr(trainer, "should_stop", False))

    def budget_runs_left(self, trainer: pl.Trainer) -> int:
        """Runs still to come that the :attr:`budget` sizes: :meth:`scheduled_runs_left` for a callback whose
        runs are one-off analyses (``sized_runs``), else 0."""
        return self.scheduled_runs_left(trainer) if self.sized_runs else 0

    def scheduled_runs_left(self, trainer: pl.Trainer) -> int:
        """Scheduled runs from the current epoch (included) to the last; what :attr:`budget` plans for."""
        total = self.total_epochs(trainer)
        if total is None:
            return 1
        return sum(1 for e in range(int(trainer.current_epoch), total) if self.is_scheduled(trainer, e))

    def sized(self, trainer: pl.Trainer, options: Sequence[Option]) -> Option | None:
        """The sizes of a one-off run: the first of ``options`` (the configured sizes) without a budget,
        else the budget's choice; ``None``: skipped, it does not fit (never the fit's last run). The decision is kept in
        :attr:`budget_choice` and written to ``introspect/<name>/budget`` (text)."""
        if self.budget is None:
            return options[0]
        choice = self.budget.choose(trainer, self, options, final=self.is_final(trainer))
        self.writer(trainer).text(self.tag("budget"), choice.note, trainer.global_step)
        if choice.option is None:
            self.warn_once("budget-skip", choice.note + " (said once per fit; see introspect/" + self.name + "/budget)")
        return choice.option

    def charge(self, seconds: float) -> None:
        """Count ``seconds`` of sized work or extras against the budget (not as recurring cost)."""
        if self.budget is not None:
            self.budget.record(seconds)

    def figure_seconds(self) -> float:
        """What one chart costs to draw and write: as measured in this callback's runs, else in another member
        of its budget (the same machine; the dearest of them), else a cautious :data:`FIGURE_GUESS`."""
        if self.unit_costs.known("figure"):
            return self.unit_costs.get("figure", FIGURE_GUESS)
        members = self.budget.members if self.budget is not None else []
        seen = [cb.unit_costs.get("figure", 0.0) for cb in members if cb.unit_costs.known("figure")]
        return max(seen) if seen else FIGURE_GUESS

    def figure(self, trainer: pl.Trainer, tag: str, build: Callable[[], Any], step: int, *, final: bool = True) -> bool:
        """Build and write a figure: ``build()`` returns a :class:`~lightning_introspect.render.plot.Chart` (written
        as an image) or a matplotlib figure. A figure of a run before the last (``final=False``) is an extra:
        under a :attr:`budget` it is drawn only when the allowance covers it. Returns whether it was written."""
        if not final and self.budget is not None:
            if not self.budget.affords(trainer, self, self.figure_seconds()):
                return False
        start = time.perf_counter()
        built = build()
        if isinstance(built, Chart):
            self.writer(trainer).image(tag, built.render(), step)
        else:
            self.writer(trainer).figure(tag, built, step)
        elapsed = time.perf_counter() - start
        self.unit_costs.observe("figure", elapsed)
        self.charge(elapsed)
        return True

    # -------------------------------------------------------------------------------- error policy
    def run(self, trainer: pl.Trainer, fn: Callable[..., T], *args: Any, log_seconds: bool = True, **kwargs: Any) -> T | None:
        """Call ``fn`` under the error policy and time it: the one place where failures are contained.

        Everything that can fail is inside the guarded region: the work, the writer's creation, its
        writes and the flush of the call's batch of events (a full disk or a read-only log directory
        is a failure like any other). With ``on_error="warn"`` a failure disables the callback for the
        rest of the fit with one :class:`IntrospectionFailureWarning` carrying the traceback; with
        ``"raise"`` it propagates. ``log_seconds=False`` for cheap per-batch work: no scalar per call,
        the time still adds to ``seconds_total``.
        """
        if self.disabled:
            return None
        start = time.perf_counter()
        try:
            if not log_seconds:
                return fn(*args, **kwargs)
            writer = self.writer(trainer)
            # the call's scalars, histograms and seconds: one event, one flush; its figures' reference cycles
            # freed young, without a full collection of the user's process
            with collector_paused(), writer.batch():
                result = fn(*args, **kwargs)
                writer.scalar(self.tag("seconds"), time.perf_counter() - start, trainer.global_step)
            return result
        except Exception:
            self.fail(traceback.format_exc())
            return None
        finally:
            if log_seconds:  # what a run freed goes back to the system, not into the fit's peak (large inputs only)
                release_free_memory(min_free=RELEASE_AFTER_RUN)
            self.seconds_total += time.perf_counter() - start

    def fail(self, details: str) -> None:
        """Apply the error policy to the exception being handled: re-raise it (``on_error="raise"``) or
        disable the callback for the rest of the fit with one warning (``"warn"``)."""
        self.on_disable()
        if self.on_error == "raise":
            raise  # called from an ``except`` block: re-raises the exception being handled
        self.disabled = True
        warn(  # reported at the user's line (their trainer.fit), not at ours
            f"{type(self).__name__} failed and is disabled for the rest of this fit (on_error='warn'); training "
            f"continues and what was already logged is kept.\n{details}",
            IntrospectionFailureWarning,
        )

    def skip(self, reason: str) -> None:
        """Switch the callback off for this fit because it cannot serve this model or data: one
        :class:`IntrospectionSkipWarning` that names the callback and says why; never an error."""
        if self.disabled:
            return
        self.disabled = True
        self.skip_reason = reason
        self.on_disable()
        warn(f"{type(self).__name__} is skipped for this fit: {reason}", IntrospectionSkipWarning)

    def agree(self, trainer: pl.Trainer) -> bool:
        """Whether every rank still runs this callback; on disagreement all ranks disable it.

        For callbacks that enter collectives (metric sync): call it on every rank, also on a rank that
        has disabled itself, right before each collective, so no rank ever waits in a collective for a
        rank that gave up. A no-op outside distributed runs.
        """
        strategy = getattr(trainer, "strategy", None)
        if getattr(trainer, "world_size", 1) <= 1 or strategy is None:
            return not self.disabled
        all_ok = bool(strategy.reduce_boolean_decision(not self.disabled, all=True))
        if not all_ok and not self.disabled:
            self.disabled = True
            self.on_disable()
            self.warn_once("peer-disabled", f"{type(self).__name__} is disabled on every rank: another rank failed.")
        return all_ok

    def batch_logits(self, source: LogitsSource, outputs: Any, batch: Any, pl_module: Any) -> torch.Tensor | None:
        """The logits of a validation batch from ``source``; the first batch that needs an extra forward of
        our own (``validation_step`` returned no logits) is said once."""
        logits = source.logits(outputs, batch, pl_module)
        if source.used_own_forward:
            self.warn_once(
                "own-forward", f"{type(self).__name__}: `validation_step` returns no logits (a tensor with one row per "
                "sample), so the logits come from one extra forward of each validation batch it reads (eval mode, "
                "no grad; one forward serves every callback reading the batch)."
            )
        return logits

    def note_nonfinite(self, trainer: pl.Trainer, key: str, what: str, action: str, again: str | None = None) -> None:
        """The one NaN / Inf policy: what could not be logged is said once per fit in a warning (per ``key``)
        and at every step where it happens in ``introspect/<name>/warnings`` (text); the callback stays on.

        ``what``: which values are non-finite ("the model's outputs ... for 3 of 64 samples"); ``action``:
        what is not logged because of it; ``again``: what the callback does once the values are finite."""
        step = int(trainer.global_step)
        stays = "The callback stays on" + (f" and {again}." if again else ".")
        self.warn_once(
            key,
            f"{type(self).__name__}: {what} at step {step}. {NONFINITE_CAUSE} {action}; a note goes to "
            f"`{self.tag('warnings')}` instead, at every step where this happens. {stays} (Warned once.)",
        )
        self.writer(trainer).text(self.tag("warnings"), f"**Step {step}:** {what}. {action}. {NONFINITE_CAUSE}", step)

    def warn_once(self, key: str, message: str) -> None:
        """Warn with ``message`` the first time ``key`` is seen by this callback in this fit."""
        if key not in self._warned:
            self._warned.add(key)
            warn(message)

    # ------------------------------------------------------------------------------------- logging
    def tag(self, *parts: Any) -> str:
        """``introspect/<name>/<parts...>``."""
        return "/".join(["introspect", self.name, *(str(p) for p in parts)])

    def writer(self, trainer: pl.Trainer) -> IntrospectionWriter:
        """The writer for this trainer (TensorBoard if present, files otherwise; nothing off rank zero)."""
        cached = self._writer_cache
        if cached is not None and cached[0] is trainer:
            return cached[1]
        writer = writer_for(trainer)
        if isinstance(writer, TensorBoardWriter):  # once per SummaryWriter: later calls do nothing
            writer.register_layout({cb.name: cb.scalar_charts for cb in trainer.callbacks if isinstance(cb, IntrospectionCallback)})
        self._writer_cache = (trainer, writer)
        return writer

    # ------------------------------------------------------------------------------------- samples
    @staticmethod
    def val_dataloader(trainer: pl.Trainer) -> Any:
        """The first validation loader, loading it early if Lightning has not yet; else the train loader."""
        loaders = getattr(trainer, "val_dataloaders", None)
        if loaders is None and getattr(trainer, "world_size", 1) > 1:
            # setup_data() holds a barrier: a rank-zero-only caller would deadlock. Ask the source directly.
            source = getattr(trainer, "datamodule", None) or getattr(trainer, "lightning_module", None)
            try:
                with fork_global_rng():
                    loaders = source.val_dataloader() if source is not None else None
            except Exception:  # no validation data configured
                loaders = None
        elif loaders is None and getattr(trainer, "fit_loop", None) is not None:
            try:
                with fork_global_rng():
                    trainer.fit_loop.epoch_loop.val_loop.setup_data()
                loaders = trainer.val_dataloaders
            except Exception:  # no validation data configured
                loaders = None
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None:
            loaders = getattr(trainer, "train_dataloader", None)
        return loaders

    def fixed_samples(self, trainer: pl.Trainer, *, per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The callback's fixed sample set ``(inputs, targets)`` on CPU, drawn once per fit and then reused.

        Drawn from the validation data with the callback's private generator: ``num_samples`` random
        items, or with ``per_class=k`` up to k items of each class. Unless ``num_samples`` was given, the
        random items' inputs hold at most :data:`~lightning_introspect.methods.chunks.DEFAULT_MEMORY_BUDGET`
        bytes (never fewer than 8 items): large inputs take fewer (56 of 3x384x384 float32 images), so the
        set neither multiplies the fit's memory nor the checkpoint's size. The random sets of the callbacks of
        one fit with the same seed and loader are prefixes of one shared draw
        (:func:`~lightning_introspect.callbacks.data.shared_samples`): the same images as drawn alone, held
        once. Kept in the checkpoint, so a resumed fit explains the same images.
        """
        if self._samples is None:
            loader = self.val_dataloader(trainer)
            if loader is None:
                raise RuntimeError(f"{type(self).__name__} needs validation (or training) data to draw its samples from.")
            cap = None if "num_samples" in self._given else DEFAULT_MEMORY_BUDGET
            if per_class is None:  # the same permutation as the other callbacks of the fit: one draw, held once
                wanted = [n for cb in getattr(trainer, "callbacks", ()) if (n := self._shared_request(cb, cap)) is not None]
                self._samples = shared_samples(loader, self.num_samples, seed=self.seed, max_bytes=cap, wanted=wanted)
            else:
                self._samples = draw_samples(loader, self.num_samples, seed=self.seed, per_class=per_class, max_bytes=cap)
        x, y = self._samples
        return x, y

    def sample_request(self) -> int | None:
        """How many random fixed samples this callback will draw (``None``: none, or drawn per class)."""
        return self.num_samples if self.draws_samples else None

    def _shared_request(self, other: Any, cap: int | None) -> int | None:
        """What ``other`` will draw from the same shared draw as this callback (``None``: nothing). Every
        callback draws from :meth:`val_dataloader`'s data, so the seed and the cap decide."""
        if other is self or not isinstance(other, IntrospectionCallback) or not other.enabled or other.seed != self.seed:
            return None
        if ("num_samples" in other._given) != (cap is None) or other._samples is not None:
            return None
        return other.sample_request()

    def example(self, trainer: pl.Trainer, n: int = 2) -> Any:
        """A small batch of the validation (else training) data, as the loader's ``collate_fn`` builds it,
        on the model's device, for :meth:`preflight`; ``None`` without data."""
        loader = self.val_dataloader(trainer)
        if loader is None:
            return None
        batch = example_batch(loader, n, seed=self.seed)
        strategy = getattr(trainer, "strategy", None)
        return strategy.batch_to_device(batch) if strategy is not None else batch
