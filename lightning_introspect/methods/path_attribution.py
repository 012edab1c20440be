"""Path methods: SmoothGrad and integrated gradients, many gradients of inputs built from the samples.

Both explain, for each sample, a set of inputs made from it -- noisy copies (:func:`smoothgrad`) or
points on the straight path from a baseline (:func:`integrated_gradients`, quadrature by
:func:`ig_alphas`) -- and combine the gradients of the target score there. The copies are stacked and
explained a chunk at a time (at most ``batch_size`` rows per forward pass), each chunk one guarded
forward pass of :func:`~lightning_introspect.methods.gradients._forward`; every copy is explained with
its own sample's target (:func:`_tiled_target`), ``"pred"`` being the prediction on the clean sample.
The noise comes from a private generator, never the global RNG.

Re-exported by :mod:`lightning_introspect.methods.attribution`, where :func:`attribute` runs them after
the shared forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lightning_introspect._torch.guards import fresh_input, introspection_mode, private_generator
from lightning_introspect.methods.gradients import (
    LayerSpec,
    _check_inputs,
    _forward,
    _input_dtype,
    _model_device,
)
from lightning_introspect.methods.targets import RegionTarget, Target, model_logits, target_indices

__all__ = ["DEFAULT_PATH_BATCH", "IG_METHODS", "ig_alphas", "integrated_gradients", "smoothgrad"]

IG_METHODS = ("riemann_trapezoid", "riemann_right", "riemann_left", "riemann_middle", "gausslegendre")
"""Quadrature rules of :func:`integrated_gradients` (captum's ``method`` names and meaning)."""

DEFAULT_PATH_BATCH = 128
"""Rows (noisy copies / path points x samples) per forward pass of SmoothGrad and integrated gradients."""


def ig_alphas(steps: int, method: str = "riemann_trapezoid") -> tuple[list[float], list[float]]:
    """The points ``alpha_j`` on the straight path from the baseline (0) to the input (1) and their
    weights ``w_j``: integrated gradients is ``(x - x') * sum_j w_j * grad(x' + alpha_j (x - x'))``.

    * ``riemann_left`` / ``riemann_right`` / ``riemann_middle``: ``steps`` equal intervals, each evaluated
      at its left end / right end / middle, weight ``1 / steps``;
    * ``riemann_trapezoid``: ``steps`` equally spaced points from 0 to 1 included, weight
      ``1 / (steps - 1)`` with the end points weighted half (the trapezoidal rule; needs ``steps >= 2``).
      captum's ``riemann_trapezoid`` uses the same points with weights ``1 / steps`` (its weights sum to
      ``(steps - 1) / steps``, so its attributions are that factor smaller than ours and fall short of
      completeness by it);
    * ``gausslegendre``: Gauss-Legendre nodes and weights mapped from [-1, 1] to [0, 1].

    The weights sum to 1 (the path has length one), so a model linear in its input gets exactly
    ``(x - x') * gradient``.

    Example:
        >>> ig_alphas(3, "riemann_trapezoid")
        ([0.0, 0.5, 1.0], [0.25, 0.5, 0.25])
        >>> ig_alphas(2, "riemann_right")
        ([0.5, 1.0], [0.5, 0.5])
    """
    _check_steps(steps, method)
    if method == "gausslegendre":
        import numpy as np

        nodes, gauss = np.polynomial.legendre.leggauss(steps)
        return [float(0.5 * (a + 1.0)) for a in nodes], [float(0.5 * w) for w in gauss]
    if method == "riemann_trapezoid":
        alphas = [j / (steps - 1) for j in range(steps)]
        weights = [1.0 / (steps - 1)] * steps
        weights[0] = weights[-1] = 0.5 / (steps - 1)
        return alphas, weights
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
    return [(j + offset) / steps for j in range(steps)], [1.0 / steps] * steps


def _check_steps(steps: Any, method: Any) -> None:
    if method not in IG_METHODS:
        raise ValueError(f"Expected `method` to be one of {', '.join(repr(m) for m in IG_METHODS)}, but got {method!r}.")
    least = 2 if method == "riemann_trapezoid" else 1
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < least:
        raise ValueError(f"Expected `steps` to be an int >= {least} for method {method!r}, but got {steps!r}.")


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected `batch_size` to be a positive int (rows per forward pass), but got {batch_size!r}.")


def _predicted_ids(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Each sample's arg-max class on the clean inputs (one forward, no gradients): ``"pred"`` of a path
    method explains the prediction for the sample itself, not for each perturbed copy."""
    with introspection_mode(model, grad=False):
        x = fresh_input(inputs.to(_model_device(model, inputs)), requires_grad=False, dtype=_input_dtype(model))
        return target_indices(model_logits(model(x)).float(), "pred")


def _tiled_target(target: Target, n: int, model: nn.Module, inputs: torch.Tensor) -> Callable[[int], Target]:
    """``copies -> target`` for ``copies`` stacked copies of the ``N`` samples (row ``c * N + i`` is a copy
    of sample ``i``): each copy is explained with its sample's own target."""
    if isinstance(target, str):
        target = _predicted_ids(model, inputs) if target == "pred" else target  # a bad string: target_scores names it
    if isinstance(target, RegionTarget):
        ids = target.class_id if isinstance(target.class_id, int) else torch.as_tensor(target.class_id).flatten()
        mask = torch.as_tensor(target.mask)
        region = target

        def tile_region(copies: int) -> Target:
            class_id = ids if isinstance(ids, int) or ids.numel() == 1 else ids.repeat(copies)
            tiled = mask.repeat(copies, 1, 1) if mask.ndim == 3 and mask.shape[0] == n else mask
            return RegionTarget(class_id=class_id, mask=tiled) if copies > 1 else region

        return tile_region
    if isinstance(target, (int, str)) or (callable(target) and not isinstance(target, torch.Tensor)):
        return lambda copies: target  # the same class for every row / a row-wise score function
    ids = torch.as_tensor(target)
    if ids.ndim > 1 or ids.numel() not in (1, n):
        raise ValueError(f"Expected `target` to hold 1 or N={n} class ids (one per sample), but got shape {tuple(ids.shape)}.")
    flat = ids.flatten()
    return lambda copies: flat if flat.numel() == 1 else flat.repeat(copies)


def _copy_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    copies: int,
    make: Callable[[int, int], torch.Tensor],
    batch_size: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Gradients of the target score w.r.t. ``copies`` inputs built from the samples, a chunk at a time.

    ``make(start, stop)`` returns copies ``start .. stop - 1`` stacked, ``((stop - start) * N, ...)``;
    yields ``(start, gradients)`` with gradients ``(stop - start, N, ...)``. Every chunk is one guarded
    forward pass (:func:`_forward`) of at most ``batch_size`` rows (at least one copy of the samples).
    """
    n = inputs.shape[0]
    tiled = _tiled_target(target, n, model, inputs)
    per_pass = max(1, batch_size // n)
    for start in range(0, copies, per_pass):
        stop = min(copies, start + per_pass)
        with _forward(model, make(start, stop), tiled(stop - start)) as fwd:
            (g,) = fwd.grad([fwd.x], retain=False)
        yield start, g.detach().view(stop - start, *inputs.shape)


def _noise_std(inputs: torch.Tensor, noise: float) -> torch.Tensor:
    """Smilkov et al.'s noise level: ``noise`` times each sample's value range ``max - min``, shaped to broadcast."""
    flat = inputs.detach().flatten(1).float()
    spread = flat.max(dim=1).values - flat.min(dim=1).values
    return (noise * spread).view(-1, *([1] * (inputs.ndim - 1)))


def smoothgrad(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    *,
    samples: int = 16,
    noise: float = 0.15,
    abs: bool = True,  # noqa: A002
    generator: torch.Generator | None = None,
    batch_size: int = DEFAULT_PATH_BATCH,
) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017): the saliency map averaged over noisy copies of each input.

    Each sample ``x`` is copied ``samples`` times with Gaussian noise of standard deviation
    ``sigma = noise * (max(x) - min(x))`` added (the paper's noise level: a fraction of the sample's value
    range; 0.1-0.2 is its recommendation), and the gradients of the target score at the copies are
    averaged: ``mean_s |d score / d x (x + e_s)|`` with ``abs=True`` (the smoothed saliency map, captum
    ``NoiseTunnel(Saliency()).attribute(nt_type="smoothgrad", stdevs=sigma)``), or the signed mean
    gradient with ``abs=False`` (the paper's ``M_hat``; show its magnitude).

    The noise comes from ``generator`` (a private ``torch.Generator`` seeded 0 when ``None``; the global
    RNG is never drawn from): for ``s = 0 .. samples - 1`` in turn, ``torch.randn(inputs.shape,
    generator=generator)`` on the model's device, times ``sigma``. Copies are explained in batches of at most
    ``batch_size`` rows; ``"pred"`` is each sample's prediction on the clean input.

    Args:
        model: the model.
        inputs: ``(N, ...)`` floating inputs (not modified).
        target: int, per-sample ids, ``"pred"``, a callable on the output (row-wise) or a ``RegionTarget``.
        samples: number of noisy copies per sample.
        noise: noise standard deviation as a fraction of each sample's value range (>= 0).
        abs: average ``|gradient|`` (unsigned) instead of the signed gradient.
        generator: the source of the noise (on the model's device).
        batch_size: most rows (copies x samples) per forward pass.

    Returns:
        A detached tensor of the inputs' shape.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> smoothgrad(net, torch.randn(2, 4), [0, 2], samples=4).shape
        torch.Size([2, 4])
    """
    _check_inputs(inputs)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"Expected `samples` to be a positive int (noisy copies per sample), but got {samples!r}.")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"Expected `noise` to be a float >= 0 (a fraction of each sample's value range), but got {noise!r}.")
    _check_batch_size(batch_size)
    device = _model_device(model, inputs)
    if generator is None:
        generator = private_generator(0, device)
    x = inputs.detach().to(device, _input_dtype(model))
    sigma = _noise_std(x, float(noise))
    total = torch.zeros_like(x)

    def noisy(start: int, stop: int) -> torch.Tensor:
        draws = [torch.randn(x.shape, generator=generator, device=device) for _ in range(start, stop)]
        return torch.cat([x + sigma * e for e in draws])

    for _, grads in _copy_gradients(model, x, target, samples, noisy, batch_size):
        total += (grads.abs() if abs else grads).sum(dim=0)
    return total / samples


