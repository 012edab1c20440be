"""Where the callbacks find logits and labels: in what ``validation_step`` returned, in the module's own
forward during that step, or, failing both, in a forward of the batch's inputs of their own.

Users write ``validation_step`` in many ways: returning the logits, a dict with ``"logits"``, a dict
with the loss and integer ``"preds"``, only the loss, or nothing. One set of rules, used by every
callback, decides what counts as logits:

* ``output_transform(output)`` when the user gave one (its result is trusted);
* else the first *floating* tensor among: the output itself, a dict's ``"logits"`` / ``"preds"`` /
  ``"y_hat"`` / ``"outputs"``, an object's ``.logits`` (Hugging Face outputs), a tuple's items --
  and only when it has one row per sample of the batch (a scalar loss never passes);
* else the output of the LightningModule's own ``forward`` during the step (:class:`OutputCapture`,
  a forward hook that only keeps a reference);
* else one extra forward of the batch's inputs (:meth:`LogitsSource.logits`): eval mode, no grad,
  global RNG forked. Its time counts in the callback's ``seconds_total``; the first use says so
  once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from lightning_introspect._torch.guards import introspection_mode
from lightning_introspect._torch.hooks import hooks, output_as_tensor
from lightning_introspect.callbacks.data import split_batch
from lightning_introspect.errors import IntrospectionInputError

_OUTPUT_KEYS = ("logits", "preds", "y_hat", "outputs", "output")


def _candidates(output: Any) -> list[Any]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [output.get(k) for k in _OUTPUT_KEYS]
    found = [getattr(output, "logits", None)]
    if isinstance(output, (tuple, list)):
        found += list(output)
    return found


def extract_logits(output: Any, output_transform: Callable[[Any], Any] | None = None, *, batch_size: int | None = None) -> torch.Tensor | None:
    """Logits from what ``validation_step`` (or ``forward``) returned; ``None`` if there are none.

    With ``output_transform`` its result is used as is (integer class ids included). Otherwise the
    first floating tensor of the output (see the module docstring) with at least one dimension and,
    when ``batch_size`` is given, that many rows.

    Example:
        >>> extract_logits({"loss": torch.tensor(0.3), "logits": torch.zeros(4, 3)}).shape
        torch.Size([4, 3])
        >>> extract_logits(torch.tensor(0.3), batch_size=4) is None  # a loss is not logits
        True
        >>> extract_logits({"preds": torch.tensor([1, 0])}) is None  # class ids are not logits
        True
    """
    if output_transform is not None:
        output = output_transform(output)
        if output is not None and not isinstance(output, torch.Tensor):
            raise IntrospectionInputError(
                f"Expected `output_transform` to return a tensor of logits, but it returned {type(output).__name__}."
            )
        return output
    for value in _candidates(output):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim >= 1:
            if batch_size is None or value.shape[0] == batch_size:
                return value
    return None


def logits_only(model: Any, output_transform: Callable[[Any], Any] | None = None) -> Any:
    """A context in which ``model(x)`` returns :func:`extract_logits` of its output (for the methods, which
    need one tensor); see :func:`lightning_introspect._torch.hooks.output_as_tensor`."""
    return output_as_tensor(model, lambda out: extract_logits(out, output_transform))


def extract_targets(batch: Any, target_transform: Callable[[Any], Any] | None = None) -> torch.Tensor:
    """Labels from a batch: ``target_transform(batch)`` or :func:`split_batch`'s targets."""
    target = target_transform(batch) if target_transform is not None else split_batch(batch)[1]
    if not isinstance(target, torch.Tensor):
        raise IntrospectionInputError(
            "Cannot find the labels in the validation batch: return (inputs, labels) / a dict with a 'y', "
            "'target' or 'label' key, or pass `target_transform` (a callable batch -> labels tensor)."
        )
    return target


def batch_size_of(batch: Any) -> int | None:
    """The number of samples in a batch (its inputs' first dimension), ``None`` if it cannot be read."""
    try:
        x, _ = split_batch(batch)
    except ValueError:
        return None
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim else None


