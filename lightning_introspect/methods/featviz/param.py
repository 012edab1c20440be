"""Image parameterisations: what the optimiser changes, and how that becomes an image.

A parameterisation is an ``nn.Module`` whose ``forward()`` (no arguments) returns the ``(N, C, H, W)``
images in the display range; its ``parameters()`` are what the optimiser changes; ``project()`` (if
present) runs after every step; a ``latent`` parameter ``(N, d)`` is what ``latent_penalty`` weighs.
Subclass :class:`ImageParameterization` for your own, or describe a built-in one with a *spec* that
:func:`~lightning_introspect.methods.featviz.render.visualize_features` builds for the batch shape,
the value range, its private generator and the model's device:

* :class:`Pixels` -- one value per pixel (optionally colour-decorrelated);
* :class:`Fourier` -- a 1/f-scaled spectrum (a soft frequency regulariser), colour-decorrelated for
  3-channel images;
* :class:`Latent` -- the latent code of a decoder (an autoencoder prior: images stay near the data).

A spec of your own is any object with ``build(shape, *, value_range, generator, device) -> nn.Module``.

Example:
    >>> image = Fourier(decay_power=1.5).build((2, 3, 8, 8), value_range=(0.0, 1.0), generator=torch.Generator(), device=torch.device("cpu"))
    >>> image().shape, sum(p.numel() for p in image.parameters())
    (torch.Size([2, 3, 8, 8]), 480)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from lightning_introspect.methods.featviz.frequency import _radial_frequency

PARAMS = ("pixels", "fourier")
RANGE_FNS = ("sigmoid", "clamp")

# The Fourier image is ifft(spectrum * 1/f) / _FOURIER_DAMP: with ortho normalisation the lowest
# frequencies are scaled by up to max(H, W), so this keeps the first Adam steps of a comparable size
# to the pixel parameterisation's (Lucid uses the same constant).
_FOURIER_DAMP = 4.0


def default_color_correlation() -> torch.Tensor:
    """A generic colour basis ``(3, 3)``: luminance plus two opponent axes with smaller spread.

    Columns map decorrelated channels to RGB; the luminance column has norm 1. Use
    :func:`color_correlation_from_data` for the basis of your own images.
    """
    basis = torch.tensor(
        [
            [1 / math.sqrt(3), 1 / math.sqrt(2), 1 / math.sqrt(6)],
            [1 / math.sqrt(3), -1 / math.sqrt(2), 1 / math.sqrt(6)],
            [1 / math.sqrt(3), 0.0, -2 / math.sqrt(6)],
        ]
    )
    return basis * torch.tensor([1.0, 0.35, 0.2]).view(1, 3)


def color_correlation_from_data(images: torch.Tensor) -> torch.Tensor:
    """The square root of the colour covariance of ``(N, 3, H, W)`` images, scaled to a largest column norm of 1.

    Pass it as ``color_correlation`` to :func:`visualize_features`.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Expected `images` of shape (N, 3, H, W), but got {tuple(images.shape)}.")
    pix = images.detach().double().permute(1, 0, 2, 3).reshape(3, -1)
    cov = torch.cov(pix)
    vals, vecs = torch.linalg.eigh(cov)
    root = vecs * vals.clamp_min(0).sqrt().view(1, 3)
    root = root / root.norm(dim=0).max().clamp_min(1e-12)
    return root.float()


class ImageSpec(Protocol):
    """What :func:`~lightning_introspect.methods.featviz.render.visualize_features` needs of a spec:
    a builder of the module whose ``forward()`` returns the images."""

    def build(self, shape: Sequence[int], *, value_range: tuple[float, float], generator: torch.Generator, device: torch.device) -> nn.Module: ...


