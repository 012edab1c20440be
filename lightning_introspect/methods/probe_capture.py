"""Catching probe features from a forward pass: forward hooks pool (and, when wide, project) the outputs of
named modules, one batch at a time, and hand them to :class:`~lightning_introspect.methods.probes.FeatureCache`.

Pure torch (no Lightning): the caller decides when hooks are attached (``attach()`` returns the
``ExitStack`` that removes them) and which batches count (``begin`` / ``commit``).

Example:
    >>> import torch
    >>> from lightning_introspect.methods.probes import FeatureCache
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> capture = FeatureCapture({"1": net[1]}, max_features=4)
    >>> layers, inputs = FeatureCache(100), FeatureCache(100)
    >>> with capture.attach():
    ...     capture.begin(torch.tensor([0, 1, 1]))
    ...     _ = net(torch.randn(3, 4))
    ...     capture.commit(layers, inputs)
    >>> layers.features("1").shape  # 8 features, projected to 4
    torch.Size([3, 4])
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_introspect._torch.hooks import hooks
from lightning_introspect.methods.probes import FeatureCache, RandomProjection, pool_activation

#: the name of the raw-input features (the input baseline) in a feature cache
INPUT_KEY = "input"


class FeatureCapture:
    """Pooled, projected activations of named modules, caught by forward hooks, one batch at a time.

    Args:
        modules: ``{name: module}`` to catch; each module's first call per batch counts.
        pooling: how conv maps are pooled (see :func:`~lightning_introspect.methods.probes.pool_activation`).
        max_features: wider features are reduced to this width by a seeded random projection per name
            (the same every batch and every epoch).
        seed: seeds the projections.
        on_time: called with the seconds each hook call took (the caller's clock of its own work).

    Attributes:
        projections: ``{name: RandomProjection}`` made so far.
        error: the first exception a hook raised in this batch (raised by :meth:`check`); hooks never
            raise inside the model's forward.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        *,
        pooling: str = "avg",
        max_features: int = 512,
        seed: int = 0,
        on_time: Callable[[float], None] | None = None,
    ) -> None:
        self.modules = dict(modules)
        self.pooling = pooling
        self.max_features = max_features
        self.seed = seed
        self.on_time = on_time
        self.projections: dict[str, RandomProjection] = {}
        self.error: BaseException | None = None
        self._pending: dict[str, torch.Tensor] = {}
        self._labels: torch.Tensor | None = None
        self._inputs: torch.Tensor | None = None
        self._active = False

    def attach(self) -> contextlib.ExitStack:
        """Register a forward hook on every module; closing the returned stack removes them all."""
        stack = contextlib.ExitStack()
        handles = stack.enter_context(hooks())
        for name, module in self.modules.items():
            handles.append(module.register_forward_hook(self._hook(name)))
        return stack

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not self._active or name in self._pending:
                return
            start = time.perf_counter()
            try:
                self._pending[name] = self.project(name, pool_activation(output, self.pooling))
            except Exception as exc:  # surfaced by `check` at the end of the batch
                if self.error is None:
                    self.error = exc
            if self.on_time is not None:
                self.on_time(time.perf_counter() - start)

        return hook

    def project(self, name: str, features: torch.Tensor) -> torch.Tensor:
        """``features`` (``(N, D)``) reduced to ``max_features`` when wider, by ``name``'s own projection."""
        if features.shape[1] <= self.max_features:
            return features
        proj = self.projections.get(name)
        if proj is None or proj.in_features != features.shape[1]:
            index = 1 + list(self.modules).index(name) if name in self.modules else 0
            proj = RandomProjection(features.shape[1], self.max_features, seed=self.seed * 1_000_003 + index, device=features.device)
            self.projections[name] = proj
        return proj(features)

    def begin(self, labels: torch.Tensor | None, inputs: torch.Tensor | None = None, *, layers: bool = True) -> None:
        """Start a batch: its ``labels``, its raw-input features (``inputs``, already pooled / projected) and
        whether the hooks catch layer features in it (``layers``)."""
        self._pending = {}
        self._labels = labels
        self._inputs = inputs
        self._active = layers

    def check(self) -> None:
        """Raise the error a hook met in this batch, if any (once)."""
        error, self.error = self.error, None
        if error is not None:
            raise error

    def commit(self, layer_cache: FeatureCache, input_cache: FeatureCache, *, layers: bool = True) -> None:
        """Add the batch's features to the caches (layers when ``layers``; the raw input when given) and end it.

        Raises:
            RuntimeError: a module did not run in the batch's forward pass.
        """
        labels = self._labels
        try:
            if labels is None:
                return
            if layers:
                missing = [n for n in self.modules if n not in self._pending]
                if missing:
                    raise RuntimeError(
                        f"LinearProbes: the layers {missing} did not run in this forward pass, so they cannot be "
                        "probed. Choose layers that the model's forward (validation step) calls."
                    )
                layer_cache.add(self._pending, labels)
            if self._inputs is not None:
                input_cache.add({INPUT_KEY: self._inputs}, labels)
            self._labels = self._inputs = None
        finally:
            self.clear()

    def clear(self) -> None:
        """Drop what the current batch caught and stop catching until the next :meth:`begin`."""
        self._active = False
        self._pending = {}
