"""LRP rules as data: what a rule changes about a layer, not how relevance is pushed through it.

A linear layer computes ``z_k = sum_j a_j w_jk + b_k``. Every rule here redistributes the relevance
``R_k`` of an output over the inputs as ``R_j = sum_t m_t(a)_j * sum_k p_t(w)_jk * s_gk`` where each
:class:`Term` ``t`` names an *input modifier* ``m_t``, a *parameter modifier* ``p_t``, whether the bias
counts, and the *group* ``g`` it belongs to; the rule's :meth:`Rule.scales` (the output modifier, with its
stabiliser) turns the group sums ``Z_g = sum_t f(m_t(a); p_t(w))`` into the factors ``s_g = R / Z_g``
(weighted as the rule says). The propagator (:mod:`.propagate`) has one generic step for that formula and
knows no rule by name.

* :class:`Epsilon` - ``R_j = sum_k a_j w_jk / (z_k + eps sign(z_k)) R_k``; biases absorb their share.
* :class:`AlphaBeta` - positive and negative contributions normalised apart, weighted ``alpha`` / ``-beta``.
* :class:`ZPlus` - alpha-beta with ``alpha=1, beta=0``.
* :class:`Gamma` - ``w + gamma w+`` in numerator and denominator (favours positive contributions).
* :class:`Flat` - every input of a neuron gets an equal share (for the first layer, where pixels are not
  meaningful magnitudes).
* :class:`WSquare` - shares in proportion to ``w^2`` (input-independent, also for first layers).
* :class:`ZBox` - for a first layer whose inputs lie in ``[low, high]`` (pixel bounds).

The operations of transformers that are not linear layers have rules of their own kind
(:class:`OperationRule`), chosen per composite (:class:`~.composites.Composite` ``softmax`` / ``product`` /
``norm``):

* :class:`HoldConstant` - softmax (attention probabilities) held constant, CP-LRP (Ali et al. 2022): no
  relevance flows into the queries and keys, and ``attention @ v`` is a linear map of ``v``. The default.
* :class:`AttnLRPSoftmax` - the softmax rule of AttnLRP (Achtibat et al. 2024), ``R_x = x (R - s sum(R))``.
* :class:`Uniform` - products of two (or more) input-dependent tensors (``q @ k^T``, ``attention @ v``,
  gating): each operand gets an equal share of the epsilon-rule relevance of the product (AttnLRP).
* :class:`NormIdentity` - LayerNorm / RMSNorm: the division by the standard deviation treated as a constant
  (the identity rule on the normalisation, CP-LRP / AttnLRP), the rest (centering, scale, shift) a linear map
  under the epsilon rule.

Example:
    >>> rule = AlphaBeta(alpha=2.0, beta=1.0)
    >>> [(t.input.name, t.weight.name, t.group) for t in rule.terms]
    [('positive', 'positive', 0), ('negative', 'negative', 0), ('positive', 'negative', 1), ('negative', 'positive', 1)]
    >>> ZPlus()
    ZPlus()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

__all__ = [
    "KEEP", "NEGATIVE", "ONES", "POSITIVE", "SQUARE", "AlphaBeta", "AttnLRPSoftmax", "Epsilon", "Flat", "Gamma",
    "HoldConstant", "Modifier", "NormIdentity", "OperationRule", "Rule", "Term", "Uniform", "WSquare", "ZBox", "ZPlus",
    "stabilize",
]


@dataclass(frozen=True)
class Modifier:
    """A named elementwise map applied to a layer's input or to its weights.

    The flags let the propagator skip work it can prove useless; they never change the result.

    Attributes:
        name: shown in reprs and docs.
        fn: the map.
        identity: ``fn`` returns its argument unchanged.
        identity_on_nonneg: ``fn`` returns an input that is known to be ``>= 0`` unchanged.
        zero_on_nonneg: ``fn`` maps an input that is known to be ``>= 0`` to zeros (its term vanishes).
        keeps_positive: as a weight modifier, ``fn`` maps positive weights to positive ones (a parameter-free
            linear operation such as average pooling, whose implicit weights are positive, keeps its term);
            ``False`` means it maps them to zero (the term vanishes there).
    """

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    identity: bool = False
    identity_on_nonneg: bool = False
    zero_on_nonneg: bool = False
    keeps_positive: bool = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _positive(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=0)


def _negative(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(max=0)


KEEP = Modifier("keep", lambda x: x, identity=True, identity_on_nonneg=True)
POSITIVE = Modifier("positive", _positive, identity_on_nonneg=True)
NEGATIVE = Modifier("negative", _negative, zero_on_nonneg=True, keeps_positive=False)
ONES = Modifier("ones", torch.ones_like)
SQUARE = Modifier("square", torch.square)


def _constant(value: float | torch.Tensor, name: str) -> Modifier:
    """An input modifier that replaces the input by ``value`` (a float or a tensor broadcastable to it)."""

    def fill(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x).add_(torch.as_tensor(value, dtype=x.dtype, device=x.device))

    return Modifier(name, fill)


@dataclass(frozen=True)
class Term:
    """One summand of a rule: ``f(input(a); weight(w), bias if counted)``, counted in group ``group``."""

    input: Modifier = KEEP
    weight: Modifier = KEEP
    group: int = 0
    bias: bool = False


def stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z + eps * sign(z)`` with ``sign(+0) = 1`` (captum's convention; ``-0.0`` counts as negative)."""
    return torch.copysign(torch.tensor(epsilon, dtype=z.dtype, device=z.device), z).add_(z)


