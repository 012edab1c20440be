"""Layer-wise relevance propagation (LRP): epsilon, z+ and alpha-beta rules on plain ``nn.Module`` models.

How it works. The model's ``forward`` is traced once with :mod:`torch.fx` (cached per model), so every
operation is visible: modules, functional ``F.relu``, ``x.view``, residual ``a + b``. One forward pass
over that graph keeps every intermediate value; relevance then flows from the output back to the input
node by node, each operation with its own rule, using the gradient-times-input form of LRP (for a linear
operation ``z = f(a)``: ``s = R / z``, ``c = vjp_f(s)``, ``R_a = a * c``) with ``torch.autograd.grad``
on one small local graph per operation. Nothing of the user's model is modified: no hooks, no weight
swaps, no ``.grad``; modes are restored (the pass runs in eval mode).

Rules for the linear operations (convolutions, linear layers, folded BatchNorm, additions, average
pooling, scaling by constants):

* ``"epsilon"``: ``R_j = sum_k a_j w_jk / (z_k + eps * sign(z_k)) R_k`` (``sign(0) = 1``, as captum).
  Biases absorb their share of relevance.
* ``"alpha_beta"``: ``R_j = sum_k (alpha (a_j w_jk)^+ / z_k^+ - beta (a_j w_jk)^- / z_k^-) R_k`` with
  ``alpha - beta = 1``; biases are ignored (not counted in ``z^+`` / ``z^-``). Where a neuron has
  contributions of one sign only, its relevance is shared in proportion to them (the term of the missing
  sign would be ``0 / 0``), which keeps every layer exactly conservative.
* ``"zplus"`` (alias ``"z+"``): alpha-beta with ``alpha=1, beta=0``: only positive contributions
  (negative ones only where a neuron has no positive contribution at all). Maps have the sign of the
  target score.

Other operations: ReLU / ReLU6 / LeakyReLU / Tanh (module, functional, in-place or not), Dropout and
Identity pass relevance through unchanged; max pooling is winner-take-all (the epsilon rule applied to
the max, as captum does; under z+ / alpha-beta the relevance goes to the arg-max unchanged); reshapes,
``Flatten``, ``cat``, ``permute``, indexing move relevance with the values. ``BatchNorm`` directly after a
conv / linear layer is folded into it for the computation; a BatchNorm with no such layer before it is
an elementwise affine layer with the chosen rule (epsilon: its shift absorbs relevance and can amplify it;
z+ / alpha-beta: relevance passes through). Anything else (GELU, Softmax, LayerNorm, attention, products
of two input-dependent tensors, ...) raises ``TypeError`` naming the module / operation and its type.

Output relevance: like captum, the explained score itself, ``R_out = output * d score / d output``: for a
class id that is the one-hot times the logit, for a :class:`RegionTarget` the logits of the class over
the mask. So with zero biases the input relevance sums to the target score.
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

from lightning_introspect._torch.guards import eval_mode, fresh_input, introspection_mode, is_compiled
from lightning_introspect.methods.targets import Target, target_scores

__all__ = ["LRP_RULES", "fold_batchnorm", "lrp", "lrp_unsupported"]

LRP_RULES = ("epsilon", "zplus", "z+", "alpha_beta")

# --------------------------------------------------------------------------------------------------
# What we know how to propagate through (exact types: a subclass may change forward).

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WEIGHTED = (*_CONV, nn.Linear)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh)
_NONNEG_ACTIVATIONS = (nn.ReLU, nn.ReLU6)
_REARRANGE_MODULES = (nn.Flatten, nn.Unflatten)

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu6}
_LEAKY_FUNCTIONS = {F.leaky_relu, F.leaky_relu_}
_TANH_FUNCTIONS = {torch.tanh, F.tanh}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
_LINEAR_FUNCTIONS = {
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    torch.mean, torch.sum,
}
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
    "Conv1d/2d/3d, Linear, BatchNorm (folded into a preceding conv / linear, else affine), max / avg / adaptive "
    "pooling, ReLU / ReLU6 / LeakyReLU / Tanh, Dropout, Identity, Flatten, reshapes, cat, additions and "
    "scaling by constants"
)


# --------------------------------------------------------------------------------------------------
# The plan: the traced graph with one propagation step per node.


@dataclass
class _Step:
    node: fx.Node
    kind: str  # input, output, const, meta, skip, weighted, affine, linear, wta, rearrange, sum, scale, pass
    module: str | None = None  # the conv / linear / BatchNorm module of weighted and affine steps
    bn: str | None = None  # the BatchNorm folded into a weighted step
    src: fx.Node | None = None  # the one input-dependent argument of single-input steps
    terms: list[tuple[fx.Node, int]] = field(default_factory=list)  # sum steps: (operand, sign)
    nonneg: bool = False  # the input of the step is known to be >= 0 (saves work for z+ / alpha-beta)


@dataclass
class _Plan:
    graph: fx.Graph
    steps: list[_Step]
    constants: dict[str, Any]  # tensor constants the tracer would have stored on the model
    dependent: set[fx.Node]  # nodes whose tensor value depends on the input


class _Tracer(fx.Tracer):
    """The default tracer: torch.nn modules are leaves, user modules (blocks) are traced through.

    A ``torch.compile``-d submodule (``OptimizedModule``) is traced through its eager original
    (``_orig_mod``, the same weights): fx cannot trace dynamo-compiled code.
    """

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if is_compiled(m):
            return self.call_module(m._orig_mod, m._orig_mod.forward, args, kwargs)
        return super().call_module(m, forward, args, kwargs)


def _type_name(obj: object) -> str:
    cls = type(obj)
    module = cls.__module__
    if module.startswith("torch.nn.modules"):
        module = "torch.nn"
    return f"{module}.{cls.__qualname__}"


def _op_name(node: fx.Node) -> str:
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
        what = f"operation '{_op_name(node)}'"
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


def _fusable(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The conv / linear node a BatchNorm node can be folded into, if any."""
    if node.op != "call_module" or type(modules[str(node.target)]) not in _BATCHNORM or len(node.args) != 1:
        return None
    src = node.args[0]
    if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1 or src.kwargs:
        return None
    if type(modules[str(src.target)]) not in _WEIGHTED or len(src.args) != 1:
        return None
    return src


