"""Which layers a linear probe should read when the user asks for ``layers="auto"``.

Pure torch (no Lightning): the choice is made from one traced forward pass of an example input
(:func:`~lightning_introspect._torch.layers.trace_module_calls`): the order in which modules run, how
often each runs, and which modules give the same output tensor.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(
    ...     torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ... )
    >>> auto_probe_layers(net, torch.randn(2, 4))
    ['1', '3']
"""

from __future__ import annotations

from collections.abc import Mapping
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
    name suggests. Modules that give the same values (a block and its last norm, a wrapper ``Sequential``
    and its last child) are probed once, under the outer name. The output layer is left out. Falls back
    to the top-level children that run once (without the last) when fewer than two blocks are found.
    Every chosen module runs exactly once per forward pass.

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
    if len(picks) < 2:
        picks = [n for n in calls.order if "." not in n and n != last and n != calls.order[-1] and calls.counts[n] == 1]
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
