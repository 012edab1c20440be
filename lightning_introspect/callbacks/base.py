"""``IntrospectionCallback``: what every introspection callback shares.

A concrete callback decides WHEN (Lightning hooks, as one-line guards), WHAT (a ``methods`` call) and
WHERE (``self.writer(trainer)``); this base class owns the rest:

* schedule: ``every_n_epochs`` and ``at`` fractions of training (:meth:`is_scheduled`);
* guards: sanity-check steps skipped, rank-zero only (unless the callback syncs metrics itself);
* a fixed sample set drawn once from the validation data with a private generator
  (:meth:`fixed_samples`), kept in the checkpoint;
* the error policy: ``on_error="warn"`` warns once with the traceback and disables the callback for
  the rest of the fit, ``"raise"`` re-raises (:meth:`run`);
* its own wall time, logged as ``introspect/<name>/seconds`` per call and summed in ``seconds_total``
  (which also holds per-batch work done outside :meth:`run`, such as forward hooks);
* ``state_dict`` / ``load_state_dict`` holding only tensors, numbers, strings, lists and dicts
  (checkpoints load with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch

from lightning_introspect._lightning import CALLBACK_BASES, rank_zero_warn
from lightning_introspect._torch.guards import fork_global_rng, private_generator
from lightning_introspect.loggers.adapter import IntrospectionWriter, TensorBoardWriter, writer_for

T = TypeVar("T")

NO_INPUT_GRADIENT = (
    "autograd does not connect the model's output to its input: its forward runs the part the input enters "
    "under torch.no_grad() (or detaches it), as a frozen feature extractor often does, so there is no input "
    "gradient to explain or optimise. Run the frozen part without no_grad (its parameters can keep "
    "requires_grad=False) to use it."
)


def input_gradient_problem(model: Any, inputs: torch.Tensor) -> str | None:
    """Why gradient-based methods cannot work on ``model`` with these inputs, or ``None`` when they can
    (call it where ``model(x)`` returns the logits tensor)."""
    from lightning_introspect._torch.guards import output_depends_on_input

    if not inputs.is_floating_point():
        return (
            f"the inputs are {inputs.dtype} (integer data such as token ids or raw uint8 pixels), so there is no input "
            "gradient to explain or optimise; gradient methods need floating inputs (convert pixels to float in the "
            "data pipeline, not in forward)."
        )
    return None if output_depends_on_input(model, inputs) else NO_INPUT_GRADIENT

ON_ERROR_CHOICES = ("warn", "raise")
#: the advice every callback gives when what it computed holds NaN / Inf
NONFINITE_CAUSE = (
    "Likely cause: non-finite weights or inputs (see WeightHistograms' `introspect/weights/nonfinite` counts, "
    "or run a training step under `torch.autograd.detect_anomaly()`)."
)
_INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values", "data", "features")
_TARGET_KEYS = ("y", "target", "targets", "label", "labels", "mask", "masks")


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, targets)`` from a batch: a tensor, a ``(x, y, ...)`` tuple/list, or a dict.

    Dicts are searched for the usual keys (``x``/``input``/``image``..., ``y``/``target``/``label``...).

    Example:
        >>> x, y = split_batch((torch.zeros(2, 3), torch.tensor([0, 1])))
        >>> x.shape, y.tolist()
        (torch.Size([2, 3]), [0, 1])
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        y = next((batch[k] for k in _TARGET_KEYS if k in batch), None)
        if x is None:
            raise ValueError(
                f"Cannot find the inputs in a dict batch with keys {sorted(batch)}; expected one of {list(_INPUT_KEYS)}."
            )
        return x, y
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], y
    raise ValueError(f"Cannot split a batch of type {type(batch).__name__} into inputs and targets.")


def check_positive_int(value: Any, argument: str, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is a positive int."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"Expected `{argument}` to be a positive int{extra}, but got {value!r}.")


def check_callable(value: Any, argument: str) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is callable or ``None``."""
    if value is not None and not callable(value):
        raise ValueError(f"Expected `{argument}` to be a callable or None, but got {value!r}.")


def lrp_problem(model: Any, output_transform: Any = None) -> str | None:
    """Why LRP cannot run on ``model`` (the end of a warning that names the callback), or ``None``."""
    from lightning_introspect.methods.attribution import lrp_available

    if not lrp_available():
        return "`lightning_introspect.methods.lrp` is not available; 'lrp' is skipped."
    if output_transform is not None:
        return "LRP propagates through the model's own graph and cannot apply `output_transform`; 'lrp' is skipped."
    from lightning_introspect.methods.lrp import lrp_unsupported

    reason = lrp_unsupported(model)  # a property of the model, known before training: not a failure
    return None if reason is None else f"'lrp' is skipped for this model: {reason}"


def check_choice(value: Any, argument: str, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming ``argument`` and listing ``choices`` unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"Expected `{argument}` to be one of {', '.join(repr(c) for c in choices)}, but got {value!r}.")