def _build_plan(model: nn.Module) -> _Plan:
    graph, constants = _trace(model)
    modules = dict(model.named_modules())
    steps: list[_Step] = []
    by_node: dict[fx.Node, _Step] = {}
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
                step, seen_input = _Step(node, "input"), True
                dependent.add(node)
                nonneg.discard(node)
            elif node.args:  # an argument with a default value
                step = _Step(node, "const")
            else:
                raise TypeError(f"LRP explains models with one input tensor, but forward also needs '{node.target}'.")
        elif node.op == "output":
            step = _Step(node, "output", src=_output_source(node.args[0]))
            if step.src is None or step.src not in dependent:
                raise TypeError(
                    "LRP needs a model that returns a tensor computed from its input (or a tuple whose first element, "
                    "or a dict whose 'logits' / 'preds' entry, is one)."
                )
        elif node.op == "get_attr" or not any(n in dependent for n in node.all_input_nodes):
            step = _Step(node, "const")
        else:
            dependent.add(node)
            step = _classify(node, modules, single_source, dependent, nonneg)
            if step.kind == "meta":  # sizes / shapes: values computed from the input, but no relevance
                dependent.discard(node)
            if step.kind == "weighted" and step.bn is not None:
                by_node[step.node.args[0]].kind = "skip"  # the conv / linear is computed with the BatchNorm
        steps.append(step)
        by_node[node] = step
    return _Plan(graph=graph, steps=steps, constants=constants, dependent=dependent)


