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
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from functools import reduce
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_introspect.methods.lrp.composites import Composite
from lightning_introspect.methods.lrp.rules import Modifier, Rule, Term
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

__all__ = ["Propagator"]


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

    def _assign(self, composite: Composite) -> dict[fx.Node, Rule]:
        rules: dict[fx.Node, Rule] = {}
        first = True
        for step in self.plan.steps:
            node = step.node
            if step.kind == "weighted":
                rules[node] = composite.rule_for(step.module, self.modules[str(step.module)], first)
                first = False
            elif step.kind in ("affine", "linear", "wta", "sum", "scale"):
                name = str(node.target) if node.op == "call_module" else None
                rules[node] = composite.rule_for(name, self.modules[name] if name is not None else None)
        return rules

    # ---- forward -------------------------------------------------------------------------------

    def _param(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.detach().to(self.dtype)

    def _layer(self, step: Step) -> tuple[Callable[..., torch.Tensor], torch.Tensor, torch.Tensor | None]:
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
        module = self.modules[str(step.module)]
        channel_dim = -1 if isinstance(module, nn.Linear) else 1
        # where a weight keeps its input and output channels: (out, in, ...), transposed convs (in, out, ...)
        in_dim, out_dim = (0, 1) if transposed_groups(module) is not None else (1, 0)
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
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"LRP needs a model that returns one tensor, but it returned {type(output).__name__}.")
        return output

    # ---- backward ------------------------------------------------------------------------------

    def _weighted(self, step: Step, relevance: torch.Tensor) -> torch.Tensor:
        rule = self.rules[step.node]
        how, *saved = self.ctx.pop(step.node)
        if how == "stacked":
            leaf, out, zs, n_inputs = saved
            channel_dim = -1 if isinstance(self.modules[str(step.module)], nn.Linear) else 1
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

    def backward(self, relevance_out: torch.Tensor, output_node: fx.Node) -> torch.Tensor | None:
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
                contributions = [sign * vals[n] for n, sign in step.terms]
                shares = self._one_to_one(self.rules[node], r, contributions, vals[node], shift=False)
                for (n, _), share in zip(step.terms, shares):
                    add(n, share.sum_to_size(vals[n].shape))
        return None
