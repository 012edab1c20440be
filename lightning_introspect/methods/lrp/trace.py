"""Tracing for LRP: the model's graph as a plan of propagation steps, and BatchNorm folding.

The model's ``forward`` is traced once with :mod:`torch.fx` (cached per model, traced again when its
modules change). Every node of the graph becomes a :class:`Step` whose ``kind`` says how relevance
crosses it (a conv / linear layer, a parameter-free linear operation, a winner-take-all max, an addition,
a rearrangement, an activation it passes through, ...). Anything without a known kind is refused with a
``TypeError`` naming the module or operation and its type. Nothing here knows about rules.
"""

from __future__ import annotations

import builtins
import copy
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_introspect._torch.guards import eval_mode, is_compiled

__all__ = ["Plan", "Step", "bn_scale_shift", "call_node", "detach", "fold_batchnorm", "fold_layer",
           "lrp_unsupported", "op_name", "pass_value", "plan_for", "transposed_groups"]

# --------------------------------------------------------------------------------------------------
# What we know how to propagate through (exact types: a subclass may change forward).

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_WEIGHTED = (*_CONV, *_CONV_TRANSPOSE, nn.Linear)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh)
_NONNEG_ACTIVATIONS = (nn.ReLU, nn.ReLU6)
_REARRANGE_MODULES = (nn.Flatten, nn.Unflatten)
_UPSAMPLE_MODULES = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
# Padding copies values (or adds zeros): relevance moves back with the values like a reshape, each input getting
# the sum over its copies (reflect / replicate / circular); a non-zero constant is refused (it would act as a bias).
_PAD_MODULES = tuple(
    getattr(nn, f"{kind}Pad{d}d") for kind in ("Zero", "Constant", "Reflection", "Replication", "Circular") for d in (1, 2, 3)
    if hasattr(nn, f"{kind}Pad{d}d")
)
# Interpolation modes whose implicit weights are all >= 0 (each output a convex combination of inputs), so
# relevance can be shared in proportion to the contributions; bicubic's negative lobes cannot.
_INTERPOLATION_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area")

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu6}
_LEAKY_FUNCTIONS = {F.leaky_relu, F.leaky_relu_}
_TANH_FUNCTIONS = {torch.tanh, F.tanh}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
_LINEAR_FUNCTIONS = {
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    torch.mean, torch.sum,
}
_INTERPOLATE_FUNCTIONS = {F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear}
_MAX_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_REARRANGE_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.cat, torch.concat, torch.stack, torch.permute, torch.transpose,
    torch.squeeze, torch.unsqueeze, operator.getitem,
}
_SUM_FUNCTIONS = {operator.add: 1, operator.iadd: 1, torch.add: 1, operator.sub: -1, operator.isub: -1, torch.sub: -1}
_SCALE_FUNCTIONS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div, operator.neg, torch.neg}
_META_FUNCTIONS = {builtins.getattr, builtins.len}
_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul, operator.itruediv: operator.truediv}

_RELU_METHODS = {"relu", "relu_"}
_TANH_METHODS = {"tanh", "tanh_"}
_LINEAR_METHODS = {"mean", "sum"}
_REARRANGE_METHODS = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
    "expand", "repeat", "clone", "t",
}
_SUM_METHODS = {"add": 1, "add_": 1, "sub": -1, "sub_": -1}
_SCALE_METHODS = {"mul", "mul_", "div", "div_", "neg", "neg_"}
_META_METHODS = {"size", "dim", "numel", "ndimension"}

_SUPPORTED_TEXT = (
    "Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear, BatchNorm (folded into a preceding conv / linear, else "
    "affine), max / avg / adaptive pooling, Upsample / F.interpolate (nearest, linear, bilinear, trilinear, "
    "area), padding (zero, reflect, replicate, circular), ReLU / ReLU6 / LeakyReLU / Tanh, Dropout, Identity, "
    "Flatten, reshapes, cat, additions and scaling by constants"
)


# --------------------------------------------------------------------------------------------------
# The plan: the traced graph with one propagation step per node.


