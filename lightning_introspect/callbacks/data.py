"""Samples for introspection: splitting a batch into inputs and targets, and drawing a fixed sample set
or an example batch from a loader without touching the global random state."""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_introspect._torch.guards import fork_global_rng, private_generator

MIN_SAMPLES = 8  # a fixed sample set capped by bytes keeps at least this many items

_INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values", "input_ids", "data", "features")
_TARGET_KEYS = ("y", "target", "targets", "label", "labels", "mask", "masks")


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, targets)`` from a batch: a tensor, a ``(x, y, ...)`` tuple/list, or a dict.

    Dicts are searched for the usual keys (``x``/``input``/``image``/``pixel_values``/``input_ids``...,
    ``y``/``target``/``label``/``labels``...), so a Hugging Face style text batch gives its token ids.

    Example:
        >>> x, y = split_batch((torch.zeros(2, 3), torch.tensor([0, 1])))
        >>> x.shape, y.tolist()
        (torch.Size([2, 3]), [0, 1])
        >>> ids, labels = split_batch({"input_ids": torch.tensor([[5, 7, 0]]), "attention_mask": torch.tensor([[1, 1, 0]]),
        ...                            "labels": torch.tensor([2])})
        >>> ids.tolist(), labels.tolist()
        ([[5, 7, 0]], [2])
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
    loader: Any, n: int, *, seed: int = 0, per_class: int | None = None, max_bytes: int | None = None, min_samples: int = MIN_SAMPLES
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw a fixed ``(inputs, targets)`` sample set from a ``DataLoader`` without touching global RNG.

    ``max_bytes``: the ``n`` random inputs hold at most that many bytes (measured on the first input drawn),
    but never fewer than ``min_samples`` (the same first samples: a smaller set is a prefix of a larger);
    not applied with ``per_class``.

    Map-style datasets are indexed directly with a private generator (no loader iteration); iterable
    datasets are iterated and the first items taken. Either way under :func:`fork_global_rng`: a
    dataset whose ``__getitem__`` draws random augmentations from the global RNG leaves training's
    random stream as it was. The tensors are ordinary ones (not inference tensors) even when drawn
    inside ``trainer.validate()``, so a later fit can differentiate through them.
    """
    with fork_global_rng(), torch.inference_mode(False):
        x, y = _draw(loader, n, seed=seed, per_class=per_class, max_bytes=max_bytes, min_samples=min_samples)
        return x.detach().cpu().clone(), None if y is None else y.detach().cpu().clone()


# dataset (or loader) -> {(seed, max_bytes): (inputs, targets, n asked)}: the draws the callbacks of a fit share (see
# shared_samples); keyed by the dataset, which stays one object when a data module builds a new loader per call
_SHARED: weakref.WeakKeyDictionary[Any, dict[tuple[int, int | None], tuple[torch.Tensor, torch.Tensor | None, int]]] = (
    weakref.WeakKeyDictionary()
)


def forget_shared_samples() -> None:
    """Drop the shared draws: each fit draws its own (called at the ``setup`` of every fit), and a data set kept
    after its fit does not keep a sample set alive with it."""
    _SHARED.clear()


def shared_samples(
    loader: Any, n: int, *, seed: int, max_bytes: int | None, wanted: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`draw_samples` of ``n`` random items, as views of one draw shared by every caller with the same
    dataset (the loader's), seed and ``max_bytes``: several callbacks explaining the first images of the same permutation hold
    them once (in memory and in the checkpoint, which saves a shared storage once).

    The shared draw has as many items as the largest of ``n`` and ``wanted`` (what the other callbacks of the
    fit will ask for, so that the first draw serves them all); a later, larger request draws again. Each caller gets the
    prefix it would have drawn alone, so a set equals :func:`draw_samples`' for the same arguments.

    Example:
        >>> data = torch.utils.data.TensorDataset(torch.randn(20, 3), torch.arange(20))
        >>> loader = torch.utils.data.DataLoader(data)
        >>> small, _ = shared_samples(loader, 4, seed=0, max_bytes=None, wanted=[8])
        >>> large, _ = shared_samples(loader, 8, seed=0, max_bytes=None)
        >>> small.untyped_storage().data_ptr() == large.untyped_storage().data_ptr(), torch.equal(small, large[:4])
        (True, True)
    """
    key = (int(seed), max_bytes)
    if loader is None:
        raise ValueError("Expected a loader to draw the samples from, but got None.")
    source = getattr(loader, "dataset", None)
    try:
        draws = _SHARED.setdefault(loader if source is None else source, {})
    except TypeError:  # a dataset or loader that cannot be weakly referenced: no sharing
        return draw_samples(loader, n, seed=seed, max_bytes=max_bytes)
    entry = draws.get(key)
    if entry is None or entry[2] < n:
        size = max([n, *wanted])
        x, y = draw_samples(loader, size, seed=seed, max_bytes=max_bytes)
        entry = draws[key] = (x, y, size)
    x, y, _ = entry
    # what draw_samples(loader, n) would have kept: n, capped by the bytes of one input, at most what exists
    count = min(_capped(n, x[0], max_bytes, MIN_SAMPLES) if len(x) else 0, len(x))
    return x[:count], None if y is None else y[:count]


def _capped(n: int, first_input: Any, max_bytes: int | None, min_samples: int) -> int:
    """``n``, or fewer so that inputs like ``first_input`` (one sample) hold at most ``max_bytes``."""
    if max_bytes is None or not isinstance(first_input, torch.Tensor):
        return n
    per_sample = max(1, first_input.numel() * first_input.element_size())
    return min(n, max(min_samples, max_bytes // per_sample))


def example_batch(loader: Any, n: int, *, seed: int = 0) -> Any:
    """``n`` items of the loader's dataset collated as the loader would (an iterable dataset: its first
    batch), on CPU, with the global RNG untouched (see :func:`draw_samples`)."""
    with fork_global_rng(), torch.inference_mode(False):
        dataset = getattr(loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and len(dataset):
            collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
            order = torch.randperm(len(dataset), generator=private_generator(seed)).tolist()
            return collate([dataset[i] for i in order[:n]])
        return next(iter(loader))


def _draw(
    loader: Any, n: int, *, seed: int, per_class: int | None, max_bytes: int | None, min_samples: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    dataset = getattr(loader, "dataset", None)
    collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
    if dataset is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        order = torch.randperm(len(dataset), generator=private_generator(seed)).tolist()
        if order and max_bytes is not None and per_class is None:  # `per_class` sets the size itself
            n = _capped(n, split_batch(collate([dataset[order[0]]]))[0][0], max_bytes, min_samples)
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
        return split_batch(collate(items))
    chunks, seen = [], 0
    for batch in loader:
        chunks.append(batch)
        if max_bytes is not None and seen == 0:
            n = _capped(n, split_batch(batch)[0][0], max_bytes, min_samples)
        seen += split_batch(batch)[0].shape[0]
        if seen >= n:
            break
    if not chunks:
        raise RuntimeError("The data loader yielded no batches to draw samples from.")
    xs = [split_batch(b) for b in chunks]
    x = torch.cat([a for a, _ in xs])[:n]
    ys = [b for _, b in xs if b is not None]
    y = torch.cat(ys)[:n] if len(ys) == len(xs) else None
    return x, y