def integrated_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    *,
    steps: int = 32,
    baseline: float | torch.Tensor | None = None,
    method: str = "riemann_trapezoid",
    batch_size: int = DEFAULT_PATH_BATCH,
    embedding_layer: LayerSpec = None,
) -> torch.Tensor:
    """Integrated gradients (Sundararajan et al. 2017): ``(x - x') * integral_0^1 grad(x' + a (x - x')) da``.

    The integral along the straight path from the baseline ``x'`` to the input is approximated by the
    quadrature ``method`` with ``steps`` points (:func:`ig_alphas`), evaluated in batches of at most
    ``batch_size`` rows. Equals captum ``IntegratedGradients(model).attribute(inputs, baselines, target,
    n_steps=steps, method=method)`` (for ``riemann_trapezoid``: captum's times ``steps / (steps - 1)``, see
    :func:`ig_alphas`). Completeness: each sample's attributions sum to ``score(x) -
    score(x')`` up to the quadrature error (``riemann_trapezoid`` and ``gausslegendre`` converge fastest).

    Token ids (integer inputs ``(N, T)``): the path runs in the embedding space instead, from the
    baseline embedding to the embedding output of ``embedding_layer`` (found automatically when
    ``None``), and the result is one score per token ``(N, T)``, summed over the embedding dimension;
    ``baseline`` is then a token id (its embedding at every position: a pad or mask token) or ``None``
    (the zero embedding). See :func:`lightning_introspect.methods.token_attribution.token_integrated_gradients`.

    Args:
        model: the model.
        inputs: ``(N, ...)`` floating inputs (not modified), or ``(N, T)`` integer token ids.
        target: int, per-sample ids, ``"pred"`` (the prediction on the input itself), a callable on the
            output (row-wise) or a ``RegionTarget``.
        steps: number of points on the path.
        baseline: floating inputs: ``None`` (zeros), a number, or a tensor broadcastable to ``inputs``
            (e.g. a blurred copy, or the data mean of shape ``(C, 1, 1)``).
        method: one of :data:`IG_METHODS`.
        batch_size: most rows (path points x samples) per forward pass.
        embedding_layer: token ids only: the embedding module (dotted name or submodule).

    Returns:
        A detached signed tensor of the inputs' shape (``(N, T)`` for token ids).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x = torch.randn(2, 4)
        >>> ig = integrated_gradients(net, x, 1, steps=64)
        >>> gap = net(x)[:, 1] - net(torch.zeros(2, 4))[:, 1]
        >>> torch.allclose(ig.sum(1), gap, atol=1e-3)
        True
    """
    if isinstance(inputs, torch.Tensor) and inputs.ndim == 2 and not inputs.is_floating_point():
        from lightning_introspect.methods.token_attribution import token_integrated_gradients

        if baseline is not None and not isinstance(baseline, int):
            raise ValueError(f"Expected `baseline` to be a token id (int) or None for token-id inputs, but got {baseline!r}.")
        return token_integrated_gradients(
            model, inputs, target, steps=steps, baseline=baseline, method=method, batch_size=batch_size, embedding_layer=embedding_layer
        )
    _check_inputs(inputs)
    _check_batch_size(batch_size)
    alphas, weights = ig_alphas(steps, method)
    device = _model_device(model, inputs)
    dtype = _input_dtype(model)
    x = inputs.detach().to(device, dtype)
    if baseline is None:
        base = torch.zeros_like(x)
    elif isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        base = torch.full_like(x, float(baseline))
    elif isinstance(baseline, torch.Tensor):
        try:
            base = torch.broadcast_to(baseline.detach().to(device, dtype), x.shape).clone()
        except RuntimeError as err:
            raise ValueError(f"Expected `baseline` to broadcast to the inputs' shape {tuple(x.shape)}, but got {tuple(baseline.shape)}.") from err
    else:
        raise ValueError(f"Expected `baseline` to be None, a number or a tensor broadcastable to the inputs, but got {type(baseline).__name__}.")
    delta = x - base
    total = torch.zeros_like(x)

    def path(start: int, stop: int) -> torch.Tensor:
        return torch.cat([base + alphas[j] * delta for j in range(start, stop)])

    for start, grads in _copy_gradients(model, x, target, steps, path, batch_size):
        w = torch.tensor(weights[start : start + grads.shape[0]], dtype=grads.dtype, device=grads.device)
        total += (w.view(-1, *([1] * x.ndim)) * grads).sum(dim=0)
    return (delta * total).detach()
