"""Model parameter randomisation (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

An explanation that does not change when the network is destroyed cannot be explaining the network.
:func:`randomization_curves` measures that on a deep copy of the model (the trained model is never
touched), in one of two modes:

* ``"cascading"`` (:func:`cascading_randomization`): the model's blocks are re-initialised one after the
  other, cumulatively; every attribution map is recomputed after each step and compared with the trained
  model's map (:mod:`~lightning_introspect.methods.similarity`).
* ``"independent"`` (:func:`independent_randomization`): one block at a time, the others kept trained
  (each block is restored before the next one is randomised).

``order`` is the sequence (:data:`ORDERS`): ``"top_down"`` (default; Adebayo et al. 2018) goes from the
output side to the input side in reverse execution order, ``"bottom_up"`` from the input side to the
output side (recommended by Hedström et al. 2023, "Sanity Checks Revisited": top-down randomisation leaves
the lower layers and the forward signal they carry intact, so the maps after the first steps still show
what those untouched layers compute; bottom-up cuts that signal first). The fully randomised end point is
the same model in both orders (the per-layer seeds do not depend on the order).

Blocks and re-initialisation
----------------------------
A *block* is a parametrised layer (anything with parameters of its own: conv, linear, embedding, ...)
together with the normalisation layers that run after it and before the next parametrised layer.
Blocks are found by running the model once (:func:`~lightning_introspect._torch.hooks.record_execution_order`),
so the order is the order of execution, not of registration. Naming a container (``"layer4.1"``)
makes all its parametrised descendants one block. A layer is re-initialised by its own
``reset_parameters()`` while the global RNG is forked and seeded with a private per-layer seed
(:func:`layer_seed`, derived from ``seed`` and the layer's name: every layer gets its own stream and
the global RNG is untouched); layers without ``reset_parameters`` get each parameter redrawn from a
normal distribution with the trained tensor's mean and standard deviation, from a private generator.
Because the seed depends on the name, the top block is re-initialised identically by both modes.

Normalisation layers follow ``bn_mode``:

* ``"affine"`` (default, as in the paper, which re-initialises trainable variables): the learned scale
  and shift go back to their initial values (1 and 0); running statistics are kept.
* ``"stats"``: running mean / variance reset to 0 / 1 (what Quantus does); scale and shift kept.
* ``"both"``: both of the above, the layer as freshly constructed.
* ``"keep"``: normalisation layers are left trained.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> grad = lambda m, x, t, layer=None: torch.autograd.grad(
    ...     m(x.requires_grad_()).gather(1, t.view(-1, 1)).sum(), x)[0]
    >>> res = randomization_curves(net, torch.randn(3, 1, 2, 2), methods={"grad": grad}, mode="independent")
    >>> res.mode, res.layers, sorted(res.curves["grad"])
    ('independent', ['3', '1'], ['spearman', 'spearman_abs'])
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import torch
from torch import nn

from lightning_introspect._torch.guards import private_generator
from lightning_introspect._torch.hooks import record_execution_order
from lightning_introspect._torch.layers import resolve_layers
from lightning_introspect.methods.chunks import (
    DEFAULT_MEMORY_BUDGET,
    chunk_slices,
    explain_in_chunks,
    explanation_rows,
)
from lightning_introspect.methods.explainers import (
    DEFAULT_METHODS,
    Explainer,
    MethodSpec,
    as_explainer,
    model_input,
    work_mode,
)
from lightning_introspect.methods.similarity import METRICS, PendingSimilarities, check_metrics, mean_and_std
from lightning_introspect.methods.targets import RegionTarget, model_logits, target_indices

RANDOMIZATION_MODES: tuple[str, ...] = ("cascading", "independent")
ORDERS: tuple[str, ...] = ("top_down", "bottom_up")
BN_MODES: tuple[str, ...] = ("affine", "stats", "both", "keep")
ORIGINAL = "original"
"""The key of the trained model's maps in :attr:`RandomizationCurves.maps`."""


# ---------------------------------------------------------------------------------------- blocks
#: the name of the model itself in a block's modules: its own parameters (not its children's)
ROOT = ""


@dataclass(frozen=True)
class RandomizationBlock:
    """One randomisation step: ``name`` (the block's main layer) and the module names it re-initialises."""

    name: str
    modules: tuple[str, ...]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm))


