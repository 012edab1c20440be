"""Relevance propagation over a traced plan, with any rule per layer.

One forward pass over the plan keeps every intermediate value; relevance then flows from the output back
to the input node by node, using the gradient-times-input form of LRP: for a linear operation
``z = f(a)`` and a rule with terms ``t`` (input modifier ``m_t``, parameter modifier ``p_t``),
``Z_g = sum_t f(m_t(a); p_t(w))``, ``s_g = rule.scales(R, Z)``, ``R_a = sum_t m_t(a) * vjp_{f(.; p_t(w))}(s_g)``,
with ``torch.autograd.grad`` on one small local graph per operation. The same formula serves conv / linear
layers (the terms of a layer with one input-channel group are computed in one call: inputs stacked along
channels, weights in blocks, groups along output channels), parameter-free linear operations (pooling,
means; their implicit weights are positive) and operations where each output has one contribution per
input (additions, scaling by constants, a BatchNorm that is not folded, the winners of max pooling). There
is no code per rule here.

The operations of transformers get their operation rules (:class:`~.rules.OperationRule`), all in the same
gradient-times-input form on a small local graph recomputed at backward time: LayerNorm / RMSNorm with the
standard deviation detached (:class:`~.rules.NormIdentity`), products of input-dependent tensors shared
uniformly (:class:`~.rules.Uniform`), softmax held constant (:class:`~.rules.HoldConstant`: every value computed
only from held values is held too, and relevance that reaches a held value is dropped) or linearised
(:class:`~.rules.AttnLRPSoftmax`), and attention calls (``F.scaled_dot_product_attention``, the traced
``nn.MultiheadAttention``) as the three steps ``q k^T`` -> softmax -> ``@ v``. Relevance stops at an
embedding's output (token ids carry none).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from functools import reduce
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_introspect._torch.guards import fresh_input, introspection_mode
from lightning_introspect.methods.lrp.composites import Composite
from lightning_introspect.methods.lrp.decompose import attention_arguments, attention_inputs
from lightning_introspect.methods.lrp.rules import (
    AttnLRPSoftmax,
    HoldConstant,
    Modifier,
    NormIdentity,
    OperationRule,
    Rule,
    Term,
    Uniform,
    stabilize,
)
from lightning_introspect.methods.lrp.trace import (
    Plan,
    Step,
    bn_scale_shift,
    call_node,
    detach,
    fold_layer,
    op_name,
    pass_value,
    transposed_groups,
)

__all__ = ["Propagator", "check_forward"]

# steps whose value is held constant when everything input-dependent they read is
_HOLDABLE = frozenset({"rearrange", "pass", "linear", "wta", "scale", "sum", "product", "softmax", "norm", "split", "attention"})
# steps whose output carries relevance: it must be floating (token ids must go into an embedding first)
_CARRIERS = frozenset({"weighted", "affine", "linear", "wta", "rearrange", "sum", "scale", "pass", "norm", "softmax", "product", "attention"})


def _add(tensors: list[torch.Tensor]) -> torch.Tensor:
    return reduce(operator.add, tensors)


def _modified(modifier: Modifier, a: torch.Tensor, nonneg: bool) -> torch.Tensor:
    return a if modifier.identity or (nonneg and modifier.identity_on_nonneg) else modifier(a)


def _live_terms(rule: Rule, nonneg: bool, implicit_weights: bool = False) -> list[Term]:
    """The rule's terms that can be non-zero: an input known ``>= 0`` kills terms on its negative part;
    implicit (positive) weights kill terms on negative weights."""
    return [t for t in rule.terms if not (nonneg and t.input.zero_on_nonneg) and not (implicit_weights and not t.weight.keeps_positive)]


def _reuses_forward(terms: list[Term], nonneg: bool) -> bool:
    """One term that sees the operation exactly as the forward pass did: its graph can be reused."""
    if len(terms) != 1:
        return False
    term = terms[0]
    same_input = term.input.identity or (nonneg and term.input.identity_on_nonneg)
    same_weight = term.weight.identity or term.weight.identity_on_nonneg  # implicit weights are >= 0
    return same_input and same_weight


def _inputs_of(terms: list[Term]) -> list[Modifier]:
    inputs: list[Modifier] = []
    for term in terms:
        if term.input not in inputs:
            inputs.append(term.input)
    return inputs


_TRANSPOSED_FUNCTIONS: dict[type[nn.Module], Callable[..., torch.Tensor]] = {
    nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d, nn.ConvTranspose3d: F.conv_transpose3d,
}


def _layer_function(module: nn.Module) -> Callable[..., torch.Tensor]:
    """``f(x, weight, bias)``: the layer's own operation with other weights (the plan's weighted types only).

    For a transposed convolution, autograd's input gradient of this function is the adjoint operation (the
    convolution with the same weight, stride, padding, dilation and groups), so relevance flows back through
    exactly the connections the forward pass used.
    """
    if isinstance(module, nn.Linear):
        return F.linear
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module._conv_forward
    transposed = _TRANSPOSED_FUNCTIONS.get(type(module))
    if transposed is None or not isinstance(module, nn.modules.conv._ConvTransposeNd):
        raise AssertionError(f"weighted step on a {type(module).__name__}")  # pragma: no cover
    # output_padding as the module stores it: the plan refuses calls with an explicit output_size
    stride, padding, output_padding = module.stride, module.padding, module.output_padding
    groups, dilation = module.groups, module.dilation

    def conv_transpose(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return transposed(x, weight, bias, stride, padding, output_padding, groups, dilation)

    return conv_transpose


class Propagator:
    """Runs the forward pass over ``plan`` keeping what each rule needs, then propagates relevance back.

    Args:
        plan: the traced plan of ``model``.
        model: the model (its parameters are read, never changed).
        composite: which rule each layer gets.
        dtype: the working dtype (fp32, or fp64 for fp64 models).
    """

    def __init__(self, plan: Plan, model: nn.Module, composite: Composite, dtype: torch.dtype) -> None:
        self.plan, self.model, self.dtype = plan, model, dtype
        self.modules = dict(model.named_modules())
        self.vals: dict[fx.Node, Any] = {}
        self.ctx: dict[fx.Node, Any] = {}
        self.dependent = plan.dependent
        self.rules = self._assign(composite)
        self.operation_rules = self._assign_operations(composite)
        self.held = self._held()
        self.reached: dict[fx.Node, torch.Tensor] = {}

    def _assign(self, composite: Composite) -> dict[fx.Node, Rule]:
        rules: dict[fx.Node, Rule] = {}
        first = True
        for step in self.plan.steps:
            node = step.node
            if step.kind == "weighted":
                if step.module is None:  # F.linear: the rule of nn.Linear, or of the module owning the weight
                    rules[node] = composite.rule_for(_owner(step.params[0] if step.params else None), nn.Linear, first)
                else:
                    rules[node] = composite.rule_for(step.module, self.modules[str(step.module)], first)
                first = False
            elif step.kind in ("affine", "linear", "wta", "sum", "scale"):
                name = str(node.target) if node.op == "call_module" else None
                rules[node] = composite.rule_for(name, self.modules[name] if name is not None else None)
        return rules

    def _enclosing(self, node: fx.Node) -> tuple[list[str], list[type]]:
        """The module doing ``node`` (a module call) and the modules around it, innermost first."""
        names: list[str] = [str(node.target)] if node.op == "call_module" else []
        for entry in reversed(list((node.meta.get("nn_module_stack") or {}).values())):
            path = entry[0] if isinstance(entry, tuple) else None
            if isinstance(path, str) and path in self.modules and path not in names:
                names.append(path)
        return names, [type(self.modules[n]) for n in names]

    def _assign_operations(self, composite: Composite) -> dict[fx.Node, tuple[OperationRule, ...]]:
        rules: dict[fx.Node, tuple[OperationRule, ...]] = {}
        kinds = {"norm": ("norm",), "softmax": ("softmax",), "product": ("product",), "attention": ("softmax", "product")}
        for step in self.plan.steps:
            if step.kind in kinds:
                names, types = self._enclosing(step.node)
                rules[step.node] = tuple(composite.operation_rule(kind, names, types) for kind in kinds[step.kind])
        return rules

    def _held(self) -> set[fx.Node]:
        """Values held constant: softmax outputs under :class:`HoldConstant`, and what is computed from them alone."""
        held: set[fx.Node] = set()
        for step in self.plan.steps:
            node = step.node
            if step.kind == "softmax" and isinstance(self.operation_rules[node][0], HoldConstant):
                held.add(node)
            elif step.kind in _HOLDABLE and node in self.dependent:
                deps = [n for n in node.all_input_nodes if n in self.dependent]
                if deps and all(n in held for n in deps):
                    held.add(node)
        return held

    def _relevant(self, n: Any) -> bool:
        """``n`` is a node whose value carries relevance (input-dependent, not held constant)."""
        return isinstance(n, fx.Node) and n in self.dependent and n not in self.held

    # ---- forward -------------------------------------------------------------------------------

    def _param(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.detach().to(self.dtype)

    def _value(self, arg: Any) -> Any:
        return self.vals[arg] if isinstance(arg, fx.Node) else arg

    def _layer(self, step: Step) -> tuple[Callable[..., torch.Tensor], torch.Tensor, torch.Tensor | None]:
        if step.module is None:  # F.linear with constant weight and bias
            assert step.params is not None
            weight, bias = (self._value(p) for p in step.params)
            return F.linear, weight.detach().to(self.dtype), self._param(bias)
        module = self.modules[str(step.module)]
        weight, bias = module.weight.detach().to(self.dtype), self._param(module.bias)
        if step.bn is not None:
            weight, bias = fold_layer(weight, bias, self.modules[step.bn], transposed_groups=transposed_groups(module))
        return _layer_function(module), weight, bias

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
        if node.op == "get_attr":
            return self._resolve_attr(str(node.target))
        return call_node(node, self.modules, args, kwargs)

    def _weighted_forward(self, step: Step, a: torch.Tensor) -> torch.Tensor:
        """Compute the rule's group sums ``Z_g`` of a conv / linear layer, keeping the local graph; return the
        layer's output.

        With one input-channel group (and always for a single term) the terms come out of one call: the
        distinct modified inputs stacked along input channels, each group's weights as one block row, the
        groups stacked along output channels. A grouped convolution cannot mix channels that way: there each
        (input, group) pair is its own call.
        """
        rule = self.rules[step.node]
        fn, weight, bias = self._layer(step)
        module = None if step.module is None else self.modules[str(step.module)]
        channel_dim = -1 if module is None or isinstance(module, nn.Linear) else 1
        # where a weight keeps its input and output channels: (out, in, ...), transposed convs (in, out, ...)
        in_dim, out_dim = (0, 1) if module is not None and transposed_groups(module) is not None else (1, 0)
        terms = _live_terms(rule, step.nonneg)
        inputs, groups = _inputs_of(terms), rule.groups
        weights: dict[Modifier, torch.Tensor] = {}

        def modified_weight(modifier: Modifier) -> torch.Tensor:
            if modifier not in weights:
                weights[modifier] = weight if modifier.identity else modifier(weight)
            return weights[modifier]

        def block(modifier: Modifier, group: int) -> torch.Tensor | None:
            parts = [modified_weight(t.weight) for t in terms if t.input == modifier and t.group == group]
            return _add(parts) if parts else None

        with_bias = [bias is not None and any(t.bias for t in terms if t.group == g) for g in range(groups)]
        if getattr(module, "groups", 1) == 1 or (len(inputs) == 1 and groups == 1):
            xs = [_modified(m, a, step.nonneg) for m in inputs]
            leaf = (xs[0] if len(xs) == 1 else torch.cat(xs, dim=channel_dim)).detach().requires_grad_()
            rows = []
            for g in range(groups):
                maybe_blocks = [block(m, g) for m in inputs]
                blocks = [torch.zeros_like(weight) if b is None else b for b in maybe_blocks]
                rows.append(blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=in_dim))
            stacked_bias = None
            if bias is not None and any(with_bias):
                stacked_bias = bias if groups == 1 else torch.cat([bias if w else torch.zeros_like(bias) for w in with_bias])
            out = fn(leaf, rows[0] if groups == 1 else torch.cat(rows, dim=out_dim), stacked_bias)
            zs = [out.detach()] if groups == 1 else [z.detach() for z in out.split(weight.shape[out_dim], dim=channel_dim)]
            self.ctx[step.node] = ("stacked", leaf, out, zs, len(inputs))
        else:
            leaves = [_modified(m, a, step.nonneg).detach().requires_grad_() for m in inputs]
            graphs = []
            for g in range(groups):
                parts: list[torch.Tensor] = []
                for m, leaf in zip(inputs, leaves):
                    w = block(m, g)
                    if w is not None:
                        parts.append(fn(leaf, w, bias if with_bias[g] and not parts else None))
                graphs.append(_add(parts) if parts else None)
            self.ctx[step.node] = ("split", leaves, graphs)
            zs = [torch.zeros_like(next(z for z in graphs if z is not None)).detach() if z is None else z.detach() for z in graphs]
        if not rule.exact:
            with torch.no_grad():
                return fn(a, weight, bias)
        z = zs[0] if groups == 1 else _add(zs)
        if bias is not None and not any(with_bias):
            z = z + (bias if channel_dim == -1 else bias.view(1, -1, *([1] * (z.ndim - 2))))
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals, ctx = self.vals, self.ctx
        output: torch.Tensor | None = None
        for step in self.plan.steps:
            node, kind = step.node, step.kind
            if kind == "input":
                vals[node] = x
            elif kind == "skip":
                continue
            elif node in self.held or kind in ("norm", "softmax", "product", "attention", "split", "embedding"):
                # relevance of these is computed at backward time, on a local graph of their own
                if kind == "attention":
                    vals[node] = self._attention(node, None, None)
                else:
                    args, kwargs = self._arguments(node, None)
                    with torch.no_grad():
                        value = detach(self._call(node, args, kwargs))
                    vals[node] = value.to(self.dtype) if kind == "embedding" else value
                    if kind == "embedding" and not isinstance(value, torch.Tensor):  # pragma: no cover - nn.Embedding returns one
                        raise TypeError(f"LRP expected embedding '{op_name(node)}' to return one tensor.")
            elif kind == "rearrange" and step.via is not None:
                leaf = vals[step.source].detach().requires_grad_()
                parts = self._call(step.via, *self._arguments(step.via, None, {step.source: leaf}))
                z = parts[node.args[1]]
                ctx[node] = [(step.source, leaf)], z
                vals[node] = z.detach()
            elif kind in ("const", "meta", "sum", "scale"):
                if node.op == "placeholder":
                    vals[node] = node.args[0]
                    continue
                args, kwargs = self._arguments(node, None)
                with torch.no_grad():
                    vals[node] = detach(self._call(node, args, kwargs))
            elif kind == "weighted":
                a = vals[step.source]
                if step.bn is not None and isinstance(self.modules[str(step.module)], nn.Linear) and a.ndim != 2:
                    raise TypeError(f"LRP folds BatchNorm '{step.bn}' into linear layer '{step.module}' only for (N, F) inputs.")
                vals[node] = self._weighted_forward(step, a)
            elif kind == "affine":
                scale, shift = bn_scale_shift(self.modules[str(step.module)], self.dtype)
                a = vals[step.source]
                shape = (1, -1, *([1] * (a.ndim - 2)))
                contribution = a * scale.view(shape)
                ctx[node] = contribution
                vals[node] = contribution + shift.view(shape)
            elif kind == "pass":
                vals[node] = pass_value(node, self.modules, vals[step.source])
            elif kind in ("linear", "wta", "rearrange"):
                leaves: list[tuple[fx.Node, torch.Tensor]] = []
                args, kwargs = self._arguments(node, leaves)
                z = self._call(node, args, kwargs)
                if not isinstance(z, torch.Tensor):
                    if kind == "rearrange":  # indexing a size tuple: no relevance
                        step.kind = "meta"
                        self.plan.dependent.discard(node)
                        vals[node] = detach(z)
                        continue
                    raise TypeError(f"LRP expected operation '{op_name(node)}' to return one tensor, got {type(z).__name__}.")
                ctx[node] = leaves, z
                vals[node] = z.detach()
            elif kind == "output":
                output = vals[step.source]
            if kind in _CARRIERS and node not in self.held:
                value = vals.get(node)
                if isinstance(value, torch.Tensor) and not value.is_floating_point():
                    raise TypeError(
                        f"LRP needs token ids to go into an nn.Embedding (where their relevance is read), but operation "
                        f"'{op_name(node)}' computes a {value.dtype} tensor from them."
                    )
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"LRP needs a model that returns one tensor, but it returned {type(output).__name__}.")
        return output

    # ---- backward ------------------------------------------------------------------------------

    def _weighted(self, step: Step, relevance: torch.Tensor) -> torch.Tensor:
        rule = self.rules[step.node]
        how, *saved = self.ctx.pop(step.node)
        if how == "stacked":
            leaf, out, zs, n_inputs = saved
            channel_dim = -1 if step.module is None or isinstance(self.modules[str(step.module)], nn.Linear) else 1
            scales = rule.scales(relevance, zs)
            (grad,) = torch.autograd.grad(out, leaf, scales[0] if len(scales) == 1 else torch.cat(scales, dim=channel_dim))
            share = leaf.detach() * grad
            return share if n_inputs == 1 else _add(list(share.chunk(n_inputs, dim=channel_dim)))
        leaves, graphs = saved
        zs = [torch.zeros_like(next(z for z in graphs if z is not None)) if z is None else z.detach() for z in graphs]
        scales = rule.scales(relevance, zs)
        live = [(z, s) for z, s in zip(graphs, scales) if z is not None]
        grads = torch.autograd.grad([z for z, _ in live], leaves, [s for _, s in live], allow_unused=True)
        return _add([leaf.detach() * g for leaf, g in zip(leaves, grads) if g is not None])

    def _parameter_free(self, step: Step, relevance: torch.Tensor) -> torch.Tensor:
        """A linear operation without parameters (pooling, mean, sum over dims); its weights are positive."""
        rule = self.rules[step.node]
        leaves, z = self.ctx.pop(step.node)
        a = self.vals[step.source]
        terms = _live_terms(rule, step.nonneg, implicit_weights=True)
        if _reuses_forward(terms, step.nonneg):
            zs = [z.detach() if g == terms[0].group else torch.zeros_like(z) for g in range(rule.groups)]
            (grad,) = torch.autograd.grad(z, leaves[0][1], rule.scales(relevance, zs)[terms[0].group])
            return a * grad
        inputs = _inputs_of(terms)
        with torch.enable_grad():
            xs = [_modified(m, a, step.nonneg).detach().requires_grad_() for m in inputs]
            outs = {m: self._call(step.node, *self._arguments(step.node, None, {step.source: x})) for m, x in zip(inputs, xs)}
            graphs = [[outs[t.input] for t in terms if t.group == g] for g in range(rule.groups)]
            zs = [_add(parts) if parts else torch.zeros_like(z) for parts in graphs]
            scales = rule.scales(relevance, [s.detach() for s in zs])
            live = [(zg, s) for zg, s, parts in zip(zs, scales, graphs) if parts]
            grads = torch.autograd.grad([zg for zg, _ in live], xs, [s for _, s in live], allow_unused=True)
        return _add([x.detach() * g for x, g in zip(xs, grads) if g is not None])

    def _one_to_one(self, rule: Rule, relevance: torch.Tensor, contributions: list[torch.Tensor], z: torch.Tensor,
                    shift: bool) -> list[torch.Tensor]:
        """Shares of operations in which each output gets one contribution ``c`` per input (signs and constant
        factors inside ``c``, implicit weight 1; ``shift``: the output also has a constant added)."""
        terms = _live_terms(rule, nonneg=False, implicit_weights=True)
        if rule.exact and rule.groups == 1 and len(terms) == 1 and terms[0].input.identity and (terms[0].bias or not shift):
            zs = [z]  # the output itself: the same value, without summing the contributions again
        else:
            zs = []
            for g in range(rule.groups):
                parts = [t.input(c) for c in contributions for t in terms if t.group == g]
                total = _add(parts) + torch.zeros_like(z) if parts else torch.zeros_like(z)
                if shift and any(t.bias for t in terms if t.group == g):
                    total = total + (z - _add(contributions))
                zs.append(total)
        scales = rule.scales(relevance, zs)
        return [_add([_modified(t.input, c, False) * scales[t.group] for t in terms]) for c in contributions]

    def backward(self, relevance_out: torch.Tensor, output_node: fx.Node, stop: frozenset[fx.Node] = frozenset()) -> dict[fx.Node, torch.Tensor]:
        """Relevance from the output node back; returns the relevance where it stops: at the input node, at
        embeddings, and at the nodes of ``stop`` (read there, not propagated further). Nodes no relevance reached
        are missing."""
        vals, ctx = self.vals, self.ctx
        relevance: dict[fx.Node, torch.Tensor] = {output_node: relevance_out}
        reached = self.reached

        def add(node: fx.Node, r: torch.Tensor) -> None:
            if node in self.held:  # attention probabilities held constant: no relevance of their own
                return
            relevance[node] = relevance[node] + r if node in relevance else r

        for step in reversed(self.plan.steps):
            node, kind = step.node, step.kind
            r = relevance.pop(node, None)
            if r is None:
                continue
            if kind in ("input", "embedding") or node in stop:
                reached[node] = r
                continue
            if node in self.held:  # e.g. a model that returns attention probabilities held constant
                continue
            if kind == "pass":
                add(step.source, r)
            elif kind == "weighted":
                add(step.source, self._weighted(step, r))
            elif kind == "linear":
                add(step.source, self._parameter_free(step, r))
            elif kind == "wta":
                rule = self.rules[node]
                terms = _live_terms(rule, step.nonneg, implicit_weights=True)
                if _reuses_forward(terms, step.nonneg):
                    add(step.source, self._parameter_free(step, r))
                else:  # the winners are the contributions; their shares go back to where they came from
                    leaves, z = ctx.pop(node)
                    (share,) = self._one_to_one(rule, r, [z.detach()], z.detach(), shift=False)
                    (grad,) = torch.autograd.grad(z, leaves[0][1], share)
                    add(step.source, grad)
            elif kind == "rearrange":
                leaves, z = ctx.pop(node)
                grads = torch.autograd.grad(z, [leaf for _, leaf in leaves], r, allow_unused=True)
                for (src, leaf), grad in zip(leaves, grads):
                    add(src, torch.zeros_like(leaf) if grad is None else grad)
            elif kind == "affine":
                (share,) = self._one_to_one(self.rules[node], r, [ctx.pop(node)], vals[node], shift=True)
                add(step.source, share)
            elif kind == "scale":
                z, x = vals[node], vals[step.source]
                (share,) = self._one_to_one(self.rules[node], r, [z], z, shift=False)
                add(step.source, share.sum_to_size(x.shape))
            elif kind == "sum":
                operands = [(n, sign) for n, sign in step.terms if n not in self.held]  # held terms count as constants
                contributions = [sign * vals[n] for n, sign in operands]
                shares = self._one_to_one(self.rules[node], r, contributions, vals[node], shift=False)
                for (n, _), share in zip(operands, shares):
                    add(n, share.sum_to_size(vals[n].shape))
            elif kind == "norm":
                add(step.source, self._norm(step, r))
            elif kind == "softmax":
                add(step.source, self._softmax(step, r))
            elif kind == "product":
                uniform = self.operation_rules[node][0]
                assert isinstance(uniform, Uniform)
                for n, share in self._product(node, r, uniform):
                    add(n, share)
            elif kind == "attention":
                by_source = self._attention(node, r, self.operation_rules[node])
                assert isinstance(by_source, dict)
                for n, share in by_source.items():
                    add(n, share)
        return reached

    # ---- the operations of transformers ----------------------------------------------------------

    def _norm(self, step: Step, relevance: torch.Tensor) -> torch.Tensor:
        """LayerNorm / RMSNorm with the standard deviation detached: a linear map of the input under epsilon."""
        rule = self.operation_rules[step.node][0]
        assert isinstance(rule, NormIdentity)
        node = step.node
        args, kwargs = self._arguments(node, None)
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            x, shape, eps = args[0], tuple(module.normalized_shape), module.eps
            weight, bias = module.weight, getattr(module, "bias", None)
            layer = isinstance(module, nn.LayerNorm)
        else:
            layer = node.target is F.layer_norm
            names = ("input", "normalized_shape", "weight", "bias", "eps") if layer else ("input", "normalized_shape", "weight", "eps")
            bound = {**dict(zip(names, args)), **kwargs}
            x, shape, eps = bound["input"], tuple(bound["normalized_shape"]), bound.get("eps")
            weight, bias = bound.get("weight"), bound.get("bias")
            eps = 1e-5 if layer and eps is None else eps
        eps = torch.finfo(x.dtype).eps if eps is None else float(eps)
        dims = tuple(range(-len(shape), 0))
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            if layer:
                inverse = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)  # x is detached: a constant
                y = (leaf - leaf.mean(dims, keepdim=True)) * inverse
            else:
                y = leaf * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
            if weight is not None:
                y = y * weight.detach().to(y.dtype)
            if bias is not None:
                y = y + bias.detach().to(y.dtype)
            (grad,) = torch.autograd.grad(y, leaf, relevance / stabilize(y.detach(), float(rule.epsilon)))
        return x * grad

    def _softmax(self, step: Step, relevance: torch.Tensor) -> torch.Tensor:
        """AttnLRP's softmax rule ``R_x = x * (R - s * sum(R))`` (held softmaxes never get here)."""
        node = step.node
        with torch.enable_grad():
            leaf = self.vals[step.source].detach().requires_grad_()
            s = self._call(node, *self._arguments(node, None, {step.source: leaf}))
            return _softmax_share(leaf, s, relevance)

    def _product(self, node: fx.Node, relevance: torch.Tensor, rule: Uniform) -> list[tuple[fx.Node, torch.Tensor]]:
        """The uniform rule: the epsilon-rule relevance of the product in equal shares to its relevant operands."""
        leaves: list[tuple[fx.Node, torch.Tensor]] = []

        def value(n: fx.Node) -> Any:
            v = self.vals[n]
            if self._relevant(n) and isinstance(v, torch.Tensor) and v.is_floating_point():
                v = v.detach().requires_grad_()
                leaves.append((n, v))
            return v

        with torch.enable_grad():
            z = self._call(node, fx.node.map_arg(node.args, value), fx.node.map_arg(node.kwargs, value))
            shares = _uniform_shares(z, [leaf for _, leaf in leaves], relevance, rule)
        return [(n, share) for (n, _), share in zip(leaves, shares)]

    def _attention(self, node: fx.Node, relevance: torch.Tensor | None,
                   rules: tuple[OperationRule, ...] | None) -> torch.Tensor | dict[fx.Node, torch.Tensor]:
        """``softmax(q k^T * scale + mask) v``: its value (``relevance=None``), or the relevance of q, k and v
        through the three steps, ``@ v`` (uniform), softmax (its rule), ``q k^T`` (uniform; the mask acts as a bias)."""
        args, kwargs = self._arguments(node, None)
        bound = attention_arguments(node.target, args, kwargs)
        names = {"query": 0, "key": 1, "value": 2}
        sources: dict[str, Any] = {name: node.args[i] if len(node.args) > i else node.kwargs.get(name) for name, i in names.items()}
        if relevance is None:
            with torch.no_grad():
                key, value, mask, scale = attention_inputs(**bound)
                scores = bound["query"] @ key.transpose(-2, -1) * scale
                return torch.softmax(scores if mask is None else scores + mask, dim=-1) @ value
        assert rules is not None
        softmax_rule, product_rule = rules
        assert isinstance(product_rule, Uniform)
        out: dict[fx.Node, torch.Tensor] = {}
        with torch.enable_grad():
            leaves = {name: bound[name].detach().requires_grad_(self._relevant(sources[name])) for name in names}
            key, value, mask, scale = attention_inputs(**{**bound, **leaves})
            scores = leaves["query"] @ key.transpose(-2, -1) * scale
            if mask is not None:
                scores = scores + mask
            probs = torch.softmax(scores.detach(), dim=-1)
            hold = isinstance(softmax_rule, HoldConstant)
            probs_leaf = probs.requires_grad_(not hold)
            z = probs_leaf @ value
            operands = [t for t in (probs_leaf, leaves["value"]) if t.requires_grad]
            shares = _uniform_shares(z, operands, relevance, product_rule)
            by_operand = dict(zip((id(t) for t in operands), shares))
            if id(leaves["value"]) in by_operand:
                out_value = by_operand[id(leaves["value"])]
                out[sources["value"]] = out_value
            if not hold and isinstance(softmax_rule, AttnLRPSoftmax):
                scores_leaf = scores.detach().requires_grad_()
                r_scores = _softmax_share(scores_leaf, torch.softmax(scores_leaf, dim=-1), by_operand[id(probs_leaf)])
                qk = [leaves[n] for n in ("query", "key") if leaves[n].requires_grad]
                if qk:
                    for name, share in zip([n for n in ("query", "key") if leaves[n].requires_grad],
                                           _uniform_shares(scores, qk, r_scores, product_rule)):
                        out[sources[name]] = out[sources[name]] + share if sources[name] in out else share
        return out