def _nonzero(z: torch.Tensor) -> torch.Tensor:
    """``z >= 0`` kept away from zero just enough that dividing by it stays finite."""
    return z.clamp(min=torch.finfo(z.dtype).tiny ** 0.5)


class Rule:
    """Base of the rules: a set of :class:`Term` plus the output modifier :meth:`scales`.

    Attributes:
        exact: the contributions of all terms add up to the layer's own output (its bias added where no term
            counts it), so the forward pass can reuse them instead of computing the layer once more.
    """

    exact: ClassVar[bool] = False

    @property
    def terms(self) -> tuple[Term, ...]:  # pragma: no cover - every rule defines it
        raise NotImplementedError

    @property
    def groups(self) -> int:
        """How many normalising groups the terms form."""
        return 1 + max(t.group for t in self.terms)

    def scales(self, relevance: torch.Tensor, z: list[torch.Tensor]) -> list[torch.Tensor]:
        """The factor ``s_g`` each group's terms pass back, from the output relevance and the group sums."""
        raise NotImplementedError  # pragma: no cover


@dataclass(frozen=True)
class Epsilon(Rule):
    """``R_j = sum_k a_j w_jk / (z_k + eps * sign(z_k)) R_k`` (``sign(0) = 1``). Biases absorb their share.

    Args:
        epsilon: the stabiliser (captum's default is 1e-9, zennit's 1e-6). Larger values absorb the relevance
            of weakly activated neurons and give sparser, less noisy maps.
    """

    epsilon: float = 1e-6
    exact: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not self.epsilon > 0:
            raise ValueError(f"Expected `epsilon` to be a positive float, but got {self.epsilon!r}.")

    @property
    def terms(self) -> tuple[Term, ...]:
        return (Term(KEEP, KEEP, 0, bias=True),)

    def scales(self, relevance: torch.Tensor, z: list[torch.Tensor]) -> list[torch.Tensor]:
        return [relevance / stabilize(z[0], float(self.epsilon))]


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """``R_j = sum_k (alpha (a_j w_jk)^+ / z_k^+ - beta (a_j w_jk)^- / z_k^-) R_k`` with ``alpha - beta = 1``.

    Biases are not counted in ``z^+`` / ``z^-``. Where a neuron has contributions of one sign only, its
    relevance is shared in proportion to them (the term of the missing sign would be ``0 / 0``), which keeps
    every layer exactly conservative.

    Args:
        alpha: weight of the positive contributions.
        beta: weight of the negative contributions, ``>= 0``.
    """

    alpha: float = 2.0
    beta: float = 1.0
    exact: ClassVar[bool] = True

    def __post_init__(self) -> None:
        values = (self.alpha, self.beta)
        if not all(isinstance(v, (int, float)) for v in values) or self.beta < 0 or abs(self.alpha - self.beta - 1) > 1e-9:
            raise ValueError(
                f"Expected `alpha` - `beta` = 1 with `beta` >= 0 for the alpha_beta rule (e.g. alpha=2, beta=1), "
                f"but got alpha={self.alpha!r}, beta={self.beta!r}."
            )

    @property
    def terms(self) -> tuple[Term, ...]:
        # z+ = f(a+, w+) + f(a-, w-), z- = f(a+, w-) + f(a-, w+): contributions by sign, biases left out.
        return (Term(POSITIVE, POSITIVE, 0), Term(NEGATIVE, NEGATIVE, 0), Term(POSITIVE, NEGATIVE, 1),
                Term(NEGATIVE, POSITIVE, 1))

    def scales(self, relevance: torch.Tensor, z: list[torch.Tensor]) -> list[torch.Tensor]:
        """``alpha R / z+`` and ``-beta R / z-``, with the one-sign fallback (factor 1).

        ``z+ >= 0`` and ``z- <= 0``. Where a part is zero, so is every contribution to it, so its factor is
        irrelevant; the clamp only keeps the division finite. Written without boolean masks (slow on CPU).
        """
        zp, zn = z
        alpha, beta = float(self.alpha), float(self.beta)
        tiny = torch.finfo(zp.dtype).tiny ** 0.5
        has_p, has_n = zp.sign(), zn.sign().neg_()  # 1 where the part exists, else 0
        if alpha == 1.0:
            sp = relevance / zp.clamp(min=tiny)
        else:
            sp = relevance * has_n.mul(alpha - 1.0).add_(1.0) / zp.clamp(min=tiny)
        sn = relevance * has_n.mul_(has_p).mul_(-(1.0 + beta)).add_(1.0) / zn.clamp(max=-tiny)
        return [sp, sn]