@dataclass
class Step:
    node: fx.Node
    kind: str  # input, output, const, meta, skip, weighted, affine, linear, wta, rearrange, sum, scale, pass
    module: str | None = None  # the conv / linear / BatchNorm module of weighted and affine steps
    bn: str | None = None  # the BatchNorm folded into a weighted step
    src: fx.Node | None = None  # the one input-dependent argument of single-input steps
    terms: list[tuple[fx.Node, int]] = field(default_factory=list)  # sum steps: (operand, sign)
    nonneg: bool = False  # the input of the step is known to be >= 0 (saves work for z+ / alpha-beta)

    @property
    def source(self) -> fx.Node:
        """``src``, for the single-input steps that always have one."""
        if self.src is None:
            raise AssertionError(f"the {self.kind} step of node '{self.node.name}' has no source")  # pragma: no cover
        return self.src


@dataclass
class Plan:
    graph: fx.Graph
    steps: list[Step]
    constants: dict[str, Any]  # tensor constants the tracer would have stored on the model
    dependent: set[fx.Node]  # nodes whose tensor value depends on the input


class _Tracer(fx.Tracer):
    """The default tracer: torch.nn modules are leaves, user modules (blocks) are traced through.

    A ``torch.compile``-d submodule (``OptimizedModule``) is traced through its eager original
    (``_orig_mod``, the same weights): fx cannot trace dynamo-compiled code.
    """

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        original = getattr(m, "_orig_mod", None)
        if is_compiled(m) and isinstance(original, nn.Module):
            return self.call_module(original, original.forward, args, kwargs)
        return super().call_module(m, forward, args, kwargs)


def _type_name(obj: object) -> str:
    cls = type(obj)
    module = cls.__module__
    if module.startswith("torch.nn.modules"):
        module = "torch.nn"
    return f"{module}.{cls.__qualname__}"


def op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    name = getattr(target, "__name__", None) or repr(target)
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module and module not in ("_operator", "builtins") else name


def _unsupported(node: fx.Node, modules: dict[str, nn.Module], why: str = "") -> TypeError:
    if node.op == "call_module":
        module = modules[str(node.target)]
        what = f"module '{node.target}' of type {_type_name(module)}"
    else:
        what = f"operation '{op_name(node)}'"
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, cls = list(stack.values())[-1][:2]
            cls_name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
            what += f" inside module '{path}' of type {cls_name}"
    return TypeError(f"LRP has no rule for {what}{why}. Supported: {_SUPPORTED_TEXT}.")


def _output_source(value: Any) -> fx.Node | None:
    """The traced value LRP explains, picked like the callbacks pick logits: the output itself, a tuple's
    first tensor, or a dict's ``"logits"`` / ``"preds"`` entry."""
    if isinstance(value, fx.Node):
        return value
    if isinstance(value, dict):
        return next((value[k] for k in ("logits", "preds") if isinstance(value.get(k), fx.Node)), None)
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, fx.Node)), None)
    return None


def _trace(model: nn.Module) -> tuple[fx.Graph, dict[str, Any]]:
    before = set(model.__dict__)
    try:
        with eval_mode(model):
            graph = _Tracer().trace(model)
    except Exception as err:
        raise TypeError(
            f"LRP needs a model whose forward torch.fx can trace symbolically; tracing {type(model).__name__} "
            f"failed: {type(err).__name__}: {err}"
        ) from err
    finally:
        # The tracer stores tensor constants made in forward as attributes of the root: move them out.
        added = {name: model.__dict__.pop(name) for name in set(model.__dict__) - before}
    return graph, added


def _fusable(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node, fx.Node] | None:
    """The conv / linear node a BatchNorm node can be folded into, and that node's input, if any."""
    if node.op != "call_module" or type(modules[str(node.target)]) not in _BATCHNORM or len(node.args) != 1:
        return None
    src = node.args[0]
    if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1 or src.kwargs:
        return None
    conv_input = src.args[0] if len(src.args) == 1 else None
    if type(modules[str(src.target)]) not in _WEIGHTED or not isinstance(conv_input, fx.Node):
        return None
    return src, conv_input


