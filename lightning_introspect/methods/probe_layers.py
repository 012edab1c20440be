"""Which layers a linear probe reads (``layers="auto"``, or the names given, each output probed once) and how
their outputs are read (conv maps, or tokens ``(N, T, D)``: :func:`token_layers`).

Pure torch (no Lightning): the choices are made from traced forward passes of an example input
(:func:`~lightning_introspect._torch.layers.trace_module_calls`): the order in which modules run, how
often each runs, their output shapes, and which modules give the same output tensor.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(
    ...     torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ... )
    >>> auto_probe_layers(net, torch.randn(2, 4))
    ['1', '3']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_introspect._torch.guards import introspection_mode
from lightning_introspect._torch.hooks import hooks
from lightning_introspect._torch.layers import (
    ModuleCalls,
    refuse_reused_modules,
    resolve_layers,
    trace_module_calls,
)
from lightning_introspect.methods.probes.tokens import (
    TokenPooling,
    is_attention,
    module_layout,
    resolve_token_pooling,
)
from lightning_introspect.methods.task import resolve_task

#: module types whose output marks the end of a block (what ``"auto"`` looks for)
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardtanh, nn.Softplus,
)
#: the most block outputs ``"auto"`` keeps (the penultimate layer comes on top)
MAX_AUTO_LAYERS = 6


def auto_probe_layers(
    model: nn.Module, example_input: Any, max_layers: int = MAX_AUTO_LAYERS, *, calls: ModuleCalls | None = None
) -> list[str]:
    """The layers ``layers="auto"`` stands for: the output of each block, in execution order, evenly thinned
    to ``max_layers``, plus the penultimate representation (the output of the leaf before the last).

    A block's output is found through its activation modules: an activation that runs once per forward is
    probed itself; one module object applied several times (a ResNet block's single ``self.relu``) is
    replaced by the innermost module around it that runs once (the block), whose output is the one that
    name suggests. In a transformer (a model with attention layers) the blocks are found as
    :func:`transformer_blocks` finds them, after the embedding that feeds the first of them. Modules that give
    the same values (a block and its last norm, a wrapper ``Sequential`` and its last child) are probed once,
    under the outer name. The output layer is left out. Falls back to the top-level children that run once
    (without the last; inside a wrapper that holds the whole network, its children) when fewer than two
    blocks are found. Every chosen module runs exactly once per
    forward pass.

    Args:
        model: the network.
        example_input: what ``model(example_input)`` accepts (two samples are enough).
        max_layers: the most block outputs kept (evenly spread over depth).
        calls: a trace of ``example_input`` already made
            (:func:`~lightning_introspect._torch.layers.trace_module_calls`), to save one forward pass.

    Returns:
        Dotted module names in execution order (the penultimate layer last); empty for a model without leaves.
    """
    calls = calls or trace_module_calls(model, example_input)
    modules = dict(model.named_modules())
    leaves = [n for n in calls.order if not any(True for _ in modules[n].children())]
    if not leaves:
        return []
    last = leaves[-1]
    picks: list[str] = []
    for name in leaves:
        if name == last or not isinstance(modules[name], ACTIVATIONS):
            continue
        chosen = name if calls.counts[name] == 1 else calls.enclosing_single_call(name)
        if chosen is not None and chosen not in picks:
            picks.append(chosen)
    if any(is_attention(modules[n]) for n in calls.order):
        picks = transformer_blocks(model, calls) or picks
    if len(picks) < 2:
        top = _network_root(leaves)  # a wrapper around the whole network ("net" of a LightningModule) is looked through
        picks = [
            n for n in calls.order
            if _parent(n) == top and n != top and n != last and n != calls.order[-1] and calls.counts[n] == 1
        ]
    penultimate = leaves[-2] if len(leaves) >= 2 else None
    if penultimate is not None and (calls.counts[penultimate] != 1 or isinstance(modules[penultimate], nn.Dropout)):
        penultimate = None
    if picks or penultimate:
        outputs = trace_module_calls(model, example_input, keep_outputs=[*picks, *([penultimate] if penultimate else [])])
        picks = distinct_outputs(picks, outputs)
        if penultimate is not None and any(p == penultimate or outputs.same_output(p, penultimate) for p in picks):
            penultimate = None
    if len(picks) > max_layers:
        idx = sorted({round(i * (len(picks) - 1) / (max_layers - 1)) for i in range(max_layers)})
        picks = [picks[i] for i in idx]
    if penultimate is not None:
        picks.append(penultimate)
    return picks


def transformer_blocks(model: nn.Module, calls: ModuleCalls) -> list[str]:
    """The block outputs of a transformer, in execution order, after the embedding that feeds the first block.

    A block is the innermost module that runs once and holds an attention layer
    (:func:`~lightning_introspect.methods.probes.tokens.is_attention`) and a ``Linear`` outside it (the MLP),
    but not the output layer (a whole network wrapped in a ``LightningModule`` is not a block):
    ``nn.TransformerEncoderLayer``, timm's ``Block``, Hugging Face's ``*Layer``. A model written without block
    modules (attention, norm, MLP, norm in one ``forward``) gives its ``LayerNorm`` / ``RMSNorm`` modules that
    run once outside attention layers instead: with post-norm residuals they are the block outputs. The
    embedding is the first ``nn.Embedding`` that runs once before the first block, else the last module with
    parameters that runs once before it beside one of the first block's enclosing modules (a patch embedding). Empty when there is no such block.

    Example:
        >>> layer = nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=16, batch_first=True)
        >>> net = nn.Sequential(nn.Embedding(10, 8), layer, nn.LayerNorm(8), nn.Linear(8, 2))
        >>> transformer_blocks(net, trace_module_calls(net, torch.zeros(2, 5, dtype=torch.long)))
        ['0', '1']
    """
    modules = dict(model.named_modules())
    ran_once = [n for n in calls.order if calls.counts[n] == 1]
    attention = [n for n in calls.order if is_attention(modules[n])]

    def within(name: str, outer: str) -> bool:
        return name.startswith(outer + ".")

    def in_attention(name: str) -> bool:
        return any(name == a or within(name, a) for a in attention)

    leaves = [n for n in calls.order if not any(True for _ in modules[n].children())]
    output_layer = leaves[-1] if leaves else ""

    def is_block(name: str) -> bool:
        if in_attention(name) or within(output_layer, name) or not any(within(a, name) for a in attention):
            return False
        return any(within(n, name) and isinstance(modules[n], nn.Linear) and not in_attention(n) for n in calls.order)

    blocks = [n for n in ran_once if is_block(n)]
    blocks = [b for b in blocks if not any(within(o, b) for o in blocks)]
    if not blocks:
        blocks = [n for n in ran_once if isinstance(modules[n], (nn.LayerNorm, nn.RMSNorm)) and not in_attention(n)]
    if not blocks:
        return []
    before = calls.order[: calls.order.index(blocks[0])]
    embedding = next((n for n in before if isinstance(modules[n], nn.Embedding) and calls.counts[n] == 1), None)
    if embedding is None:
        embedding = next(
            (
                n for n in reversed(before)
                if calls.counts[n] == 1 and not within(blocks[0], n) and _parent(n) in ("", *_ancestors(blocks[0]))
                and any(True for _ in modules[n].parameters())
            ),
            None,
        )
    return ([embedding] if embedding is not None else []) + blocks


def _network_root(leaves: list[str]) -> str:
    """The innermost module holding every leaf that ran (``""``: the model itself)."""
    common = leaves[0].split(".")[:-1] if leaves else []
    for leaf in leaves[1:]:
        parts = leaf.split(".")
        while common and parts[: len(common)] != common:
            common.pop()
    return ".".join(common)


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


class ProbeLayersUnavailable(Exception):
    """``layers="auto"`` cannot choose layers in this model; the message says why and what to do instead."""


def resolve_probe_layers(model: nn.Module, layers: str | list[str], example_input: Any) -> dict[str, nn.Module]:
    """``{name: module}`` of the layers to probe, in execution order, each checked to run once per forward.

    One eval-mode, no-grad forward pass of ``example_input`` counts the calls of every module. For names
    given explicitly, a model whose forward does not take the bare inputs keeps the given order, with the
    call counts unchecked.

    Args:
        model: the network.
        layers: ``"auto"`` (see :func:`auto_probe_layers`), a dotted name, a glob or a list of those.
        example_input: two samples as ``model`` takes them, on its device.

    Raises:
        ValueError: a wrong name (with close matches), or a named module that runs more than once per
            forward pass (naming the block to probe instead).
        ProbeLayersUnavailable: ``"auto"`` could not run the model, or found no layer to probe.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> list(resolve_probe_layers(net, ["1", "0"], torch.randn(2, 4)))
        ['0', '1']
    """
    auto = isinstance(layers, str) and layers == "auto"
    modules = {} if auto else resolve_layers(model, layers, argument="layers")
    calls: ModuleCalls | None
    try:
        calls = trace_module_calls(model, example_input)
    except Exception as exc:
        if auto:
            raise ProbeLayersUnavailable(
                "`layers='auto'` runs `model(inputs)` on two samples to find the layers, and that failed "
                f"({type(exc).__name__}: {exc}); name the layers explicitly."
            ) from exc
        calls = None  # the forward does not take the bare inputs: the given order, call counts unchecked
    if auto:
        modules = resolve_layers(model, auto_probe_layers(model, example_input, calls=calls), argument="layers")
        if not modules:
            raise ProbeLayersUnavailable("`layers='auto'` found no layer to probe in this model; name the layers explicitly.")
    if calls is None:
        return modules
    refuse_reused_modules(calls, list(modules), argument="layers")
    rank = {n: i for i, n in enumerate(calls.order)}
    return dict(sorted(modules.items(), key=lambda item: rank.get(item[0], len(rank))))


def distinct_outputs(names: list[str], calls: ModuleCalls) -> list[str]:
    """``names`` without repeats of the same output; of a module and one inside it, the outer name stays.

    Args:
        names: module names in execution order.
        calls: a trace that kept the outputs of ``names`` (``keep_outputs``).
    """
    kept: list[str] = []
    for name in names:
        twin = next((k for k in kept if calls.same_output(k, name)), None)
        if twin is None:
            kept.append(name)
        elif twin.startswith(name + "."):  # the wrapper came second: it names the output better
            kept[kept.index(twin)] = name
    return kept


def layer_output_shapes(model: nn.Module, example_input: Any, modules: Mapping[str, nn.Module]) -> tuple[dict[str, tuple[int, ...] | None], Any]:
    """One eval-mode, no-grad forward pass of ``example_input`` (global RNG forked, hooks removed afterwards):
    the output shape of each of ``modules`` (of its first tensor; ``None`` when it did not run or gave no
    tensor) and the model's own output.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
        >>> shapes, out = layer_output_shapes(net, torch.zeros(2, 1, 8, 8), {"1": net[1]})
        >>> shapes, tuple(out.shape)
        ({'1': (2, 4, 8, 8)}, (2, 2, 8, 8))
    """
    shapes: dict[str, tuple[int, ...] | None] = dict.fromkeys(modules)

    def catch(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            t = output if isinstance(output, torch.Tensor) else next((o for o in output if isinstance(o, torch.Tensor)), None) if isinstance(output, (tuple, list)) else None
            if shapes[name] is None and t is not None:
                shapes[name] = tuple(t.shape)

        return hook

    with torch.inference_mode(False), introspection_mode(model, grad=False), hooks() as handles:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(catch(name)))
        x = example_input.clone() if isinstance(example_input, torch.Tensor) and example_input.is_inference() else example_input
        output = model(x)
    return shapes, output


def pixel_probe_layers(
    modules: Mapping[str, nn.Module], shapes: Mapping[str, tuple[int, ...] | None], *, auto: bool, num_classes: int | None = None
) -> dict[str, nn.Module]:
    """The layers per-pixel probes (segmentation) read: those whose output is a feature map ``(N, D, h, w)``.

    With ``auto`` (the layers :func:`auto_probe_layers` chose: a U-Net's encoder and decoder stages) the
    others are dropped, and so is a 1x1 convolution with ``num_classes`` output channels (the segmentation
    head: its "features" are the logits, and a probe on them only measures the model's own accuracy).
    Layers named explicitly are all kept or refused.

    Raises:
        ValueError: a layer named in ``layers`` whose output is not a feature map (naming it and its shape).
        ProbeLayersUnavailable: ``auto`` leaves no layer.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 1))
        >>> shapes = {"1": (2, 4, 6, 6), "2": (2, 3, 6, 6)}
        >>> list(pixel_probe_layers({"1": net[1], "2": net[2]}, shapes, auto=True, num_classes=3))
        ['1']
    """
    maps = {n: m for n, m in modules.items() if (shapes.get(n) is not None and len(shapes[n] or ()) == 4)}
    if not auto:
        bad = {n: shapes.get(n) for n in modules if n not in maps}
        if bad:
            raise ValueError(
                f"Expected the layers in `layers` to output feature maps (N, D, h, w) for per-pixel probes (segmentation), "
                f"but got {bad} (shape None: the layer did not run); name convolutional layers, or pass `task='classification'`."
            )
        return dict(maps)
    kept = {
        n: m for n, m in maps.items()
        if not (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and num_classes is not None and m.out_channels == num_classes)
    }
    if not kept:
        raise ProbeLayersUnavailable(
            "`layers='auto'` found no layer with feature maps (N, D, h, w) for per-pixel probes; name the layers explicitly."
        )
    return kept


def identical_outputs(model: nn.Module, example_input: Any, names: list[str]) -> dict[str, str]:
    """``{name: the name it is probed under}`` for the ``names`` whose output equals another's on
    ``example_input`` (a block and its last norm, a wrapper and its only child; see
    :meth:`~lightning_introspect._torch.layers.ModuleCalls.same_output`): the outer name is kept. Names
    whose outputs are all different give ``{}``.

    Example:
        >>> block = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        >>> identical_outputs(nn.Sequential(block, nn.Linear(4, 2)), torch.randn(2, 4), ["0", "0.1", "0.0"])
        {'0.1': '0'}
    """
    outputs = trace_module_calls(model, example_input, keep_outputs=names)
    kept = distinct_outputs(names, outputs)
    return {n: next(k for k in kept if outputs.same_output(k, n)) for n in names if n not in kept}


def _image_size(example_input: Any) -> tuple[int, int] | None:
    """``(H, W)`` of image inputs ``(N, C, H, W)``; ``None`` for anything else (token ids, tables)."""
    if isinstance(example_input, torch.Tensor) and example_input.ndim == 4 and example_input.is_floating_point():
        return int(example_input.shape[-2]), int(example_input.shape[-1])
    return None


def _batch_size(example_input: Any) -> int | None:
    if isinstance(example_input, torch.Tensor):
        return int(example_input.shape[0]) if example_input.ndim else None
    if isinstance(example_input, Mapping):
        return next((_batch_size(v) for v in example_input.values() if isinstance(v, torch.Tensor)), None)
    return None


def _trace_shapes(model: nn.Module, example_input: Any) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """One eval-mode, no-grad forward pass: the modules in the order their first call started, and the shape of
    the first tensor of each one's first output."""
    names = {m: n for n, m in model.named_modules() if n}
    order: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}

    def pre(module: nn.Module, _inputs: Any) -> None:
        if names[module] not in order:
            order.append(names[module])

    def post(module: nn.Module, _inputs: Any, output: Any) -> None:
        t = output if isinstance(output, torch.Tensor) else next((o for o in output if isinstance(o, torch.Tensor)), None) if isinstance(output, (tuple, list)) else None
        if t is not None:
            shapes.setdefault(names[module], tuple(t.shape))

    with torch.inference_mode(False), introspection_mode(model, grad=False), hooks() as handles:
        for module in names:
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
        x = example_input.clone() if isinstance(example_input, torch.Tensor) and example_input.is_inference() else example_input
        model(x)
    return order, shapes