def _classify(node: fx.Node, modules: dict[str, nn.Module], single_source: Callable[[fx.Node], fx.Node],
              dependent: set[fx.Node], nonneg: set[fx.Node]) -> _Step:
    op, target = node.op, node.target
    if op == "call_module":
        module = modules[str(target)]
        kind_of = type(module)
        src = single_source(node)
        if node.kwargs:
            raise _unsupported(node, modules, " called with keyword arguments")
        if kind_of in _WEIGHTED:
            return _Step(node, "weighted", module=str(target), src=src, nonneg=src in nonneg)
        if kind_of in _BATCHNORM:
            if module.running_mean is None or module.running_var is None:
                raise TypeError(
                    f"LRP cannot explain module '{target}' of type {_type_name(module)}: without running statistics "
                    "(track_running_stats=False) it normalises with the batch's own statistics, mixing samples."
                )
            conv = _fusable(node, modules)
            if conv is not None:
                return _Step(node, "weighted", module=str(conv.target), bn=str(target), src=conv.args[0],
                             nonneg=conv.args[0] in nonneg)
            return _Step(node, "affine", module=str(target), src=src)
        if kind_of in _MAXPOOL:
            if getattr(module, "return_indices", False):
                raise _unsupported(node, modules, " with return_indices=True")
            _inherit(node, src, nonneg)
            return _Step(node, "wta", src=src)
        if kind_of in _AVGPOOL:
            _inherit(node, src, nonneg)
            return _Step(node, "linear", src=src, nonneg=src in nonneg)
        if kind_of in _ACTIVATION_MODULES:
            if kind_of in _NONNEG_ACTIVATIONS:
                nonneg.add(node)
            return _Step(node, "pass", src=src)
        if kind_of in _IDENTITY_MODULES:
            _inherit(node, src, nonneg)
            return _Step(node, "pass", src=src)
        if kind_of in _REARRANGE_MODULES:
            _inherit(node, src, nonneg)
            return _Step(node, "rearrange")
        raise _unsupported(node, modules)

    if op == "call_function":
        if target in _META_FUNCTIONS:
            return _Step(node, "meta")
        if target in _RELU_FUNCTIONS or target in _LEAKY_FUNCTIONS or target in _TANH_FUNCTIONS:
            src = single_source(node)
            if target in _RELU_FUNCTIONS:
                nonneg.add(node)
            return _Step(node, "pass", src=src)
        if target in _DROPOUT_FUNCTIONS:
            src = single_source(node)
            _inherit(node, src, nonneg)
            return _Step(node, "pass", src=src)
        if target in _LINEAR_FUNCTIONS:
            src = single_source(node)
            _inherit(node, src, nonneg)
            return _Step(node, "linear", src=src, nonneg=src in nonneg)
        if target in _MAX_FUNCTIONS:
            src = single_source(node)
            _inherit(node, src, nonneg)
            return _Step(node, "wta", src=src)
        if target in _REARRANGE_FUNCTIONS:
            deps = [n for n in node.all_input_nodes if n in dependent]
            if all(n in nonneg for n in deps):
                nonneg.add(node)
            return _Step(node, "rearrange")
        if target in _SUM_FUNCTIONS:
            return _sum_step(node, _SUM_FUNCTIONS[target], modules, dependent, nonneg)
        if target in _SCALE_FUNCTIONS:
            return _scale_step(node, modules, dependent)
        raise _unsupported(node, modules)

    if op == "call_method":
        name = str(target)
        if name in _META_METHODS:
            return _Step(node, "meta")
        if name in _RELU_METHODS or name in _TANH_METHODS:
            src = single_source(node)
            if name in _RELU_METHODS:
                nonneg.add(node)
            return _Step(node, "pass", src=src)
        if name in _LINEAR_METHODS:
            src = single_source(node)
            _inherit(node, src, nonneg)
            return _Step(node, "linear", src=src, nonneg=src in nonneg)
        if name in _REARRANGE_METHODS:
            src = single_source(node)
            _inherit(node, src, nonneg)
            return _Step(node, "rearrange")
        if name in _SUM_METHODS:
            return _sum_step(node, _SUM_METHODS[name], modules, dependent, nonneg)
        if name in _SCALE_METHODS:
            return _scale_step(node, modules, dependent)
        raise _unsupported(node, modules)
    raise _unsupported(node, modules)


def _inherit(node: fx.Node, src: fx.Node, nonneg: set[fx.Node]) -> None:
    if src in nonneg:
        nonneg.add(node)


def _sum_step(node: fx.Node, sign: int, modules: dict[str, nn.Module], dependent: set[fx.Node], nonneg: set[fx.Node]) -> _Step:
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        raise _unsupported(node, modules, " with these arguments")
    terms = [(arg, s) for arg, s in zip(node.args, (1, sign)) if isinstance(arg, fx.Node) and arg in dependent]
    if all(s > 0 and n in nonneg for n, s in terms) and all(isinstance(a, fx.Node) and a in dependent for a in node.args):
        nonneg.add(node)
    return _Step(node, "sum", terms=terms)


