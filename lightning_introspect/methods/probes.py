"""Linear classifier probes on intermediate activations (Alain & Bengio 2016).

A probe is a multinomial logistic regression trained on the (pooled) activations of one layer to
predict the labels: its test accuracy measures how *linearly separable* the classes are at that layer.
This module holds the pure parts (torch + numpy + scikit-learn, no Lightning):

* :func:`pool_activation` turns a layer output into one feature vector per sample (conv maps pooled
  over space: ``"avg"``, ``"max"``, ``"avgmax"``, or ``"flatten"``); :func:`downsample_input` makes a
  small thumbnail of the raw input for the input baseline;
* :class:`RandomProjection` reduces very wide features to ``max_features`` with a seeded random
  projection (dense Gaussian, or a sparse sign sketch when the dense matrix would be large);
* :class:`FeatureCache` keeps a bounded, aligned sample of features and labels (reservoir sampling or
  the first N samples), at most ``max_samples x width`` floats per layer;
* segmentation (per-pixel probes): :func:`nearest_labels` resizes the masks to a feature map's size,
  :func:`sample_pixels` draws a bounded set of labelled positions per image, :func:`pixel_features`
  reads the feature vectors there, and :class:`LayerCaches` keeps them per layer, each layer with its
  own labels;
* :func:`fit_probe` / :func:`fit_probes` standardise, split (stratified, seeded), fit and score the
  probe with either solver: scikit-learn ``LogisticRegression`` (lbfgs) or the same model in torch
  (``torch.optim.LBFGS``, full batch, on the features' device). Both can warm-start from a previous fit.

Example:
    >>> import torch
    >>> from sklearn.datasets import load_digits
    >>> digits = load_digits()
    >>> x, y = torch.tensor(digits.data, dtype=torch.float32), torch.tensor(digits.target)
    >>> result = fit_probe(x, y, solver="torch", seed=0)
    >>> result.accuracy > 0.9
    True
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np
import torch
import torch.nn.functional as F

from lightning_introspect._torch.guards import one_blas_thread, private_generator, torch_threads

POOLING_CHOICES = ("avg", "max", "avgmax", "flatten")
SOLVER_CHOICES = ("sklearn", "torch")
CACHE_POLICIES = ("reservoir", "first")

ArrayLike = torch.Tensor | np.ndarray


def _check_choice(value: Any, argument: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"Expected `{argument}` to be one of {', '.join(repr(c) for c in choices)}, but got {value!r}.")


def first_tensor(output: Any) -> torch.Tensor:
    """The tensor in a module output: the output itself, or the first tensor of a tuple / list.

    Raises:
        ValueError: when the output holds no tensor (e.g. a dict); probe a submodule instead.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise ValueError(
        f"Cannot probe a layer whose output is a {type(output).__name__}; probe a submodule that returns a tensor."
    )


def pool_activation(activation: Any, pooling: str = "avg") -> torch.Tensor:
    """One float32 feature vector per sample from a layer output ``(N, C, *spatial)`` or ``(N, D)``.

    Channels-first layouts are assumed: ``"avg"`` / ``"max"`` reduce every dimension after the
    channel dimension (global average / max pooling of conv maps), ``"avgmax"`` concatenates both
    (``2C`` features), ``"flatten"`` keeps everything (``C * H * W`` features; pair it with a
    :class:`RandomProjection`). ``(N, D)`` outputs are returned as they are for every choice.

    Args:
        activation: the layer output (a tensor, or a tuple whose first tensor is used).
        pooling: ``"avg"``, ``"max"``, ``"avgmax"`` or ``"flatten"``.

    Returns:
        A detached ``(N, D)`` float32 tensor on the activation's device.

    Example:
        >>> pool_activation(torch.ones(2, 3, 4, 4), "avgmax").shape
        torch.Size([2, 6])
    """
    _check_choice(pooling, "pooling", POOLING_CHOICES)
    x = first_tensor(activation).detach()
    if x.ndim < 2:
        raise ValueError(f"Expected a layer output with a batch dimension (N, ...), but got shape {tuple(x.shape)}.")
    if x.ndim == 2:
        return x.float()
    if pooling == "flatten":
        return x.reshape(x.shape[0], -1).float()
    dims = tuple(range(2, x.ndim))
    if pooling == "avg":
        return x.mean(dims, dtype=torch.float32)
    if pooling == "max":
        return x.amax(dims).float()
    return torch.cat([x.mean(dims, dtype=torch.float32), x.amax(dims).float()], dim=1)


