"""Composites: which LRP rule each layer gets, by module type, by module name, and for the first layer.

Good LRP practice uses different rules in different parts of a network (Montavon et al., "Layer-wise
relevance propagation: an overview", 2019): epsilon near the output, where neurons are few and
class-specific; z+ / alpha-beta / gamma in the convolutional body, where they remove noise; an
input-independent rule (flat, w^2) or the box rule for the first layer, whose inputs are pixels.

Presets (each a function returning a :class:`Composite`; also by name in :data:`PRESETS`):

* :func:`epsilon_plus`: epsilon for linear layers, z+ for convolutions (transposed ones too), epsilon for
  everything else (upsampling, pooling, additions).
* :func:`epsilon_plus_flat`: as :func:`epsilon_plus`, with the flat rule for the first conv / linear layer.
* :func:`epsilon_alpha2_beta1`: epsilon for linear layers, alpha-beta (2, 1) for convolutions.

Transformers: a composite also says how the operations that are not linear layers propagate, with the
rules of :mod:`.rules` of that kind: ``softmax`` (:class:`HoldConstant`, CP-LRP, the default, or
:class:`AttnLRPSoftmax`), ``product`` (:class:`Uniform`) and ``norm`` (:class:`NormIdentity`). ``layer_map``
and ``name_map`` may hold these too, for the modules they name and the operations inside them (a softmax
inside ``"blocks.0.attn"``, every attention inside an ``nn.MultiheadAttention``).

Example:
    >>> from torch import nn
    >>> composite = epsilon_plus_flat()
    >>> composite.rule_for("0", nn.Conv2d(1, 2, 3), first=True), composite.rule_for("3", nn.Conv2d(2, 2, 3))
    (Flat(), ZPlus())
    >>> Composite({nn.Linear: Epsilon(0.1)}, name_map={"head": Epsilon(1.0)}).rule_for("head", nn.Linear(2, 2))
    Epsilon(epsilon=1.0)
    >>> Composite(layer_map={nn.MultiheadAttention: AttnLRPSoftmax()}).operation_rule("softmax", ["enc.self_attn"], [nn.MultiheadAttention])
    AttnLRPSoftmax()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_introspect.methods.lrp.rules import (
    AlphaBeta,
    AttnLRPSoftmax,
    Epsilon,
    Flat,
    HoldConstant,
    NormIdentity,
    OperationRule,
    Rule,
    Uniform,
    ZBox,
    ZPlus,
)

__all__ = ["OPERATION_KINDS", "PRESETS", "Composite", "as_composite", "epsilon_alpha2_beta1", "epsilon_plus", "epsilon_plus_flat"]

# transposed convolutions are convolutions of the decoder: the same rule as the encoder's
# the kinds of operation rules, and the rule types each accepts
OPERATION_KINDS: dict[str, tuple[type[OperationRule], ...]] = {
    "softmax": (HoldConstant, AttnLRPSoftmax),
    "product": (Uniform,),
    "norm": (NormIdentity,),
}

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True, eq=False)
class Composite:
    """A map from layers to rules.

    A layer's rule is looked up in this order: its dotted name in ``name_map``; ``first`` if it is the first
    conv / linear layer (in forward order; a BatchNorm folded into it goes with it); the first entry of
    ``layer_map`` whose type it is an instance of; else ``default``. Operations that are not modules
    (additions of residual branches, functional pooling, reshapes' neighbours) get ``default``.

    Softmax, products of input-dependent tensors and LayerNorm / RMSNorm get an operation rule instead
    (:meth:`operation_rule`): the entry of ``name_map`` for the module or the innermost enclosing module that
    has one of that kind, else the entry of ``layer_map`` for the innermost module whose type has one, else the
    field ``softmax`` / ``product`` / ``norm``.

    Args:
        layer_map: module type -> rule, e.g. ``{nn.Linear: Epsilon(), nn.Conv2d: ZPlus()}``; operation rules
            too, e.g. ``{nn.MultiheadAttention: AttnLRPSoftmax(), nn.LayerNorm: NormIdentity(0.01)}``.
        name_map: dotted module name -> rule, e.g. ``{"features.0": Flat(), "blocks.1.attn": AttnLRPSoftmax()}``.
        first: rule for the first conv / linear layer, or ``None`` for no special case.
        default: rule for everything else (not :class:`ZBox`, which is meant for a first layer only).
        softmax: the softmax (attention probabilities): :class:`HoldConstant` (CP-LRP, default) or
            :class:`AttnLRPSoftmax`.
        product: products of input-dependent tensors: :class:`Uniform`.
        norm: LayerNorm / RMSNorm: :class:`NormIdentity`.
    """

    layer_map: Mapping[type[nn.Module], Rule | OperationRule] = field(default_factory=dict)
    name_map: Mapping[str, Rule | OperationRule] = field(default_factory=dict)
    first: Rule | None = None
    default: Rule = field(default_factory=Epsilon)
    softmax: OperationRule = field(default_factory=HoldConstant)
    product: OperationRule = field(default_factory=Uniform)
    norm: OperationRule = field(default_factory=NormIdentity)

    def __post_init__(self) -> None:
        rule_types = (Rule, OperationRule)
        for key, rule in self.layer_map.items():
            if not (isinstance(key, type) and issubclass(key, nn.Module)) or not isinstance(rule, rule_types):
                raise ValueError(f"Expected `layer_map` to map nn.Module types to LRP rules, but got {key!r}: {rule!r}.")
        for name, rule in self.name_map.items():
            if not isinstance(name, str) or not isinstance(rule, rule_types):
                raise ValueError(f"Expected `name_map` to map module names to LRP rules, but got {name!r}: {rule!r}.")
        for kind, allowed in OPERATION_KINDS.items():
            value = getattr(self, kind)
            if not isinstance(value, allowed):
                names = " or ".join(f"{cls.__name__}()" for cls in allowed)
                raise ValueError(f"Expected `{kind}` to be {names}, but got {value!r}.")
        if self.first is not None and not isinstance(self.first, Rule):
            raise ValueError(f"Expected `first` to be an LRP rule or None, but got {self.first!r}.")
        if not isinstance(self.default, Rule) or isinstance(self.default, ZBox):
            raise ValueError(f"Expected `default` to be an LRP rule other than ZBox, but got {self.default!r}.")

    def rule_for(self, name: str | None, module: nn.Module | type | None, first: bool = False) -> Rule:
        """The rule of the module ``name`` (``None`` for an operation that is not a module); ``module`` may also
        be a module type (a functional ``F.linear`` counts as ``nn.Linear``)."""
        if name is not None and name in self.name_map:
            return self._linear(self.name_map[name], f"name_map[{name!r}]")
        if first and self.first is not None:
            return self.first
        if module is not None:
            for cls, rule in self.layer_map.items():
                if isinstance(module, cls) if not isinstance(module, type) else issubclass(module, cls):
                    return self._linear(rule, f"layer_map[{cls.__name__}]")
        return self.default

    @staticmethod
    def _linear(rule: Rule | OperationRule, where: str) -> Rule:
        if not isinstance(rule, Rule):
            raise ValueError(f"Expected {where} to be a rule of linear layers (Epsilon, ZPlus, ...) for a conv / linear "
                             f"layer, but got {rule!r}, a rule of {_kind_of(rule)}.")
        return rule

    def operation_rule(self, kind: str, names: list[str], types: list[type]) -> OperationRule:
        """The rule of an operation of ``kind`` (``"softmax"``, ``"product"``, ``"norm"``) done by or inside the
        modules ``names`` of types ``types`` (innermost first)."""
        allowed = OPERATION_KINDS[kind]
        for name in names:
            rule = self.name_map.get(name)
            if isinstance(rule, allowed):
                return rule
        for module_type in types:
            for cls, rule in self.layer_map.items():
                if issubclass(module_type, cls) and isinstance(rule, allowed):
                    return rule
        rule = getattr(self, kind)
        assert isinstance(rule, OperationRule)  # checked in __post_init__
        return rule


def _kind_of(rule: object) -> str:
    kinds = [kind for kind, allowed in OPERATION_KINDS.items() if isinstance(rule, allowed)]
    return kinds[0] if kinds else "no known kind"


def epsilon_plus(epsilon: float = 1e-6) -> Composite:
    """Epsilon for linear layers (class-specific, near the output), z+ for convolutions, epsilon elsewhere."""
    return Composite({nn.Linear: Epsilon(epsilon), **dict.fromkeys(_CONV, ZPlus())}, default=Epsilon(epsilon))


def epsilon_plus_flat(epsilon: float = 1e-6) -> Composite:
    """:func:`epsilon_plus` with the flat rule for the first conv / linear layer (no pixel-value bias)."""
    return Composite({nn.Linear: Epsilon(epsilon), **dict.fromkeys(_CONV, ZPlus())}, first=Flat(), default=Epsilon(epsilon))


def epsilon_alpha2_beta1(epsilon: float = 1e-6) -> Composite:
    """Epsilon for linear layers, alpha-beta with alpha=2, beta=1 for convolutions (signed maps)."""
    return Composite({nn.Linear: Epsilon(epsilon), **dict.fromkeys(_CONV, AlphaBeta(2.0, 1.0))}, default=Epsilon(epsilon))


PRESETS: dict[str, Callable[[], Composite]] = {
    "epsilon_plus": epsilon_plus,
    "epsilon_plus_flat": epsilon_plus_flat,
    "epsilon_alpha2_beta1": epsilon_alpha2_beta1,
}
"""Preset name -> function returning the composite (with its default epsilon)."""


def as_composite(value: Any) -> Composite:
    """A :class:`Composite` from itself, a preset name, or a dict whose keys are module types or names.

    Example:
        >>> as_composite({nn.Conv2d: ZPlus(), "fc": Epsilon(0.5)}).name_map
        {'fc': Epsilon(epsilon=0.5)}
    """
    if isinstance(value, Composite):
        return value
    if isinstance(value, str):
        if value not in PRESETS:
            raise ValueError(f"Expected `composite` to be one of {sorted(PRESETS)} (or a Composite / dict), but got {value!r}.")
        return PRESETS[value]()
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, (str, type))]
        if bad:
            raise ValueError(f"Expected the keys of `composite` to be module types or names, but got {bad[0]!r}.")
        return Composite(
            layer_map={k: v for k, v in value.items() if isinstance(k, type)},
            name_map={k: v for k, v in value.items() if isinstance(k, str)},
        )
    raise ValueError(f"Expected `composite` to be a Composite, a dict or one of {sorted(PRESETS)}, but got {value!r}.")
