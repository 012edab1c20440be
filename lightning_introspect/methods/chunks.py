"""Extra passes in chunks sized to a memory budget, so large inputs do not multiply a fit's peak memory.

An explanation of ``N`` samples holds every activation of the ``N``-sample forward pass until its
backward pass is done, and a perturbation test of ``N`` images holds every perturbed copy at once: at
3x384x384 that is hundreds of megabytes for a few dozen samples. The passes of the sanity checks and of the
perturbation test therefore run ``rows`` samples at a time, ``rows`` chosen so that one chunk's working
memory stays within a budget (:data:`DEFAULT_MEMORY_BUDGET` bytes, on the CPU or the accelerator alike):

* :func:`activation_bytes` measures what one sample's forward pass produces (every module's output once,
  plus the input), on one sample, without gradients;
* :func:`explanation_rows` / :func:`forward_rows`: how many samples fit in the budget for a gradient
  pass (:data:`GRADIENT_FACTOR` times the activations: kept for the backward pass, their gradients, a second
  pass for guided backpropagation) and for a forward pass without gradients;
* :func:`rows_per_chunk` and :func:`chunk_slices`: the arithmetic;
* :func:`explain_in_chunks`: an :class:`~lightning_introspect.methods.explainers.Explainer` call over
  consecutive chunks, with the target of each chunk cut to its rows.

The maps are per sample: a chunk's maps are those samples' maps, so the chunked result is the unchunked
one wherever the kernels give a row the same numbers whatever the batch size (float64 convolutions and
elementwise work always do; some float32 CPU convolution kernels differ in the last bits between batch
sizes). Small inputs fit in one chunk and run exactly as before.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> activation_bytes(net, torch.zeros(1, 1, 2, 2))  # input 16 B (Flatten's output is a view of it), logits 12 B
    28
    >>> rows_per_chunk(100, budget=1000), [(s.start, s.stop) for s in chunk_slices(5, 2)]
    (10, [(0, 2), (2, 4), (4, 5)])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_introspect._torch.guards import introspection_mode
from lightning_introspect._torch.hooks import hooks
from lightning_introspect._torch.memory import release_free_memory
from lightning_introspect.methods.explainers import Explainer
from lightning_introspect.methods.targets import RegionTarget

DEFAULT_MEMORY_BUDGET = 96 * 2**20
"""Bytes of working memory one piece of introspection may hold: a chunk of an extra pass, a pass of map
similarities, a callback's fixed sample set (unless ``num_samples`` is given). A training step of a small CNN on a
batch of 16 images of 3x384x384 holds about 350 MB; with 96 MB a chunk stays well inside it
(benchmarks/bench_memory.py at 384 px: the default set's peak about 1.4x a fit without; 1.5x with 128 MB, at the
same speed)."""

GRADIENT_FACTOR = 3
"""A gradient pass holds about this many times one forward pass's activations (measured: 2.6x for the four
default sanity-check methods in one call on a plain CNN)."""


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    logits = getattr(value, "logits", None)  # model output objects
    return [logits] if isinstance(logits, torch.Tensor) else []


def activation_bytes(model: nn.Module, example: torch.Tensor) -> int:
    """Bytes one forward pass of ``example`` produces: the input and every leaf module's output tensors,
    tensors sharing a storage counted once (a view such as ``Flatten``'s output is free).

    One forward pass in eval mode, without gradients, global RNG forked, hooks removed afterwards. Pass
    one sample (``x[:1]``) for the per-sample cost. Outputs of functional operations inside a module's
    ``forward`` (``F.relu``, residual additions) are not seen; :data:`GRADIENT_FACTOR` leaves room for them.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 3))
        >>> activation_bytes(net, torch.zeros(1, 1, 8, 8))  # input 256, conv 512, ReLU 512, logits 12
        1292
    """
    seen: dict[tuple[str, int], int] = {}
    alive: list[torch.Tensor] = []  # held until the end: a freed output's address could be handed out again

    def count(tensor: torch.Tensor) -> None:  # views of one storage (Flatten, reshapes) counted once
        alive.append(tensor)
        key = (str(tensor.device), tensor.untyped_storage().data_ptr())
        seen[key] = max(seen.get(key, 0), tensor.numel() * tensor.element_size())

    def record(_module: nn.Module, _args: Any, output: Any) -> None:
        for tensor in _tensors(output):
            count(tensor)

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    with introspection_mode(model, grad=False), hooks() as handles:
        for module in leaves:
            handles.append(module.register_forward_hook(record))
        count(example)
        model(example)
    return int(sum(seen.values()))


def rows_per_chunk(row_bytes: int, budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """How many rows of ``row_bytes`` each fit in ``budget`` bytes (at least one).

    Example:
        >>> rows_per_chunk(3 * 2**20, budget=2**24), rows_per_chunk(2**30, budget=2**24)
        (5, 1)
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"Expected `memory_budget` to be a positive int (bytes), but got {budget!r}.")
    return max(1, budget // max(1, int(row_bytes)))


def chunk_slices(n: int, rows: int) -> list[slice]:
    """Consecutive slices of at most ``rows`` of ``range(n)`` (one empty slice when ``n`` is 0)."""
    rows = max(1, int(rows))
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)] or [slice(0, 0)]


