"""Properties of a model and its inputs that make attribution maps untrustworthy.

:func:`detect_caveats` runs the model once and lists :class:`Caveat` s: BatchNorm, in-place
activations, functional ReLU that module hooks cannot see, ReLU written as ``clamp(min=0)``, activation
modules called more than once, non-ReLU activations, negative inputs for input-times-gradient methods,
probability outputs, segmentation-style outputs.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Softmax(-1))
    >>> [c.kind for c in detect_caveats(net, torch.rand(2, 4), warn=False)]
    ['probability_output']
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_introspect._torch.guards import eager_mode, eval_mode, fork_global_rng
from lightning_introspect._torch.hooks import hooks
from lightning_introspect.methods.explainers import model_input

# Methods that multiply by the input (sign of the input matters) and methods with modified ReLU rules.
_INPUT_TIMES_METHODS = frozenset({"input_x_gradient", "lrp", "integrated_gradients", "deeplift"})
_GUIDED_METHODS = frozenset({"guided_backprop", "deconvnet", "guided_grad_cam"})


class SanityCaveatWarning(UserWarning):
    """Raised (as a warning) for each caveat :func:`detect_caveats` finds."""


@dataclass(frozen=True)
class Caveat:
    """A reason not to trust some maps: ``kind`` (a short key) and a ``message`` for people."""

    kind: str
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


_RELU_OPS = frozenset({"relu", "relu_"})
_NON_RELU_OPS = frozenset({
    "sigmoid", "sigmoid_", "tanh", "tanh_", "gelu", "silu", "elu", "elu_", "selu", "celu", "leaky_relu", "leaky_relu_",
    "softplus", "mish", "hardswish", "hardsigmoid", "relu6", "hardtanh", "hardtanh_", "prelu", "rrelu", "glu",
    "logsigmoid", "softsign", "tanhshrink", "threshold",
})
_PROB_OPS = frozenset({"softmax", "log_softmax", "sigmoid"})
_CLAMP_OPS = frozenset({"clamp", "clamp_", "clamp_min", "clamp_min_", "clip", "clip_", "maximum", "max"})


def _is_zero(value: Any) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    if isinstance(value, torch.Tensor) and value.numel() and (value.numel() == 1 or value.numel() < 1_000_000):
        return bool((value == 0).all())
    return False


def _is_hidden_relu(op: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    """``clamp(x, min=0)`` without a max, ``clamp_min(x, 0)`` or ``maximum(x, 0)``: a ReLU no hook sees."""
    if op not in _CLAMP_OPS:
        return False
    if op in ("maximum", "max"):
        return len(args) >= 2 and isinstance(args[1], torch.Tensor) and (_is_zero(args[1]) or _is_zero(args[0]))
    low = kwargs.get("min", args[1] if len(args) > 1 else None)
    high = kwargs.get("max", args[2] if len(args) > 2 else None)
    return low is not None and _is_zero(low) and (high is None or op.startswith("clamp_min"))


_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.PReLU, nn.RReLU, nn.GLU, nn.LogSigmoid,
    nn.Softsign, nn.Tanhshrink, nn.Threshold,
)


def _trace_activations(model: nn.Module, example_input: torch.Tensor) -> tuple[list[tuple[str, str, bool, str]], Any, dict[str, int]]:
    """Run the model once, recording every activation op: ``(op, innermost module, in-place, its class)``.

    Also returns the output and how often each activation module ran. Uses a ``TorchFunctionMode`` so
    functional calls (``F.relu``, ``x.relu()``) are seen as well as modules.
    """
    from torch.overrides import TorchFunctionMode

    names = {m: n for n, m in model.named_modules()}
    stack: list[nn.Module] = []
    calls: dict[str, int] = {}
    records: list[tuple[str, str, bool, str]] = []
    prob_outputs: list[torch.Tensor] = []

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            result = func(*args, **kwargs)
            op = getattr(func, "__name__", "")
            if _is_hidden_relu(op, args, kwargs):
                op = "hidden_relu"
            if op in _RELU_OPS or op in _NON_RELU_OPS or op in _PROB_OPS or op == "hidden_relu":
                inner = stack[-1] if stack else model
                inplace = op.endswith("_") or bool(kwargs.get("inplace", False))
                records.append((op, names.get(inner, ""), inplace, type(inner).__name__))
                if op in _PROB_OPS and isinstance(result, torch.Tensor):
                    prob_outputs.append(result)
            return result

    def push(module: nn.Module, _args: Any) -> None:
        stack.append(module)
        if isinstance(module, _ACTIVATION_MODULES):
            calls[names[module]] = calls.get(names[module], 0) + 1

    def pop(module: nn.Module, _args: Any, _out: Any) -> None:
        if stack and stack[-1] is module:
            stack.pop()

    with contextlib.ExitStack() as ctx:
        ctx.enter_context(fork_global_rng())
        ctx.enter_context(eager_mode())
        ctx.enter_context(eval_mode(model))
        ctx.enter_context(torch.no_grad())
        handles = ctx.enter_context(hooks())
        for module in names:
            handles.append(module.register_forward_pre_hook(push))
            handles.append(module.register_forward_hook(pop))
        x = model_input(model, example_input)
        with Recorder():
            output = model(x)
    is_prob = isinstance(output, torch.Tensor) and any(output is p for p in prob_outputs)
    return records, (output, is_prob), calls


def _short_list(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def detect_caveats(
    model: nn.Module,
    example_input: torch.Tensor,
    methods: Sequence[str] | None = None,
    *,
    warn: bool = True,
) -> list[Caveat]:
    """Find properties of the model and inputs that make attribution maps less trustworthy.

    Kinds: ``"batchnorm"``, ``"inplace_relu"``, ``"functional_relu"`` (ReLU applied as a function:
    invisible to module-hook tools such as captum, though our guided methods intercept it),
    ``"hidden_relu"`` (``clamp(min=0)`` / ``maximum(x, 0)``: no guided method sees it), ``"reused_activation"`` (one
    activation module called several times), ``"non_relu_activation"``, ``"negative_inputs"`` (for
    input-times-gradient style methods), ``"probability_output"`` (softmax / sigmoid at the output),
    ``"segmentation_output"`` (per-pixel ``(N, C, H, W)`` output).

    The model runs once in eval mode without gradients (global RNG forked); nothing is changed.

    Args:
        model: the model.
        example_input: a batch it accepts (the real inputs, so the sign check is meaningful).
        methods: the method names in use (caveats specific to other methods are skipped); ``None``: all.
        warn: also issue each caveat as a :class:`SanityCaveatWarning`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(inplace=True))
        >>> [c.kind for c in detect_caveats(net, torch.randn(1, 1, 5, 5), warn=False)]
        ['batchnorm', 'inplace_relu', 'negative_inputs', 'segmentation_output']
    """
    relevant = set(methods) if methods is not None else None

    def uses(kinds: frozenset[str]) -> bool:
        return relevant is None or bool(relevant & kinds)

    caveats: list[Caveat] = []
    modules = dict(model.named_modules())
    norms = [n for n, m in modules.items() if isinstance(m, nn.modules.batchnorm._NormBase)]
    if norms:
        caveats.append(Caveat(
            "batchnorm",
            f"The model has {len(norms)} BatchNorm layer(s) ({_short_list(norms)}). In eval mode each is an affine map "
            "that rescales channels: LRP-style rules need it folded into the neighbouring layer, and how the "
            "randomisation check treats it (`bn_mode`) changes the curves.",
        ))
    try:
        records, (output, is_prob), calls = _trace_activations(model, example_input)
    except Exception as err:  # a model the function mode cannot run through: fall back to modules only
        records, output, is_prob, calls = [], None, False, {}
        caveats.append(Caveat("trace_failed", f"Could not trace the model's activation ops ({type(err).__name__}: {err}); only modules were inspected."))
    inplace = sorted({n for n, m in modules.items() if getattr(m, "inplace", False) is True and isinstance(m, _ACTIVATION_MODULES)})
    inplace_ops = sorted({where or "<model>" for op, where, ip, cls in records if ip and op in _RELU_OPS | _NON_RELU_OPS})
    places = sorted(set(inplace) | set(inplace_ops))
    if places:
        caveats.append(Caveat(
            "inplace_relu",
            f"In-place activations at {_short_list(places)}: they overwrite the tensor a backward hook or an "
            "activation hook wants to read, which breaks or silently changes several attribution tools; "
            "use inplace=False for introspection.",
        ))
    functional = [where or "<model>" for op, where, _ip, cls in records if op in _RELU_OPS and cls not in ("ReLU",)]
    if functional and uses(_GUIDED_METHODS):
        unique = sorted(set(functional))
        caveats.append(Caveat(
            "functional_relu",
            f"{len(functional)} ReLU call(s) are functional (F.relu / torch.relu / x.relu()) inside {_short_list(unique)}: "
            "lightning_introspect's guided backprop and deconvnet intercept these ops, but tools that hook "
            "nn.ReLU modules (captum's GuidedBackprop / Deconvolution, per-module LRP rules, activation hooks) do "
            "not see them and silently use the plain gradient there. Prefer one nn.ReLU module per use.",
        ))
    hidden = sorted({where or "<model>" for op, where, _ip, _cls in records if op == "hidden_relu"})
    if hidden and uses(_GUIDED_METHODS):
        caveats.append(Caveat(
            "hidden_relu",
            f"ReLU written as clamp(min=0) / torch.maximum(x, 0) inside {_short_list(hidden)}: no guided backprop or "
            "deconvnet implementation (ours included) recognises it, so those methods use the plain gradient rule "
            "there. Use nn.ReLU.",
        ))
    reused = sorted(n for n, k in calls.items() if k > 1)
    if reused and uses(_GUIDED_METHODS):
        caveats.append(Caveat(
            "reused_activation",
            f"Activation module(s) {_short_list(reused)} are called more than once per forward pass: per-module "
            "hooks (guided backprop, LRP rules, activation capture) see several calls mixed together.",
        ))
    non_relu = sorted({f"{op} in {where or '<model>'}" for op, where, _ip, cls in records if op in _NON_RELU_OPS and not (is_prob and op == "sigmoid")})
    if non_relu:
        caveats.append(Caveat(
            "non_relu_activation",
            f"Non-ReLU activations ({_short_list(non_relu)}): the guided backprop / deconvnet rules are defined for "
            "ReLU only, and gradient maps of saturating activations (sigmoid, tanh) are small and noisy.",
        ))
    if isinstance(example_input, torch.Tensor) and example_input.is_floating_point() and bool((example_input < 0).any()):
        if uses(_INPUT_TIMES_METHODS):
            caveats.append(Caveat(
                "negative_inputs",
                f"The inputs have negative values (min {float(example_input.min()):.3g}): input x gradient style methods "
                "multiply by the input, so the sign of a normalised pixel flips its attribution and a uniform "
                "background (not zero after normalisation) gets relevance.",
            ))
    if is_prob:
        caveats.append(Caveat(
            "probability_output",
            "The model's output is a softmax / sigmoid: explain the logits instead, gradients of saturated "
            "probabilities are close to zero and compare badly across classes.",
        ))
    if isinstance(output, torch.Tensor) and output.ndim > 2:
        caveats.append(Caveat(
            "segmentation_output",
            f"The output has shape {tuple(output.shape)} (per position, segmentation-style): a plain class target "
            "sums the class score over all pixels, so a map explains the whole image's class mass; use a "
            "RegionTarget to explain a region. SanityChecks explains object regions and compares classes over the same region.",
        ))
    if warn:
        for caveat in caveats:
            warnings.warn(str(caveat), SanityCaveatWarning, stacklevel=2)
    return caveats


__all__ = ["Caveat", "SanityCaveatWarning", "detect_caveats"]