@dataclass(frozen=True)
class ZPlus(AlphaBeta):
    """Alpha-beta with ``alpha=1, beta=0``: only positive contributions count (negative ones only where a
    neuron has no positive contribution at all). Maps have the sign of the target score."""

    alpha: float = field(default=1.0, init=False, repr=False)
    beta: float = field(default=0.0, init=False, repr=False)


@dataclass(frozen=True)
class Gamma(Rule):
    """``R_j = sum_k a_j (w_jk + gamma w_jk^+) / (z_k^gamma + eps sign) R_k``, the bias counted as is.

    Meant for layers whose inputs are ``>= 0`` (after a ReLU): it favours positive contributions and gives
    less noisy maps than epsilon; ``gamma -> infinity`` approaches z+. The same arithmetic as captum's
    ``GammaRule`` (whose stabiliser is 1e-9).

    Args:
        gamma: how much the positive weights are boosted, ``>= 0``.
        epsilon: the stabiliser of the denominator.
    """

    gamma: float = 0.25
    epsilon: float = 1e-6

    def __post_init__(self) -> None:
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or self.gamma < 0:
            raise ValueError(f"Expected `gamma` to be a float >= 0, but got {self.gamma!r}.")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not self.epsilon > 0:
            raise ValueError(f"Expected `epsilon` to be a positive float, but got {self.epsilon!r}.")

    @property
    def terms(self) -> tuple[Term, ...]:
        gamma = float(self.gamma)
        boost = Modifier(f"w + {gamma} w+", lambda w: w + gamma * w.clamp(min=0))
        return (Term(KEEP, boost, 0, bias=True),)

    def scales(self, relevance: torch.Tensor, z: list[torch.Tensor]) -> list[torch.Tensor]:
        return [relevance / stabilize(z[0], float(self.epsilon))]


@dataclass(frozen=True)
class Flat(Rule):
    """Every input in a neuron's receptive field gets an equal share of its relevance (weights and inputs
    taken as 1). Input-independent: for the first layer, where raw pixel values say little."""

    @property
    def terms(self) -> tuple[Term, ...]:
        return (Term(ONES, ONES, 0),)

    def scales(self, relevance: torch.Tensor, z: list[torch.Tensor]) -> list[torch.Tensor]:
        return [relevance / _nonzero(z[0])]


@dataclass(frozen=True)
class WSquare(Rule):
    """Shares in proportion to the squared weights, ``R_j = sum_k w_jk^2 / sum_i w_ik^2 R_k``.
    Input-independent: for the first layer."""

    @property
    def terms(self) -> tuple[Term, ...]:
        return (Term(ONES, SQUARE, 0),)

    def scales(self, relevance: torch.Tensor, z: list[torch.Tensor]) -> list[torch.Tensor]:
        return [relevance / _nonzero(z[0])]