def _build_plan(model: nn.Module) -> Plan:
    graph, constants = _trace(model)
    modules = dict(model.named_modules())
    steps: list[Step] = []
    by_node: dict[fx.Node, Step] = {}
    dependent: set[fx.Node] = set()
    nonneg: set[fx.Node] = set()
    seen_input = False

    def single_source(node: fx.Node) -> fx.Node:
        deps = [n for n in node.all_input_nodes if n in dependent]
        first = node.args[0] if node.args else None
        if len(deps) != 1 or first is not deps[0] or sum(1 for a in node.args if a is first) != 1:
            raise _unsupported(node, modules, " with more than one input-dependent argument")
        return deps[0]

    for node in graph.nodes:
        if node.op == "placeholder":
            if not seen_input:
                step, seen_input = Step(node, "input"), True
                dependent.add(node)
                nonneg.discard(node)
            elif node.args:  # an argument with a default value
                step = Step(node, "const")
            else:
                raise TypeError(f"LRP explains models with one input tensor, but forward also needs '{node.target}'.")
        elif node.op == "output":
            step = Step(node, "output", src=_output_source(node.args[0]))
            if step.src is None or step.src not in dependent:
                raise TypeError(
                    "LRP needs a model that returns a tensor computed from its input (or a tuple whose first element, "
                    "or a dict whose 'logits' / 'preds' entry, is one)."
                )
        elif node.op == "get_attr" or not any(n in dependent for n in node.all_input_nodes):
            step = Step(node, "const")
        else:
            dependent.add(node)
            step = _classify(node, modules, single_source, dependent, nonneg)
            if step.kind == "meta":  # sizes / shapes: values computed from the input, but no relevance
                dependent.discard(node)
            if step.kind == "weighted" and step.bn is not None:
                conv_node = step.node.args[0]
                assert isinstance(conv_node, fx.Node)  # _fusable matched it
                by_node[conv_node].kind = "skip"  # the conv / linear is computed with the BatchNorm
        steps.append(step)
        by_node[node] = step
    return Plan(graph=graph, steps=steps, constants=constants, dependent=dependent)