def _layout(name: str, order: list[str], shapes: Mapping[str, tuple[int, ...]], modules: Mapping[str, nn.Module]) -> str:
    """``"tokens"`` or ``"channels"`` for the 3-D output of ``name`` (see :func:`token_layers`)."""
    target = shapes[name]
    at = order.index(name)
    inside = [n for n in order[at + 1 :] if n.startswith(name + ".")]
    before = [n for n in order[:at] if not name.startswith(n + ".")]
    after = [n for n in order[at + 1 :] if not n.startswith(name + ".")]
    for candidates in ([name], reversed(inside), reversed(before), after):
        for other in candidates:
            layout, shape = module_layout(modules[other]), shapes.get(other)
            if layout is None or shape is None or len(shape) != 3:
                continue
            if other != name and shape != target and (shape[0], shape[2], shape[1]) == target:  # transposed in between
                return "channels" if layout == "tokens" else "tokens"
            return layout
    return "channels"


def token_layers(
    model: nn.Module, example_input: Any, modules: Mapping[str, nn.Module], *, token_pooling: str = "auto",
    batch_size: int | None = None,
) -> dict[str, TokenPooling]:
    """``{name: TokenPooling}`` of the ``modules`` whose output is tokens ``(N, T, D)`` (or ``(T, N, D)``).

    The rule, from one forward pass of ``example_input`` (output shapes and execution order): a 3-D output is
    token-major or channel-major as the module's own type says
    (:func:`~lightning_introspect.methods.probes.tokens.module_layout`: ``Linear``, ``LayerNorm``,
    ``Embedding``, attention, RNNs, transformer layers give tokens; ``Conv1d``, ``BatchNorm1d``, 1-D pooling
    give channels). A module whose type does not say (a block, a ``Sequential``, an activation, dropout)
    takes the layout of the last module inside it that says, else of the nearest one that ran before it,
    else of the first one after it, each among those with a 3-D output; if that output is the module's own
    with dimensions 1 and 2 swapped, the layout is swapped too (a ``transpose`` in between). Nothing that
    says: channels (pooled as ``(N, C, L)``). An output whose second dimension is the batch (and its first
    not) is sequence-first (``batch_first=False``); ``batch_size`` is the example's number of samples (default:
    the first dimension of the input). The pooling of each token layer is
    :func:`~lightning_introspect.methods.probes.tokens.resolve_token_pooling` of ``token_pooling``, the
    layer's ``T`` and the input's image size. When the forward does not take ``example_input``, the module
    types alone decide (own type, else the last inside it), without the class-token rule.

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.GELU(), nn.Linear(4, 2))
        >>> token_layers(net, torch.zeros(2, 6, dtype=torch.long), {"1": net[1]})
        {'1': TokenPooling(pooling='mean', prefix=0, sequence_first=False, num_tokens=6)}
    """
    named = dict(model.named_modules())
    try:
        order, shapes = _trace_shapes(model, example_input)
    except Exception:  # the forward does not take the bare inputs: what the module types say
        out = {}
        for name, module in modules.items():
            inner = [module_layout(m) for m in module.modules()]
            if module_layout(module) == "tokens" or (module_layout(module) is None and [v for v in inner if v][-1:] == ["tokens"]):
                out[name] = resolve_token_pooling(token_pooling, None, None)
        return out
    image, batch = _image_size(example_input), batch_size or _batch_size(example_input)
    out = {}
    for name in modules:
        shape = shapes.get(name)
        if shape is None or len(shape) != 3 or _layout(name, order, shapes, named) != "tokens":
            continue
        sequence_first = batch is not None and shape[1] == batch and shape[0] != batch
        out[name] = resolve_token_pooling(token_pooling, shape[0 if sequence_first else 1], image, sequence_first=sequence_first)
    return out


