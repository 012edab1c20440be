"""Layer-wise relevance propagation (LRP) on plain ``nn.Module`` models, with rules as data and composites.

``lightning_introspect.methods.lrp`` is this package (a module), never the function: the function is
``lightning_introspect.methods.lrp.lrp``. Import it from here (``from lightning_introspect.methods.lrp import
lrp``); ``from lightning_introspect.methods import lrp`` gives the package, whatever was imported before.

The package, one concern per module:

* :mod:`.trace` - the model's ``forward`` traced once with :mod:`torch.fx` (cached per model) into a plan
  of steps, so every operation is visible: modules, functional ``F.relu``, ``x.view``, residual ``a + b``;
  BatchNorm folding (:func:`fold_batchnorm`); the reasons a model cannot be explained
  (:func:`lrp_unsupported`).
* :mod:`.record` - the same plan for a model torch.fx cannot trace, recorded from one forward pass on the
  actual input (every tensor function and method seen by a torch function mode, ``torch.nn`` layers kept
  whole by global module hooks), cached per input shape and checked against the model's output. Hugging
  Face ``transformers`` models, which fx cannot trace, take this path (``ViTForImageClassification``,
  ``BertForSequenceClassification``, DeiT, Swin, DistilBERT, RoBERTa; eager and SDPA attention); models fx can
  trace keep the traced plan.
* :mod:`.rules` - the rules as small frozen dataclasses: :class:`Epsilon`, :class:`ZPlus`,
  :class:`AlphaBeta`, :class:`Gamma`, :class:`Flat`, :class:`WSquare`, :class:`ZBox`. Each is a set of terms
  (input modifier, parameter modifier, whether the bias counts) and an output modifier with its stabiliser.
* :mod:`.composites` - :class:`Composite`: which rule a layer gets by type, by name, and for the first
  layer; presets :func:`epsilon_plus`, :func:`epsilon_plus_flat`, :func:`epsilon_alpha2_beta1`.
* :mod:`.propagate` - one forward pass keeping every intermediate value, then relevance from the output
  back to the input node by node in the gradient-times-input form, one generic step for every rule.
* :mod:`.decompose` - the reference computation of ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``
  and ``nn.TransformerEncoder`` (their fused fast path hides the attention, and fx cannot trace their checks).

Nothing of the user's model is modified: no hooks on it (a recording's global module hooks end with it), no
weight swaps, no ``.grad``; modes are restored (the pass runs in eval mode).

Operations: conv / linear layers, folded BatchNorm, additions, average pooling, means and scaling by
constants get their layer's rule. Transposed convolutions (``ConvTranspose1d/2d/3d``, any stride, padding,
output padding, dilation, groups) get the same rules as convolutions; relevance flows back through the
adjoint of their forward (a convolution with the same weight), i.e. over exactly the connections the
forward used. Upsampling (``nn.Upsample``, ``UpsamplingNearest2d`` / ``UpsamplingBilinear2d``,
``F.interpolate`` in the modes nearest, nearest-exact, linear, bilinear (``align_corners`` either way),
trilinear, area) is a linear map with weights ``>= 0``: relevance goes back to each input in proportion to
its contribution (nearest: each input gets the sum over its copies); bicubic (negative weights) is refused.
ReLU / ReLU6 / LeakyReLU / Tanh (module, functional, in-place or not), Dropout and Identity pass relevance
through unchanged; max pooling is winner-take-all (the rule applied to the winning value, as captum does);
reshapes, ``Flatten``, ``cat`` (a U-Net's skip connections: each input gets its slice back), ``permute``,
indexing and padding (``F.pad`` / ``nn.*Pad*d`` with zeros, reflect, replicate, circular; each input gets
the sum over its copies) move relevance with the values. ``BatchNorm`` directly after a conv / linear / transposed conv
layer is folded into it (and gets its rule); a BatchNorm with no such layer before it is an elementwise
affine layer (epsilon: its shift absorbs relevance and can amplify it; z+ / alpha-beta: relevance passes
through).

Transformers, with the operation rules of :mod:`.rules` (CP-LRP / AttnLRP): LayerNorm / RMSNorm with the
standard deviation held constant (:class:`NormIdentity`); GELU, SiLU and the other smooth elementwise
activations pass relevance through unchanged; softmax held constant (:class:`HoldConstant`, the default) or
AttnLRP's softmax rule (:class:`AttnLRPSoftmax`, ``attention_rule="attnlrp"``); products of input-dependent
tensors (``q @ k^T``, ``attention @ v``, ``einsum``, ``a * b``) share relevance uniformly (:class:`Uniform`);
``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``, ``nn.TransformerEncoder`` and
``F.scaled_dot_product_attention``; ``F.linear``; ``chunk`` / ``split`` / ``unbind``; ``nn.Embedding`` on token
ids, where relevance stops. Anything else (GroupNorm, PReLU, quotients of input-dependent tensors, ``exp``,
...) raises ``TypeError`` naming the module / operation and its type.

Output relevance: like captum, the explained score itself, ``R_out = output * d score / d output``: for a
class id that is the one-hot times the logit (on a dense ``(N, C, H, W)`` output: the class's logit at every
pixel), for a :class:`RegionTarget` the logits of the class inside the mask and zero elsewhere. So with
zero biases the input relevance sums to the target score under epsilon, z+, alpha-beta.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

from lightning_introspect._torch.guards import fresh_input, introspection_mode, module_device
from lightning_introspect.methods.lrp.composites import (
    PRESETS,
    Composite,
    as_composite,
    epsilon_alpha2_beta1,
    epsilon_plus,
    epsilon_plus_flat,
)
from lightning_introspect.methods.lrp.propagate import Propagator
from lightning_introspect.methods.lrp.rules import (
    AlphaBeta,
    AttnLRPSoftmax,
    Epsilon,
    Flat,
    Gamma,
    HoldConstant,
    NormIdentity,
    OperationRule,
    Rule,
    Uniform,
    WSquare,
    ZBox,
    ZPlus,
)
from lightning_introspect.methods.lrp.trace import fold_batchnorm, lrp_unsupported, plan_for
from lightning_introspect.methods.targets import Target, target_scores

__all__ = [
    "ATTENTION_RULES", "LRP_RULES", "PRESETS", "AlphaBeta", "AttnLRPSoftmax", "Composite", "Epsilon", "Flat", "Gamma",
    "HoldConstant", "NormIdentity", "OperationRule", "Rule", "Uniform", "WSquare", "ZBox", "ZPlus", "epsilon_alpha2_beta1",
    "epsilon_plus", "epsilon_plus_flat", "fold_batchnorm", "lrp", "lrp_unsupported",
]

LRP_RULES = ("epsilon", "zplus", "z+", "alpha_beta")
"""The rule names ``lrp(rule=...)`` takes; each stands for one rule object applied to every layer."""


def _rule_from_name(rule: str | Rule, epsilon: float, alpha: float, beta: float) -> Rule:
    if isinstance(rule, Rule):
        return rule
    if not isinstance(rule, str) or rule not in LRP_RULES:
        raise ValueError(f"Expected `rule` to be one of {list(LRP_RULES)} or an LRP rule object, but got {rule!r}.")
    if rule == "epsilon":
        return Epsilon(epsilon)
    if rule in ("zplus", "z+"):
        return ZPlus()
    return AlphaBeta(alpha, beta)


def _working_dtype(model: nn.Module, inputs: torch.Tensor) -> torch.dtype:
    """fp64 for fp64 models (or fp64 inputs to a model without parameters, such as an upsampler), else fp32."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    reference = inputs.dtype if param is None else param.dtype
    return torch.float64 if reference == torch.float64 else torch.float32


