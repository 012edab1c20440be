"""The optimisation loop of feature visualisation: :func:`visualize_features`.

Instead of changing the weights to lower a loss, we change an image to raise an :class:`Objective` of
the (frozen) model's activations. Each step: the parameterisation draws the images (display space);
an optional random transform; ``(image - mean) / std`` into the model, with forward hooks on the
objective's layers only (:class:`ActivationRecorder`); the loss is minus the objective plus the
frequency / latent penalties; the optimiser steps on the image parameters only.

Non-interference: the model runs in eval mode and is restored; parameters keep their ``requires_grad``
and never receive a ``.grad`` (gradients are taken with ``torch.autograd.grad`` w.r.t. the image
parameters only); forward hooks sit only on the target layers and are removed in ``finally``; all
randomness comes from a private generator and the global RNG is forked. Works from inside
``torch.inference_mode()``.

Speed (CPU): the optimisation steps of a batch of at least 4096 input values run the model through
``torch.func.functional_call`` with detached, channels-last copies of its parameters (:func:`frozen_params`):
the same function, about a third less CPU time for a small CNN; checked against the model's own pass on
the starting images (a model whose forward needs NCHW strides keeps its own parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Union, cast

import torch
from torch import nn

from lightning_introspect._torch.guards import (
    fork_global_rng,
    introspection_mode,
    module_device,
    private_generator,
)
from lightning_introspect._torch.hooks import hooks
from lightning_introspect._torch.layers import get_layer
from lightning_introspect.methods.featviz.frequency import (
    PENALTIES,
    frequency_penalty_of,
    high_frequency_fraction,
)
from lightning_introspect.methods.featviz.objectives import Objective
from lightning_introspect.methods.featviz.param import PARAMS, Fourier, ImageSpec, Latent, Pixels
from lightning_introspect.methods.featviz.transform import Transform, resolve_transforms
from lightning_introspect.methods.targets import model_logits

# Below this many input elements a step is dominated by per-op overhead, where `functional_call` adds more
# than channels-last saves (one 32 px image: ~1.4x slower; four: ~0.6-0.8x of the module's time).
_FAST_MIN_ELEMENTS = 4 * 32 * 32

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]
TransformSpec = Union[bool, str, float, Transform, Sequence[Transform], None]  # noqa: UP007 (a runtime alias on Python 3.10)

# Keywords of `visualize_features` that fill in a field of the parameterisation spec or of the image space.
_PARAM_SHORTHANDS = ("range_fn", "decorrelate", "color_correlation", "decay_power", "init_std")
_PRIOR_SHORTHANDS = ("prior", "latent_dim", "latent_std")
_SPACE_SHORTHANDS = ("value_range", "mean", "std")


@dataclass(frozen=True, eq=False)
class ImageSpace:
    """How optimised images relate to the model's input.

    Images are optimised in *display space*, within ``value_range`` (e.g. ``(0, 1)`` for digits); the model
    sees ``(image - mean) / std`` (the data normalisation; a number or one per channel).
    """

    value_range: tuple[float, float] = (0.0, 1.0)
    mean: float | Sequence[float] = 0.0
    std: float | Sequence[float] = 1.0


@dataclass
class FeatureVisualizationResult:
    """What :func:`visualize_features` returns.

    Attributes:
        images: ``(N, C, H, W)`` optimised images in ``value_range`` (display space, detached, CPU).
        objective: ``(N,)`` the objective of the final images, untransformed.
        initial_objective: ``(N,)`` the objective of the starting images (the noise / decoded latent).
        trace: ``(steps, N)`` the objective at each step, as optimised (on the transformed image).
        high_frequency_fraction: ``(N,)`` see :func:`high_frequency_fraction`.
        latents: ``(N, latent_dim)`` the optimised latent codes when a prior was used, else ``None``.
        input_mean, input_std: ``(1, C, 1, 1)`` (or numbers) the ``mean`` / ``std`` the images were
            normalised with for the model; :attr:`model_inputs` is computed from them on demand, so that a
            result kept between runs holds its images once (at 16 x 3 x 512 x 512: 50 MB, not 100).
    """

    images: torch.Tensor
    objective: torch.Tensor
    initial_objective: torch.Tensor
    trace: torch.Tensor
    high_frequency_fraction: torch.Tensor
    latents: torch.Tensor | None = None
    settings: dict[str, object] = field(default_factory=dict)
    input_mean: torch.Tensor | float = 0.0
    input_std: torch.Tensor | float = 1.0

    @property
    def model_inputs(self) -> torch.Tensor:
        """``(N, C, H, W)`` the final images as the model sees them: ``(images - input_mean) / input_std``
        (float32, before any cast to the model's dtype)."""
        return (self.images - self.input_mean) / self.input_std


class _Stop(Exception):
    """Raised from the last needed hook to skip the rest of the forward pass."""


class ActivationRecorder:
    """Forward hooks on the objective's layers only; call it like the model to get ``(acts, output)``.

    Use as a context manager: the hooks are removed on exit, also on errors. ``params``: tensors that
    stand in for some of the model's parameters during the call (``torch.func.functional_call``; the
    model's own parameters are put back afterwards, also on errors), e.g. :func:`frozen_params`.
    """

    def __init__(self, model: nn.Module, objective: Objective, params: Mapping[str, torch.Tensor] | None = None) -> None:
        self.model = model
        self.params = dict(params) if params else None
        self.needs_output = objective.needs_output
        self.modules = {name: get_layer(model, name, argument="layer") for name in objective.module_layers}
        self.acts: dict[str, torch.Tensor] = {}
        self._ctx = hooks()
        self._handles: list | None = None

    def __enter__(self) -> ActivationRecorder:
        self._handles = self._ctx.__enter__()
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._ctx.__exit__(exc_type, exc, tb)

    def _hook(self, name: str) -> Callable[..., None]:
        def record(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"Layer {name!r} returns {type(output).__name__}, not a tensor; choose another layer.")
            self.acts[name] = output
            if not self.needs_output and len(self.acts) == len(self.modules):
                raise _Stop

        return record

    def __call__(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        self.acts = {}
        output = None
        try:
            output = self.model(x) if self.params is None else torch.func.functional_call(self.model, self.params, (x,))
        except _Stop:
            pass
        if output is not None:
            output = model_logits(output)  # a dict's "logits", an output object's .logits, a tuple's first tensor
        missing = sorted(set(self.modules) - set(self.acts))
        if missing:
            raise ValueError(f"The layer(s) {missing} did not run in the model's forward pass; choose layers that do.")
        return self.acts, output


def frozen_params(model: nn.Module, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """On CPU: the model's floating parameters, detached, with 4-D ones (2-D conv weights) in channels-last
    memory format; ``{}`` on other devices (not measured there).

    Passed to :class:`ActivationRecorder` (``torch.func.functional_call``), they make every convolution,
    BatchNorm, ReLU and pooling of an optimisation step run on NHWC tensors, and autograd build no graph
    for the weights: the same values, about a third less CPU time for a small CNN (NCHW max-pooling alone
    is ~10x slower than NHWC on CPU; an eval-mode BatchNorm backward is ~40 % cheaper when its weight
    does not require grad). The model itself is not changed (the tensors are detached copies / views).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 1))
        >>> {k: (v.ndim, v.requires_grad) for k, v in frozen_params(net).items()}
        {'0.weight': (4, False), '0.bias': (1, False), '3.weight': (2, False), '3.bias': (1, False)}
        >>> frozen_params(net)["0.weight"].is_contiguous(memory_format=torch.channels_last)
        True
    """
    device = module_device(model) if device is None else torch.device(device)
    if device.type != "cpu":
        return {}
    with torch.inference_mode(False):
        return {
            name: p.detach().to(memory_format=torch.channels_last) if p.ndim == 4 else p.detach()
            for name, p in model.named_parameters()
            if p.is_floating_point()
        }


def _same_objective(fn: Callable[[], torch.Tensor], reference: torch.Tensor) -> bool:
    """Whether ``fn()`` (the objective through :func:`frozen_params`) runs and matches ``reference`` (the
    model's own pass) to float precision; a model whose forward assumes NCHW strides (``x.view(n, -1)``
    after a conv fails here) or behaves differently then keeps its own parameters. A non-finite reference
    (NaN / Inf weights or inputs) proves nothing either way: the model's own pass is kept."""
    if not bool(torch.isfinite(reference).all()):
        return False
    try:
        values = fn().detach().float().cpu()
    except RuntimeError:
        return False
    scale = 1.0 + float(reference.abs().max()) if reference.numel() else 1.0
    return values.shape == reference.shape and bool(torch.allclose(values, reference, rtol=1e-3, atol=1e-4 * scale))


def _as_channel_tensor(value: float | Sequence[float], c: int, device: torch.device, argument: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32, device=device).flatten()
    if t.numel() not in (1, c):
        raise ValueError(f"Expected `{argument}` to be a number or {c} numbers (one per channel), but got {value!r}.")
    return t.view(1, -1, 1, 1)


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Expected `shape` to be (N, C, H, W) ints, but got {shape!r}.") from err
    if len(dims) == 3:
        dims = (1, *dims)
    if len(dims) != 4 or min(dims) < 1:
        raise ValueError(f"Expected `shape` to be (N, C, H, W) or (C, H, W) positive ints, but got {shape!r}.")
    return dims


def objective_values(
    model: nn.Module,
    objective: Objective,
    images: torch.Tensor,
    *,
    mean: float | Sequence[float] = 0.0,
    std: float | Sequence[float] = 1.0,
    transforms: TransformSpec = None,
    seed: int = 0,
) -> torch.Tensor:
    """The objective of display-space ``images`` (optionally after one random transform): ``(N,)``.

    Use it to check robustness: the value of a visualisation under fresh random jitter. ``transforms``
    takes what :func:`visualize_features` takes (:func:`resolve_transforms`).
    """
    robust = resolve_transforms(transforms, min(images.shape[-2:]))
    device = module_device(model, images.device)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    gen = private_generator(seed)
    with introspection_mode(model, grad=False), ActivationRecorder(model, objective) as rec:
        x = images.detach().to(device=device, dtype=torch.float32)
        if robust is not None:
            x = robust(x, gen)
        c = x.shape[1]
        x = (x - _as_channel_tensor(mean, c, device, "mean")) / _as_channel_tensor(std, c, device, "std")
        acts, out = rec(x.to(dtype))
        return objective(acts, out).detach().float().cpu()




def _image_space(space: ImageSpace | None, shorthands: dict[str, Any]) -> ImageSpace:
    given = {k: shorthands.pop(k) for k in _SPACE_SHORTHANDS if k in shorthands}
    if space is None:
        return ImageSpace(**given)
    if not isinstance(space, ImageSpace):
        raise ValueError(f"Expected `space` to be an ImageSpace(value_range, mean, std) or None, but got {type(space).__name__}.")
    if given:
        raise ValueError(f"Pass {', '.join(f'`{k}`' for k in given)} either as keywords or in `space`, not both.")
    return space


def _image_spec(param: object, shorthands: dict[str, Any]) -> ImageSpec | nn.Module:
    """The parameterisation as a spec (with ``build``) or a ready ``nn.Module``, from ``param`` and the
    shorthand keywords (``range_fn``, ``decorrelate``, ..., ``prior``, ``latent_dim``, ``latent_std``)."""
    options = {k: shorthands.pop(k) for k in _PARAM_SHORTHANDS if k in shorthands}
    prior_options = {k: shorthands.pop(k) for k in _PRIOR_SHORTHANDS if k in shorthands}
    prior = prior_options.pop("prior", None)
    if prior is not None:
        if not isinstance(prior, nn.Module):
            raise ValueError(f"Expected `prior` to be an nn.Module decoder (latent -> image), but got {type(prior).__name__}.")
        return Latent(prior, **prior_options)  # the latent is optimised instead of pixels: `param` is unused
    if isinstance(param, str):
        if param not in PARAMS:
            raise ValueError(f"Expected `param` to be one of {', '.join(repr(p) for p in PARAMS)}, an image parameterisation spec or an nn.Module image, but got {param!r}.")
        if options.get("decorrelate") is None:  # default: on for "fourier"
            options["decorrelate"] = param == "fourier"
        if param == "pixels":
            options.pop("decay_power", None)
            return Pixels(**options)
        return Fourier(**options)
    if isinstance(param, nn.Module) or callable(getattr(param, "build", None)):
        if options:
            raise ValueError(f"{', '.join(f'`{k}`' for k in options)} configure the built-in 'pixels' / 'fourier' parameterisations; set them on your `param` instead.")
        return param if isinstance(param, nn.Module) else cast(ImageSpec, param)  # duck-typed: it has a callable `build`
    raise ValueError(
        f"Expected `param` to be one of {', '.join(repr(p) for p in PARAMS)}, a spec with build(shape, *, value_range, generator, device) "
        f"(Pixels, Fourier, Latent) or an nn.Module whose forward() returns the images, but got {type(param).__name__}."
    )


def visualize_features(
    model: nn.Module,
    objective: Objective,
    *,
    shape: Sequence[int] | None = None,
    param: str | Pixels | Fourier | Latent | nn.Module = "pixels",
    space: ImageSpace | None = None,
    transforms: TransformSpec = None,
    frequency_penalty: float = 0.0,
    penalty: str = "tv",
    latent_penalty: float = 0.0,
    steps: int = 128,
    lr: float = 0.05,
    optimizer: OptimizerFactory | None = None,
    seed: int = 0,
    **shorthands: Any,
) -> FeatureVisualizationResult:
    """Optimise images (or a prior's latent codes) to maximise ``objective`` on a frozen ``model``.

    Each step: images = the parameterisation (in ``value_range``); random transform (if ``transforms``);
    ``(image - mean) / std`` into the model; per image, loss = ``-objective + |objective| *
    (frequency_penalty * penalty(image) + latent_penalty * mean(latent^2))`` (``|objective|`` detached);
    an optimiser step on the image parameters (or the latent) only.

    Args:
        model: the network (left as it was: modes, ``requires_grad``, no ``.grad``, hooks).
        objective: what to maximise (:func:`channel`, :func:`neuron`, :func:`layer`, :func:`class_logit`,
            sums of those); one value per image.
        shape: ``(N, C, H, W)`` of the optimised batch (``(C, H, W)`` means N = 1); default
            ``(1, 1, 32, 32)``, or the output shape of an ``nn.Module`` ``param``.

        **What is optimised**

        param: ``"pixels"``, ``"fourier"`` (1/f-scaled spectrum; decorrelated colour for C = 3), a spec
            (:class:`~lightning_introspect.methods.featviz.param.Pixels`, ``Fourier``, ``Latent`` or your
            own object with ``build(shape, *, value_range, generator, device)``), or a ready ``nn.Module``
            whose ``forward()`` returns the images (its parameters are optimised in place; an optional
            ``project()`` runs after every step; see :mod:`~lightning_introspect.methods.featviz.param`).
        space: :class:`ImageSpace` (``value_range``, ``mean``, ``std``): the display range of the images
            and the data normalisation in front of the model.

        **Regularisers**

        transforms: ``None``/``False``; ``True``/``"auto"`` for :meth:`TransformRobustness.for_size`; a
            float strength; a :class:`TransformRobustness`; any callable ``(images, generator) -> images``
            (or ``images -> images``), or a list of those applied in order.
        frequency_penalty: weight of ``penalty`` (computed on the image in [0, 1] units; 0 = off).
            Relative: each image's penalty is multiplied by its current ``|objective|`` (detached), so
            the same weight suits a layer whose activations are 2 and a logit that reaches 50 (for a
            positive objective it amounts to maximising ``log(objective) - weight * penalty``). 1-4 is
            a useful range with ``"tv"``.
        penalty: ``"tv"`` (mean absolute neighbour difference) or ``"highfreq"`` (root-mean-square of the
            part of the image above half the Nyquist frequency).
        latent_penalty: weight of the mean squared latent of a parameterisation with a ``latent`` (a
            prior: keeps the code where the decoder was trained); relative to ``|objective|`` like
            ``frequency_penalty``.

        **The optimisation**

        steps: optimisation steps.
        lr: learning rate of the default optimiser (Adam).
        optimizer: a factory ``params -> torch.optim.Optimizer`` (e.g.
            ``lambda ps: torch.optim.SGD(ps, lr=0.5)``) instead of ``Adam(params, lr)``; it is stepped once
            per step, without a closure.
        seed: seed of the private generator (initial noise, transforms); same seed, same images.

        **Shorthands** (keywords that fill in ``space`` or the built-in parameterisation spec):

        value_range, mean, std: the fields of ``space``.
        range_fn, decorrelate, color_correlation, decay_power, init_std: the fields of
            :class:`~lightning_introspect.methods.featviz.param.Pixels` / ``Fourier`` when ``param`` is
            ``"pixels"`` / ``"fourier"`` (``decorrelate`` defaults to on for ``"fourier"``).
        prior, latent_dim, latent_std: ``prior=decoder`` means ``param=Latent(decoder, latent_dim,
            latent_std)`` (``param`` is then unused).

    Returns:
        A :class:`FeatureVisualizationResult`.

    Raises:
        ValueError: a bad argument, naming it and the valid choices (layers: the closest names).
        TypeError: an unknown keyword.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> from lightning_introspect.methods.featviz.objectives import channel
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        >>> res = visualize_features(net, channel("0", [0, 1]), shape=(2, 1, 16, 16), steps=20, seed=1)
        >>> res.images.shape, res.trace.shape, bool((res.objective > res.initial_objective).all())
        (torch.Size([2, 1, 16, 16]), torch.Size([20, 2]), True)
        >>> sgd = visualize_features(net, channel("0", 0), shape=(1, 1, 16, 16), steps=5, transforms=[lambda x: x.flip(-1)],
        ...                          optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
        >>> sgd.settings["param"], sgd.images.shape
        ('pixels', torch.Size([1, 1, 16, 16]))
    """
    if not isinstance(objective, Objective):
        raise ValueError(f"Expected `objective` to be an Objective (channel(...), class_logit(...), ...), but got {type(objective).__name__}.")
    options = dict(shorthands)
    space = _image_space(space, options)
    spec = _image_spec(param, options)
    if options:
        known = ", ".join(_SPACE_SHORTHANDS + _PARAM_SHORTHANDS + _PRIOR_SHORTHANDS)
        raise TypeError(f"visualize_features() got unexpected keyword argument(s) {sorted(options)}; the shorthand keywords are {known}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Expected `steps` to be a positive int, but got {steps!r}.")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"Expected `lr` to be a positive number, but got {lr!r}.")
    if penalty not in PENALTIES:
        raise ValueError(f"Expected `penalty` to be one of {', '.join(repr(p) for p in PENALTIES)}, but got {penalty!r}.")
    if not (isinstance(frequency_penalty, (int, float)) and frequency_penalty >= 0):
        raise ValueError(f"Expected `frequency_penalty` to be a non-negative number, but got {frequency_penalty!r}.")
    if not (isinstance(latent_penalty, (int, float)) and latent_penalty >= 0):
        raise ValueError(f"Expected `latent_penalty` to be a non-negative number, but got {latent_penalty!r}.")
    if optimizer is not None and not callable(optimizer):
        raise ValueError(f"Expected `optimizer` to be a callable params -> torch.optim.Optimizer, but got {optimizer!r}.")
    lo, hi = (float(v) for v in space.value_range)
    if not hi > lo:
        raise ValueError(f"Expected `value_range` to be (low, high) with low < high, but got {space.value_range!r}.")
    n, c, h, w = _batch_shape(spec, shape)
    robust = resolve_transforms(transforms, min(h, w))
    for name in objective.module_layers:  # fail early, with the closest valid names
        get_layer(model, name, argument="layer")

    device = module_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    gen = private_generator(seed)
    kind = getattr(spec, "kind", type(spec).__name__)
    settings = {"param": kind, "frequency_penalty": float(frequency_penalty), "penalty": penalty, "transforms": robust, "steps": steps, "lr": float(lr), "seed": seed}
    if optimizer is not None:
        settings["optimizer"] = optimizer

    with introspection_mode(model, grad=True), ActivationRecorder(model, objective, frozen_params(model, device) if n * c * h * w >= _FAST_MIN_ELEMENTS else None) as rec:
        m_t = _as_channel_tensor(space.mean, c, device, "mean")
        s_t = _as_channel_tensor(space.std, c, device, "std")
        if (s_t == 0).any():
            raise ValueError(f"Expected `std` to be non-zero, but got {space.std!r}.")
        decoder = spec.decoder if isinstance(spec, Latent) else None
        with introspection_mode(decoder, grad=True) if decoder is not None else fork_global_rng():
            image_fn = spec if isinstance(spec, nn.Module) else spec.build((n, c, h, w), value_range=(lo, hi), generator=gen, device=device)
            if isinstance(spec, Latent):
                with torch.no_grad():
                    probe = image_fn()
                if tuple(probe.shape) != (n, c, h, w):
                    raise ValueError(f"Expected the prior to decode latents of size {image_fn.get_parameter('latent').shape[1]} to images of shape {(n, c, h, w)}, but got {tuple(probe.shape)}.")
            params: list[torch.Tensor] = [p for p in image_fn.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"Expected `param` ({kind}) to have parameters that require grad, the values to optimise, but it has none.")
            opt = torch.optim.Adam(params, lr=float(lr)) if optimizer is None else optimizer(params)
            if not isinstance(opt, torch.optim.Optimizer):
                raise ValueError(f"Expected `optimizer` to return a torch.optim.Optimizer, but got {type(opt).__name__}.")
            project = getattr(image_fn, "project", None)
            latent = getattr(image_fn, "latent", None)
            latent = latent if isinstance(latent, torch.Tensor) else None

            def draw() -> torch.Tensor:
                img = image_fn()
                return img if img.device == device else img.to(device)

            def evaluate(img: torch.Tensor) -> torch.Tensor:
                acts, out = rec(((img - m_t) / s_t).to(dtype))
                values = objective(acts, out).float()
                if not isinstance(values, torch.Tensor) or values.shape != (n,):
                    raise ValueError(f"Expected the objective to give one value per image, shape ({n},), but got {getattr(values, 'shape', values)!r}.")
                return values

            with torch.no_grad():
                start = draw()
                params_fast, rec.params = rec.params, None
                initial = evaluate(start).detach().float().cpu()  # the model as it is
            if params_fast:  # the channels-last pass only where it gives the same objective, run as a step runs it
                rec.params = params_fast
                rec.params = params_fast if _same_objective(lambda: evaluate(start.detach().requires_grad_(True)), initial) else None
            trace = []  # kept on the device: no host sync per step
            for _ in range(steps):
                img = draw()
                values = evaluate(robust(img, gen) if robust is not None else img)
                trace.append(values.detach())
                penalties = torch.zeros(n, device=device)
                if frequency_penalty > 0:
                    penalties = penalties + float(frequency_penalty) * frequency_penalty_of((img - lo) / (hi - lo), penalty)
                if latent is not None and latent_penalty > 0:
                    penalties = penalties + float(latent_penalty) * latent.pow(2).mean(1)
                # Penalties are relative to the objective's current size, so one weight suits any layer.
                loss = (values.detach().abs() * penalties - values).sum()
                for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
                    p.grad = g  # the image's own parameters, never the model's
                opt.step()
                if callable(project):
                    with torch.no_grad():
                        project()
            for p in params:
                p.grad = None
            with torch.no_grad():
                final_img = draw().detach()
                final = evaluate(final_img).detach().float().cpu()
    images = final_img.float().cpu()
    return FeatureVisualizationResult(
        images=images,
        objective=final,
        initial_objective=initial,
        trace=torch.stack(trace).float().cpu(),
        high_frequency_fraction=high_frequency_fraction(images),
        latents=latent.detach().cpu() if latent is not None else None,
        settings=settings,
        input_mean=m_t.cpu(),
        input_std=s_t.cpu(),
    )


def _batch_shape(spec: object, shape: Sequence[int] | None) -> tuple[int, int, int, int]:
    """``(N, C, H, W)``: ``shape`` (default ``(1, 1, 32, 32)``), or the output of a ready ``nn.Module`` image."""
    if not isinstance(spec, nn.Module):
        return _check_shape((1, 1, 32, 32) if shape is None else shape)
    with torch.no_grad():
        produced = spec()
    if not isinstance(produced, torch.Tensor) or produced.ndim != 4:
        raise ValueError(f"Expected `param` to return images (N, C, H, W) from forward(), but got {getattr(produced, 'shape', type(produced).__name__)!r}.")
    n, c, h, w = (int(s) for s in produced.shape)
    dims = (n, c, h, w)
    if shape is not None and _check_shape(shape) != dims:
        raise ValueError(f"Expected `shape` {tuple(shape)} to match the images of `param`, {dims}; leave `shape` out to use them.")
    return dims


__all__ = [
    "ActivationRecorder",
    "FeatureVisualizationResult",
    "ImageSpace",
    "OptimizerFactory",
    "frozen_params",
    "objective_values",
    "visualize_features",
]