def _uniform_shares(z: torch.Tensor, leaves: list[torch.Tensor], relevance: torch.Tensor, rule: Uniform) -> list[torch.Tensor]:
    """``leaf * d(z . s)/d leaf / k`` for each of the ``k`` leaves, ``s = R / (z + eps sign(z))``."""
    if not leaves:
        return []
    scale = relevance / stabilize(z.detach(), float(rule.epsilon))
    grads = torch.autograd.grad(z, leaves, scale, allow_unused=True)
    return [leaf.detach() * (torch.zeros_like(leaf) if g is None else g) / len(leaves) for leaf, g in zip(leaves, grads)]


def _softmax_share(leaf: torch.Tensor, s: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """AttnLRP: ``x * (R - s * sum(R))`` as ``x * J^T (R / s)``; entries masked to ``-inf`` get zero."""
    tiny = torch.finfo(s.dtype).tiny
    (grad,) = torch.autograd.grad(s, leaf, relevance / s.detach().clamp(min=tiny))
    x = leaf.detach()
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x)) * grad.nan_to_num(0.0, 0.0, 0.0)


def _owner(param: Any) -> str | None:
    """The dotted name of the module owning a parameter read with ``get_attr`` (maybe sliced), else ``None``."""
    while isinstance(param, fx.Node) and param.op == "call_function" and param.args:
        param = param.args[0]
    if isinstance(param, fx.Node) and param.op == "get_attr":
        return str(param.target).rpartition(".")[0] or None
    return None


def check_forward(plan: Plan, model: nn.Module, sample: torch.Tensor) -> None:
    """One LRP forward pass of ``sample`` (no relevance): raises the ``TypeError`` of what only shows at run time."""
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"LRP needs one input tensor, but got {type(sample).__name__}.")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = torch.float64 if param is not None and param.dtype == torch.float64 else torch.float32
    with introspection_mode(model, grad=False):
        Propagator(plan, model, Composite(), dtype).forward(fresh_input(sample, requires_grad=False, dtype=dtype))
