"""Where :class:`~lightning_introspect.callbacks.linear_probes.LinearProbes` reads its activations and labels.

One evaluation probes the activations of one pass over the probe data, caught by
:class:`~lightning_introspect.methods.probe_capture.FeatureCapture` into bounded caches. The pass is either the
trainer's own validation (hooks attached from :meth:`ProbePass.begin` to :meth:`ProbePass.end`, one
:meth:`ProbePass.batch_start` / :meth:`ProbePass.batch_end` per batch) or an eval-mode, no-grad pass of ours
(:meth:`ProbePass.run`: a ``probe_dataloader``, a compiled model, the baselines at fit start). The callback
decides when; this module only reads batches and fills the caches.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_introspect._torch.guards import introspection_mode, is_compiled, module_device
from lightning_introspect.callbacks.data import split_batch
from lightning_introspect.methods.probe_capture import FeatureCapture
from lightning_introspect.methods.probes import (
    FeatureCache,
    LayerCaches,
    RandomProjection,
    TokenPooling,
    check_probe_labels,
    check_probe_masks,
    token_mask,
)

#: the warning of a fit without validation data (and no ``probe_dataloader``)
NO_VALIDATION = (
    "LinearProbes probes the validation pass, but this fit has no validation data (or "
    "limit_val_batches=0): nothing will be probed. Pass `probe_dataloader` or validation data."
)
#: the warning of a compiled model: hooks would not fire in its compiled graph, so a pass of ours reads it
COMPILED_EAGER_PASS = (
    "LinearProbes: the model contains torch.compile-d modules, so the probes take their activations "
    "from an eager pass of their own over the validation data at each evaluated epoch (one extra "
    "forward pass) instead of hooks in the compiled validation."
)

__all__ = [
    "COMPILED_EAGER_PASS",
    "NO_VALIDATION",
    "ProbePass",
    "device_of",
    "has_compiled",
    "has_validation",
    "to_device",
    "validation_batches",
]


class ProbePass:
    """The capture of one fit's probes: the hooks, the caches they fill and the labels of each batch.

    Args:
        modules: ``{name: module}`` to probe, in execution order.
        tokens: ``{name: TokenPooling}`` of the layers whose outputs are tokens.
        pooling, max_features, max_samples, cache, seed, ignore_index, pad_token_id, target_transform: the
            ``LinearProbes`` arguments of the same names.
        pixels_per_image: per-pixel probes (segmentation): positions per image; ``None``: pooled features.
        device: where the caches live (the model's device for the torch solver, else the CPU).
        on_hook_time: called with the seconds each hook call took while the hooks sit in the trainer's
            validation (outside the callback's own timed calls).

    Attributes:
        cache: the layers' features of the latest pass (``LayerCaches`` for per-pixel probes).
        input_cache: the raw inputs' features (the input baseline).
        seconds: time spent capturing (hooks and per-batch bookkeeping).
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        *,
        tokens: Mapping[str, TokenPooling],
        pooling: str,
        max_features: int,
        max_samples: int,
        cache: str,
        seed: int,
        pixels_per_image: int | None,
        ignore_index: int | None,
        pad_token_id: int | None,
        target_transform: Callable[[Any], torch.Tensor] | None,
        device: torch.device,
        on_hook_time: Callable[[float], None],
    ) -> None:
        per_pixel = pixels_per_image is not None
        self.cache: FeatureCache | LayerCaches = (LayerCaches if per_pixel else FeatureCache)(
            max_samples, policy=cache, seed=seed, device=device
        )
        self.input_cache = FeatureCache(max_samples, policy=cache, seed=seed, device=device)
        self.capture = FeatureCapture(
            modules, pooling=pooling, max_features=max_features, seed=seed, on_time=self._hook_time,
            pixels_per_image=pixels_per_image, ignore_index=ignore_index, tokens=tokens,
        )
        self.per_pixel, self.tokens, self.max_features = per_pixel, dict(tokens), max_features
        self.pad_token_id, self.target_transform = pad_token_id, target_transform
        self.on_hook_time = on_hook_time
        self.seconds = 0.0
        self.stack: contextlib.ExitStack | None = None  # removes the hooks in the trainer's validation

    @property
    def hooked(self) -> bool:
        """Whether the hooks sit in the trainer's validation pass (from :meth:`begin` to :meth:`end`)."""
        return self.stack is not None

    @property
    def projections(self) -> dict[str, RandomProjection]:
        """The seeded projections of the layers wider than ``max_features``."""
        return self.capture.projections

    # ---------------------------------------------------------------- the trainer's validation pass
    def begin(self) -> None:
        """Attach the hooks for the trainer's validation pass, with an empty cache and the first positions."""
        self.remove_hooks()
        self.cache.reset()
        self.capture.restart()  # the same pixel positions every epoch
        self.capture.error = None
        self.stack = self.capture.attach()

    def batch_start(self, batch: Any, dataloader_idx: int) -> None:
        """Read the labels of a validation batch (only the first dataloader is probed)."""
        first = dataloader_idx == 0
        self.capture.begin(self.labels(batch) if first else None, layers=first, mask=self.token_mask(batch))

    def batch_end(self) -> None:
        """Move the batch's caught features into the caches."""
        start = time.perf_counter()
        try:
            self.capture.check()
            self.capture.commit(self.cache, self.input_cache)
        finally:
            self.capture.clear()
            self.seconds += time.perf_counter() - start

    def end(self) -> None:
        """Remove the hooks (raising what a hook caught in the last batch); :attr:`cache` holds the pass."""
        try:
            self.capture.check()
        finally:
            self.remove_hooks()

    def remove_hooks(self) -> None:
        """Remove the hooks of the trainer's validation pass, if any (idempotent)."""
        stack, self.stack = self.stack, None
        self.capture.clear()
        if stack is not None:
            stack.close()

    # ------------------------------------------------------------------------------ a pass of ours
    def run(
        self, module: nn.Module, loader: Any, *, max_batches: float = math.inf, layers: bool = True, inputs: bool = False
    ) -> None:
        """An eval-mode, no-grad pass of ours over ``loader`` (the global RNG forked, hooks removed after).

        Args:
            module: the model (its device is where the inputs go).
            loader: the probe data.
            max_batches: read at most this many batches.
            layers: catch the layers' features (into :attr:`cache`).
            inputs: catch the raw inputs' features (into :attr:`input_cache`).
        """
        device = device_of(module)
        self.cache.reset()
        self.input_cache.reset()
        self.capture.restart()
        with contextlib.ExitStack() as stack:
            stack.enter_context(introspection_mode(module, grad=False))  # forked RNG before the iterator
            if layers:
                stack.enter_context(self.capture.attach())
            for i, batch in enumerate(loader):
                if i >= max_batches:
                    break
                x, _ = split_batch(batch)
                self.capture.begin(self.labels(batch), layers=layers, mask=self.token_mask(batch, x))
                if inputs:
                    self.capture.add_input(x, self.max_features)
                if layers:
                    module(to_device(x, device))
                    self.capture.check()
                self.capture.commit(self.cache, self.input_cache, layers=layers)

    # ---------------------------------------------------------------------------------- one batch
    def labels(self, batch: Any) -> torch.Tensor:
        """The labels of ``batch`` (masks for per-pixel probes), checked."""
        labels = self.target_transform(batch) if self.target_transform is not None else split_batch(batch)[1]
        if labels is None:
            raise ValueError(
                "LinearProbes found no labels in a batch. Pass `probe_dataloader` (a labelled DataLoader) or "
                "`target_transform` (batch -> labels)."
            )
        return check_probe_masks(labels) if self.per_pixel else check_probe_labels(labels)

    def token_mask(self, batch: Any, inputs: Any = None) -> torch.Tensor | None:
        """Which tokens of ``batch`` are not padding (for the token layers' mean), when the batch says."""
        if not self.tokens:
            return None
        if inputs is None:
            with contextlib.suppress(ValueError):
                inputs = split_batch(batch)[0]
        return token_mask(batch, inputs=inputs, pad_token_id=self.pad_token_id)

    def _hook_time(self, elapsed: float) -> None:
        self.seconds += elapsed
        if self.stack is not None:  # the trainer's validation forward (outside the callback's own calls)
            self.on_hook_time(elapsed)

    # ------------------------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["stack"] = None  # live hook handles: a copy starts without hooks
        return state


def has_validation(trainer: Any, loader: Any) -> bool:
    """Whether the trainer runs a validation pass over ``loader`` (its first validation dataloader, as the callback
    base finds it: the training data when there is none)."""
    limit = getattr(trainer, "limit_val_batches", 1.0)
    if limit is not None and not isinstance(limit, bool) and limit == 0:
        return False
    if loader is None or loader is getattr(trainer, "train_dataloader", None):  # the base falls back to training data
        return False
    counts = list(getattr(trainer, "num_val_batches", None) or [])
    return not counts or counts[0] != 0


def validation_batches(trainer: Any) -> float:
    """How many batches of the first validation dataloader the trainer reads (``inf`` when it does not say)."""
    counts = list(getattr(trainer, "num_val_batches", None) or [])
    if counts and counts[0] not in (None, math.inf):
        return counts[0]
    return math.inf


def has_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is or contains a ``torch.compile``-d module (dynamo's ``OptimizedModule``)."""
    return any(is_compiled(m) for m in model.modules()) or getattr(model, "_compiler_ctx", None) is not None


def device_of(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters are; Lightning's ``device`` attribute only for a module without any.

    The parameters come first because during ``setup`` Lightning already reports the accelerator's device
    while the weights are still on the CPU (the strategy moves them afterwards).
    """
    device = getattr(module, "device", None)
    return module_device(module, default=device if isinstance(device, torch.device) else "cpu")


def to_device(x: Any, device: torch.device) -> Any:
    """``x`` (a tensor, or dicts / lists / tuples of them) on ``device``; anything else as it is."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x