class ImageParameterization(nn.Module):
    """Base of image parameterisations: ``forward()`` gives ``(N, C, H, W)`` images in the display range.

    Subclasses create their parameters in ``__init__`` and may override :meth:`project` (called after
    every optimiser step, without gradients) to keep them valid.

    Example:
        >>> class Constant(ImageParameterization):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.level = nn.Parameter(torch.full((1, 1, 1, 1), 0.5))
        ...     def forward(self) -> torch.Tensor:
        ...         return self.level.expand(1, 1, 8, 8)
        >>> Constant()().shape
        torch.Size([1, 1, 8, 8])
    """

    def forward(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def project(self) -> None:
        """Called after every optimiser step (under ``torch.no_grad``); default: nothing."""


class _Image(ImageParameterization):
    """An image parameterisation: ``forward()`` returns ``(N, C, H, W)`` in ``value_range``."""

    # buffers, registered in __init__ when the parameterisation uses them
    scale: torch.Tensor
    corr: torch.Tensor

    def __init__(
        self,
        shape: Sequence[int],
        *,
        param: str,
        value_range: tuple[float, float],
        range_fn: str,
        decorrelate: bool,
        color_correlation: torch.Tensor | None,
        decay_power: float,
        init_std: float,
        generator: torch.Generator,
        device: torch.device,
    ) -> None:
        super().__init__()
        n, c, h, w = (int(s) for s in shape)
        self.shape, self.param, self.range_fn = (n, c, h, w), param, range_fn
        self.lo, self.hi = value_range
        if param == "pixels":
            self.values = nn.Parameter((torch.randn(self.shape, generator=generator) * init_std).to(device))
        else:
            spec = torch.randn(n, c, h, w // 2 + 1, 2, generator=generator) * init_std
            self.values = nn.Parameter(spec.to(device))
            freq = _radial_frequency(h, w, device)
            self.register_buffer("scale", 1.0 / freq.clamp_min(1.0 / max(h, w)).pow(decay_power) / _FOURIER_DAMP)
        self.decorrelate = bool(decorrelate and c == 3)
        if self.decorrelate:
            corr = default_color_correlation() if color_correlation is None else torch.as_tensor(color_correlation, dtype=torch.float32)
            if corr.shape != (3, 3):
                raise ValueError(f"Expected `color_correlation` of shape (3, 3), but got {tuple(corr.shape)}.")
            self.register_buffer("corr", corr.to(device))

    def unit(self) -> torch.Tensor:
        """The image in [0, 1] units (before mapping to ``value_range``)."""
        n, c, h, w = self.shape
        z: torch.Tensor
        if self.param == "pixels":
            z = self.values
        else:
            spec = torch.view_as_complex(self.values) * self.scale
            z = torch.fft.irfft2(spec, s=(h, w), norm="ortho")
        if self.decorrelate:
            z = torch.einsum("rk,nkhw->nrhw", self.corr, z)
        if self.range_fn == "sigmoid":
            return torch.sigmoid(z)
        if self._projected:
            return z + 0.5  # the pixels are projected back into [-0.5, 0.5] after each step
        return (z + 0.5).clamp(0, 1)

    @property
    def _projected(self) -> bool:
        return self.param == "pixels" and self.range_fn == "clamp" and not self.decorrelate

    def forward(self) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * self.unit()

    @torch.no_grad()
    def project(self) -> None:
        if self._projected:
            self.values.clamp_(-0.5, 0.5)


class _Prior(ImageParameterization):
    """Images decoded by a user decoder from an optimised latent ``(N, latent_dim)``."""

    def __init__(self, decoder: nn.Module, n: int, latent_dim: int, *, init_std: float, value_range: tuple[float, float], generator: torch.Generator, device: torch.device) -> None:
        super().__init__()
        self.decoder = [decoder]  # a list, so the decoder's parameters are not ours to optimise
        self.lo, self.hi = value_range
        self.latent = nn.Parameter((torch.randn(n, latent_dim, generator=generator) * init_std).to(device))

    def forward(self) -> torch.Tensor:
        return self.decoder[0](self.latent).clamp(self.lo, self.hi)


def infer_latent_dim(decoder: nn.Module) -> int:
    """The input width of a decoder that starts with an ``nn.Linear`` (or has an ``latent_dim`` attribute)."""
    dim = getattr(decoder, "latent_dim", None)
    if isinstance(dim, int) and dim > 0:
        return dim
    first = next((m for m in decoder.modules() if isinstance(m, (nn.Linear, nn.ConvTranspose2d, nn.Conv2d))), None)
    if isinstance(first, nn.Linear):
        return int(first.in_features)
    raise ValueError("Cannot infer the prior's latent size: pass `latent_dim` (the decoder does not start with an nn.Linear).")



def _check_range_fn(range_fn: str) -> None:
    if range_fn not in RANGE_FNS:
        raise ValueError(f"Expected `range_fn` to be one of {', '.join(repr(p) for p in RANGE_FNS)}, but got {range_fn!r}.")


@dataclass(frozen=True, eq=False)
class Pixels:
    """Spec of the pixel parameterisation: one optimised value per pixel and channel.

    Args:
        range_fn: ``"sigmoid"`` (smooth squashing into the value range) or ``"clamp"`` (hard: the pixels
            are projected back into the range after every step).
        decorrelate: optimise decorrelated colours (3-channel images only).
        color_correlation: ``(3, 3)`` decorrelated -> RGB matrix (default :func:`default_color_correlation`).
        init_std: standard deviation of the initial noise.
    """

    range_fn: str = "sigmoid"
    decorrelate: bool = False
    color_correlation: torch.Tensor | None = None
    init_std: float = 0.01

    kind = "pixels"

    def build(self, shape: Sequence[int], *, value_range: tuple[float, float], generator: torch.Generator, device: torch.device) -> nn.Module:
        _check_range_fn(self.range_fn)
        return _Image(shape, param=self.kind, value_range=value_range, range_fn=self.range_fn, decorrelate=self.decorrelate,
                      color_correlation=self.color_correlation, decay_power=1.0, init_std=self.init_std, generator=generator, device=device)


@dataclass(frozen=True, eq=False)
class Fourier:
    """Spec of the Fourier parameterisation: the image is the inverse FFT of a spectrum scaled by ``1/f^decay_power``.

    A softer form of frequency regularisation: every frequency gets the same optimiser step size in
    the scaled spectrum, so low frequencies move more in the image. Args as for :class:`Pixels`, plus
    ``decay_power`` (default on: ``decorrelate``).
    """

    decay_power: float = 1.0
    range_fn: str = "sigmoid"
    decorrelate: bool = True
    color_correlation: torch.Tensor | None = None
    init_std: float = 0.01

    kind = "fourier"

    def build(self, shape: Sequence[int], *, value_range: tuple[float, float], generator: torch.Generator, device: torch.device) -> nn.Module:
        _check_range_fn(self.range_fn)
        return _Image(shape, param=self.kind, value_range=value_range, range_fn=self.range_fn, decorrelate=self.decorrelate,
                      color_correlation=self.color_correlation, decay_power=self.decay_power, init_std=self.init_std, generator=generator, device=device)


@dataclass(frozen=True, eq=False)
class Latent:
    """Spec of a learned prior: optimise the latent codes ``(N, latent_dim)`` of ``decoder`` instead of pixels.

    Args:
        decoder: ``latent (N, latent_dim) -> image (N, C, H, W)`` in the value range (end it with a
            sigmoid for [0, 1]; e.g. :func:`~lightning_introspect.methods.featviz.prior.fit_autoencoder_prior`).
            Its mode is set to eval during the optimisation and restored; its weights are not changed.
        latent_dim: the latent size (default: inferred with :func:`infer_latent_dim`).
        latent_std: standard deviation of the initial latent codes.
    """

    decoder: nn.Module
    latent_dim: int | None = None
    latent_std: float = 1.0

    kind = "prior"

    def build(self, shape: Sequence[int], *, value_range: tuple[float, float], generator: torch.Generator, device: torch.device) -> nn.Module:
        if not isinstance(self.decoder, nn.Module):
            raise ValueError(f"Expected `prior` to be an nn.Module decoder (latent -> image), but got {type(self.decoder).__name__}.")
        dim = infer_latent_dim(self.decoder) if self.latent_dim is None else self.latent_dim
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"Expected `latent_dim` to be a positive int, but got {self.latent_dim!r}.")
        return _Prior(self.decoder, int(shape[0]), dim, init_std=self.latent_std, value_range=value_range, generator=generator, device=device)


__all__ = [
    "PARAMS",
    "RANGE_FNS",
    "Fourier",
    "ImageParameterization",
    "Latent",
    "Pixels",
    "color_correlation_from_data",
    "default_color_correlation",
    "infer_latent_dim",
]
