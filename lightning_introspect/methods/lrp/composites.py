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

Example:
    >>> from torch import nn
    >>> composite = epsilon_plus_flat()
    >>> composite.rule_for("0", nn.Conv2d(1, 2, 3), first=True), composite.rule_for("3", nn.Conv2d(2, 2, 3))
    (Flat(), ZPlus())
    >>> Composite({nn.Linear: Epsilon(0.1)}, name_map={"head": Epsilon(1.0)}).rule_for("head", nn.Linear(2, 2))
    Epsilon(epsilon=1.0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_introspect.methods.lrp.rules import AlphaBeta, Epsilon, Flat, Rule, ZBox, ZPlus

__all__ = ["PRESETS", "Composite", "as_composite", "epsilon_alpha2_beta1", "epsilon_plus", "epsilon_plus_flat"]

# transposed convolutions are convolutions of the decoder: the same rule as the encoder's
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True, eq=False)
class Composite:
    """A map from layers to rules.

    A layer's rule is looked up in this order: its dotted name in ``name_map``; ``first`` if it is the first
    conv / linear layer (in forward order; a BatchNorm folded into it goes with it); the first entry of
    ``layer_map`` whose type it is an instance of; else ``default``. Operations that are not modules
    (additions of residual branches, functional pooling, reshapes' neighbours) get ``default``.

    Args:
        layer_map: module type -> rule, e.g. ``{nn.Linear: Epsilon(), nn.Conv2d: ZPlus()}``.
        name_map: dotted module name -> rule, e.g. ``{"features.0": Flat()}``.
        first: rule for the first conv / linear layer, or ``None`` for no special case.
        default: rule for everything else (not :class:`ZBox`, which is meant for a first layer only).
    """

    layer_map: Mapping[type[nn.Module], Rule] = field(default_factory=dict)
    name_map: Mapping[str, Rule] = field(default_factory=dict)
    first: Rule | None = None
    default: Rule = field(default_factory=Epsilon)

    def __post_init__(self) -> None:
        for key, rule in self.layer_map.items():
            if not (isinstance(key, type) and issubclass(key, nn.Module)) or not isinstance(rule, Rule):
                raise ValueError(f"Expected `layer_map` to map nn.Module types to LRP rules, but got {key!r}: {rule!r}.")
        for name, rule in self.name_map.items():
            if not isinstance(name, str) or not isinstance(rule, Rule):
                raise ValueError(f"Expected `name_map` to map module names to LRP rules, but got {name!r}: {rule!r}.")
        if self.first is not None and not isinstance(self.first, Rule):
            raise ValueError(f"Expected `first` to be an LRP rule or None, but got {self.first!r}.")
        if not isinstance(self.default, Rule) or isinstance(self.default, ZBox):
            raise ValueError(f"Expected `default` to be an LRP rule other than ZBox, but got {self.default!r}.")

    def rule_for(self, name: str | None, module: nn.Module | None, first: bool = False) -> Rule:
        """The rule of the module ``name`` (``None`` for an operation that is not a module)."""
        if name is not None and name in self.name_map:
            return self.name_map[name]
        if first and self.first is not None:
            return self.first
        if module is not None:
            for cls, rule in self.layer_map.items():
                if isinstance(module, cls):
                    return rule
        return self.default


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