def downsample_input(x: torch.Tensor, max_features: int = 512, size: int = 8) -> torch.Tensor:
    """A small float32 "thumbnail" of raw inputs for the input baseline probe.

    Images ``(N, C, H, W)`` are average-pooled to at most ``size x size`` (fewer when ``C * size**2``
    exceeds ``max_features``), sequences ``(N, C, L)`` to at most ``size**2`` steps; other shapes are
    flattened. Wider results still need a :class:`RandomProjection`.

    Example:
        >>> downsample_input(torch.zeros(4, 1, 32, 32)).shape
        torch.Size([4, 64])
    """
    x = x.detach()
    if not x.is_floating_point():
        x = x.float()
    if x.ndim == 4:
        channels, h, w = x.shape[1:]
        side = max(1, min(size, int(math.sqrt(max(1, max_features) / max(1, channels)))))
        x = F.adaptive_avg_pool2d(x.float(), (min(h, side), min(w, side)))
    elif x.ndim == 3:
        channels, length = x.shape[1:]
        steps = max(1, min(length, size * size, max(1, max_features) // max(1, channels)))
        x = F.adaptive_avg_pool1d(x.float(), steps)
    if x.ndim == 1:
        x = x[:, None]
    return x.reshape(x.shape[0], -1).float()


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()


class RandomProjection:
    """A seeded linear map from ``in_features`` to ``out_features`` that roughly preserves distances.

    Dense Gaussian entries ``N(0, 1/out_features)`` when the matrix has at most ``dense_limit``
    entries; otherwise a sparse sign sketch (every input feature added, with a random sign, to one
    random output feature), which needs only ``O(in_features)`` memory. Both preserve squared norms
    in expectation. The randomness comes from a private generator: the global RNG is never touched,
    and the same seed gives the same map on every call, epoch and resume.

    Args:
        in_features: width of the features to project.
        out_features: target width.
        seed: seed of the private generator.
        device: where the projection (and its outputs) live.
        dense_limit: largest number of dense matrix entries (default 4M = 16 MB).

    Example:
        >>> proj = RandomProjection(1000, 64, seed=0)
        >>> proj(torch.randn(5, 1000)).shape
        torch.Size([5, 64])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dense_limit: int = 1 << 22,
    ) -> None:
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Expected positive widths, but got in_features={in_features}, out_features={out_features}.")
        self.in_features, self.out_features = int(in_features), int(out_features)
        gen = private_generator(seed)
        with torch.inference_mode(False):
            if self.in_features * self.out_features <= dense_limit:
                self.kind = "dense"
                self.matrix: torch.Tensor | None = (
                    torch.randn(self.in_features, self.out_features, generator=gen) / math.sqrt(self.out_features)
                ).to(device)
                self.buckets = self.signs = None
            else:
                self.kind = "sketch"
                self.matrix = None
                self.buckets = torch.randint(0, self.out_features, (self.in_features,), generator=gen).to(device)
                self.signs = (torch.randint(0, 2, (self.in_features,), generator=gen) * 2 - 1).float().to(device)

    @property
    def device(self) -> torch.device:
        tensor = self.matrix if self.matrix is not None else self.buckets
        assert tensor is not None  # __init__ builds either the matrix or the sketch
        return tensor.device

    def to(self, device: torch.device | str) -> RandomProjection:
        """Move the projection to ``device`` (in place); returns itself."""
        with torch.inference_mode(False):
            for attr in ("matrix", "buckets", "signs"):
                value = getattr(self, attr)
                if value is not None:
                    setattr(self, attr, value.to(device))
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Expected features of shape (N, {self.in_features}), but got {tuple(x.shape)}.")
        if x.device != self.device:
            self.to(x.device)
        x = x.float()
        with _no_autocast(x.device):  # hooks run inside the model's autocast region: keep fp32
            if self.matrix is not None:
                return x @ self.matrix
            assert self.buckets is not None and self.signs is not None  # the sketch, when there is no matrix
            out = x.new_zeros(x.shape[0], self.out_features)
            return out.index_add_(1, self.buckets, x * self.signs)


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
        _check_choice(policy, "policy", CACHE_POLICIES)
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


# --------------------------------------------------------------------------------- per-pixel probes
def check_probe_masks(masks: Any) -> torch.Tensor:
    """``masks`` as detached integer masks ``(N, H, W)`` (``(N, 1, H, W)`` accepted), as per-pixel probes need.

    Raises:
        ValueError: labels of another shape or floating-point labels with fractions.

    Example:
        >>> check_probe_masks(torch.zeros(2, 1, 4, 4)).shape
        torch.Size([2, 4, 4])
    """
    masks = torch.as_tensor(masks).detach()
    dense = masks.ndim == 3 or (masks.ndim == 4 and masks.shape[1] == 1)
    integer = not masks.is_floating_point() and masks.dtype != torch.bool
    if masks.is_floating_point() and dense:
        integer = bool(torch.equal(masks, masks.round()))
    if not dense or not integer:
        raise ValueError(
            f"Expected integer masks (N, H, W) for per-pixel probes (task='segmentation'), but got {masks.dtype} "
            f"labels of shape {tuple(masks.shape)}."
        )
    return masks[:, 0].long() if masks.ndim == 4 else masks.long()


def _nearest_source(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """The source index of every output index along one axis, as ``F.interpolate(mode="nearest")`` picks it."""
    grid = torch.arange(n_in, dtype=torch.float32, device=device).view(1, 1, n_in)
    return F.interpolate(grid, size=n_out, mode="nearest").view(-1).round().long()


def nearest_labels(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Integer masks ``(N, H, W)`` resized to ``size`` ``(h, w)`` by nearest neighbour: each cell of a
    feature map gets the label of the mask pixel ``F.interpolate(mode="nearest")`` reads for it (the same
    choice of source pixels, made on the indices so any label value stays exact).

    Example:
        >>> m = torch.arange(16).view(1, 4, 4)
        >>> nearest_labels(m, (2, 2)).tolist()
        [[[0, 2], [8, 10]]]
    """
    h, w = int(size[0]), int(size[1])
    if tuple(masks.shape[-2:]) == (h, w):
        return masks
    rows = _nearest_source(masks.shape[-2], h, masks.device)
    cols = _nearest_source(masks.shape[-1], w, masks.device)
    return masks[:, rows][:, :, cols]


def sample_pixels(
    labels: torch.Tensor, per_image: int, *, generator: torch.Generator, ignore_index: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to ``per_image`` distinct positions of each image of ``labels`` ``(N, h, w)``, drawn uniformly
    among its pixels with a valid label (not ``ignore_index``, not negative): an image with fewer valid
    pixels gives all of them, and an ignored pixel is never drawn.

    The draw uses only ``generator`` (a CPU ``torch.Generator``; the global RNG is not touched): re-seeded
    before each pass over the same data, it gives the same positions every pass.

    Returns:
        ``(image, row, col)`` long tensors on CPU, image by image.

    Example:
        >>> labels = torch.tensor([[[0, 255], [1, 255]]])
        >>> image, row, col = sample_pixels(labels, 8, generator=torch.Generator().manual_seed(0), ignore_index=255)
        >>> sorted(zip(row.tolist(), col.tolist()))  # both valid pixels, never an ignored one
        [(0, 0), (1, 0)]
    """
    if isinstance(per_image, bool) or not isinstance(per_image, int) or per_image < 1:
        raise ValueError(f"Expected `pixels_per_image` to be a positive int, but got {per_image!r}.")
    labels = labels.detach().cpu()
    n, h, w = labels.shape
    flat = labels.reshape(n, h * w)
    valid = flat >= 0
    if ignore_index is not None:
        valid &= flat != ignore_index
    k = min(per_image, h * w)
    scores = torch.rand(n, h * w, generator=generator)
    scores[~valid] = 2.0  # past every valid pixel's draw in [0, 1): taken only when too few are valid, then dropped
    index = scores.topk(k, dim=1, largest=False).indices
    keep = valid.gather(1, index)
    image = torch.arange(n).view(n, 1).expand(n, k)[keep]
    position = index[keep]
    return image, torch.div(position, w, rounding_mode="floor"), position % w


def pixel_features(feature_map: Any, image: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """The feature vectors ``(n, D)`` (float32, detached) of a feature map ``(N, D, h, w)`` at the positions
    ``(image, row, col)`` (from :func:`sample_pixels`).

    Raises:
        ValueError: the layer output is not a feature map ``(N, D, h, w)``.

    Example:
        >>> fmap = torch.arange(8.0).view(1, 2, 2, 2)
        >>> pixel_features(fmap, torch.tensor([0]), torch.tensor([1]), torch.tensor([0])).tolist()
        [[2.0, 6.0]]
    """
    x = first_tensor(feature_map).detach()
    if x.ndim != 4:
        raise ValueError(
            f"Per-pixel probes (task='segmentation') need feature maps (N, D, h, w), but a layer gave shape {tuple(x.shape)}; "
            "probe convolutional layers."
        )
    device = x.device
    return x[image.to(device), :, row.to(device), col.to(device)].float()


# ------------------------------------------------------------------------------------------- fitting
@contextlib.contextmanager
def blas_threads(n: int | None = 1) -> Iterator[None]:
    """numpy / scipy's BLAS at ``n`` threads in a block (``None``: unchanged), for sklearn fits in a
    background thread: multi-threaded BLAS there competes with the training loop for the same cores and,
    on a busy machine, spins. ``n=1`` is the shared, counted limit of
    :func:`~lightning_introspect._torch.guards.one_blas_thread` (safe while histograms are binned at the
    same time). torch's own thread pool is left alone, so training numerics do not change.
    """
    if n is None:
        yield
        return
    if n == 1:
        with one_blas_thread():
            yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n, user_api="blas"):
        yield


@dataclass
class ProbeResult:
    """The outcome of one probe fit.

    Attributes:
        accuracy: accuracy on the held-out probe-test split.
        macro_f1: macro-averaged F1 on the probe-test split (classes in the labels or predictions).
        train_accuracy: accuracy on the probe-train split.
        n_train, n_test, n_features, n_classes: sizes.
        n_iter: L-BFGS iterations used.
        seconds: wall time of standardisation + fit + scoring.
        solver: ``"sklearn"`` or ``"torch"``.
        state: warm-start state (classes, coefficients, intercept as numpy arrays) for the next fit.
    """

    accuracy: float
    macro_f1: float
    train_accuracy: float
    n_train: int
    n_test: int
    n_features: int
    n_classes: int
    n_iter: int
    seconds: float
    solver: str
    state: dict[str, Any] | None = field(default=None, repr=False)


def probe_split(labels: ArrayLike, test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train / test indices (sorted numpy int64 arrays).

    Each class with at least two samples puts ``round(test_fraction * count)`` of them (at least one,
    at most ``count - 1``) in the test split; a class with a single sample goes to the train split.

    Example:
        >>> tr, te = probe_split(np.array([0] * 10 + [1] * 10), 0.3, seed=0)
        >>> len(tr), len(te)
        (14, 6)
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"Expected `test_fraction` to be in (0, 1), but got {test_fraction!r}.")
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.nonzero(y == c)[0]
        idx = idx[rng.permutation(idx.size)]
        k = 0 if idx.size < 2 else min(idx.size - 1, max(1, round(test_fraction * idx.size)))
        test.append(idx[:k])
        train.append(idx[k:])
    empty = np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(train or [empty])).astype(np.int64), np.sort(np.concatenate(test or [empty])).astype(np.int64)


def classification_scores(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[float, float]:
    """``(accuracy, macro_f1)`` by scikit-learn; macro-F1 averages over the classes present in ``y_true``
    or ``y_pred`` (``f1_score(average="macro")``).

    Example:
        >>> classification_scores(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
        (0.75, 0.7333333333333334)
    """
    from sklearn.metrics import accuracy_score, f1_score

    t = y_true.detach().cpu().numpy() if isinstance(y_true, torch.Tensor) else np.asarray(y_true)
    p = y_pred.detach().cpu().numpy() if isinstance(y_pred, torch.Tensor) else np.asarray(y_pred)
    if t.size == 0:
        return float("nan"), float("nan")
    return float(accuracy_score(t, p)), float(f1_score(t, p, average="macro", zero_division=0.0))


def _as_numpy(x: ArrayLike, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().astype(dtype, copy=False)
    return np.asarray(x, dtype=dtype)


def _warm_ok(state: Mapping[str, Any] | None, solver: str, classes: np.ndarray, n_features: int) -> TypeGuard[Mapping[str, Any]]:
    return (
        state is not None
        and state.get("solver") == solver
        and np.array_equal(np.asarray(state["classes"]), classes)
        and np.asarray(state["coef"]).shape[-1] == n_features
    )


def _fit_sklearn(
    x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, *, C: float, max_iter: int, tol: float,
    warm_start: Mapping[str, Any] | None,
) -> tuple[np.ndarray, np.ndarray, int, dict[str, Any]]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mean = x[train].mean(0)
    std = x[train].std(0)
    std[std < 1e-8] = 1.0
    z = (x - mean) / std
    classes = np.unique(y[train])
    clf = LogisticRegression(C=C, max_iter=max_iter, tol=tol, warm_start=True)
    if _warm_ok(warm_start, "sklearn", classes, x.shape[1]):
        clf.coef_ = np.array(warm_start["coef"], dtype=np.float64)
        clf.intercept_ = np.array(warm_start["intercept"], dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(z[train], y[train])
    state = {"solver": "sklearn", "classes": clf.classes_.copy(), "coef": clf.coef_.copy(), "intercept": clf.intercept_.copy()}
    return clf.predict(z[train]), clf.predict(z[test]), int(np.max(clf.n_iter_)), state


_SMALL_CPU_PROBLEM = 1 << 20  # features (n x D); below this one CPU thread is faster than several


def _standardise(x: torch.Tensor, tr: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` with the probe-train rows' statistics (constant features: std 1)."""
    mean = x[tr].mean(0)
    std = x[tr].std(0, unbiased=False)
    return (x - mean) / torch.where(std < 1e-8, torch.ones_like(std), std)


def _softmax_objective(
    zt: torch.Tensor, z: torch.Tensor, onehot_t: torch.Tensor, theta: torch.Tensor, penalty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Objective and gradient of ``L`` independent L2-regularised multinomial logistic regressions.

    ``zt``: ``(L, D, n)`` standardised features and ``z`` the same as ``(L, n, D)``; ``onehot_t``: ``(k, n)``
    targets; ``theta``: ``(L, k, D + 1)`` (weights, then the bias in the last column). The objective is
    sklearn's: mean cross-entropy plus ``penalty * ||W||^2`` (the bias is not penalised). Logits are kept
    as ``(L, k, n)`` (the class reductions then run along contiguous rows). Returns ``f`` ``(L,)`` and
    the gradient, shaped like ``theta``.
    """
    n = zt.shape[2]
    w = theta[..., :-1]
    logits = torch.baddbmm(theta[..., -1:], w, zt)
    top = logits.amax(1, keepdim=True)
    e = (logits - top).exp_()
    total = e.sum(1, keepdim=True)
    f = ((total.log() + top).sum((1, 2)) - (logits * onehot_t).sum((1, 2))) / n + penalty * w.pow(2).sum((1, 2))
    resid = e.div_(total).sub_(onehot_t).div_(n)  # d f / d logits
    grad = torch.empty_like(theta)
    torch.baddbmm(w, resid, z, beta=2 * penalty, out=grad[..., :-1])
    torch.sum(resid, 2, out=grad[..., -1])
    return f, grad


def _fit_torch(
    x: torch.Tensor, y: torch.Tensor, train: np.ndarray, test: np.ndarray, *, C: float, max_iter: int, tol: float,
    warm_start: Mapping[str, Any] | None,
) -> tuple[np.ndarray, np.ndarray, int, dict[str, Any]]:
    """Fit one probe on ``x`` (rows aligned with ``y``) with ``torch.optim.LBFGS`` on the features' device.

    The objective is sklearn's (:func:`_softmax_objective`, its gradient written out: no autograd graph, no
    ``.backward()``), minimised with a strong-Wolfe line search and history 10 until the largest absolute
    gradient entry is at most ``tol`` (scipy's ``pgtol``, which sklearn's lbfgs uses) or ``max_iter``
    iterations. ``benchmarks/bench_probes.py`` compares it with scikit-learn and measures the time.
    Returns ``(pred_train, pred_test, n_iter, state)``.
    """
    device = x.device
    small_cpu = device.type == "cpu" and x.numel() <= _SMALL_CPU_PROBLEM
    with torch.inference_mode(False), torch.no_grad(), _no_autocast(device), torch_threads(1 if small_cpu else None):
        tr = torch.as_tensor(train, device=device)
        te = torch.as_tensor(test, device=device)
        y = y.detach().to(device=device, dtype=torch.long).clone()
        classes = torch.unique(y[tr])
        classes_np = classes.cpu().numpy()
        k, width = classes.numel(), int(x.shape[1])
        onehot_t = F.one_hot(torch.searchsorted(classes, y[tr]), k).float().T.contiguous()
        # sklearn's objective: C * sum(cross-entropy) + ||W||^2 / 2, divided by C * n (the bias is not penalised).
        penalty = 0.5 / (C * max(1, tr.numel()))
        z = _standardise(x.detach().to(device=device, dtype=torch.float32), tr)
        ztr = z[tr].unsqueeze(0)
        ztr_t = ztr.transpose(1, 2).contiguous()
        theta = torch.zeros(1, k, width + 1, device=device)  # weights | bias
        if _warm_ok(warm_start, "torch", classes_np, width):
            theta[0, :, :-1] = torch.as_tensor(np.asarray(warm_start["coef"]), dtype=torch.float32, device=device)
            theta[0, :, -1] = torch.as_tensor(np.asarray(warm_start["intercept"]), dtype=torch.float32, device=device)
        optimizer = torch.optim.LBFGS(
            [theta], lr=1.0, max_iter=max_iter, tolerance_grad=tol, history_size=10, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            with torch.no_grad():  # LBFGS.step enables grad around the closure; nothing here needs it
                f, grad = _softmax_objective(ztr_t, ztr, onehot_t, theta, penalty)
            theta.grad = grad
            return f[0]

        optimizer.step(closure)
        n_iter = int(optimizer.state[theta].get("n_iter", 0))
        coef, intercept = theta[0, :, :-1], theta[0, :, -1]
        pred = classes[torch.addmm(intercept, z, coef.T).argmax(1)]
        state = {
            "solver": "torch",
            "classes": classes_np,
            "coef": coef.cpu().numpy().copy(),
            "intercept": intercept.cpu().numpy().copy(),
        }
        return pred[tr].cpu().numpy(), pred[te].cpu().numpy(), n_iter, state


def fit_probe(
    features: ArrayLike,
    labels: ArrayLike,
    *,
    solver: str = "sklearn",
    test_fraction: float = 0.3,
    seed: int = 0,
    max_iter: int = 100,
    C: float = 1.0,
    tol: float = 1e-4,
    warm_start: Mapping[str, Any] | None = None,
    split: tuple[np.ndarray, np.ndarray] | None = None,
) -> ProbeResult:
    """Fit one multinomial logistic-regression probe and score it on a held-out split.

    Features are standardised with the probe-train mean / std, the split is stratified and seeded
    (:func:`probe_split`), and the model is L2-regularised logistic regression (``C`` as in sklearn,
    the intercept not penalised) fitted with L-BFGS:

    * ``solver="sklearn"``: ``sklearn.linear_model.LogisticRegression(solver="lbfgs")`` on CPU numpy
      arrays (thread-safe; the callback runs it in a background worker);
    * ``solver="torch"``: the same objective, its gradient written out (no autograd), minimised by
      ``torch.optim.LBFGS`` (strong-Wolfe line search) on the features' device (the GPU, where the model
      is); works inside ``torch.inference_mode``.

    Args:
        features: ``(n, D)`` features (tensor or array).
        labels: ``(n,)`` integer labels.
        solver: ``"sklearn"`` or ``"torch"``.
        test_fraction: share of each class held out for scoring.
        seed: seed of the split.
        max_iter: L-BFGS iterations (about 100 reaches the converged accuracy on standardised features).
        C: inverse L2 strength (sklearn's convention).
        tol: gradient tolerance (max-abs of the gradient of the mean loss).
        warm_start: ``ProbeResult.state`` of an earlier fit with the same solver, classes and width.
        split: precomputed ``(train, test)`` indices (shared by several layers).

    Returns:
        A :class:`ProbeResult`.

    Raises:
        ValueError: bad ``solver``, or fewer than two classes in the probe-train split.
    """
    return fit_probes(
        {"probe": features}, labels, solver=solver, test_fraction=test_fraction, seed=seed, max_iter=max_iter, C=C,
        tol=tol, warm_start={"probe": warm_start} if warm_start is not None else None, split=split,
    )["probe"]


def fit_probes(
    features: Mapping[str, ArrayLike],
    labels: ArrayLike | Mapping[str, ArrayLike],
    *,
    solver: str = "sklearn",
    test_fraction: float = 0.3,
    seed: int = 0,
    max_iter: int = 100,
    C: float = 1.0,
    tol: float = 1e-4,
    warm_start: Mapping[str, Mapping[str, Any] | None] | None = None,
    split: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, ProbeResult]:
    """:func:`fit_probe` for several layers on the same samples, with one shared split.

    The layers are fitted one after the other, each its own problem; ``ProbeResult.seconds`` is each
    layer's own time (the first also carries the split).

    Args:
        features: layer name -> ``(n, D_layer)`` features (rows aligned with ``labels``).
        labels: ``(n,)`` integer labels; or layer name -> that layer's own labels (per-pixel probes: every
            layer has its own samples), each layer then with its own split.
        warm_start: layer name -> ``ProbeResult.state`` of the previous fit (missing layers start cold).
        split: precomputed ``(train, test)`` indices (default: :func:`probe_split`).
        solver, test_fraction, seed, max_iter, C, tol: as in :func:`fit_probe`.

    Returns:
        Layer name -> :class:`ProbeResult`, in the order of ``features``.

    Raises:
        ValueError: bad ``solver``, no features, or fewer than two classes in the probe-train split.

    Example:
        >>> x = torch.randn(200, 16)
        >>> y = (x[:, 0] > 0).long()
        >>> results = fit_probes({"a": x, "b": torch.randn(200, 4)}, y, solver="torch")
        >>> results["a"].accuracy > results["b"].accuracy
        True
    """
    _check_choice(solver, "solver", SOLVER_CHOICES)
    if not features:
        raise ValueError("Expected `features` to map at least one layer name to its features, but got none.")
    if isinstance(labels, Mapping):
        missing = [n for n in features if n not in labels]
        if missing or split is not None:
            raise ValueError(
                f"Expected per-layer `labels` for every layer of `features` and no shared `split`, but the labels miss "
                f"{missing} (split given: {split is not None})."
            )
        warm = warm_start or {}
        out: dict[str, ProbeResult] = {}
        for name in features:
            out.update(fit_probes(
                {name: features[name]}, labels[name], solver=solver, test_fraction=test_fraction, seed=seed,
                max_iter=max_iter, C=C, tol=tol, warm_start={name: warm.get(name)},
            ))
        return out
    start = time.perf_counter()
    train, test = split if split is not None else probe_split(labels, test_fraction, seed)
    y_np = _as_numpy(labels, np.int64)
    if np.unique(y_np[train]).size < 2 or test.size == 0:
        raise ValueError(
            f"A probe needs at least two classes and a non-empty test split, but got classes {np.unique(y_np).tolist()} "
            f"in {y_np.size} samples."
        )
    warm_start = warm_start or {}
    names = list(features)
    fits: list[tuple[np.ndarray, np.ndarray, int, dict[str, Any]]] = []
    seconds: list[float] = []
    if solver == "sklearn":
        for name in names:
            begin = time.perf_counter()
            fits.append(_fit_sklearn(
                _as_numpy(features[name], np.float32), y_np, train, test, C=C, max_iter=max_iter, tol=tol,
                warm_start=warm_start.get(name),
            ))
            seconds.append(time.perf_counter() - (begin if seconds else start))  # the first carries the split
    else:
        y_t = torch.as_tensor(y_np)
        for name in names:
            begin = time.perf_counter()
            x = features[name]
            x = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float32))
            fits.append(_fit_torch(x, y_t, train, test, C=C, max_iter=max_iter, tol=tol, warm_start=warm_start.get(name)))
            seconds.append(time.perf_counter() - (begin if seconds else start))
    results = {}
    for name, (pred_train, pred_test, n_iter, state), secs in zip(names, fits, seconds, strict=True):
        accuracy, macro_f1 = classification_scores(y_np[test], pred_test)
        results[name] = ProbeResult(
            accuracy=accuracy,
            macro_f1=macro_f1,
            train_accuracy=float((pred_train == y_np[train]).mean()),
            n_train=int(train.size),
            n_test=int(test.size),
            n_features=int(features[name].shape[1]),
            n_classes=int(np.unique(y_np[train]).size),
            n_iter=n_iter,
            seconds=secs,
            solver=solver,
            state=state,
        )
    return results


def check_probe_labels(labels: Any) -> torch.Tensor:
    """``labels`` as a detached ``(N,)`` integer tensor: one class id per sample, as a probe needs.

    Raises:
        ValueError: labels of another shape (dense masks) or floating-point labels.

    Example:
        >>> check_probe_labels([0, 2, 1])
        tensor([0, 2, 1])
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(
            f"Expected one integer label per sample (shape (N,)), but got {labels.dtype} labels of shape "
            f"{tuple(labels.shape)}; use `target_transform` to map a batch to class ids."
        )
    return labels.detach()


def auto_solver(n_values: int, inline_limit: int) -> str:
    """The solver ``"auto"`` picks on a CPU for cached features holding ``n_values`` numbers in all layers.

    The torch solver inline while the features are small (its few milliseconds cost less than a background
    scikit-learn fit takes from training's cores), scikit-learn (meant for a background thread) above that.

    Example:
        >>> auto_solver(2_000 * 64, inline_limit=1 << 20), auto_solver(5_000 * 512, inline_limit=1 << 20)
        ('torch', 'sklearn')
    """
    return "torch" if n_values <= inline_limit else "sklearn"


def best_layer(accuracies: Mapping[str, float], order: Sequence[str]) -> str:
    """The layer with the highest probe accuracy; of equal ones the shallowest (first in ``order``).

    Layers missing from ``order`` count as deepest.

    Example:
        >>> best_layer({"a": 0.9, "b": 0.95, "c": 0.95}, ["a", "b", "c"])
        'b'
    """
    rank = {name: i for i, name in enumerate(order)}
    return max(accuracies, key=lambda n: (accuracies[n], -rank.get(n, len(order))))


def probe_label_problem(labels: torch.Tensor | None, source: str = "validation") -> str | None:
    """Why the labels of example batches cannot serve a probe, or ``None`` when they can.

    Args:
        labels: the labels of an example batch as the data gives them (``None``: the batches carry none).
        source: where the batches come from, as the message names it.

    Example:
        >>> probe_label_problem(torch.tensor([0, 1])) is None
        True
        >>> probe_label_problem(torch.zeros(2, 8, 8)).split(";")[0]
        'the labels have shape (2, 8, 8) (dense masks, as in segmentation), and a probe needs one class id per sample'
    """
    if labels is None:
        return (
            f"it needs labels, but the {source} batches carry none. Pass `probe_dataloader` (a labelled DataLoader) "
            "or `target_transform` (batch -> labels)."
        )
    if labels.ndim > 1:
        return (
            f"the labels have shape {tuple(labels.shape)} (dense masks, as in segmentation), and a probe needs one "
            "class id per sample; the model's output is not per-pixel logits of the masks' size, so per-pixel probes "
            "were not chosen: pass `task='segmentation'` for per-pixel probes, or `target_transform` (batch -> one "
            "label per sample)."
        )
    return None
