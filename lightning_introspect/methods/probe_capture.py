"""Catching probe features from a forward pass: forward hooks pool (and, when wide, project) the outputs of
named modules, one batch at a time, and hand them to :class:`~lightning_introspect.methods.probes.FeatureCache`.
Token layers (``tokens``) are pooled by their class token or their mean over the tokens the batch's mask keeps.
For segmentation (``pixels_per_image``) they instead read the feature vectors at a few labelled positions of
each image (per-pixel probes) and hand them, with their labels, to
:class:`~lightning_introspect.methods.probes.LayerCaches`.

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

from lightning_introspect._torch.guards import private_generator
from lightning_introspect._torch.hooks import hooks
from lightning_introspect.methods.probes import (
    FeatureCache,
    LayerCaches,
    RandomProjection,
    TokenPooling,
    check_probe_masks,
    downsample_input,
    first_tensor,
    nearest_labels,
    pixel_features,
    pool_activation,
    sample_pixels,
)

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
        pixels_per_image: per-pixel probes (segmentation): the labels given to :meth:`begin` are integer masks
            ``(N, H, W)``, and each module's output ``(N, D, h, w)`` gives the feature vectors at up to this
            many positions per image, labelled by the masks resized to ``(h, w)`` by nearest neighbour
            (:func:`~lightning_introspect.methods.probes.nearest_labels`). ``None``: pooled features, one
            row per sample.
        ignore_index: per-pixel probes: the mask value of pixels that are never drawn.
        tokens: ``{name: TokenPooling}`` of the modules whose 3-D outputs are tokens ``(N, T, D)``
            (:func:`~lightning_introspect.methods.probe_layers.token_layers`); the others' 3-D outputs are
            ``(N, C, L)`` maps, pooled by ``pooling``.

    The positions are drawn from a private generator per module (and one for the raw input), re-seeded
    by :meth:`restart`: call it before each pass over the same data, and every pass reads the same
    positions (curves of different epochs compare the same pixels).

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
        pixels_per_image: int | None = None,
        ignore_index: int | None = None,
        tokens: Mapping[str, TokenPooling] | None = None,
    ) -> None:
        self.modules = dict(modules)
        self.tokens = dict(tokens or {})
        self._mask: torch.Tensor | None = None
        self.pixels_per_image = pixels_per_image
        self.ignore_index = ignore_index
        self._generators: dict[str, torch.Generator] = {}
        self.pooling = pooling
        self.max_features = max_features
        self.seed = seed
        self.on_time = on_time
        self.projections: dict[str, RandomProjection] = {}
        self.error: BaseException | None = None
        self._pending: dict[str, Any] = {}
        self._labels: torch.Tensor | None = None
        self._inputs: Any = None
        self._active = False

    @property
    def per_pixel(self) -> bool:
        """Whether the features are positions of feature maps (segmentation) rather than pooled samples."""
        return self.pixels_per_image is not None

    def restart(self) -> None:
        """Re-seed the position draws: the next pass over the same data reads the same positions."""
        self._generators = {}

    def _generator(self, name: str) -> torch.Generator:
        gen = self._generators.get(name)
        if gen is None:
            index = 1 + list(self.modules).index(name) if name in self.modules else 0
            gen = self._generators[name] = private_generator(self.seed * 1_000_003 + 7919 * (index + 1))
        return gen

    def sample(self, name: str, feature_map: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (n, D'), labels (n,))`` of ``name`` at up to ``pixels_per_image`` positions per image of
        ``feature_map`` ``(N, D, h, w)``, labelled by the current batch's masks resized to ``(h, w)``."""
        if self.pixels_per_image is None or self._labels is None:
            raise RuntimeError("FeatureCapture.sample needs `pixels_per_image` and the batch's masks (begin).")
        fmap = first_tensor(feature_map)
        if fmap.ndim != 4:
            raise ValueError(
                f"Per-pixel probes (task='segmentation') need feature maps (N, D, h, w), but {name!r} gives shape "
                f"{tuple(fmap.shape)}; probe convolutional layers."
            )
        labels = nearest_labels(self._labels, (int(fmap.shape[-2]), int(fmap.shape[-1])))
        image, row, col = sample_pixels(labels, self.pixels_per_image, generator=self._generator(name), ignore_index=self.ignore_index)
        return self.project(name, pixel_features(fmap, image, row, col)), labels[image, row, col]

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
                if self.per_pixel:
                    self._pending[name] = self.sample(name, output)
                else:
                    pooled = pool_activation(output, self.pooling, tokens=self.tokens.get(name), mask=self._mask)
                    self._pending[name] = self.project(name, pooled)
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

    def begin(
        self, labels: torch.Tensor | None, inputs: torch.Tensor | None = None, *, layers: bool = True,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Start a batch: its ``labels`` (per-pixel probes: integer masks ``(N, H, W)``), its raw-input features
        (``inputs``, already pooled / projected; or :meth:`add_input` after this), whether the hooks catch
        layer features in it (``layers``) and which of its tokens are not padding (``mask`` ``(N, T)``, for the
        mean of token layers; :func:`~lightning_introspect.methods.probes.token_mask`)."""
        self._pending = {}
        self._mask = mask
        self._labels = None if labels is None else check_probe_masks(labels).cpu() if self.per_pixel else labels
        self._inputs = inputs
        self._active = layers

    def add_input(self, x: Any, max_features: int | None = None) -> None:
        """The raw-input features of the current batch (the input baseline): a small thumbnail per sample
        (:func:`~lightning_introspect.methods.probes.downsample_input`), or, for per-pixel probes, the input's
        values at up to ``pixels_per_image`` positions per image (the input taken as a feature map ``(N, C, H, W)``).

        Raises:
            ValueError: per-pixel probes on inputs that are not images ``(N, C, H, W)``.
        """
        if self.per_pixel:
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                raise ValueError(
                    f"The per-pixel input baseline needs image inputs (N, C, H, W), but got {getattr(x, 'shape', type(x))}; "
                    "pass `include_input=False`."
                )
            self._inputs = self.sample(INPUT_KEY, x if x.is_floating_point() else x.float())
        else:
            self._inputs = self.project(INPUT_KEY, downsample_input(x, max_features or self.max_features))

    def check(self) -> None:
        """Raise the error a hook met in this batch, if any (once)."""
        error, self.error = self.error, None
        if error is not None:
            raise error

    def commit(self, layer_cache: FeatureCache | LayerCaches, input_cache: FeatureCache, *, layers: bool = True) -> None:
        """Add the batch's features to the caches (layers when ``layers``; the raw input when given) and end it.
        Per-pixel probes need a :class:`~lightning_introspect.methods.probes.LayerCaches` for the layers.

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
                if isinstance(layer_cache, LayerCaches):
                    layer_cache.add(self._pending)
                else:
                    layer_cache.add(self._pending, labels)
            if isinstance(self._inputs, tuple):  # per-pixel: (features, their labels)
                input_cache.add({INPUT_KEY: self._inputs[0]}, self._inputs[1])
            elif self._inputs is not None:
                input_cache.add({INPUT_KEY: self._inputs}, labels)
            self._labels = self._inputs = None
        finally:
            self.clear()

    def clear(self) -> None:
        """Drop what the current batch caught and stop catching until the next :meth:`begin`."""
        self._active = False
        self._pending = {}
        self._mask = None
