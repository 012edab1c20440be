"""Tracing for LRP: the model's graph as a plan of propagation steps, and BatchNorm folding.

The model's ``forward`` is traced once with :mod:`torch.fx` (cached per model, traced again when its
modules change); where fx cannot trace it, :mod:`.record` writes the same kind of graph from a forward
pass on the actual input (a fallback only: :func:`plan_for`). Every node of the graph becomes a
:class:`Step` whose ``kind`` says how relevance crosses it (a conv / linear layer, a parameter-free linear
operation, a winner-take-all max, an addition, a rearrangement, an activation it passes through, a
normalisation, a softmax, a product of input-dependent tensors, an attention, an embedding where relevance
stops, ...). Anything without a known kind is refused
with a ``TypeError`` naming the module or operation and its type. Nothing here knows about rules.

``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` are traced through
their reference computation (:mod:`.decompose`), not as opaque leaves and never through their fused fast
path. The plan also records which graph node is the output of each module call (:attr:`Plan.module_outputs`),
so relevance can be read at a named layer.
"""

from __future__ import annotations

import builtins
import copy
import functools
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_introspect._torch.guards import eval_mode, is_compiled
from lightning_introspect.methods.lrp.decompose import DECOMPOSED, attention

__all__ = ["Plan", "Step", "TraceFailed", "bn_scale_shift", "call_node", "detach", "fold_batchnorm", "fold_layer", "leaf_module",
           "lrp_unsupported", "model_signature", "op_name", "pass_value", "plan_for", "plan_from_graph", "transposed_groups"]

# --------------------------------------------------------------------------------------------------
# What we know how to propagate through (exact types: a subclass may change forward).

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# MultiheadAttention's out_proj is a NonDynamicallyQuantizableLinear: nn.Linear's forward under another name
_WEIGHTED = (*_CONV, *_CONV_TRANSPOSE, nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh)
# Smooth elementwise activations: relevance passes through unchanged (the identity rule, AttnLRP's choice).
_SMOOTH_ACTIVATION_MODULES = (nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Hardswish, nn.Hardtanh,
                              nn.Sigmoid, nn.Hardsigmoid, nn.Softsign)
_NORM_MODULES = (nn.LayerNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
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
_SMOOTH_ACTIVATION_FUNCTIONS = {
    F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu, F.softplus, F.hardswish, F.hardtanh, F.sigmoid, torch.sigmoid,
    F.hardsigmoid, F.softsign, torch.selu, torch.celu,
}
_NORM_FUNCTIONS = {F.layer_norm, *((F.rms_norm,) if hasattr(F, "rms_norm") else ())}
_SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax}
_PRODUCT_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm, torch.mm, torch.einsum}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_ATTENTION_FUNCTIONS = {F.scaled_dot_product_attention, attention}
_EMBEDDING_FUNCTIONS = {F.embedding}
# comparisons make masks: computed from the input (token ids), but they carry no relevance
_MASK_FUNCTIONS = {
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.invert, torch.eq, torch.ne,
    torch.lt, torch.le, torch.gt, torch.ge, torch.logical_not, torch.isnan, torch.isfinite,
}
_SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.unbind, torch.tensor_split}
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
    torch.squeeze, torch.unsqueeze, operator.getitem, torch.masked_fill,
}
_SUM_FUNCTIONS = {operator.add: 1, operator.iadd: 1, torch.add: 1, operator.sub: -1, operator.isub: -1, torch.sub: -1}
_SCALE_FUNCTIONS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div, operator.neg, torch.neg}
_META_FUNCTIONS = {builtins.getattr, builtins.len}
_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul, operator.itruediv: operator.truediv}