def _scale_step(node: fx.Node, modules: dict[str, nn.Module], dependent: set[fx.Node]) -> _Step:
    deps = [a for a in node.args if isinstance(a, fx.Node) and a in dependent]
    is_div = node.target in (operator.truediv, operator.itruediv, torch.div) or node.target in ("div", "div_")
    if len(deps) != 1 or node.kwargs or (is_div and node.args[0] is not deps[0]):
        raise _unsupported(node, modules, " (only products / quotients of one input-dependent tensor and a constant)")
    return _Step(node, "scale", src=deps[0])


_PLANS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, _Plan]] = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    return (
        tuple((name, type(m)) for name, m in model.named_modules()),
        type(model).forward,
        model.__dict__.get("forward"),
    )


def _plan(model: nn.Module) -> _Plan:
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
        >>> lrp_unsupported(nn.Sequential(nn.Linear(4, 3), nn.GELU()))[:27]
        "LRP has no rule for module "
    """
    try:
        _plan(model)
    except TypeError as err:
        return str(err)
    return None


# --------------------------------------------------------------------------------------------------
# BatchNorm folding


def _bn_scale_shift(bn: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``BN(x) = x * scale + shift`` per channel in eval mode."""
    var = bn.running_var.detach().to(dtype)
    mean = bn.running_mean.detach().to(dtype)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(dtype)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(dtype)
    return scale, shift


def _fold(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``BN(layer(x))`` as one conv / linear layer (out channels first in ``weight``)."""
    scale, shift = _bn_scale_shift(bn, weight.dtype)
    folded_weight = weight * scale.view(-1, *([1] * (weight.ndim - 1)))
    folded_bias = shift if bias is None else bias * scale + shift
    return folded_weight, folded_bias


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
        conv = _fusable(node, modules)
        if conv is None:
            continue
        layer, bn = modules[str(conv.target)], modules[str(node.target)]
        if bn.running_mean is None:
            continue
        with torch.no_grad():
            weight, bias = _fold(layer.weight.detach(), None if layer.bias is None else layer.bias.detach(), bn)
            layer.weight = nn.Parameter(weight.clone())
            layer.bias = nn.Parameter(bias.clone())
        node.replace_all_uses_with(conv)
        graph.erase_node(node)
    folded = fx.GraphModule(clone, graph, class_name=f"Folded{type(model).__name__}")
    return folded.eval()


# --------------------------------------------------------------------------------------------------
# Propagation


def _stabilize(z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``z + eps * sign(z)`` with ``sign(+0) = 1`` (captum's convention; ``-0.0`` counts as negative)."""
    return torch.copysign(eps, z).add_(z)


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value) if not hasattr(value, "_fields") else value
    return value


