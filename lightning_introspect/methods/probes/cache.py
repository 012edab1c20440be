"""Bounded, aligned stores of features and labels: one per evaluation (:class:`FeatureCache`, every layer the
same samples) or one per layer (:class:`LayerCaches`, per-pixel probes: every layer its own pixels)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from lightning_introspect.methods.probes.checks import check_choice

CACHE_POLICIES = ("reservoir", "first")


class FeatureCache:
    """A bounded, aligned store of per-layer features ``(n, D_layer)`` and their labels ``(n,)``.

    Memory is bounded by ``max_samples`` rows per layer: buffers are allocated once per layer
    (``max_samples x D`` float32) and never grow. Which samples are kept:

    * ``"reservoir"`` (default): a uniform random sample of everything added since the last
      :meth:`reset` (Vitter's algorithm R, from a private ``numpy`` generator). After a reset the
      generator is re-seeded, so the same stream of batches keeps the same samples every epoch:
      probes of different epochs (and the "init" baseline) see the same data.
    * ``"first"``: the first ``max_samples`` samples (cheapest; biased if the loader is sorted).

    Every :meth:`add` gives features for all layers of the same batch, so rows stay aligned.

    Args:
        max_samples: the most rows kept per layer.
        policy: ``"reservoir"`` or ``"first"``.
        seed: seed of the reservoir's generator.
        device: where the buffers live (the model's device for the torch solver, CPU otherwise).

    Example:
        >>> cache = FeatureCache(100, seed=0)
        >>> for _ in range(5):
        ...     cache.add({"fc": torch.randn(64, 8)}, torch.randint(0, 3, (64,)))
        >>> cache.size, cache.seen, tuple(cache.features("fc").shape)
        (100, 320, (100, 8))
    """

    def __init__(
        self, max_samples: int, *, policy: str = "reservoir", seed: int = 0, device: torch.device | str = "cpu"
    ) -> None:
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"Expected `max_samples` to be a positive int, but got {max_samples!r}.")
        check_choice(policy, "policy", CACHE_POLICIES)
        self.max_samples, self.policy, self.seed = max_samples, policy, seed
        self.device = torch.device(device)
        self._buffers: dict[str, torch.Tensor] = {}
        self._labels: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the samples (buffers are kept and reused) and re-seed the reservoir generator."""
        self.seen = 0
        self.size = 0
        self._rng = np.random.default_rng(self.seed)

    @property
    def names(self) -> list[str]:
        return list(self._buffers)

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (allocated capacity, not just the filled rows)."""
        tensors = list(self._buffers.values()) + ([self._labels] if self._labels is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def _slots(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(source rows in the batch, destination slots) for the next ``n`` samples of the stream."""
        idx = np.arange(self.seen, self.seen + n)
        if self.policy == "first":
            keep = idx < self.max_samples
            return np.nonzero(keep)[0], idx[keep]
        draws = self._rng.integers(0, idx + 1)  # algorithm R: sample i replaces slot j ~ U[0, i] if j < k
        slots = np.where(idx < self.max_samples, idx, draws)
        keep = slots < self.max_samples
        src, slots = np.nonzero(keep)[0], slots[keep]
        if np.unique(slots).size != slots.size:  # within one batch the later sample wins a slot
            _, first_from_end = np.unique(slots[::-1], return_index=True)
            last = np.sort(slots.size - 1 - first_from_end)
            src, slots = src[last], slots[last]
        return src, slots

    def add(self, features: Mapping[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Add one batch: ``features[name]`` is ``(n, D_name)``, ``labels`` is ``(n,)`` integer."""
        labels = torch.as_tensor(labels)
        if labels.ndim != 1:
            raise ValueError(
                f"Expected one integer label per sample (shape (N,)), but got shape {tuple(labels.shape)}; "
                "use `target_transform` to turn targets such as masks into one class per sample."
            )
        n = labels.shape[0]
        if self._buffers and set(features) != set(self._buffers):
            raise ValueError(f"Expected features for the layers {sorted(self._buffers)}, but got {sorted(features)}.")
        for name, feats in features.items():
            if feats.ndim != 2 or feats.shape[0] != n:
                raise ValueError(
                    f"Expected features of layer {name!r} with shape ({n}, D) to match {n} labels, "
                    f"but got {tuple(feats.shape)}."
                )
            buffer = self._buffers.get(name)
            if buffer is not None and buffer.shape[1] != feats.shape[1]:
                raise ValueError(f"Layer {name!r} changed width from {buffer.shape[1]} to {feats.shape[1]} features.")
        src, slots = self._slots(n)
        self.seen += n
        self.size = min(self.seen, self.max_samples)
        if src.size == 0:
            return
        with torch.inference_mode(False):
            if self._labels is None:
                self._labels = torch.zeros(self.max_samples, dtype=torch.long, device=self.device)
            for name, feats in features.items():
                if name not in self._buffers:
                    self._buffers[name] = torch.zeros(self.max_samples, feats.shape[1], device=self.device)
        dst = torch.as_tensor(slots, device=self.device)
        for name, feats in features.items():
            rows = feats.detach()[torch.as_tensor(src, device=feats.device)]
            self._buffers[name][dst] = rows.to(self.device, torch.float32)
        self._labels[dst] = labels.detach()[torch.as_tensor(src, device=labels.device)].to(self.device, torch.long)

    def features(self, name: str) -> torch.Tensor:
        """The kept features of layer ``name``: a ``(size, D)`` view of the buffer."""
        if name not in self._buffers:
            raise KeyError(f"No features cached for layer {name!r}; cached layers: {self.names}.")
        return self._buffers[name][: self.size]

    @property
    def labels(self) -> torch.Tensor:
        """The labels of the kept samples, ``(size,)`` int64."""
        if self._labels is None:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        return self._labels[: self.size]

    def labels_of(self, name: str) -> torch.Tensor:
        """The labels of layer ``name``'s rows: :attr:`labels`, shared by every layer (the same samples)."""
        return self.labels


class LayerCaches:
    """One :class:`FeatureCache` per layer, each with its own labels: for per-pixel probes, where every
    layer's samples are positions of its own feature map, labelled from the mask resized to that map, so
    rows of different layers are different pixels and the labels differ too.

    Memory: at most ``max_samples`` rows per layer, as in :class:`FeatureCache`.

    Example:
        >>> caches = LayerCaches(100)
        >>> caches.add({"a": (torch.randn(30, 4), torch.zeros(30, dtype=torch.long)),
        ...             "b": (torch.randn(12, 8), torch.ones(12, dtype=torch.long))})
        >>> caches.names, tuple(caches.features("b").shape), caches.labels_of("b").tolist()[:3]
        (['a', 'b'], (12, 8), [1, 1, 1])
    """

    def __init__(
        self, max_samples: int, *, policy: str = "reservoir", seed: int = 0, device: torch.device | str = "cpu"
    ) -> None:
        FeatureCache(max_samples, policy=policy)  # checks the arguments now, before any layer is seen
        self.max_samples, self.policy, self.seed = max_samples, policy, seed
        self.device = torch.device(device)
        self._caches: dict[str, FeatureCache] = {}

    def reset(self) -> None:
        """Forget the samples of every layer and re-seed their reservoirs (see :meth:`FeatureCache.reset`)."""
        for cache in self._caches.values():
            cache.reset()

    @property
    def names(self) -> list[str]:
        return list(self._caches)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._caches.values())

    def size_of(self, name: str) -> int:
        """The rows kept for layer ``name``."""
        return self._caches[name].size if name in self._caches else 0

    def add(self, items: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add one batch: ``items[name]`` is ``(features (n, D), labels (n,))`` of that layer (``n`` may differ)."""
        for name, (feats, labels) in items.items():
            cache = self._caches.get(name)
            if cache is None:
                index = len(self._caches)  # its own reservoir stream, the same every epoch
                cache = self._caches[name] = FeatureCache(
                    self.max_samples, policy=self.policy, seed=self.seed * 1_000_003 + index, device=self.device
                )
            cache.add({name: feats}, labels)

    def features(self, name: str) -> torch.Tensor:
        if name not in self._caches:
            raise KeyError(f"No features cached for layer {name!r}; cached layers: {self.names}.")
        return self._caches[name].features(name)

    def labels_of(self, name: str) -> torch.Tensor:
        """The labels of layer ``name``'s rows, ``(size_of(name),)`` int64."""
        if name not in self._caches:
            raise KeyError(f"No features cached for layer {name!r}; cached layers: {self.names}.")
        return self._caches[name].labels