def _classify(node: fx.Node, modules: dict[str, nn.Module], single_source: Callable[[fx.Node], fx.Node],
              dependent: set[fx.Node], nonneg: set[fx.Node]) -> Step:
    op, target = node.op, node.target
    if op == "call_module":
        module = modules[str(target)]
        kind_of = type(module)
        src = single_source(node)
        if node.kwargs:
            raise _unsupported(node, modules, " called with keyword arguments")
        if kind_of in _WEIGHTED:
            if len(node.args) > 1:  # ConvTranspose's output_size: the propagator calls the layer on its input alone
                raise _unsupported(node, modules, " called with more than one argument")
            return Step(node, "weighted", module=str(target), src=src, nonneg=src in nonneg)
        if kind_of in _BATCHNORM:
            if module.running_mean is None or module.running_var is None:
                raise TypeError(
                    f"LRP cannot explain module '{target}' of type {_type_name(module)}: without running statistics "
                    "(track_running_stats=False) it normalises with the batch's own statistics, mixing samples."
                )
            fused = _fusable(node, modules)
            if fused is not None:
                conv, conv_input = fused
                return Step(node, "weighted", module=str(conv.target), bn=str(target), src=conv_input,
                            nonneg=conv_input in nonneg)
            return Step(node, "affine", module=str(target), src=src)
        if kind_of in _MAXPOOL:
            if getattr(module, "return_indices", False):
                raise _unsupported(node, modules, " with return_indices=True")
            _inherit(node, src, nonneg)
            return Step(node, "wta", src=src)
        if kind_of in _AVGPOOL:
            _inherit(node, src, nonneg)
            return Step(node, "linear", src=src, nonneg=src in nonneg)
        if kind_of in _UPSAMPLE_MODULES:
            _check_interpolation(node, modules, str(module.mode))
            _inherit(node, src, nonneg)
            return Step(node, "linear", src=src, nonneg=src in nonneg)
        if kind_of in _ACTIVATION_MODULES:
            if kind_of in _NONNEG_ACTIVATIONS:
                nonneg.add(node)
            return Step(node, "pass", src=src)
        if kind_of in _IDENTITY_MODULES:
            _inherit(node, src, nonneg)
            return Step(node, "pass", src=src)
        if kind_of in _REARRANGE_MODULES or kind_of in _PAD_MODULES:
            if kind_of in _PAD_MODULES and float(getattr(module, "value", 0.0)) != 0.0:
                raise _unsupported(node, modules, f" with value={module.value} (only zero padding has no relevance of its own)")
            _inherit(node, src, nonneg)
            return Step(node, "rearrange")
        raise _unsupported(node, modules)

    if op == "call_function":
        if target in _META_FUNCTIONS:
            return Step(node, "meta")
        if target in _RELU_FUNCTIONS or target in _LEAKY_FUNCTIONS or target in _TANH_FUNCTIONS:
            src = single_source(node)
            if target in _RELU_FUNCTIONS:
                nonneg.add(node)
            return Step(node, "pass", src=src)
        if target in _DROPOUT_FUNCTIONS:
            src = single_source(node)
            _inherit(node, src, nonneg)
            return Step(node, "pass", src=src)
        if target in _LINEAR_FUNCTIONS:
            src = single_source(node)
            _inherit(node, src, nonneg)
            return Step(node, "linear", src=src, nonneg=src in nonneg)
        if target is F.pad:
            src = single_source(node)
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
            if mode == "constant" and value not in (None, 0, 0.0):
                raise _unsupported(node, modules, f" with value={value!r} (only zero padding has no relevance of its own)")
            _inherit(node, src, nonneg)
            return Step(node, "rearrange")
        if target in _INTERPOLATE_FUNCTIONS:
            src = single_source(node)
            _check_interpolation(node, modules, _interpolation_mode(node))
            _inherit(node, src, nonneg)
            return Step(node, "linear", src=src, nonneg=src in nonneg)
        if target in _MAX_FUNCTIONS:
            src = single_source(node)
            _inherit(node, src, nonneg)
            return Step(node, "wta", src=src)
        if target in _REARRANGE_FUNCTIONS:
            deps = [n for n in node.all_input_nodes if n in dependent]
            if all(n in nonneg for n in deps):
                nonneg.add(node)
            return Step(node, "rearrange")
        if target in _SUM_FUNCTIONS:
            return _sum_step(node, _SUM_FUNCTIONS[target], modules, dependent, nonneg)
        if target in _SCALE_FUNCTIONS:
            return _scale_step(node, modules, dependent)
        raise _unsupported(node, modules)

    if op == "call_method":
        name = str(target)
        if name in _META_METHODS:
            return Step(node, "meta")
        if name in _RELU_METHODS or name in _TANH_METHODS:
            src = single_source(node)
            if name in _RELU_METHODS:
                nonneg.add(node)
            return Step(node, "pass", src=src)
        if name in _LINEAR_METHODS:
            src = single_source(node)
            _inherit(node, src, nonneg)
            return Step(node, "linear", src=src, nonneg=src in nonneg)
        if name in _REARRANGE_METHODS:
            src = single_source(node)
            _inherit(node, src, nonneg)
            return Step(node, "rearrange")
        if name in _SUM_METHODS:
            return _sum_step(node, _SUM_METHODS[name], modules, dependent, nonneg)
        if name in _SCALE_METHODS:
            return _scale_step(node, modules, dependent)
        raise _unsupported(node, modules)
    raise _unsupported(node, modules)


def _interpolation_mode(node: fx.Node) -> Any:
    """The ``mode`` of an ``F.interpolate`` / ``F.upsample*`` call (positional or keyword)."""
    if node.target is F.upsample_nearest:
        return "nearest"
    if node.target is F.upsample_bilinear:
        return "bilinear"
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("mode", "nearest")


