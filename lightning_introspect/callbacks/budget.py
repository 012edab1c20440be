"""The introspection budget: the share of a fit's own time that the callbacks may add, and how the
one-off analyses size themselves to it.

One :class:`IntrospectionBudget` is shared by the callbacks of a set (``introspection_callbacks(config,
budget=0.5)``). It keeps one clock per fit: the fit's *own* time is the wall time since the fit started
minus every member's ``seconds_total``; after the first steps it is projected to the whole fit
(own time / epochs done x epochs planned). The allowance at any moment is ``fraction x projected own
time - time already spent by the members - what the recurring work will still take`` (the members'
recurring cost per epoch so far, times the epochs left).

A one-off analysis (a misclassification review, a feature visualisation, the sanity check) lists its
*options*, largest first: the sizes it would run with and their estimated seconds (from unit costs it
measured in its own earlier runs, or a one-batch probe before the first). :meth:`IntrospectionBudget.choose`
grants it a share of the allowance in proportion to its full cost among every member's runs still to
come, and picks the largest option that fits; when even the smallest does not, the run is skipped and
the choice says what budget it would need. Optional extras (figures at mid-fit runs) are drawn only when
the allowance covers them on top of every analysis still to come at full size (:meth:`affords`).

Before the first training step nothing is known of the fit's length, so runs at ``at=0.0`` take their
smallest size and no extra is drawn. Sizes the user gave explicitly are never changed (the callbacks leave them out of
their options). Every choice is deterministic for its sizes: the budget picks sizes, never stops work
half way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Option:
    """One way to run an analysis: ``sizes`` (what changes, e.g. ``{"steps": 16}``) and its estimated seconds."""

    sizes: dict[str, Any]
    seconds: float


@dataclass
class Choice:
    """What the budget decided for one run.

    Attributes:
        option: the option to run, or ``None`` when even the smallest does not fit (the run is skipped).
        full: the configured option (the first one offered).
        grant: seconds granted to this run (``None`` when nothing is known yet of the fit's length).
        note: one line for the log and the TensorBoard text, saying what ran and why.
    """

    option: Option | None
    full: Option
    grant: float | None = None
    note: str = ""

    @property
    def reduced(self) -> bool:
        """Whether the run is smaller than configured (or skipped)."""
        return self.option is not self.full


def format_sizes(sizes: dict[str, Any]) -> str:
    """``steps=16, compare=False``."""
    return ", ".join(f"{k}={v}" for k, v in sizes.items()) or "as configured"


@dataclass
class UnitCosts:
    """Seconds per unit of work, measured by a callback in its own runs (``observe``) and read back to
    estimate the next run (``get``)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def get(self, key: str, default: float) -> float:
        return self.seconds.get(key, default)

    def known(self, key: str) -> bool:
        return key in self.seconds

    def observe(self, key: str, seconds: float, units: float = 1.0) -> None:
        if units > 0 and math.isfinite(seconds):
            self.seconds[key] = max(seconds, 0.0) / units

    @contextmanager
    def timed(self, key: str, units: float = 1.0) -> Iterator[None]:
        """Measure the block and record it as ``units`` units of ``key``."""
        start = time.perf_counter()
        yield
        self.observe(key, time.perf_counter() - start, units)


def steps_per_epoch(trainer: Any) -> int | None:
    """Optimizer steps per training epoch (batches / gradient accumulation), ``None`` when not known."""
    batches = getattr(trainer, "num_training_batches", math.inf)
    if batches in (None, math.inf) or not batches:
        return None
    accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
    return max(1, math.ceil(batches / accumulate))


def best_of(repeats: int, fn: Any) -> float:
    """The shortest of ``repeats`` timings of ``fn()`` in seconds (the first call of a model pays set-up costs)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class IntrospectionBudget:
    """The fraction of a fit's own time the introspection may add, shared by the callbacks of one set.

    Args:
        fraction: e.g. ``0.5``: the callbacks together may add half of the fit's own time.

    Attributes:
        members: the callbacks sharing this budget.
        choices: ``[(callback name, epoch, Choice)]`` of the current fit, in order.

    Example:
        >>> budget = IntrospectionBudget(0.5)
        >>> budget.fraction
        0.5
    """

    def __init__(self, fraction: float) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction) or fraction <= 0:
            raise ValueError(f"Expected `budget` to be a positive fraction of the fit's own time (e.g. 0.5) or None, but got {fraction!r}.")
        self.fraction = float(fraction)
        self.members: list[Any] = []
        self.choices: list[tuple[str, int, Choice]] = []
        self._start: float | None = None
        self._start_epochs = 0.0  # epochs already done when the clock started (a resumed fit)
        self._heavy_spent = 0.0  # seconds of budgeted one-off runs and extras: not part of the recurring rate

    def __repr__(self) -> str:
        return f"IntrospectionBudget({self.fraction:g})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_start"] = None  # a clock does not travel to another process
        return state

    def attach(self, callbacks: Sequence[Any]) -> None:
        """Make ``callbacks`` share this budget."""
        for cb in callbacks:
            cb.budget = self
            if cb not in self.members:
                self.members.append(cb)

    # ------------------------------------------------------------------------------------- the clock
    def begin_fit(self) -> None:
        """Called by every member at ``setup("fit")``: the clock restarts at the fit's first step."""
        self._start = None
        self._heavy_spent = 0.0
        self.choices = []

    def start_clock(self, trainer: Any) -> None:
        """Called by every member at ``on_fit_start``; the first call starts the clock."""
        if self._start is None:
            self._start = time.perf_counter()
            self._start_epochs = self.epochs_done(trainer)

    def spent(self) -> float:
        """Seconds the members have spent in this fit."""
        return float(sum(getattr(cb, "seconds_total", 0.0) for cb in self.members))

    def record(self, seconds: float) -> None:
        """Count ``seconds`` of a budgeted run (or extra), so they are not read as recurring cost."""
        self._heavy_spent += max(float(seconds), 0.0)

    @staticmethod
    def epochs_done(trainer: Any) -> float:
        """Training epochs completed so far (fractional), from the optimizer steps taken."""
        per_epoch = steps_per_epoch(trainer)
        if per_epoch is None:
            return float(getattr(trainer, "current_epoch", 0))
        return float(getattr(trainer, "global_step", 0)) / per_epoch

    @staticmethod
    def epochs_planned(trainer: Any, done: float) -> float:
        max_epochs = getattr(trainer, "max_epochs", None)
        if max_epochs is not None and max_epochs >= 0:
            return float(max_epochs)
        max_steps, per_epoch = getattr(trainer, "max_steps", -1), steps_per_epoch(trainer)
        if max_steps and max_steps > 0 and per_epoch is not None:
            return max_steps / per_epoch
        return done  # unbounded: the budget is relative to the time so far

    def projection(self, trainer: Any) -> tuple[float, float, float] | None:
        """``(projected own seconds of the whole fit, epochs done, epochs planned)``, or ``None`` before
        the first training step."""
        if self._start is None:
            return None
        done = self.epochs_done(trainer)
        ran = done - self._start_epochs  # epochs trained under this clock
        if ran <= 0:
            return None
        planned = max(self.epochs_planned(trainer, done), done)
        own = max(time.perf_counter() - self._start - self.spent(), 1e-6)
        return own / ran * (planned - self._start_epochs), ran, planned - self._start_epochs

    def allowance(self, trainer: Any) -> float | None:
        """Seconds still free for one-off work now: ``fraction x projected - spent - recurring still to come``."""
        projected = self.projection(trainer)
        if projected is None:
            return None
        total, done, planned = projected
        spent = self.spent()
        recurring_rate = max(spent - self._heavy_spent, 0.0) / done
        return self.fraction * total - spent - recurring_rate * max(planned - done, 0.0)

    # ---------------------------------------------------------------------------------- decisions
    def _pending(self, trainer: Any, exclude: Any, unknown: float = 0.0) -> float:
        """Estimated seconds of every other member's budgeted runs still to come, at full size (``unknown``
        for a member that has not estimated its runs yet)."""
        total = 0.0
        for cb in self.members:
            if cb is exclude or not getattr(cb, "enabled", True) or getattr(cb, "disabled", False):
                continue
            runs = cb.budget_runs_left(trainer) if hasattr(cb, "budget_runs_left") else 0
            if runs:
                full = getattr(cb, "budget_full_seconds", None)
                total += runs * (unknown if full is None else full)
        return total

    def choose(self, trainer: Any, callback: Any, options: Sequence[Option], *, final: bool = False) -> Choice:
        """The largest of ``options`` (largest first) that fits this run's share of the allowance. The last
        run of a fit (``final``: the trained model, the result users read) is never skipped: when nothing
        fits it runs at its smallest size."""
        if not options:
            raise ValueError("choose() needs at least one option.")
        full = options[0]
        callback.budget_full_seconds = full.seconds
        name = type(callback).__name__
        allowance = self.allowance(trainer)
        if allowance is None:
            # nothing to judge by yet: the smallest size, so that a long analysis cannot blow a short fit's
            # budget before the budget knows the fit's length; later runs are sized as usual
            smallest = options[-1]
            how = "as configured" if smallest is full else "at its smallest size"
            choice = Choice(smallest, full, None, f"{name}: before the first training step the fit's length is unknown; "
                                                  f"ran {how} ({format_sizes(smallest.sizes)}).")
        else:
            mine = max(1, callback.budget_runs_left(trainer) if hasattr(callback, "budget_runs_left") else 1)
            others = self._pending(trainer, callback, unknown=full.seconds)
            denominator = full.seconds * mine + others
            grant = allowance * (full.seconds / denominator) if denominator > 0 else allowance
            picked = next((o for o in options if o.seconds <= max(grant, 0.0)), None)
            if picked is None and len(options) == 1:  # every size was given explicitly: the user's sizes win
                choice = Choice(full, full, grant, f"{name}: its sizes were given explicitly ({format_sizes(full.sizes)}), "
                                                   f"so it ran as configured although its share of the budget was {max(grant, 0.0):.2f} s.")
            elif picked is None and final:
                smallest = options[-1]
                choice = Choice(smallest, full, grant, self._note(name, trainer, None, options, grant, mine, others).split("; skipped")[0]
                                + f"; the last run is never skipped: ran at its smallest size ({format_sizes(smallest.sizes)}, "
                                f"about {smallest.seconds:.2f} s) although that exceeds its share.")
            else:
                choice = Choice(picked, full, grant, self._note(name, trainer, picked, options, grant, mine, others))
        self.choices.append((name, int(getattr(trainer, "current_epoch", 0)), choice))
        callback.budget_choice = choice
        return choice

    def _note(self, name: str, trainer: Any, picked: Option | None, options: Sequence[Option], grant: float, mine: int, others: float) -> str:
        projected = self.projection(trainer)
        total = projected[0] if projected else float("nan")
        head = f"{name}: budget {self.fraction:g} of a projected {total:.1f} s fit, {max(grant, 0.0):.2f} s for this run"
        full = options[0]
        if picked is full:
            return f"{head}; ran as configured ({format_sizes(full.sizes)}, about {full.seconds:.2f} s)."
        if picked is not None:
            return (f"{head}; ran with {format_sizes(picked.sizes)} (about {picked.seconds:.2f} s) instead of "
                    f"{format_sizes(full.sizes)} (about {full.seconds:.2f} s).")
        smallest = options[-1]
        needed = (self.spent() + smallest.seconds * mine + others * smallest.seconds / max(full.seconds, 1e-9)) / max(total, 1e-9)
        return (f"{head}; skipped: even its smallest size ({format_sizes(smallest.sizes)}) needs about "
                f"{smallest.seconds:.2f} s. A budget of about {max(needed, self.fraction * 1.1):.2f} would fit it; "
                "sizes given explicitly are never reduced.")

    def affords(self, trainer: Any, callback: Any, seconds: float) -> bool:
        """Whether an optional extra of ``seconds`` (a mid-fit figure, a probe evaluation between the
        scheduled ones) fits on top of every budgeted run still to come at full size. Never before the first
        step: nothing is known of the fit's length yet (the fit-end figures show every snapshot)."""
        allowance = self.allowance(trainer)
        if allowance is None:
            return False
        return seconds <= allowance - self._pending(trainer, None)