class OutputCapture:
    """Keeps the last output of a module's forward while it is attached.

    The hook only stores a reference (no extra forward pass); :meth:`detach` removes it. Used across
    Lightning hooks, so it owns an ``ExitStack`` around :func:`hooks` that :meth:`detach` closes.
    Pickles empty (hooks cannot be pickled): a copy is detached.
    """

    def __init__(self) -> None:
        self.output: Any = None
        self._stack: contextlib.ExitStack | None = None

    def attach(self, module: torch.nn.Module) -> None:
        self.detach()
        self._stack = contextlib.ExitStack()
        handles = self._stack.enter_context(hooks())
        handles.append(module.register_forward_hook(self._keep))

    def _keep(self, _module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        self.output = output

    def take(self) -> Any:
        out, self.output = self.output, None
        return out

    def detach(self) -> None:
        self.output = None
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"output": None, "_stack": None}


class LogitsSource:
    """The logits of a validation batch by the rules of this module, for one callback.

    Call :meth:`attach` when the validation epoch starts, :meth:`new_batch` in ``on_validation_batch_start``,
    :meth:`logits` in ``on_validation_batch_end`` and :meth:`detach` when the epoch ends (also on
    exceptions). ``used_own_forward`` tells whether the last batch needed the extra forward (the callback
    says so once: :meth:`IntrospectionCallback.batch_logits`). The captured forward output may also come
    from another callback's own forward of the same batch: one extra forward then serves both.
    """

    def __init__(self, output_transform: Callable[[Any], Any] | None = None) -> None:
        self.output_transform = output_transform
        self.capture = OutputCapture()
        self.used_own_forward = False

    def attach(self, module: torch.nn.Module) -> None:
        self.capture.attach(module)

    def new_batch(self) -> None:
        """Forget what was captured during an earlier batch: only this batch's forward may be read."""
        self.capture.output = None

    def detach(self) -> None:
        self.capture.detach()

    def logits(self, outputs: Any, batch: Any, pl_module: torch.nn.Module) -> torch.Tensor | None:
        """The batch's logits: from ``outputs``, the captured forward, or a forward of our own."""
        captured = self.capture.take()
        self.used_own_forward = False
        if self.output_transform is not None and outputs is not None:
            return extract_logits(outputs, self.output_transform)
        n = batch_size_of(batch)
        for source in (outputs, captured):
            if source is None:
                continue
            if self.output_transform is not None:  # only forward outputs reach here with a transform
                return extract_logits(source, self.output_transform)
            found = extract_logits(source, batch_size=n)
            if found is not None:
                return found
        self.used_own_forward = True
        return forward_logits(pl_module, batch, self.output_transform)[1]


def forward_logits(
    pl_module: torch.nn.Module, batch: Any, output_transform: Callable[[Any], Any] | None = None
) -> tuple[Any, torch.Tensor | None]:
    """``(output, logits)`` of a forward of the batch's inputs of our own (eval mode, no grad, global RNG
    forked); ``logits`` is ``None`` when the output holds none (see :func:`extract_logits`)."""
    x = split_batch(batch)[0]
    with introspection_mode(pl_module, grad=False):
        output = pl_module(x)
    return output, extract_logits(output, output_transform, batch_size=None if output_transform else int(x.shape[0]))


NO_LOGITS = (
    "the model's forward returns no logits tensor (got {kind}); return one (or a dict with 'logits', or an "
    "object with `.logits`) or pass `output_transform`."
)


def example_logits(callback: Any, trainer: Any, pl_module: torch.nn.Module, n: int = 16) -> tuple[Any, torch.Tensor] | None:
    """``(batch, logits)`` of ``n`` example samples for a callback's ``preflight`` (its ``output_transform``
    applied); ``None`` without data, or after skipping the callback when the model returns no logits."""
    batch = callback.example(trainer, n)
    if batch is None:
        return None
    output, logits = forward_logits(pl_module, batch, callback.output_transform)
    if logits is None:
        callback.skip(NO_LOGITS.format(kind=type(output).__name__))
        return None
    return batch, logits


def validation_batches(trainer: Any, loader: Any) -> Iterator[Any]:
    """The batches of ``loader`` the trainer's own validation would use (``limit_val_batches``), on the
    model's device, for a pass of our own (run it inside :func:`introspection_mode`)."""
    max_batches = (getattr(trainer, "num_val_batches", None) or [math.inf])[0]
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        yield trainer.strategy.batch_to_device(batch)