def _check_interpolation(node: fx.Node, modules: dict[str, nn.Module], mode: Any) -> None:
    if mode not in _INTERPOLATION_MODES:
        raise _unsupported(node, modules, f" with mode={mode!r} (only modes whose weights are >= 0: {', '.join(_INTERPOLATION_MODES)})")


def _inherit(node: fx.Node, src: fx.Node, nonneg: set[fx.Node]) -> None:
    if src in nonneg:
        nonneg.add(node)


def _sum_step(node: fx.Node, sign: int, modules: dict[str, nn.Module], dependent: set[fx.Node], nonneg: set[fx.Node]) -> Step:
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        raise _unsupported(node, modules, " with these arguments")
    terms = [(arg, s) for arg, s in zip(node.args, (1, sign)) if isinstance(arg, fx.Node) and arg in dependent]
    if all(s > 0 and n in nonneg for n, s in terms) and all(isinstance(a, fx.Node) and a in dependent for a in node.args):
        nonneg.add(node)
    return Step(node, "sum", terms=terms)


def _scale_step(node: fx.Node, modules: dict[str, nn.Module], dependent: set[fx.Node]) -> Step:
    deps = [a for a in node.args if isinstance(a, fx.Node) and a in dependent]
    is_div = node.target in (operator.truediv, operator.itruediv, torch.div) or node.target in ("div", "div_")
    if len(deps) != 1 or node.kwargs or (is_div and node.args[0] is not deps[0]):
        raise _unsupported(node, modules, " (only products / quotients of one input-dependent tensor and a constant)")
    return Step(node, "scale", src=deps[0])


_PLANS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Plan]] = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    return (
        tuple((name, type(m)) for name, m in model.named_modules()),
        type(model).forward,
        model.__dict__.get("forward"),
    )


def plan_for(model: nn.Module) -> Plan:
    signature = _signature(model)
    cached = _PLANS.get(model)
    if cached is not None and cached[0] == signature:
        return cached[1]
    plan = _build_plan(model)
    _PLANS[model] = (signature, plan)
    return plan


def lrp_unsupported(model: nn.Module) -> str | None:
    """Why :func:`lrp` cannot explain ``model`` (a module or operation without a rule, a forward fx cannot
    trace), or ``None`` when it can. Traces the model symbolically; runs no forward pass.

    Example:
        >>> lrp_unsupported(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))) is None
        True
        >>> lrp_unsupported(nn.Sequential(nn.Linear(4, 3), nn.GELU())).startswith("LRP has no rule for module '1'")
        True
    """
    try:
        plan_for(model)
    except TypeError as err:
        return str(err)
    return None


# --------------------------------------------------------------------------------------------------
# BatchNorm folding