ATTENTION_RULES = ("cp", "attnlrp")
"""The names ``lrp(attention_rule=...)`` takes: the softmax held constant (CP-LRP) or AttnLRP's softmax rule."""


def _with_attention_rule(composite: Composite, attention_rule: str | None) -> Composite:
    if attention_rule is None:
        return composite
    if attention_rule not in ATTENTION_RULES:
        raise ValueError(f"Expected `attention_rule` to be one of {list(ATTENTION_RULES)}, but got {attention_rule!r}.")
    return dataclasses.replace(composite, softmax=HoldConstant() if attention_rule == "cp" else AttnLRPSoftmax())


def _stop_node(plan: Any, at: str) -> fx.Node:
    calls = plan.module_outputs.get(at)
    if not isinstance(at, str) or not calls:
        names = sorted(plan.module_outputs)
        close = difflib.get_close_matches(str(at), names, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else f" Layers: {', '.join(names[:20])}."
        raise ValueError(f"Expected `at` to name a module that the forward pass calls, but got {at!r}.{hint}")
    if len(calls) > 1:
        raise ValueError(f"Expected `at` to name a module that runs once per forward pass, but {at!r} runs {len(calls)} times.")
    node = calls[0]
    step = next(s for s in plan.steps if s.node is node)
    if step.kind == "skip":
        raise ValueError(f"LRP folds the BatchNorm after {at!r} into it, so its own output has no relevance: pass the BatchNorm's "
                         "name as `at`.")
    return node


def lrp(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    *,
    rule: str | Rule | None = None,
    epsilon: float = 1e-6,
    alpha: float = 2.0,
    beta: float = 1.0,
    composite: Composite | Mapping[Any, Any] | str | None = None,
    attention_rule: str | None = None,
    at: str | None = None,
) -> torch.Tensor:
    """Layer-wise relevance propagation of each sample's target score down to its input.

    Args:
        model: a model with one input tensor whose output is a tensor (or a dict / output object with
            ``logits``, a tuple whose first item is one); see the package docstring for the supported layers
            (U-Nets with transposed convolutions, upsampling and skip concatenations, and transformers
            included). Traced with ``torch.fx``; a model fx cannot trace (Hugging Face ``transformers``) is
            recorded from a forward pass on ``inputs`` instead. Never modified; evaluated in eval mode.
        inputs: ``(N, ...)`` floating batch, or ``(N, T)`` integer token ids for a model that embeds them with
            ``nn.Embedding``. Works inside ``torch.inference_mode()`` (the input is cloned).
        target: int, per-sample ids (list / tensor), ``"pred"``, a callable on the output, or a
            :class:`~lightning_introspect.methods.targets.RegionTarget`; each sample uses its own target.
            The output relevance is ``output * d score / d output`` (for a class id: one-hot times the logit).
        rule: one rule for every layer: ``"epsilon"`` (default), ``"zplus"`` (alias ``"z+"``),
            ``"alpha_beta"``, or a rule object such as ``Gamma(0.25)``. Not together with ``composite``.
        epsilon: stabiliser of ``rule="epsilon"`` (captum's default is 1e-9, zennit's 1e-6), and, without
            ``composite``, of the products' and normalisations' rules (:class:`Uniform`, :class:`NormIdentity`).
        alpha: positive weight of ``rule="alpha_beta"``.
        beta: negative weight of ``rule="alpha_beta"``; ``alpha - beta`` must be 1.
        composite: rules per layer: a :class:`Composite`, a dict whose keys are module types or dotted
            names (``{nn.Conv2d: ZPlus(), "fc": Epsilon(0.1)}``, epsilon elsewhere), or a preset name
            (``"epsilon_plus"``, ``"epsilon_plus_flat"``, ``"epsilon_alpha2_beta1"``).
        attention_rule: the softmax of every attention: ``"cp"`` (held constant, CP-LRP; the default of a
            composite) or ``"attnlrp"`` (AttnLRP's softmax rule, relevance reaches queries and keys). Given
            together with ``composite``, it replaces the composite's ``softmax``.
        at: the dotted name of a module (called once per forward): the relevance of its output is returned
            instead, with the output's shape (e.g. ``at="embed"``: ``(N, T, D)`` at a text model's embedding).
            Only relevance that flows through that output counts (not what passes it on a residual path).

    Returns:
        Detached relevance with the shape of ``inputs`` (fp32, fp64 for fp64 models); for token ids ``(N, T)``:
        the relevance at the output of the ``nn.Embedding`` taking them, summed over the embedding dimension; with
        ``at``, the relevance at that module's output. With zero biases, each sample's relevance sums to its
        target score (up to the epsilon absorption, and except for AttnLRP's softmax rule).

    Raises:
        ValueError: bad ``rule`` / ``epsilon`` / ``alpha`` / ``beta`` / ``composite`` / ``attention_rule`` /
            ``at`` / ``target``.
        TypeError: a module or operation without an LRP rule (named, with its type), or a model that can be
            neither traced nor recorded (its recorded graph must reproduce its output).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        >>> x = torch.randn(2, 1, 8, 8)
        >>> relevance = lrp(net, x, target=[0, 2])
        >>> relevance.shape
        torch.Size([2, 1, 8, 8])
        >>> bool((lrp(net, x, target="pred", rule="z+") * net.eval()(x).max(1).values.view(2, 1, 1, 1) >= 0).all())
        True
        >>> lrp(net, x, target=0, composite={nn.Conv2d: ZPlus(), nn.Linear: Epsilon(0.01)}).shape
        torch.Size([2, 1, 8, 8])
        >>> lrp(net, x, target=0, composite="epsilon_plus_flat").shape
        torch.Size([2, 1, 8, 8])

        A segmentation net, explained for class 1 over a region of its output:

        >>> from lightning_introspect.methods.targets import RegionTarget
        >>> unet = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        ...                      nn.ConvTranspose2d(4, 4, 2, stride=2), nn.ReLU(),
        ...                      nn.Upsample(scale_factor=1.0, mode="bilinear"), nn.Conv2d(4, 3, 1))
        >>> region = torch.zeros(8, 8, dtype=torch.bool); region[2:5, 2:5] = True
        >>> lrp(unet, x, RegionTarget(class_id=1, mask=region)).shape
        torch.Size([2, 1, 8, 8])

        A text transformer on token ids (relevance per token, or at the embedding):

        >>> class Text(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed = nn.Embedding(20, 8)
        ...         self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        ...         self.head = nn.Linear(8, 3)
        ...     def forward(self, ids):
        ...         return self.head(self.block(self.embed(ids)).mean(1))
        >>> ids = torch.randint(0, 20, (2, 5))
        >>> lrp(Text(), ids, target=1).shape, lrp(Text(), ids, target=1, at="embed").shape
        (torch.Size([2, 5]), torch.Size([2, 5, 8]))
        >>> lrp(Text(), ids, target=1, attention_rule="attnlrp").shape
        torch.Size([2, 5])
    """
    if composite is not None:
        if rule is not None:
            raise ValueError(f"Expected either `rule` or `composite`, but got both (rule={rule!r}).")
        rules = as_composite(composite)
    else:
        rules = Composite(default=_rule_from_name("epsilon" if rule is None else rule, epsilon, alpha, beta),
                          product=Uniform(epsilon), norm=NormIdentity(epsilon))
    rules = _with_attention_rule(rules, attention_rule)
    if not isinstance(inputs, torch.Tensor) or inputs.is_complex() or inputs.dtype == torch.bool:
        raise ValueError(f"Expected `inputs` to be a floating-point tensor or integer token ids, but got {getattr(inputs, 'dtype', type(inputs))}.")
    tokens = not inputs.is_floating_point()
    inputs = inputs.to(module_device(model, inputs.device))  # like the gradient methods: samples may come from the CPU
    plan = plan_for(model, inputs)
    stop = None if at is None else _stop_node(plan, at)
    if tokens and at is None and not any(s.kind == "embedding" for s in plan.steps):
        raise TypeError("LRP on integer token ids needs a model that embeds them with nn.Embedding (or F.embedding); this one has none.")
    dtype = _working_dtype(model, inputs)
    with introspection_mode(model):
        x = fresh_input(inputs, requires_grad=False, dtype=dtype)
        propagator = Propagator(plan, model, rules, dtype)
        output = propagator.forward(x)
        if not output.is_floating_point() or output.ndim < 2 or output.shape[0] != x.shape[0]:
            raise TypeError(f"LRP needs an (N, C, ...) floating output per sample, but the model returned {tuple(output.shape)}.")
        leaf = output.detach().requires_grad_()
        scores = target_scores(leaf, target)
        if not scores.requires_grad:
            raise ValueError("Expected `target` to give scores that depend on the model output (a differentiable callable).")
        (grad,) = torch.autograd.grad(scores.sum(), leaf, allow_unused=True)
        relevance_out = output * grad if grad is not None else torch.zeros_like(output)
        output_node = next(s.source for s in plan.steps if s.kind == "output")
        reached = propagator.backward(relevance_out, output_node, frozenset() if stop is None else frozenset({stop}))
    if stop is not None:
        value = propagator.vals[stop]
        return reached[stop].detach() if stop in reached else torch.zeros_like(value, dtype=dtype)
    if not tokens:
        input_node = plan.steps[0].node
        return reached[input_node].detach() if input_node in reached else torch.zeros_like(x)
    return _token_relevance(plan, propagator, reached, x, dtype)


def _token_relevance(plan: Any, propagator: Propagator, reached: dict[fx.Node, torch.Tensor], ids: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """Per-token relevance: the relevance at the outputs of the embeddings of the ids, summed over ``D``."""
    input_node = plan.steps[0].node
    if input_node in reached:
        raise TypeError("LRP on token ids: relevance reached the ids themselves, not only through an nn.Embedding.")
    total = torch.zeros(ids.shape, dtype=dtype, device=ids.device)
    for step in plan.steps:
        r = reached.get(step.node)
        if step.kind != "embedding" or r is None:
            continue
        if r.shape[: ids.ndim] != ids.shape:
            raise TypeError(f"LRP on token ids needs embeddings of shape (*ids.shape, D), but '{step.node.name}' gives {tuple(r.shape)}.")
        total = total + r.reshape(*ids.shape, -1).sum(-1)
    return total.detach()