class IntrospectionCallback(*CALLBACK_BASES):  # type: ignore[misc]
    """Base class of every lightning_introspect callback.

    Args:
        enabled: switch the callback off without removing it from the config.
        every_n_epochs: run at the end of every n-th epoch (``None``: only at ``at`` fractions).
            The last epoch of a bounded fit always runs, so panels are never left empty.
        at: fractions of training (0.0 = before the first step, 1.0 = the last epoch) at which to run
            as well. Resolved from ``max_epochs`` or, failing that, ``max_steps``; when both are
            unbounded only 0.0 and 1.0 (fit end) can be placed and the others are skipped with a warning.
        num_samples: size of the fixed sample set drawn from the validation data.
        seed: seed of the callback's private random generator.
        on_error: ``"warn"`` (warn once with the traceback and disable the callback; training goes
            on) or ``"raise"``.

    Subclasses set ``name`` (the tag component: ``introspect/<name>/...``) and call
    :meth:`run` around their work.
    """

    name: ClassVar[str] = "base"
    rank_zero_only: ClassVar[bool] = True

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
        fractions = tuple(float(f) for f in (at or ()))
        for f in fractions:
            if not 0.0 <= f <= 1.0 or math.isnan(f):
                raise ValueError(f"Expected every entry of `at` to be a fraction in [0, 1], but got {f!r}.")
        self.enabled = bool(enabled)
        self.every_n_epochs = every_n_epochs
        self.at = fractions
        self.num_samples = num_samples
        self.seed = seed
        self.on_error = on_error
        self.disabled = False
        self.seconds_total = 0.0
        self._samples: Any = None
        self._warned: set[str] = set()

    # ----------------------------------------------------------------------------------- guards
    def active(self, trainer: Any) -> bool:
        """Enabled, not disabled by an error, not in the sanity check, on rank zero where required."""
        if not self.enabled or self.disabled or getattr(trainer, "sanity_checking", False):
            return False
        return trainer.is_global_zero or not self.rank_zero_only

    @staticmethod
    def trainer_fn(trainer: Any) -> str | None:
        """What the trainer is running: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` (``None`` if unknown)."""
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        return None if fn is None else str(getattr(fn, "value", fn))

    def final_run_missed(self, trainer: Any, last_step: int | None) -> bool:
        """At train end: whether the final model has not been looked at, because the fit ended before its
        last scheduled epoch (EarlyStopping, ``max_time``, no ``max_epochs``, a last epoch without
        validation). ``last_step``: the global step of the callback's latest run."""
        return self.active(trainer) and trainer.global_step > 0 and last_step != trainer.global_step

    @staticmethod
    def last_epoch(trainer: Any) -> int:
        """The index of the epoch that ran last (or runs now). At ``on_train_end`` ``trainer.current_epoch``
        already counts a finished epoch, so the started-epochs counter is used where Lightning has it."""
        progress = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_progress", None), "current", None)
        started = getattr(progress, "started", None)
        if isinstance(started, int) and started > 0:
            return started - 1
        return max(int(trainer.current_epoch) - 1, 0)

    def total_epochs(self, trainer: Any) -> int | None:
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

    def fraction_epochs(self, trainer: Any, fractions: Sequence[float] | None = None) -> dict[float, int]:
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

    def is_scheduled(self, trainer: Any, epoch: int | None = None) -> bool:
        """Whether the epoch (default: the current one) is due: every n-th, an ``at`` fraction, or the last."""
        return self.is_due(trainer, self.every_n_epochs, epoch)

    def is_due(self, trainer: Any, every_n_epochs: int | None, epoch: int | None = None) -> bool:
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

    # ------------------------------------------------------------------------------- running
    def run(self, trainer: Any, fn: Callable[..., T], *args: Any, log_seconds: bool = True, **kwargs: Any) -> T | None:
        """Call ``fn`` under the error policy, time it and log ``introspect/<name>/seconds``.

        ``log_seconds=False`` for cheap per-batch work (the time still adds to ``seconds_total``).
        On failure with ``on_error="warn"`` the callback disables itself and :meth:`on_disable` runs.
        """
        if self.disabled:
            return None
        start = time.perf_counter()
        writer = self.writer(trainer) if log_seconds else None
        # one batch: the scalars and histograms of this call (and its seconds) go out as one event, one flush
        with writer.batch() if writer is not None else contextlib.nullcontext():
            try:
                result = fn(*args, **kwargs)
            except Exception:
                if self.on_error == "raise":
                    self.on_disable()
                    raise
                self.disabled = True
                self.on_disable()
                rank_zero_warn(
                    f"{type(self).__name__} failed and is disabled for the rest of this fit (on_error='warn'); "
                    f"training continues and what was already logged is kept.\n{traceback.format_exc()}"
                )
                return None
            elapsed = time.perf_counter() - start
            if writer is not None:
                writer.scalar(self.tag("seconds"), elapsed, trainer.global_step)
        self.seconds_total += time.perf_counter() - start  # with the batch's write
        return result

    def on_disable(self) -> None:
        """Release what the callback holds (hooks, workers) when a failure stops it. Default: nothing."""

    def warn_once(self, key: str, message: str) -> None:
        """Warn with ``message`` the first time ``key`` is seen by this callback."""
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    # ------------------------------------------------------------------------------- logging
    def tag(self, *parts: Any) -> str:
        """``introspect/<name>/<parts...>``."""
        return "/".join(["introspect", self.name, *(str(p) for p in parts)])

    def writer(self, trainer: Any) -> IntrospectionWriter:
        """The writer for this trainer (TensorBoard if present, files otherwise; nothing off rank zero)."""
        cached = getattr(self, "_writer_cache", None)
        if cached is not None and cached[0] is trainer:
            return cached[1]
        writer = writer_for(trainer)
        if isinstance(writer, TensorBoardWriter) and not getattr(writer.experiment, "_introspect_layout", False):
            names = [cb.name for cb in trainer.callbacks if isinstance(cb, IntrospectionCallback)]
            writer.register_layout(dict.fromkeys(names, ()))
            writer.experiment._introspect_layout = True
        self._writer_cache = (trainer, writer)
        return writer

    # ------------------------------------------------------------------------------- samples
    @staticmethod
    def val_dataloader(trainer: Any) -> Any:
        """The first validation loader, loading it early if Lightning has not yet; else the train loader."""
        loaders = getattr(trainer, "val_dataloaders", None)
        if loaders is None and getattr(trainer, "world_size", 1) > 1:
            # setup_data() holds a barrier: a rank-zero-only caller would deadlock. Ask the source directly.
            source = getattr(trainer, "datamodule", None) or getattr(trainer, "lightning_module", None)
            try:
                with fork_global_rng():
                    loaders = source.val_dataloader()
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

    def fixed_samples(self, trainer: Any, *, per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The callback's fixed sample set ``(inputs, targets)`` on CPU, drawn once and then reused.

        Drawn from the validation data with the callback's private generator: ``num_samples`` random
        items, or with ``per_class=k`` up to k items of each class. Kept in the checkpoint, so a resumed
        fit explains the same images.
        """
        if self._samples is None:
            loader = self.val_dataloader(trainer)
            if loader is None:
                raise RuntimeError(f"{type(self).__name__} needs validation (or training) data to draw its samples from.")
            self._samples = draw_samples(loader, self.num_samples, seed=self.seed, per_class=per_class)
        x, y = self._samples
        return x, y

    def summary_lines(self) -> list[str]:
        """A few plain-text lines on what this callback found (printed by the demo)."""
        return []

    # --------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"disabled": self.disabled, "seconds_total": self.seconds_total}
        if self._samples is not None:
            state["samples"] = list(self._samples)
        state.update(self.extra_state())
        return state

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


def _labels_of(item: Any) -> int | None:
    try:
        _, y = split_batch(item if isinstance(item, (tuple, list, Mapping)) else (item,))
    except ValueError:
        return None
    if y is None:
        return None
    y = torch.as_tensor(y)
    return int(y.item()) if y.numel() == 1 else None


def draw_samples(
    loader: Any, n: int, *, seed: int = 0, per_class: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw a fixed ``(inputs, targets)`` sample set from a ``DataLoader`` without touching global RNG.

    Map-style datasets are indexed directly with a private generator (no loader iteration); iterable
    datasets are iterated under :func:`fork_global_rng` and the first items taken.
    """
    dataset = getattr(loader, "dataset", None)
    collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
    if dataset is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        order = torch.randperm(len(dataset), generator=private_generator(seed)).tolist()
        if per_class is None:
            items = [dataset[i] for i in order[:n]]
        else:
            counts: dict[int, int] = {}
            items = []
            for i in order[: max(n, 1) * 50]:
                item = dataset[i]
                label = _labels_of(item)
                if label is None or counts.get(label, 0) >= per_class:
                    continue
                counts[label] = counts.get(label, 0) + 1
                items.append(item)
            if not items:
                items = [dataset[i] for i in order[:n]]
        batch = collate(items)
    else:
        with fork_global_rng():
            chunks, seen = [], 0
            for batch in loader:
                chunks.append(batch)
                seen += split_batch(batch)[0].shape[0]
                if seen >= n:
                    break
        if not chunks:
            raise RuntimeError("The data loader yielded no batches to draw samples from.")
        xs = [split_batch(b) for b in chunks]
        x = torch.cat([a for a, _ in xs])[:n]
        y = torch.cat([b for _, b in xs])[:n] if all(b is not None for _, b in xs) else None
        return x.detach().cpu(), None if y is None else y.detach().cpu()
    x, y = split_batch(batch)
    return x.detach().cpu(), None if y is None else y.detach().cpu()
