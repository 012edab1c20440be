"""Attribution maps to colours: normalisation, colormaps (sequential or diverging) and overlays."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize_maps(maps: torch.Tensor, *, mode: str = "per_map", signed: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """Scale ``(N, H, W)`` maps for display.

    Unsigned maps go to [0, 1] (divided by the max of |map|); signed maps to [-1, 1] keeping 0 at 0.
    ``mode="per_map"`` scales each map alone, ``"per_batch"`` all maps by one factor so magnitudes
    stay comparable.
    """
    if mode not in ("per_map", "per_batch"):
        raise ValueError(f"Expected `normalize` to be one of 'per_map', 'per_batch', but got {mode!r}.")
    maps = torch.nan_to_num(maps.detach().float())
    if mode == "per_map":
        scale = maps.abs().flatten(1).amax(dim=1).clamp_min(eps).view(-1, *([1] * (maps.ndim - 1)))
    else:
        scale = maps.abs().amax().clamp_min(eps)
    out = maps / scale
    return out if signed else out.clamp(min=0.0)


def colorize(maps: torch.Tensor, *, cmap: str = "inferno", signed: bool = False) -> torch.Tensor:
    """Normalised ``(N, H, W)`` maps -> ``(N, 3, H, W)`` RGB in [0, 1] through a matplotlib colormap.

    Signed maps (in [-1, 1]) use a diverging colormap centred on 0 (``"bwr"`` unless told otherwise).
    """
    import matplotlib

    if signed and cmap == "inferno":
        cmap = "bwr"
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError as err:
        raise ValueError(f"Expected `colormap` to be a matplotlib colormap name, but got {cmap!r}.") from err
    values = ((maps + 1.0) / 2.0) if signed else maps
    lut = torch.tensor(colormap(torch.linspace(0, 1, 256).numpy())[:, :3], dtype=torch.float32)
    idx = (values.clamp(0, 1) * 255).round().long().cpu()
    return lut[idx].permute(0, 3, 1, 2).contiguous()


def to_display(images: torch.Tensor, *, mean: float | tuple[float, ...] | None = None, std: float | tuple[float, ...] | None = None) -> torch.Tensor:
    """Inputs ``(N, C, H, W)`` -> [0, 1] for display: un-normalise with ``mean``/``std`` if given,
    otherwise min-max per image."""
    x = images.detach().float().cpu()
    if mean is not None and std is not None:
        m = torch.as_tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x * s + m).clamp(0, 1)
    lo = x.flatten(1).amin(1).view(-1, 1, 1, 1)
    hi = x.flatten(1).amax(1).view(-1, 1, 1, 1)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def overlay(images: torch.Tensor, heat: torch.Tensor, *, alpha: float = 0.5) -> torch.Tensor:
    """Blend RGB heat ``(N, 3, h, w)`` over display images ``(N, C, H, W)`` in [0, 1]; resizes the heat."""
    if heat.shape[-2:] != images.shape[-2:]:
        heat = F.interpolate(heat, size=images.shape[-2:], mode="bilinear", align_corners=False)
    base = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]
    gray = base.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    return ((1 - alpha) * gray + alpha * heat).clamp(0, 1)