@dataclass(frozen=True, eq=False)
class ZBox(Rule):
    """The z^B rule for a first layer whose inputs lie in ``[low, high]`` (e.g. normalised pixel bounds):
    ``R_j = sum_k (a_j w_jk - l_j w_jk^+ - h_j w_jk^-) / z_k R_k`` with ``z_k`` the sum over ``j``.

    Args:
        low: lowest possible input, a float or a tensor broadcastable to one sample (e.g. ``(C, 1, 1)``).
        high: highest possible input, likewise; ``low <= high``.
        epsilon: the stabiliser of the denominator (which is ``>= 0`` for inputs inside the box).
    """

    low: float | torch.Tensor = 0.0
    high: float | torch.Tensor = 1.0
    epsilon: float = 1e-6

    def __post_init__(self) -> None:
        low, high = torch.as_tensor(self.low), torch.as_tensor(self.high)
        if not bool((low <= high).all()):
            raise ValueError(f"Expected `low` <= `high` for the ZBox rule, but got low={self.low!r}, high={self.high!r}.")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not self.epsilon > 0:
            raise ValueError(f"Expected `epsilon` to be a positive float, but got {self.epsilon!r}.")

    @property
    def terms(self) -> tuple[Term, ...]:
        low = -torch.as_tensor(self.low)
        high = -torch.as_tensor(self.high)
        return (Term(KEEP, KEEP, 0), Term(_constant(low, "-low"), POSITIVE, 0), Term(_constant(high, "-high"), NEGATIVE, 0))

    def scales(self, relevance: torch.Tensor, z: list[torch.Tensor]) -> list[torch.Tensor]:
        return [relevance / stabilize(z[0], float(self.epsilon))]


# --------------------------------------------------------------------------------------------------
# Rules of the operations of transformers that are not linear layers


def _check_epsilon(epsilon: object) -> None:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise ValueError(f"Expected `epsilon` to be a positive float, but got {epsilon!r}.")


class OperationRule:
    """Base of the rules of operations that are not linear layers (softmax, products, normalisations)."""


@dataclass(frozen=True)
class HoldConstant(OperationRule):
    """Softmax held constant (CP-LRP, Ali et al. 2022, "XAI for transformers: better explanations through
    conservative propagation"): the attention probabilities are treated as fixed weights, so no relevance
    flows into the queries and keys, ``attention @ v`` is a linear map of ``v`` and relevance is conserved
    through the attention (exactly, without biases)."""


@dataclass(frozen=True)
class AttnLRPSoftmax(OperationRule):
    """The softmax rule of AttnLRP (Achtibat et al. 2024, "AttnLRP: attention-aware layer-wise relevance
    propagation for transformers"): ``R_x = x * (R - s * sum(R))`` along the softmax dimension, the
    gradient-times-input of the softmax linearised at ``x``.

    Relevance then reaches the queries and keys (through :class:`Uniform` on ``q @ k^T``). It is not
    conservative: the part of the softmax that is not explained by its input acts as a bias. Entries masked
    with ``-inf`` get zero relevance.
    """


@dataclass(frozen=True)
class Uniform(OperationRule):
    """Products of ``k`` input-dependent tensors (``q @ k^T``, ``attention @ v``, ``a * b``, ``einsum``): the
    epsilon-rule relevance of each product term goes in equal shares ``1 / k`` to the operands (AttnLRP's
    uniform rule for bilinear products). ``R_a = a * d(z . s)/da / k`` with ``s = R / (z + eps sign(z))``; each
    share sums to ``sum(z s) / k``, so the rule is conservative. An operand that is held constant (attention
    probabilities under :class:`HoldConstant`) or is a constant gets nothing: the product is linear in the
    others, which share all of it.

    Args:
        epsilon: the stabiliser of the denominator.
    """

    epsilon: float = 1e-6

    def __post_init__(self) -> None:
        _check_epsilon(self.epsilon)


@dataclass(frozen=True)
class NormIdentity(OperationRule):
    """LayerNorm / RMSNorm (modules and ``F.layer_norm`` / ``F.rms_norm``): the identity rule on the
    normalisation, as in CP-LRP and AttnLRP. The division by the standard deviation (RMS) is treated as a
    constant, so the layer is the linear map ``y = (x - mean(x)) / std * gamma + beta`` of its input, and its
    relevance goes back by the epsilon rule, ``R_x = x * J^T (R / (y + eps sign(y)))``: conservative up to the
    share absorbed by ``beta`` (exact for ``bias=False``).

    Args:
        epsilon: the stabiliser of the denominator.
    """

    epsilon: float = 1e-6

    def __post_init__(self) -> None:
        _check_epsilon(self.epsilon)