_RELU_METHODS = {"relu", "relu_"}
_SMOOTH_ACTIVATION_METHODS = {"sigmoid", "sigmoid_"}
_SOFTMAX_METHODS = {"softmax"}
_PRODUCT_METHODS = {"matmul", "bmm", "mm"}
_MUL_METHODS = {"mul", "mul_"}
_MASK_METHODS = {"eq", "ne", "lt", "le", "gt", "ge", "logical_not", "bool", "isnan", "isfinite"}
_SPLIT_METHODS = {"chunk", "split", "unbind", "tensor_split"}
_TANH_METHODS = {"tanh", "tanh_"}
_LINEAR_METHODS = {"mean", "sum"}
_REARRANGE_METHODS = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
    "expand", "repeat", "clone", "t", "masked_fill", "masked_fill_", "expand_as", "float", "to", "type_as",
}
_SUM_METHODS = {"add": 1, "add_": 1, "sub": -1, "sub_": -1}
_SCALE_METHODS = {"mul", "mul_", "div", "div_", "neg", "neg_"}
_META_METHODS = {"size", "dim", "numel", "ndimension"}

_SUPPORTED_TEXT = (
    "Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear / F.linear, BatchNorm (folded into a preceding conv / linear, else "
    "affine), LayerNorm / RMSNorm, max / avg / adaptive pooling, Upsample / F.interpolate (nearest, linear, bilinear, "
    "trilinear, area), padding (zero, reflect, replicate, circular), ReLU / ReLU6 / LeakyReLU / Tanh and smooth "
    "activations (GELU, SiLU, ELU, Sigmoid, ...), softmax, MultiheadAttention / TransformerEncoderLayer / "
    "F.scaled_dot_product_attention, products of input-dependent tensors (matmul, einsum, mul), Embedding (for token "
    "ids), Dropout, Identity, Flatten, reshapes, cat, chunk / split, additions and scaling by constants"
)


# --------------------------------------------------------------------------------------------------
# The plan: the traced graph with one propagation step per node.


@dataclass
class Step:
    node: fx.Node
    # input, output, const, meta, skip, weighted, affine, linear, wta, rearrange, sum, scale, pass, norm, softmax,
    # product, attention, embedding, split
    kind: str
    module: str | None = None  # the conv / linear / BatchNorm module of weighted and affine steps (None: F.linear)
    bn: str | None = None  # the BatchNorm folded into a weighted step
    src: fx.Node | None = None  # the one input-dependent argument of single-input steps
    terms: list[tuple[fx.Node, int]] = field(default_factory=list)  # sum steps: (operand, sign)
    nonneg: bool = False  # the input of the step is known to be >= 0 (saves work for z+ / alpha-beta)
    params: tuple[Any, Any] | None = None  # F.linear steps: the weight and bias arguments (nodes or constants)
    via: fx.Node | None = None  # rearrange steps that take one part of a split (chunk / split / unbind) of src

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
    module_outputs: dict[str, list[fx.Node]] = field(default_factory=dict)  # module name -> the output node of each call