def _has_own_state(module: nn.Module, bn_mode: str) -> bool:
    if _is_norm(module):
        if bn_mode == "keep":
            return False
        affine = any(True for _ in module.parameters(recurse=False))
        stats = isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
        return (bn_mode in ("affine", "both") and affine) or (bn_mode in ("stats", "both") and stats)
    return any(True for _ in module.parameters(recurse=False))


def check_bn_mode(bn_mode: str) -> None:
    """Raise ``ValueError`` unless ``bn_mode`` is one of :data:`BN_MODES`."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"Expected `bn_mode` to be one of {', '.join(repr(m) for m in BN_MODES)}, but got {bn_mode!r}.")


def check_order(order: str) -> None:
    """Raise ``ValueError`` unless ``order`` is one of :data:`ORDERS`."""
    if order not in ORDERS:
        raise ValueError(f"Expected `order` to be one of {', '.join(repr(o) for o in ORDERS)}, but got {order!r}.")


def randomization_blocks(
    model: nn.Module,
    example_input: torch.Tensor,
    layers: str | int | Sequence[str] = "auto",
    *,
    bn_mode: str = "affine",
) -> list[RandomizationBlock]:
    """The blocks to randomise, output side first (reverse execution order).

    Args:
        model: the model (only run once in eval mode, not changed).
        example_input: a small batch the model accepts.
        layers: ``"auto"`` (every parametrised layer with its following normalisation layers, one block
            each), an int ``k`` (the ``k`` blocks nearest the output), or names / glob patterns (each a
            block; a container means all its parametrised descendants).
        bn_mode: how normalisation layers are treated (``"keep"`` leaves them out).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
        >>> [(b.name, b.modules) for b in randomization_blocks(net, torch.zeros(1, 1, 4, 4))]
        [('4', ('4',)), ('0', ('0', '1'))]
    """
    check_bn_mode(bn_mode)
    modules = dict(model.named_modules())
    order = record_execution_order(model, example_input)
    position = {name: i for i, name in enumerate(order)}
    executed = [n for n in order if _has_own_state(modules[n], bn_mode)]
    ran = set(order)

    def with_unrun(members: list[str]) -> tuple[str, ...]:
        # A submodule whose parameters its parent reads without calling it (nn.MultiheadAttention's out_proj)
        # never runs: it belongs to the block of that parent, or the execution order would leave it trained.
        out = list(members)
        for name in members:
            prefix = name + "."
            out += [d for d in modules if d.startswith(prefix) and d not in ran and d not in out and _has_own_state(modules[d], bn_mode)]
        return tuple(out)

    if isinstance(layers, bool) or not (isinstance(layers, (str, int)) or isinstance(layers, Sequence)):
        raise ValueError(f"Expected `layers` to be 'auto', a positive int or a list of layer names, but got {layers!r}.")
    if isinstance(layers, int) or layers == "auto":
        blocks: list[RandomizationBlock] = []
        current: list[str] = []
        for name in executed:
            if _is_norm(modules[name]) and current:
                current.append(name)
                continue
            if current:
                blocks.append(RandomizationBlock(current[0], with_unrun(current)))
            current = [name]
        if current:
            blocks.append(RandomizationBlock(current[0], with_unrun(current)))
        if not blocks:
            raise ValueError("The model has no parametrised layer that runs in its forward pass; nothing to randomise.")
        if any(True for _ in model.parameters(recurse=False)):
            # parameters held by the model itself (a ViT's bare class token / position embedding) are read next to
            # the input: they go with the input-side block, or the randomised model would keep them trained
            blocks[0] = RandomizationBlock(blocks[0].name, (*blocks[0].modules, ROOT))
        blocks.reverse()
        if isinstance(layers, int):
            if layers < 1:
                raise ValueError(f"Expected `layers` to be 'auto', a positive int or a list of layer names, but got {layers!r}.")
            blocks = blocks[:layers]
        return blocks

    named = resolve_layers(model, layers, argument="layers")
    blocks = []
    for name in named:
        prefix = name + "."
        members = [n for n in executed if n == name or n.startswith(prefix)]
        if not members:
            raise ValueError(
                f"Expected every entry of `layers` to hold parameters that run in the forward pass (bn_mode={bn_mode!r}), "
                f"but {name!r} has none."
            )
        blocks.append(RandomizationBlock(name, with_unrun(members)))
    blocks.sort(key=lambda b: max(position[m] for m in b.modules), reverse=True)
    return blocks


# ------------------------------------------------------------------------------ re-initialisation
def layer_seed(seed: int, name: str, repeat: int = 0) -> int:
    """The private seed of one layer: a stable hash of ``(seed, name, repeat)`` (differs per layer and
    repeat, not per mode).

    Example:
        >>> layer_seed(0, "features.0") == layer_seed(0, "features.0") != layer_seed(0, "features.4")
        True
        >>> layer_seed(0, "features.0", repeat=1) != layer_seed(0, "features.0")
        True
    """
    key = f"{int(seed)}/{name}" if repeat == 0 else f"{int(seed)}/{name}/{int(repeat)}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def _seeded_global_rng(seed: int, module: nn.Module) -> Iterator[None]:
    """Fork the global RNG of CPU and the module's CUDA devices and seed them privately."""
    cuda = sorted({p.device.index or 0 for p in module.parameters(recurse=False) if p.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


@torch.no_grad()
def reinitialize_(module: nn.Module, *, seed: int, bn_mode: str = "affine") -> None:
    """Re-initialise the parameters of ``module`` itself (not its children) in place.

    Normalisation layers follow ``bn_mode`` (see the module docstring); other layers use their own
    ``reset_parameters()`` under a privately seeded, forked global RNG, or, without one, a normal
    draw with each parameter's trained mean and standard deviation from a private generator.

    Example:
        >>> a, b = nn.Linear(3, 3), nn.Linear(3, 3)
        >>> reinitialize_(a, seed=7); reinitialize_(b, seed=7)
        >>> torch.equal(a.weight, b.weight)
        True
    """
    reset_parameters = getattr(module, "reset_parameters", None)  # the layer's own initialisation, if it has one
    if _is_norm(module):
        if bn_mode in ("affine", "both"):
            if isinstance(module, nn.modules.batchnorm._NormBase):
                if module.weight is not None:
                    module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
            elif any(True for _ in module.parameters(recurse=False)) and callable(reset_parameters):
                reset_parameters()
        if bn_mode in ("stats", "both") and isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            module.reset_running_stats()
        return
    if callable(reset_parameters):
        with _seeded_global_rng(seed, module):
            reset_parameters()
        return
    _redraw_own_parameters(module, seed=seed)


@torch.no_grad()
def _redraw_own_parameters(module: nn.Module, *, seed: int) -> None:
    """Each parameter of ``module`` itself drawn again from a normal with its trained mean and standard
    deviation (a private generator per parameter)."""
    for i, param in enumerate(module.parameters(recurse=False)):
        gen = private_generator(seed + i, device=param.device)
        std = float(param.float().std()) if param.numel() > 1 else 0.0
        mean = float(param.float().mean())
        fresh = torch.randn(param.shape, generator=gen, device=param.device, dtype=torch.float32) * std + mean
        param.copy_(fresh.to(param.dtype))


def randomize_block(modules: Mapping[str, nn.Module], block: RandomizationBlock, *, seed: int, bn_mode: str, repeat: int) -> None:
    """Re-initialise every module of ``block`` in place (:func:`reinitialize_`, each with its own
    :func:`layer_seed` of ``(seed, name, repeat)``); the model's own parameters (:data:`ROOT`) are drawn
    again from their trained mean and standard deviation (a model's ``reset_parameters`` may re-initialise
    every layer, so it is not called).

    Args:
        modules: ``dict(model.named_modules())`` of the model being randomised.
        block: the block to re-initialise.
        seed: base of the per-layer seeds.
        bn_mode: how normalisation layers are treated (:data:`BN_MODES`).
        repeat: the repeat index (another draw per repeat).
    """
    for name in block.modules:
        if name == ROOT:
            _redraw_own_parameters(modules[name], seed=layer_seed(seed, name, repeat))
        else:
            reinitialize_(modules[name], seed=layer_seed(seed, name, repeat), bn_mode=bn_mode)


# ---------------------------------------------------------------------------------------- curves
@dataclass
class RandomizationCurves:
    """What one randomisation mode measured.

    Attributes:
        mode: ``"cascading"`` or ``"independent"``.
        layers: the blocks in the order they were randomised (output side first for ``"top_down"``,
            input side first for ``"bottom_up"``).
        curves: ``{method: {metric: {layer: mean similarity to the original map}}}``; for cascading,
            the value at a layer is with that block and every block randomised before it.
        curves_std: the same shape, standard deviation over the samples.
        agreement: ``{layer: fraction of samples whose predicted class is unchanged}`` (shows that
            the randomisation did change the model).
        maps: ``{method: {"original" | layer: maps}}`` for the first ``keep_maps`` samples (not
            serialised).
        order: ``"top_down"`` or ``"bottom_up"``.
        samples: ``{method: {metric: {layer: (repeats, N) similarities}}}``, every sample's value (for
            intervals; not serialised).
    """

    mode: str
    layers: list[str]
    curves: dict[str, dict[str, dict[str, float]]]
    curves_std: dict[str, dict[str, dict[str, float]]]
    agreement: dict[str, float]
    maps: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    order: str = "top_down"
    samples: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only (the maps left out)."""
        return {
            "mode": self.mode,
            "layers": list(self.layers),
            "curves": copy.deepcopy(self.curves),
            "curves_std": copy.deepcopy(self.curves_std),
            "agreement": dict(self.agreement),
            "order": self.order,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RandomizationCurves:
        """Rebuild from :meth:`to_dict` (without the maps and per-sample values)."""
        return cls(
            mode=str(data["mode"]),
            layers=list(data["layers"]),
            curves=copy.deepcopy(dict(data["curves"])),
            curves_std=copy.deepcopy(dict(data.get("curves_std", {}))),
            agreement=dict(data.get("agreement", {})),
            order=str(data.get("order", "top_down")),
        )


def _predictions(model: nn.Module, inputs: torch.Tensor, rows: int) -> torch.Tensor:
    """The predicted class of every sample, ``rows`` samples per forward pass."""
    preds = []
    with torch.no_grad():
        for part in chunk_slices(int(inputs.shape[0]), rows):
            out = model_logits(model(inputs[part])).detach()
            preds.append(out.argmax(1) if out.ndim >= 2 else out)
    return torch.cat(preds)


def _are_blocks(layers: object) -> TypeGuard[Sequence[RandomizationBlock]]:
    return isinstance(layers, Sequence) and bool(layers) and all(isinstance(b, RandomizationBlock) for b in layers)


def fixed_target(model: nn.Module, x: torch.Tensor, target: Any) -> Any:
    """The target as class ids of the trained model, so that a randomised copy explains the same classes
    (``"pred"`` stays the trained model's prediction; a ``RegionTarget`` gets its class ids filled in).

    Args:
        model: the trained model (one forward pass, no gradient).
        x: its inputs.
        target: any target form of :mod:`~lightning_introspect.methods.targets`.

    Returns:
        Class ids ``(N,)``, a ``RegionTarget`` with class ids, or ``target`` itself (a callable).
    """
    with torch.no_grad():
        output = model_logits(model(x))
    ids = target_indices(output, target)
    if isinstance(target, RegionTarget) and ids is not None:  # always has ids: the region's class
        return RegionTarget(class_id=ids, mask=target.mask)
    return ids if ids is not None else target


def randomization_curves(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Any = "pred",
    methods: MethodSpec | Explainer = DEFAULT_METHODS,
    *,
    mode: str = "cascading",
    order: str = "top_down",
    layers: str | int | Sequence[str] | Sequence[RandomizationBlock] = "auto",
    seed: int = 0,
    bn_mode: str = "affine",
    layer: str | None = "auto",
    metrics: Sequence[str] = METRICS,
    keep_maps: int = 1,
    repeats: int = 1,
    progress: Callable[[str], None] | None = None,
    copy_model: bool = True,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> RandomizationCurves:
    """Randomise the model block by block (``mode``) and measure how similar every method's maps stay.

    After each step every method's maps are recomputed and compared with the trained model's maps
    (the same target classes: ``target="pred"`` is fixed to the trained model's predictions). The samples
    are explained in chunks sized to ``memory_budget`` (:mod:`~lightning_introspect.methods.chunks`).

    Args:
        model: the trained model; never modified unless ``copy_model=False``.
        inputs: a batch ``(N, ...)``; a few samples suffice.
        target: what to explain (see :mod:`lightning_introspect.methods.targets`); default each sample's
            predicted class.
        methods: names from ``attribution.METHODS``, callables ``fn(model, inputs, target, layer=None)``,
            or a dict ``{name: name or callable}`` (:mod:`~lightning_introspect.methods.explainers`).
        mode: ``"cascading"`` (cumulative) or ``"independent"`` (one block at a time, the others trained).
        order: ``"top_down"`` (output side first) or ``"bottom_up"`` (input side first); see the module
            docstring. ``layers`` chooses the blocks, ``order`` only their sequence.
        layers: which blocks (see :func:`randomization_blocks`; an int ``k``: the ``k`` blocks nearest the
            output, in either order), or the blocks themselves (output side first, as
            :func:`randomization_blocks` returns them).
        seed: base of the private per-layer seeds (:func:`layer_seed`).
        bn_mode: ``"affine"`` | ``"stats"`` | ``"both"`` | ``"keep"`` (module docstring).
        layer: the layer of layer methods (Grad-CAM); ``"auto"`` asks ``attribution.auto_layer``.
        metrics: a subset of :data:`~lightning_introspect.methods.similarity.METRICS`.
        keep_maps: keep the maps of this many samples (for figures; from the first repeat).
        repeats: run the randomisation this many times with different re-initialisations (per-layer
            seeds from ``(seed, layer, repeat)``) and average: one random draw of a small top layer
            can by chance resemble the trained one (Grad-CAM on a 10-class head varies by about
            0.15 between draws); averaging makes the verdicts stable. Cost: ``repeats`` times.
        progress: called with one line of text per step.
        copy_model: randomise a deep copy (default). ``False`` randomises ``model`` itself, for a caller
            that already works on a copy: independent mode restores every block it touches, cascading
            leaves them randomised.
        memory_budget: bytes one chunk of samples may hold while it is explained
            (:func:`~lightning_introspect.methods.chunks.explanation_rows`); small inputs fit in one chunk.

    Returns:
        The :class:`RandomizationCurves`.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> grad = lambda m, x, t, layer=None: torch.autograd.grad(
        ...     m(x.requires_grad_()).gather(1, t.view(-1, 1)).sum(), x)[0]
        >>> res = randomization_curves(net, torch.randn(3, 1, 2, 2), methods={"grad": grad}, metrics=["spearman"])
        >>> res.layers, list(res.curves["grad"]["spearman"])
        (['3', '1'], ['3', '1'])
    """
    if mode not in RANDOMIZATION_MODES:
        raise ValueError(f"Expected `mode` to be one of {', '.join(repr(m) for m in RANDOMIZATION_MODES)}, but got {mode!r}.")
    check_metrics(metrics)
    check_bn_mode(bn_mode)
    check_order(order)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"Expected `repeats` to be a positive int, but got {repeats!r}.")
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2:
        raise ValueError(f"Expected `inputs` to be a batch tensor (N, ...), but got {getattr(inputs, 'shape', type(inputs).__name__)}.")
    explainer = as_explainer(methods)
    work = copy.deepcopy(model) if copy_model else model
    with work_mode(work):
        x = model_input(work, inputs)
        fixed = fixed_target(work, x, target)
        layer = explainer.resolve_layer(work, x[:1], layer)
        blocks: list[RandomizationBlock]
        if _are_blocks(layers):
            blocks = list(layers)
        else:  # the str / int / Sequence[str] forms (a TypeGuard does not narrow the other branch)
            blocks = randomization_blocks(work, x[:1], layers, bn_mode=bn_mode)  # type: ignore[arg-type]
        if order == "bottom_up":
            blocks.reverse()
        rows = explanation_rows(work, x, memory_budget)  # the trained model's activations: re-initialising keeps every shape
        original = explain_in_chunks(explainer, work, x, fixed, layer, rows=rows)
        original_pred = _predictions(work, x, rows)
        modules = dict(work.named_modules())
        # Cascading repeats start again from the trained weights; independent steps restore their own block.
        trained = {k: v.detach().clone() for k, v in work.state_dict().items()} if mode == "cascading" and repeats > 1 else None
        kept = {m: {ORIGINAL: original[m][:keep_maps].clone()} for m in explainer.names} if keep_maps else {}
        unchanged: dict[str, list[float]] = {}
        pending = PendingSimilarities(metrics)  # measured in a few batched passes, not one per method and step
        for repeat in range(repeats):
            if repeat and trained is not None:
                work.load_state_dict(trained)
            for step, block in enumerate(blocks, 1):
                if progress is not None:
                    again = f" (repeat {repeat + 1}/{repeats})" if repeats > 1 else ""
                    progress(f"{mode} randomisation {step}/{len(blocks)}: {block.name}{again}")
                saved = {n: copy.deepcopy(modules[n].state_dict()) for n in block.modules} if mode == "independent" else {}
                randomize_block(modules, block, seed=seed, bn_mode=bn_mode, repeat=repeat)
                maps = explain_in_chunks(explainer, work, x, fixed, layer, rows=rows)
                unchanged.setdefault(block.name, []).append(float((_predictions(work, x, rows) == original_pred).float().mean()))
                for name in explainer.names:
                    pending.add((name, block.name), original[name], maps[name])
                    if keep_maps and repeat == 0:
                        kept[name][block.name] = maps[name][:keep_maps].clone()
                for n, state in saved.items():
                    modules[n].load_state_dict(state)
    values: dict[str, dict[str, dict[str, list[torch.Tensor]]]] = {m: {} for m in explainer.names}
    for (name, block_name), sims in pending.results():
        for metric, sim in sims.items():
            values[name].setdefault(metric, {}).setdefault(block_name, []).append(sim)
    curves: dict[str, dict[str, dict[str, float]]] = {m: {} for m in explainer.names}
    stds: dict[str, dict[str, dict[str, float]]] = {m: {} for m in explainer.names}
    samples: dict[str, dict[str, dict[str, torch.Tensor]]] = {m: {} for m in explainer.names}
    for name, per_metric in values.items():
        for metric, per_block in per_metric.items():
            for block_name, per_repeat in per_block.items():
                means, spread = mean_and_std({metric: torch.cat(per_repeat)})
                curves[name].setdefault(metric, {})[block_name] = means[metric]
                stds[name].setdefault(metric, {})[block_name] = spread[metric]
                samples[name].setdefault(metric, {})[block_name] = torch.stack(per_repeat)
    agreement = {k: sum(v) / len(v) for k, v in unchanged.items()}
    return RandomizationCurves(mode, [b.name for b in blocks], curves, stds, agreement, kept, order, samples)


def cascading_randomization(
    model: nn.Module, inputs: torch.Tensor, target: Any = "pred", methods: MethodSpec = DEFAULT_METHODS, **options: Any
) -> RandomizationCurves:
    """Re-initialise blocks one after the other, cumulatively (``order="top_down"``: output side first, or
    ``"bottom_up"``), on a deep copy: :func:`randomization_curves` with ``mode="cascading"`` (``options`` are
    its keyword arguments).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> grad = lambda m, x, t, layer=None: torch.autograd.grad(
        ...     m(x.requires_grad_()).gather(1, t.view(-1, 1)).sum(), x)[0]
        >>> cascading_randomization(net, torch.randn(3, 1, 2, 2), methods={"grad": grad}).mode
        'cascading'
    """
    return randomization_curves(model, inputs, target, methods, mode="cascading", **options)


def independent_randomization(
    model: nn.Module, inputs: torch.Tensor, target: Any = "pred", methods: MethodSpec = DEFAULT_METHODS, **options: Any
) -> RandomizationCurves:
    """Re-initialise one block at a time (the others trained), on a deep copy: :func:`randomization_curves`
    with ``mode="independent"`` (``options`` are its keyword arguments).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> grad = lambda m, x, t, layer=None: torch.autograd.grad(
        ...     m(x.requires_grad_()).gather(1, t.view(-1, 1)).sum(), x)[0]
        >>> independent_randomization(net, torch.randn(3, 1, 2, 2), methods={"grad": grad}).mode
        'independent'
    """
    return randomization_curves(model, inputs, target, methods, mode="independent", **options)


__all__ = [
    "BN_MODES",
    "ORDERS",
    "ORIGINAL",
    "ROOT",
    "RANDOMIZATION_MODES",
    "RandomizationBlock",
    "RandomizationCurves",
    "cascading_randomization",
    "check_bn_mode",
    "check_order",
    "fixed_target",
    "independent_randomization",
    "layer_seed",
    "randomization_blocks",
    "randomization_curves",
    "randomize_block",
    "reinitialize_",
]