def bn_scale_shift(bn: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``BN(x) = x * scale + shift`` per channel in eval mode."""
    if not isinstance(bn, nn.modules.batchnorm._NormBase) or bn.running_var is None or bn.running_mean is None:
        raise TypeError(f"Expected a BatchNorm layer with running statistics, but got {type(bn).__name__}.")
    var = bn.running_var.detach().to(dtype)
    mean = bn.running_mean.detach().to(dtype)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(dtype)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(dtype)
    return scale, shift


def fold_layer(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module, *,
               transposed_groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``BN(layer(x))`` as one conv / linear layer.

    ``weight`` has the output channels first (conv, linear), or, for a transposed convolution
    (``transposed_groups``: its ``groups``), the layout ``(in, out / groups, *kernel)``, where output channel
    ``g * out / groups + j`` is column ``j`` of group ``g``'s rows.
    """
    scale, shift = bn_scale_shift(bn, weight.dtype)
    if transposed_groups is None:
        folded_weight = weight * scale.view(-1, *([1] * (weight.ndim - 1)))
    else:
        g = transposed_groups
        blocks = weight.view(g, weight.shape[0] // g, *weight.shape[1:])
        folded_weight = (blocks * scale.view(g, 1, -1, *([1] * (weight.ndim - 2)))).view(weight.shape)
    folded_bias = shift if bias is None else bias * scale + shift
    return folded_weight, folded_bias


def transposed_groups(layer: nn.Module) -> int | None:
    """``groups`` of a transposed convolution (whose weight is laid out in-channels first), else ``None``."""
    return int(layer.groups) if isinstance(layer, _CONV_TRANSPOSE) else None


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """A copy of ``model`` (eval mode) in which every BatchNorm right after a conv / linear layer is folded into it.

    The same folding :func:`lrp` uses internally (it never changes ``model``); useful to check it, or to
    export a model without BatchNorm. BatchNorms with no conv / linear layer before them stay.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
        >>> folded = fold_batchnorm(net)
        >>> x = torch.randn(2, 1, 8, 8)
        >>> torch.allclose(folded(x), net(x), atol=1e-5), any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        (True, False)
    """
    clone = copy.deepcopy(model).eval()
    graph, constants = _trace(clone)
    for name, value in constants.items():
        setattr(clone, name, value)
    modules = dict(clone.named_modules())
    for node in list(graph.nodes):
        fused = _fusable(node, modules)
        if fused is None:
            continue
        conv, _ = fused
        layer, bn = modules[str(conv.target)], modules[str(node.target)]
        if bn.running_mean is None:
            continue
        with torch.no_grad():
            weight, bias = fold_layer(layer.weight.detach(), None if layer.bias is None else layer.bias.detach(), bn,
                                      transposed_groups=transposed_groups(layer))
            layer.weight = nn.Parameter(weight.clone())
            layer.bias = nn.Parameter(bias.clone())
        node.replace_all_uses_with(conv)
        graph.erase_node(node)
    folded = fx.GraphModule(clone, graph, class_name=f"Folded{type(model).__name__}")
    return folded.eval()




# --------------------------------------------------------------------------------------------------
# Evaluating single nodes like the model would


def detach(value: Any) -> Any:
    """``value`` with every tensor in it detached (tuples / lists rebuilt, named tuples kept)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(detach(v) for v in value) if not hasattr(value, "_fields") else value
    return value


def call_node(node: fx.Node, modules: dict[str, nn.Module], args: tuple, kwargs: dict) -> Any:
    """Evaluate ``node`` on ``args`` like the model would, but never in place (our values must stay intact)."""
    if node.op == "call_module":
        module = modules[str(node.target)]
        if getattr(module, "inplace", False):
            args = (args[0].clone(), *args[1:])
        return module.forward(*args, **kwargs)  # forward, not __call__: the user's hooks stay silent
    if node.op == "call_function":
        target = node.target
        assert callable(target)  # a call_function node holds the function itself
        fn = _OUT_OF_PLACE.get(target, target)
        if kwargs.get("inplace"):
            kwargs = {**kwargs, "inplace": False}
        return fn(*args, **kwargs)
    if node.op == "call_method":
        name = str(node.target)
        if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
            name = name[:-1]
        return getattr(args[0], name)(*args[1:], **kwargs)
    raise AssertionError(f"unexpected node {node.op}")  # pragma: no cover


def pass_value(node: fx.Node, modules: dict[str, nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The output of a ``"pass"`` step (activation, Dropout, Identity) on ``x``, out of place."""
    if node.op == "call_module":
        module = modules[str(node.target)]
        if isinstance(module, nn.ReLU):
            return F.relu(x)
        if isinstance(module, nn.ReLU6):
            return F.relu6(x)
        if isinstance(module, nn.LeakyReLU):
            return F.leaky_relu(x, module.negative_slope)
        if isinstance(module, nn.Tanh):
            return torch.tanh(x)
        return x  # Identity, Dropout in eval mode
    target = node.target
    if target in _DROPOUT_FUNCTIONS:
        return x
    if target in _RELU_FUNCTIONS or target in _RELU_METHODS:
        return F.relu6(x) if target is F.relu6 else F.relu(x)
    if target in _TANH_FUNCTIONS or target in _TANH_METHODS:
        return torch.tanh(x)
    slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
    if not isinstance(slope, (int, float)):
        raise TypeError(f"LRP needs a constant negative_slope in '{op_name(node)}', but got {slope!r}.")
    return F.leaky_relu(x, slope)