class _Tracer(fx.Tracer):
    """The default tracer: torch.nn modules are leaves, user modules (blocks) are traced through.

    A ``torch.compile``-d submodule (``OptimizedModule``) is traced through its eager original
    (``_orig_mod``, the same weights): fx cannot trace dynamo-compiled code. The transformer modules of
    :data:`~.decompose.DECOMPOSED` are traced through their reference computation. Every module call's output
    node is recorded in ``module_outputs``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.module_outputs: dict[str, list[fx.Node]] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) not in DECOMPOSED and super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        original = getattr(m, "_orig_mod", None)
        if is_compiled(m) and isinstance(original, nn.Module):
            return self.call_module(original, original.forward, args, kwargs)
        decomposed = DECOMPOSED.get(type(m))
        if decomposed is not None:
            forward = functools.partial(decomposed, m)
        out = super().call_module(m, forward, args, kwargs)
        first = out if isinstance(out, fx.Proxy) else next((v for v in out if isinstance(v, fx.Proxy)), None) if isinstance(out, tuple) else None
        if first is not None:
            try:
                name = self.path_of_module(m)
            except NameError:  # a module that is not a submodule of the traced model
                name = None
            if name is not None:
                self.module_outputs.setdefault(name, []).append(first.node)
        return out


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


class TraceFailed(TypeError):
    """torch.fx could not trace the forward symbolically (not: an operation without a rule)."""


def _trace(model: nn.Module, outputs: dict[str, list[fx.Node]] | None = None) -> tuple[fx.Graph, dict[str, Any]]:
    before = set(model.__dict__)
    tracer = _Tracer()
    try:
        with eval_mode(model):
            graph = tracer.trace(model)
        if outputs is not None:
            outputs.update(tracer.module_outputs)
    except Exception as err:
        raise TraceFailed(
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
    module_outputs: dict[str, list[fx.Node]] = {}
    graph, constants = _trace(model, module_outputs)
    return plan_from_graph(model, graph, constants, module_outputs)


def plan_from_graph(model: nn.Module, graph: fx.Graph, constants: dict[str, Any], module_outputs: dict[str, list[fx.Node]]) -> Plan:
    """The plan of a graph in the tracer's form (traced here, or recorded by :mod:`.record`): one step per node.

    Raises:
        TypeError: a module or operation without a rule, or a graph that does not explain one input.
    """
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
            step = _classify(node, modules, single_source, dependent, nonneg, by_node)
            if step.kind == "meta":  # sizes / shapes: values computed from the input, but no relevance
                dependent.discard(node)
            if step.kind == "weighted" and step.bn is not None:
                conv_node = step.node.args[0]
                assert isinstance(conv_node, fx.Node)  # _fusable matched it
                by_node[conv_node].kind = "skip"  # the conv / linear is computed with the BatchNorm
        steps.append(step)
        by_node[node] = step
    return Plan(graph=graph, steps=steps, constants=constants, dependent=dependent, module_outputs=module_outputs)


def _classify(node: fx.Node, modules: dict[str, nn.Module], single_source: Callable[[fx.Node], fx.Node],
              dependent: set[fx.Node], nonneg: set[fx.Node], by_node: dict[fx.Node, Step]) -> Step:
    op, target = node.op, node.target
    step = _classify_transformer(node, modules, single_source, dependent, by_node)
    if step is not None:
        return step
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


def _argument(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _classify_transformer(node: fx.Node, modules: dict[str, nn.Module], single_source: Callable[[fx.Node], fx.Node],
                          dependent: set[fx.Node], by_node: dict[fx.Node, Step]) -> Step | None:
    """The steps of transformers (and of token inputs): normalisations, smooth activations, softmax, products of
    input-dependent tensors, attention, embeddings, masks, splits, ``F.linear``; ``None`` for anything else."""
    op, target = node.op, node.target
    deps = [a for a in node.args if isinstance(a, fx.Node) and a in dependent]  # x * x: two operands
    if op == "call_module":
        module = modules[str(target)]
        kind_of = type(module)
        if kind_of in _SMOOTH_ACTIVATION_MODULES:
            return Step(node, "pass", src=single_source(node))
        if kind_of in _NORM_MODULES:
            return Step(node, "norm", src=single_source(node))
        if kind_of is nn.Softmax:
            return Step(node, "softmax", src=single_source(node))
        if kind_of is nn.Embedding:
            if module.max_norm is not None:
                raise _unsupported(node, modules, " with max_norm (it renormalises its weights in place)")
            return Step(node, "embedding", src=single_source(node))
        return None
    if op == "call_function":
        if target is F.linear:
            src = single_source(node)
            params = (_argument(node, 1, "weight"), _argument(node, 2, "bias"))
            if any(isinstance(p, fx.Node) and p in dependent for p in params):
                raise _unsupported(node, modules, " with input-dependent weights")
            return Step(node, "weighted", src=src, params=params)
        if target in _SMOOTH_ACTIVATION_FUNCTIONS:
            return Step(node, "pass", src=single_source(node))
        if target in _NORM_FUNCTIONS:
            return Step(node, "norm", src=single_source(node))
        if target in _SOFTMAX_FUNCTIONS:
            return Step(node, "softmax", src=single_source(node))
        if target in _PRODUCT_FUNCTIONS or (target in _MUL_FUNCTIONS and len(deps) > 1):
            return Step(node, "product")
        if target in _ATTENTION_FUNCTIONS:
            masks = [a for a in (*node.args[3:], *node.kwargs.values()) if isinstance(a, fx.Node)]
            if any(m in dependent for m in masks):
                raise _unsupported(node, modules, " with a mask computed from the input's values")
            return Step(node, "attention")
        if target in _EMBEDDING_FUNCTIONS:
            if _argument(node, 3, "max_norm") is not None:
                raise _unsupported(node, modules, " with max_norm (it renormalises its weights in place)")
            return Step(node, "embedding", src=single_source(node))
        if target in _MASK_FUNCTIONS:
            return Step(node, "meta")
        if target in _SPLIT_FUNCTIONS:
            return Step(node, "split", src=single_source(node))
        if target is operator.getitem and node.args and isinstance(node.args[0], fx.Node):
            split = by_node.get(node.args[0])
            if split is not None and split.kind == "split":
                return Step(node, "rearrange", src=split.source, via=split.node)
        return None
    if op == "call_method":
        name = str(target)
        if name in _SMOOTH_ACTIVATION_METHODS:
            return Step(node, "pass", src=single_source(node))
        if name in _SOFTMAX_METHODS:
            return Step(node, "softmax", src=single_source(node))
        if name in _PRODUCT_METHODS or (name in _MUL_METHODS and len(deps) > 1):
            return Step(node, "product")
        if name in _MASK_METHODS:
            return Step(node, "meta")
        if name in _SPLIT_METHODS:
            return Step(node, "split", src=single_source(node))
    return None


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


_PLANS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Plan | str]] = weakref.WeakKeyDictionary()
_FORCE_RECORDED = False  # tests: take the recorded path (:mod:`.record`) also for models fx can trace


def model_signature(model: nn.Module) -> tuple:
    """What a cached plan of ``model`` stays valid for: its modules (names and types) and its forward."""
    return (
        tuple((name, type(m)) for name, m in model.named_modules()),
        type(model).forward,
        model.__dict__.get("forward"),
    )


def _traced_plan(model: nn.Module) -> Plan:
    """The plan traced with torch.fx (cached per model signature, a failed trace too: :class:`TraceFailed`)."""
    signature = model_signature(model)
    cached = _PLANS.get(model)
    if cached is not None and cached[0] == signature:
        if isinstance(cached[1], str):
            raise TraceFailed(cached[1])
        return cached[1]
    try:
        plan = _build_plan(model)
    except TraceFailed as err:
        _PLANS[model] = (signature, str(err))
        raise
    _PLANS[model] = (signature, plan)
    return plan


@functools.cache
def _leaf_tracer() -> _Tracer:
    return _Tracer()


def leaf_module(module: nn.Module, name: str) -> bool:
    """Whether the tracer keeps ``module`` as one ``call_module`` node (``torch.nn`` layers, not containers, not
    the transformer modules it decomposes)."""
    return _leaf_tracer().is_leaf_module(module, name)


def plan_for(model: nn.Module, sample: torch.Tensor | None = None) -> Plan:
    """The plan of ``model``: traced with torch.fx (cached per model) where fx can trace the forward; otherwise
    recorded from a forward pass on ``sample`` (:mod:`.record`, cached per input shape).

    Raises:
        TypeError: a module or operation without a rule; a forward fx cannot trace and no ``sample`` to record it
            on, or a recording that fails (see :func:`~.record.recorded_plan`).
    """
    untraceable = False
    if not _FORCE_RECORDED:
        try:
            return _traced_plan(model)
        except TraceFailed as err:
            if sample is None:
                raise TraceFailed(f"{err} (Given an input, LRP records the forward pass instead.)") from None
            untraceable = True
    # imported here: record imports this module
    from lightning_introspect.methods.lrp.record import recorded_plan

    if sample is None:
        raise TypeError("LRP records the forward pass of this model on an input, but got none.")
    try:
        return recorded_plan(model, sample)
    except TypeError as err:
        if not untraceable:
            raise
        raise TypeError(f"{err} [recorded from a forward pass on the input: torch.fx cannot trace {type(model).__name__}]") from err


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
_KNOWN_MODULES = (
    *_WEIGHTED, *_BATCHNORM, *_MAXPOOL, *_AVGPOOL, *_IDENTITY_MODULES, *_ACTIVATION_MODULES, *_SMOOTH_ACTIVATION_MODULES,
    *_NORM_MODULES, *_REARRANGE_MODULES, *_UPSAMPLE_MODULES, *_PAD_MODULES, nn.Softmax, nn.Embedding,
)


def _layer_problem(model: nn.Module) -> str | None:
    """Without an input, a model fx cannot trace is judged by its layers alone: a ``torch.nn`` layer without a
    rule is refused (containers and losses, which forward never runs through, are not layers)."""
    leaves: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{leaf}.") for leaf in leaves) or not leaf_module(module, name):
            continue
        leaves.append(name)
        if isinstance(module, (*_CONTAINERS, nn.modules.loss._Loss)) or type(module) in _KNOWN_MODULES:
            continue
        return f"LRP has no rule for module '{name}' of type {_type_name(module)}. Supported: {_SUPPORTED_TEXT}."
    return None


def lrp_unsupported(model: nn.Module, sample: torch.Tensor | None = None) -> str | None:
    """Why :func:`lrp` cannot explain ``model`` (a module or operation without a rule, a forward that can be
    neither traced nor recorded), or ``None`` when it can.

    A model torch.fx can trace is traced symbolically; without ``sample`` no forward pass runs. A model fx
    cannot trace (Hugging Face transformers among them) has its plan recorded from a forward pass on ``sample``
    (:mod:`.record`); without ``sample`` only its ``torch.nn`` layers are checked, and the recording on the
    real input decides when :func:`lrp` runs.

    Args:
        model: the model.
        sample: optional ``(N, ...)`` inputs (floating, or token ids): then one LRP forward pass runs on them (eval
            mode, no gradients kept, the model untouched) and what only shows at run time is found too, such as
            token ids reaching something other than an ``nn.Embedding``.

    Example:
        >>> lrp_unsupported(nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Linear(3, 2))) is None
        True
        >>> lrp_unsupported(nn.Sequential(nn.Linear(4, 3), nn.GroupNorm(1, 3))).startswith("LRP has no rule for module '1'")
        True
        >>> lrp_unsupported(nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2)), torch.tensor([[1, 2]])) is None
        True
    """
    try:
        if sample is None:
            if not _FORCE_RECORDED:
                _traced_plan(model)
                return None
            return _layer_problem(model)
        plan = plan_for(model, sample)
        # imported here: propagate imports this module
        from lightning_introspect.methods.lrp.propagate import check_forward

        check_forward(plan, model, sample)
    except TraceFailed:
        return _layer_problem(model)
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
    if node.op == "call_module" and isinstance(modules[str(node.target)], _SMOOTH_ACTIVATION_MODULES):
        module = modules[str(node.target)]
        return module.forward(x.clone() if getattr(module, "inplace", False) else x)
    if node.target in _SMOOTH_ACTIVATION_FUNCTIONS or node.target in _SMOOTH_ACTIVATION_METHODS:
        rest = node.args[1:]
        if any(isinstance(a, fx.Node) for a in (*rest, *node.kwargs.values())):
            raise TypeError(f"LRP needs constant arguments besides the input in '{op_name(node)}'.")
        if node.op == "call_method":
            return torch.sigmoid(x)
        fn = node.target
        assert callable(fn)
        kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
        return fn(x.clone(), *rest, **kwargs)  # cloned: a positional inplace=True must not change our stored value
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