class _Propagator:
    def __init__(self, plan: _Plan, model: nn.Module, rule: str, epsilon: float, alpha: float, beta: float,
                 dtype: torch.dtype) -> None:
        self.plan, self.model, self.rule = plan, model, rule
        self.epsilon, self.alpha, self.beta, self.dtype = epsilon, alpha, beta, dtype
        self.modules = dict(model.named_modules())
        self.vals: dict[fx.Node, Any] = {}
        self.ctx: dict[fx.Node, Any] = {}
        self.dependent = plan.dependent

    # ---- forward -------------------------------------------------------------------------------

    def _param(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.detach().to(self.dtype)

    def _layer(self, step: _Step) -> tuple[Callable[..., torch.Tensor], torch.Tensor, torch.Tensor | None]:
        module = self.modules[str(step.module)]
        weight, bias = self._param(module.weight), self._param(module.bias)
        if step.bn is not None:
            weight, bias = _fold(weight, bias, self.modules[step.bn])
        fn = F.linear if isinstance(module, nn.Linear) else module._conv_forward
        return fn, weight, bias

    def _resolve_attr(self, target: str) -> Any:
        if target in self.plan.constants:
            return self.plan.constants[target]
        value: Any = self.model
        for part in target.split("."):
            value = getattr(value, part)
        return value

    def _arguments(self, node: fx.Node, leaves: list[tuple[fx.Node, torch.Tensor]] | None,
                   override: dict[fx.Node, torch.Tensor] | None = None) -> tuple[tuple, dict]:
        def value(n: fx.Node) -> Any:
            v = override[n] if override and n in override else self.vals[n]
            if leaves is not None and n in self.dependent and isinstance(v, torch.Tensor) and v.is_floating_point():
                v = v.detach().requires_grad_()
                leaves.append((n, v))
            return v

        return fx.node.map_arg(node.args, value), fx.node.map_arg(node.kwargs, value)

    def _call(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        """Evaluate a node like the model would, but never in place (our values must stay intact)."""
        if node.op == "get_attr":
            return self._resolve_attr(str(node.target))
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            if getattr(module, "inplace", False):
                args = (args[0].clone(), *args[1:])
            return module.forward(*args, **kwargs)  # forward, not __call__: the user's hooks stay silent
        if node.op == "call_function":
            fn = _OUT_OF_PLACE.get(node.target, node.target)
            if kwargs.get("inplace"):
                kwargs = {**kwargs, "inplace": False}
            return fn(*args, **kwargs)
        if node.op == "call_method":
            name = str(node.target)
            if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
                name = name[:-1]
            return getattr(args[0], name)(*args[1:], **kwargs)
        raise AssertionError(f"unexpected node {node.op}")  # pragma: no cover

    def _pass_value(self, node: fx.Node, x: torch.Tensor) -> torch.Tensor:
        if node.op == "call_module":
            module = self.modules[str(node.target)]
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
        return F.leaky_relu(x, slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        epsilon_rule = self.rule == "epsilon"
        vals, ctx = self.vals, self.ctx
        output: torch.Tensor | None = None
        for step in self.plan.steps:
            node, kind = step.node, step.kind
            if kind == "input":
                vals[node] = x
            elif kind == "skip":
                continue
            elif kind in ("const", "meta", "sum", "scale"):
                if node.op == "placeholder":
                    vals[node] = node.args[0]
                    continue
                args, kwargs = self._arguments(node, None)
                with torch.no_grad():
                    vals[node] = _detach(self._call(node, args, kwargs))
            elif kind == "weighted":
                a = vals[step.src]
                if step.bn is not None and isinstance(self.modules[str(step.module)], nn.Linear) and a.ndim != 2:
                    raise TypeError(f"LRP folds BatchNorm '{step.bn}' into linear layer '{step.module}' only for (N, F) inputs.")
                if epsilon_rule:
                    fn, weight, bias = self._layer(step)
                    leaf = a.detach().requires_grad_()
                    z = fn(leaf, weight, bias)
                    ctx[node] = leaf, z
                    vals[node] = z.detach()
                else:
                    vals[node] = self._weighted_ab_forward(step, a)
            elif kind == "affine":
                scale, shift = _bn_scale_shift(self.modules[str(step.module)], self.dtype)
                a = vals[step.src]
                shape = (1, -1, *([1] * (a.ndim - 2)))
                contribution = a * scale.view(shape)
                ctx[node] = contribution
                vals[node] = contribution + shift.view(shape)
            elif kind == "pass":
                vals[node] = self._pass_value(node, vals[step.src])
            elif kind in ("linear", "wta", "rearrange"):
                leaves: list[tuple[fx.Node, torch.Tensor]] = []
                args, kwargs = self._arguments(node, leaves)
                z = self._call(node, args, kwargs)
                if not isinstance(z, torch.Tensor):
                    if kind == "rearrange":  # indexing a size tuple: no relevance
                        step.kind = "meta"
                        self.plan.dependent.discard(node)
                        vals[node] = _detach(z)
                        continue
                    raise TypeError(f"LRP expected operation '{_op_name(node)}' to return one tensor, got {type(z).__name__}.")
                ctx[node] = leaves, z
                vals[node] = z.detach()
            elif kind == "output":
                output = vals[step.src]
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"LRP needs a model that returns one tensor, but it returned {type(output).__name__}.")
        return output

    # ---- backward ------------------------------------------------------------------------------

    def _ab_scales(self, relevance: torch.Tensor, zp: torch.Tensor, zn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``R / z+`` and ``R / z-`` weighted by alpha / -beta, with the one-sign fallback (factor 1).

        ``zp >= 0`` and ``zn <= 0``. Where a part is zero, so is every contribution to it, so its factor is
        irrelevant; the clamp only keeps the division finite. Written without boolean masks (slow on CPU).
        """
        tiny = torch.finfo(zp.dtype).tiny ** 0.5
        has_p, has_n = zp.sign(), zn.sign().neg_()  # 1 where the part exists, else 0
        if self.alpha == 1.0:
            sp = relevance / zp.clamp(min=tiny)
        else:
            sp = relevance * has_n.mul(self.alpha - 1.0).add_(1.0) / zp.clamp(min=tiny)
        sn = relevance * has_n.mul_(has_p).mul_(-(1.0 + self.beta)).add_(1.0) / zn.clamp(max=-tiny)
        return sp, sn

    def _weighted_ab_forward(self, step: _Step, a: torch.Tensor) -> torch.Tensor:
        """Forward of a conv / linear layer as ``z = z+ + z- + b`` (alpha-beta rules), keeping the graph.

        ``z+ = f(a+, W+) + f(a-, W-)`` and ``z- = f(a+, W-) + f(a-, W+)`` (biases not counted). With one
        group they come out of a single call: output channels stacked ``[W+; W-]`` and, for inputs that can
        be negative, input channels stacked ``[a+, a-]`` with the weight ``[[W+, W-], [W-, W+]]``.
        """
        fn, weight, bias = self._layer(step)
        module = self.modules[str(step.module)]
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        out_dim = -1 if isinstance(module, nn.Linear) else 1
        channels = weight.shape[0]
        if getattr(module, "groups", 1) == 1:
            if step.nonneg:
                leaf = a.detach().requires_grad_()
                stacked = fn(leaf, torch.cat([wp, wn]), None)
            else:
                leaf = torch.cat([a.clamp(min=0), a.clamp(max=0)], dim=out_dim).requires_grad_()
                stacked = fn(leaf, torch.cat([torch.cat([wp, wn], dim=1), torch.cat([wn, wp], dim=1)]), None)
            zp, zn = stacked.split(channels, dim=out_dim)
            self.ctx[step.node] = ("stacked", leaf, stacked, zp.detach(), zn.detach())
        else:
            ap = a.clamp(min=0).requires_grad_()
            an = a.clamp(max=0).requires_grad_()
            zp = fn(ap, wp, None) + fn(an, wn, None)
            zn = fn(ap, wn, None) + fn(an, wp, None)
            self.ctx[step.node] = ("split", ap, an, zp, zn)
        z = zp.detach() + zn.detach()
        if bias is not None:
            z = z + (bias if out_dim == -1 else bias.view(1, -1, *([1] * (z.ndim - 2))))
        return z

    def _weighted_ab(self, step: _Step, relevance: torch.Tensor) -> torch.Tensor:
        how, *saved = self.ctx.pop(step.node)
        module = self.modules[str(step.module)]
        out_dim = -1 if isinstance(module, nn.Linear) else 1
        if how == "stacked":
            leaf, stacked, zp, zn = saved
            sp, sn = self._ab_scales(relevance, zp, zn)
            (grad,) = torch.autograd.grad(stacked, leaf, torch.cat([sp, sn], dim=out_dim))
            share = leaf.detach() * grad
            if step.nonneg:
                return share
            positive, negative = share.chunk(2, dim=out_dim)
            return positive + negative
        ap, an, zp, zn = saved
        sp, sn = self._ab_scales(relevance, zp.detach(), zn.detach())
        gp, gn = torch.autograd.grad((zp, zn), (ap, an), (sp, sn))
        return ap.detach() * gp + an.detach() * gn

    def _linear_ab(self, step: _Step, relevance: torch.Tensor) -> torch.Tensor:
        leaves, z = self.ctx.pop(step.node)
        a = self.vals[step.src]
        if step.nonneg:  # weights >= 0 and inputs >= 0: one-sign contributions, shared in proportion
            sp, _ = self._ab_scales(relevance, z, torch.zeros_like(z))
            (grad,) = torch.autograd.grad(z, leaves[0][1], sp)
            return a * grad
        with torch.enable_grad():
            ap = a.clamp(min=0).requires_grad_()
            an = a.clamp(max=0).requires_grad_()
            zp = self._call(step.node, *self._arguments(step.node, None, {step.src: ap}))
            zn = self._call(step.node, *self._arguments(step.node, None, {step.src: an}))
            sp, sn = self._ab_scales(relevance, zp, zn)
            gp, gn = torch.autograd.grad((zp, zn), (ap, an), (sp, sn))
        return ap.detach() * gp + an.detach() * gn

    def backward(self, relevance_out: torch.Tensor, output_node: fx.Node) -> torch.Tensor | None:
        eps_rule = self.rule == "epsilon"
        eps = torch.tensor(self.epsilon, dtype=self.dtype, device=relevance_out.device)
        vals, ctx = self.vals, self.ctx
        relevance: dict[fx.Node, torch.Tensor] = {output_node: relevance_out}

        def add(node: fx.Node, r: torch.Tensor) -> None:
            relevance[node] = relevance[node] + r if node in relevance else r

        for step in reversed(self.plan.steps):
            node, kind = step.node, step.kind
            r = relevance.pop(node, None)
            if r is None:
                continue
            if kind == "input":
                return r
            if kind == "pass":
                add(step.src, r)
            elif kind == "weighted":
                if eps_rule:
                    leaf, z = ctx.pop(node)
                    (grad,) = torch.autograd.grad(z, leaf, r / _stabilize(z.detach(), eps))
                    add(step.src, vals[step.src] * grad)
                else:
                    add(step.src, self._weighted_ab(step, r))
            elif kind == "linear":
                if eps_rule:
                    leaves, z = ctx.pop(node)
                    (grad,) = torch.autograd.grad(z, leaves[0][1], r / _stabilize(z.detach(), eps))
                    add(step.src, vals[step.src] * grad)
                else:
                    add(step.src, self._linear_ab(step, r))
            elif kind == "wta":
                leaves, z = ctx.pop(node)
                if eps_rule:
                    (grad,) = torch.autograd.grad(z, leaves[0][1], r / _stabilize(z.detach(), eps))
                    add(step.src, vals[step.src] * grad)
                else:
                    (grad,) = torch.autograd.grad(z, leaves[0][1], r)
                    add(step.src, grad)
            elif kind == "rearrange":
                leaves, z = ctx.pop(node)
                grads = torch.autograd.grad(z, [leaf for _, leaf in leaves], r, allow_unused=True)
                for (src, leaf), grad in zip(leaves, grads):
                    add(src, torch.zeros_like(leaf) if grad is None else grad)
            elif kind == "affine":
                contribution = ctx.pop(node)
                if eps_rule:
                    add(step.src, contribution * r / _stabilize(vals[node], eps))
                else:
                    add(step.src, r * contribution.sign().abs_())
            elif kind == "scale":
                z, x = vals[node], vals[step.src]
                share = z * r / _stabilize(z, eps) if eps_rule else r * z.sign().abs_()
                add(step.src, share.sum_to_size(x.shape))
            elif kind == "sum":
                z = vals[node]
                contributions = [(n, sign * vals[n]) for n, sign in step.terms]
                if eps_rule:
                    s = r / _stabilize(z, eps)
                    for n, c in contributions:
                        add(n, (c * s).sum_to_size(vals[n].shape))
                else:
                    zp = sum(c.clamp(min=0) for _, c in contributions) + torch.zeros_like(z)
                    zn = sum(c.clamp(max=0) for _, c in contributions) + torch.zeros_like(z)
                    sp, sn = self._ab_scales(r, zp, zn)
                    for n, c in contributions:
                        add(n, (c.clamp(min=0) * sp + c.clamp(max=0) * sn).sum_to_size(vals[n].shape))
        return None


# --------------------------------------------------------------------------------------------------
# Public API


def _check_options(rule: str, epsilon: float, alpha: float, beta: float) -> str:
    if not isinstance(rule, str) or rule not in LRP_RULES:
        raise ValueError(f"Expected `rule` to be one of {list(LRP_RULES)}, but got {rule!r}.")
    rule = "zplus" if rule == "z+" else rule
    if rule == "epsilon" and not (isinstance(epsilon, (int, float)) and epsilon > 0):
        raise ValueError(f"Expected `epsilon` to be a positive float, but got {epsilon!r}.")
    if rule == "alpha_beta":
        if not all(isinstance(v, (int, float)) for v in (alpha, beta)) or beta < 0 or abs(alpha - beta - 1) > 1e-9:
            raise ValueError(
                f"Expected `alpha` - `beta` = 1 with `beta` >= 0 for the alpha_beta rule (e.g. alpha=2, beta=1), "
                f"but got alpha={alpha!r}, beta={beta!r}."
            )
    return rule


def _working_dtype(model: nn.Module) -> torch.dtype:
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return torch.float64 if param is not None and param.dtype == torch.float64 else torch.float32


def lrp(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    *,
    rule: str = "epsilon",
    epsilon: float = 1e-6,
    alpha: float = 2.0,
    beta: float = 1.0,
) -> torch.Tensor:
    """Layer-wise relevance propagation of each sample's target score down to its input.

    Args:
        model: a ``torch.fx``-traceable model with one input tensor and one output tensor (see the module
            docstring for the supported layers). Never modified; evaluated in eval mode.
        inputs: ``(N, ...)`` batch. Works inside ``torch.inference_mode()`` (the input is cloned).
        target: int, per-sample ids (list / tensor), ``"pred"``, a callable on the output, or a
            :class:`~lightning_introspect.methods.targets.RegionTarget`; each sample uses its own target.
            The output relevance is ``output * d score / d output`` (for a class id: one-hot times the logit).
        rule: ``"epsilon"``, ``"zplus"`` (alias ``"z+"``) or ``"alpha_beta"``.
        epsilon: stabiliser of the epsilon rule (captum's default is 1e-9, zennit's 1e-6).
        alpha: positive weight of the alpha-beta rule.
        beta: negative weight of the alpha-beta rule; ``alpha - beta`` must be 1.

    Returns:
        Detached relevance with the shape of ``inputs`` (fp32, fp64 for fp64 models). With zero biases,
        each sample's relevance sums to its target score (up to the epsilon absorption).

    Raises:
        ValueError: bad ``rule`` / ``epsilon`` / ``alpha`` / ``beta`` / ``target``.
        TypeError: a module or operation without an LRP rule (named, with its type), or an untraceable model.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        >>> x = torch.randn(2, 1, 8, 8)
        >>> relevance = lrp(net, x, target=[0, 2])
        >>> relevance.shape
        torch.Size([2, 1, 8, 8])
        >>> bool((lrp(net, x, target="pred", rule="z+") * net.eval()(x).max(1).values.view(2, 1, 1, 1) >= 0).all())
        True
    """
    rule = _check_options(rule, epsilon, alpha, beta)
    if rule == "zplus":
        alpha, beta = 1.0, 0.0
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise ValueError(f"Expected `inputs` to be a floating-point tensor, but got {getattr(inputs, 'dtype', type(inputs))}.")
    plan = _plan(model)
    dtype = _working_dtype(model)
    with introspection_mode(model):
        x = fresh_input(inputs, requires_grad=False, dtype=dtype)
        propagator = _Propagator(plan, model, rule, float(epsilon), float(alpha), float(beta), dtype)
        output = propagator.forward(x)
        if not output.is_floating_point() or output.ndim < 2 or output.shape[0] != x.shape[0]:
            raise TypeError(f"LRP needs an (N, C, ...) floating output per sample, but the model returned {tuple(output.shape)}.")
        leaf = output.detach().requires_grad_()
        scores = target_scores(leaf, target)
        if not scores.requires_grad:
            raise ValueError("Expected `target` to give scores that depend on the model output (a differentiable callable).")
        (grad,) = torch.autograd.grad(scores.sum(), leaf, allow_unused=True)
        relevance_out = output * grad if grad is not None else torch.zeros_like(output)
        output_node = next(s.src for s in plan.steps if s.kind == "output")
        relevance = propagator.backward(relevance_out, output_node)
    if relevance is None:
        return torch.zeros_like(x)
    return relevance.detach()