@dataclass
class ProbePlan:
    """What :func:`plan_probe_layers` decided.

    Attributes:
        modules: ``{name: module}`` to probe, in execution order.
        task: ``"classification"`` (pooled features, one row per sample) or ``"segmentation"`` (per-pixel probes).
        merged: ``{name: kept name}`` of the named layers left out because another gives the same output.
        tokens: ``{name: TokenPooling}`` of the layers whose outputs are tokens.
    """

    modules: dict[str, nn.Module]
    task: str = "classification"
    merged: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, TokenPooling] = field(default_factory=dict)


def plan_probe_layers(
    model: nn.Module,
    layers: str | list[str],
    example_input: Any,
    *,
    labels: torch.Tensor | None = None,
    task: str = "classification",
    logits_of: Callable[[Any], torch.Tensor | None] | None = None,
    token_pooling: str = "auto",
) -> ProbePlan:
    """The layers to probe (:func:`resolve_probe_layers`), each output once (:func:`identical_outputs`), the task
    and how the token outputs are pooled (:func:`token_layers`), from forward passes of ``example_input``.

    The task: ``"classification"`` as given; ``"auto"`` is segmentation for dense logits ``(N, C, H, W)``
    (``logits_of(model output)``) with integer masks ``labels`` of their size
    (:func:`~lightning_introspect.methods.task.resolve_task`; ``labels=None``: decided by the output alone),
    and then the layers are those :func:`pixel_probe_layers` keeps. An explicit ``"segmentation"`` is checked
    against the shapes.

    Raises:
        ValueError, ProbeLayersUnavailable: as :func:`resolve_probe_layers` and :func:`pixel_probe_layers`.
        IntrospectionInputError: an explicit ``task`` that the output and labels contradict.

    Example:
        >>> net = nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 2))
        >>> plan = plan_probe_layers(net, ["0", "0.0", "1"], torch.randn(2, 4))
        >>> list(plan.modules), plan.task, plan.merged
        (['0', '1'], 'classification', {'0.0': '0'})
    """
    modules = resolve_probe_layers(model, layers, example_input)
    merged: dict[str, str] = {}
    if len(modules) > 1:
        try:
            merged = identical_outputs(model, example_input, list(modules))
        except Exception:  # the forward does not take the bare inputs: every named layer is kept
            merged = {}
    modules = {n: m for n, m in modules.items() if n not in merged}
    resolved = "classification"
    if task != "classification":
        try:
            shapes, output = layer_output_shapes(model, example_input, modules)
        except Exception:  # the forward does not take the bare inputs: the shapes are checked when captured
            shapes, output = {}, None
        logits = logits_of(output) if output is not None and logits_of is not None else None
        if logits is None:
            resolved = "segmentation" if task == "segmentation" else "classification"
        else:
            resolved = resolve_task(task, logits, labels)
        if resolved == "segmentation" and shapes:
            num_classes = int(logits.shape[1]) if logits is not None and logits.ndim == 4 else None
            modules = pixel_probe_layers(modules, shapes, auto=layers == "auto", num_classes=num_classes)
    batch_size = int(labels.shape[0]) if isinstance(labels, torch.Tensor) and labels.ndim else None
    tokens = token_layers(model, example_input, modules, token_pooling=token_pooling, batch_size=batch_size)
    return ProbePlan(modules, resolved, merged, tokens)
