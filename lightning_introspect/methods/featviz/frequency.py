"""Image frequencies: how much of an image is high-frequency detail, and penalties that lower it.

Unregularised activation maximisation ends in checkerboard-like noise. :func:`high_frequency_fraction`
measures it (a "how natural" number); :func:`total_variation` and :func:`high_frequency_energy` are
the differentiable penalties that :func:`~lightning_introspect.methods.featviz.render.visualize_features`
weighs by ``frequency_penalty`` (chosen by name with :func:`frequency_penalty_of`).
"""

from __future__ import annotations

import torch

PENALTIES = ("tv", "highfreq")


def _radial_frequency(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """``|f|`` in cycles per pixel on the ``rfft2`` grid ``(h, w // 2 + 1)`` (Nyquist = 0.5)."""
    fy = torch.fft.fftfreq(h, device=device).view(-1, 1)
    fx = torch.fft.rfftfreq(w, device=device).view(1, -1)
    return torch.sqrt(fy * fy + fx * fx)


def _rfft_weights(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """How often each ``rfft2`` column stands for itself in the full spectrum (1 or 2)."""
    weights = torch.full((1, w // 2 + 1), 2.0, device=device)
    weights[0, 0] = 1.0
    if w % 2 == 0:
        weights[0, -1] = 1.0
    return weights.expand(h, -1)


def high_frequency_fraction(images: torch.Tensor, *, cutoff: float = 0.25) -> torch.Tensor:
    """The share of an image's (mean-removed) spectral energy above ``cutoff`` cycles/pixel: ``(N,)``.

    A "how natural" number: photos and digits keep most energy at low frequencies (a few percent
    above half the Nyquist frequency), the checkerboard noise of an unregularised optimum much more.
    A constant image gives 0.

    Example:
        >>> import math
        >>> checker = (torch.arange(8).view(1, -1) + torch.arange(8).view(-1, 1)) % 2
        >>> wave = torch.cos(torch.arange(8) * 2 * math.pi / 8).view(1, -1).expand(8, -1)
        >>> high_frequency_fraction(torch.stack([checker, wave]).float().unsqueeze(1)).round(decimals=3).tolist()
        [1.0, 0.0]
    """
    if images.ndim != 4:
        raise ValueError(f"Expected `images` of shape (N, C, H, W), but got {tuple(images.shape)}.")
    x = images.detach().float()
    x = x - x.mean(dim=(2, 3), keepdim=True)
    h, w = x.shape[-2:]
    power = torch.fft.rfft2(x, norm="ortho").abs().pow(2).sum(1) * _rfft_weights(h, w, x.device)
    high = (_radial_frequency(h, w, x.device) > cutoff).to(power.dtype)
    total = power.flatten(1).sum(1)
    return torch.where(total > 0, (power * high).flatten(1).sum(1) / total.clamp_min(1e-30), torch.zeros_like(total))


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels, per image: ``(N,)``."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
    return dx + dy


def high_frequency_energy(images: torch.Tensor, *, cutoff: float = 0.25) -> torch.Tensor:
    """Root-mean-square of the image's high-pass part (frequencies above ``cutoff`` cycles/pixel): ``(N,)``.

    Differentiable; in the image's units (like total variation), so the two penalties take weights of
    a similar size. It penalises exactly the energy :func:`high_frequency_fraction` counts.
    """
    h, w = images.shape[-2:]
    spec = torch.fft.rfft2(images, norm="ortho")
    mask = (_radial_frequency(h, w, images.device) > cutoff).to(images.dtype) * _rfft_weights(h, w, images.device)
    energy = (spec.real.pow(2) + spec.imag.pow(2)).mul(mask).flatten(1).sum(1) / images[0].numel()
    return torch.sqrt(energy + 1e-12)


def frequency_penalty_of(images: torch.Tensor, kind: str = "tv") -> torch.Tensor:
    """The frequency penalty ``kind`` (``"tv"`` or ``"highfreq"``) of images in [0, 1]: ``(N,)``."""
    if kind == "tv":
        return total_variation(images)
    if kind == "highfreq":
        return high_frequency_energy(images)
    raise ValueError(f"Expected `penalty` to be one of {', '.join(repr(p) for p in PENALTIES)}, but got {kind!r}.")



__all__ = ["PENALTIES", "frequency_penalty_of", "high_frequency_energy", "high_frequency_fraction", "total_variation"]
