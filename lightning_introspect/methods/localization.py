"""Localisation scores of attribution maps against known object masks.

* :func:`pointing_game` (Zhang et al. 2016): does the map's maximum fall on the object?
* :func:`energy_in_mask` (the "energy-based pointing game" of Score-CAM, Wang et al. 2020): which share
  of the map's positive mass lies on the object?

Both return one score per sample; take ``.mean()`` for a data-set score. A map that spreads its mass
uniformly scores the mask's area fraction under :func:`energy_in_mask`, and :func:`chance_level` gives
that baseline (also the expected pointing-game hit rate of a random point).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["chance_level", "energy_in_mask", "pointing_game"]


def _as_maps(maps: torch.Tensor, argument: str = "maps") -> torch.Tensor:
    if not isinstance(maps, torch.Tensor) or maps.ndim not in (3, 4):
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"Expected `{argument}` of shape (N, H, W) or (N, C, H, W), but got {shape}.")
    maps = maps.detach().float()
    return maps.sum(dim=1) if maps.ndim == 4 else maps


def _as_masks(masks: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(masks, torch.Tensor) or masks.ndim not in (2, 3, 4):
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"Expected `masks` of shape (H, W), (N, H, W) or (N, 1, H, W), but got {shape}.")
    if masks.ndim == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"Expected `masks` with one channel, (N, 1, H, W), but got {tuple(masks.shape)}.")
        masks = masks[:, 0]
    if masks.ndim == 2:
        masks = masks.unsqueeze(0).expand(n, -1, -1)
    if masks.shape[0] != n:
        raise ValueError(f"Expected `masks` with one mask per map (N={n}), but got {masks.shape[0]}.")
    return masks.detach().bool() if masks.dtype == torch.bool else masks.detach() > 0.5


def _aligned(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = _as_maps(maps)
    k = _as_masks(masks, m.shape[0]).to(m.device)
    if m.shape[-2:] != k.shape[-2:]:
        m = F.interpolate(m.unsqueeze(1), size=k.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    return m, k


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, *, tolerance: int = 0) -> torch.Tensor:
    """Per-sample hit (1.0) or miss (0.0): the map's maximum lies on the object.

    A hit needs *every* pixel attaining the map's maximum to lie inside the mask (grown by ``tolerance``
    pixels, a square neighbourhood); a constant map (no maximum to point at, e.g. an all-zero Grad-CAM)
    is a miss. Maps of another size than the masks are resized bilinearly first.

    Args:
        maps: ``(N, H, W)`` or ``(N, C, H, W)`` attribution maps (channels summed; pass ``|map|`` for
            signed methods if magnitude is what points).
        masks: ``(N, H, W)``, ``(N, 1, H, W)`` or one ``(H, W)`` mask; bool, or floats thresholded at 0.5.
        tolerance: grow the mask by this many pixels (TorchRay uses 15 px at 224 px).

    Returns:
        ``(N,)`` float tensor of 0/1.

    Example:
        >>> maps = torch.zeros(2, 4, 4); maps[0, 1, 1] = 1; maps[1, 3, 3] = 1
        >>> mask = torch.zeros(4, 4, dtype=torch.bool); mask[:2, :2] = True
        >>> pointing_game(maps, mask).tolist()
        [1.0, 0.0]
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"Expected `tolerance` to be a non-negative int, but got {tolerance!r}.")
    m, k = _aligned(maps, masks)
    if tolerance:
        k = F.max_pool2d(k.float().unsqueeze(1), 2 * tolerance + 1, stride=1, padding=tolerance).squeeze(1) > 0
    flat = m.flatten(1)
    top = flat.amax(dim=1, keepdim=True)
    at_max = flat == top
    constant = flat.amin(dim=1) == top.squeeze(1)
    hit = (at_max & ~k.flatten(1)).sum(dim=1) == 0
    return (hit & ~constant).float()


def energy_in_mask(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-sample share of the map's positive mass inside the mask: ``sum(relu(map) * mask) / sum(relu(map))``.

    Negative values are ignored (pass ``|map|`` for signed methods if magnitude is what counts). A map
    with no positive mass scores 0.

    Example:
        >>> maps = torch.ones(1, 4, 4)
        >>> mask = torch.zeros(4, 4, dtype=torch.bool); mask[:2, :2] = True
        >>> energy_in_mask(maps, mask).tolist()
        [0.25]
    """
    m, k = _aligned(maps, masks)
    pos = m.clamp_min(0).flatten(1)
    total = pos.sum(dim=1)
    inside = (pos * k.flatten(1).float()).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(pos.dtype).tiny), torch.zeros_like(total))


def chance_level(masks: torch.Tensor) -> torch.Tensor:
    """Per-sample mask area fraction: the expected score of a random point / a uniform map.

    Example:
        >>> chance_level(torch.ones(1, 2, 2)).tolist()
        [1.0]
    """
    k = masks[:, 0] if masks.ndim == 4 else masks
    k = k.unsqueeze(0) if k.ndim == 2 else k
    k = k.bool() if k.dtype == torch.bool else k > 0.5
    return k.flatten(1).float().mean(dim=1)