def explanation_rows(model: nn.Module, x: torch.Tensor, budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Samples of ``x`` explained together within ``budget`` bytes: :data:`GRADIENT_FACTOR` times one
    sample's :func:`activation_bytes` per sample."""
    return rows_per_chunk(GRADIENT_FACTOR * activation_bytes(model, x[:1]), budget)


def forward_rows(model: nn.Module, x: torch.Tensor, budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Samples of ``x`` in one forward pass without gradients within ``budget`` bytes (one sample's
    :func:`activation_bytes` per sample: more than such a pass keeps alive at once)."""
    return rows_per_chunk(activation_bytes(model, x[:1]), budget)


def _rows_of(value: Any, n: int, rows: slice) -> tuple[bool, Any]:
    """``(True, value cut to rows)`` for a per-sample value of ``n`` rows, ``(True, value)`` for one that
    holds for every sample, ``(False, value)`` when it cannot be cut."""
    if isinstance(value, (str, int)):
        return True, value
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            return True, value
        if value.shape[0] == n:
            return True, value[rows]
        return value.ndim >= 2 and value.shape[0] == 1, value  # a mask broadcast over the samples
    if isinstance(value, Sequence) and len(value) == n:
        return True, list(value)[rows]
    return False, value


def chunk_target(target: Any, n: int, rows: slice) -> tuple[bool, Any]:
    """The target of the samples ``rows`` of a batch of ``n``: ``(True, target)``, or ``(False, target)``
    when it cannot be cut (a callable score of the whole output; then the batch is explained in one piece).

    Example:
        >>> chunk_target(torch.tensor([3, 1, 2]), 3, slice(1, 3))
        (True, tensor([1, 2]))
        >>> chunk_target("pred", 3, slice(0, 1)), chunk_target(len, 3, slice(0, 1))[0]
        ((True, 'pred'), False)
    """
    if isinstance(target, RegionTarget):
        ok_ids, ids = _rows_of(target.class_id, n, rows)
        mask = target.mask
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:  # one mask for every sample
            ok_mask = True
        else:
            ok_mask, mask = _rows_of(mask, n, rows)
        return ok_ids and ok_mask, RegionTarget(class_id=ids, mask=mask)
    if callable(target):
        return False, target
    return _rows_of(target, n, rows)


def explain_in_chunks(explainer: Explainer, model: nn.Module, x: torch.Tensor, target: Any, layer: str | None, *, rows: int) -> dict[str, torch.Tensor]:
    """``explainer(model, x, target, layer)`` over consecutive chunks of at most ``rows`` samples, the maps
    concatenated in sample order: ``{name: (N, ...)}``. One call when ``x`` fits in one chunk or the target
    cannot be cut (:func:`chunk_target`).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
        >>> x, explain = torch.randn(5, 1, 2, 2), Explainer(["saliency"])
        >>> whole = explain(net, x, torch.tensor([0, 1, 2, 0, 1]), None)["saliency"]
        >>> torch.equal(explain_in_chunks(explain, net, x, torch.tensor([0, 1, 2, 0, 1]), None, rows=2)["saliency"], whole)
        True
    """
    n = int(x.shape[0])
    if rows >= n:
        return explainer(model, x, target, layer)
    slices = chunk_slices(n, rows)
    cuts = [chunk_target(target, n, part) for part in slices]
    if not all(ok for ok, _ in cuts):
        return explainer(model, x, target, layer)
    parts = []
    for part, (_, cut) in zip(slices, cuts):
        parts.append(explainer(model, x[part], cut, layer))
        release_free_memory()  # a chunk's activations and gradients are free now: large, and sized unlike the next
    return {name: torch.cat([p[name] for p in parts]) for name in explainer.names}


__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "GRADIENT_FACTOR",
    "activation_bytes",
    "chunk_slices",
    "chunk_target",
    "explain_in_chunks",
    "explanation_rows",
    "forward_rows",
    "rows_per_chunk",
]
