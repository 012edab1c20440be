"""Image grids in torch, and captioned grids through matplotlib."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def make_grid(images: torch.Tensor, *, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile ``(N, C, H, W)`` images into one ``(C, H', W')`` image, ``nrow`` images per row.

    Example:
        >>> make_grid(torch.zeros(5, 3, 4, 4), nrow=3, padding=1).shape
        torch.Size([3, 11, 16])
    """
    if images.ndim != 4:
        raise ValueError(f"Expected `images` of shape (N, C, H, W), but got {tuple(images.shape)}.")
    n, c, h, w = images.shape
    ncol = max(1, min(nrow, n))
    nrows = math.ceil(n / ncol)
    grid = images.new_full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


def captioned_grid(
    images: torch.Tensor | Sequence[torch.Tensor],
    captions: Sequence[str] | None = None,
    *,
    nrow: int = 8,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    cell_inches: float = 1.4,
) -> np.ndarray:
    """A grid of images with a caption under each (and optional row labels), as an HWC uint8 array.

    ``images`` are ``(N, C, H, W)`` floats in [0, 1] (C = 1 or 3). Use it where the caption carries
    meaning (true / predicted label, confidence): TensorBoard images have no per-tile text. The tiles
    are assembled in torch and drawn as ONE ``imshow`` plus text (no subplot per tile), which keeps a
    64-tile grid well under a second.

    Example:
        >>> captioned_grid(torch.rand(3, 1, 8, 8), ["a", "b", "c"], nrow=3).dtype
        dtype('uint8')
    """
    from matplotlib.figure import Figure

    from lightning_introspect.loggers.adapter import figure_to_array

    imgs = torch.stack(list(images)) if not isinstance(images, torch.Tensor) else images
    if imgs.ndim != 4:
        raise ValueError(f"Expected `images` of shape (N, C, H, W), but got {tuple(imgs.shape)}.")
    n, c, h, w = imgs.shape
    ncol = max(1, min(nrow, n))
    nrows = max(1, math.ceil(n / ncol))
    pad = max(1, h // 16)
    band = max(8, round(h * 0.5)) if captions else pad  # room for two caption lines under a tile
    left_margin = max(8, round(w * 0.6)) if row_labels else 0
    height, width = nrows * (h + band) + pad, left_margin + ncol * (w + pad) + pad
    tiles = imgs.detach().float().cpu().clamp(0, 1)
    tiles = tiles.expand(-1, 3, -1, -1) if c == 1 else tiles[:, :3]
    canvas = torch.ones(3, height, width)
    spots = []
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + band), left_margin + pad + col * (w + pad)
        canvas[:, top : top + h, left : left + w] = tiles[i]
        spots.append((left + w / 2 - 0.5, top + h + 0.5))
    fig_w = cell_inches * ncol + (cell_inches * 0.6 if row_labels else 0.0)
    fig_h = fig_w * height / width
    title_h = 0.3 if title else 0.0
    fig = Figure(figsize=(fig_w, fig_h + title_h), dpi=100)
    ax = fig.add_axes((0.0, 0.0, 1.0, fig_h / (fig_h + title_h)))
    ax.imshow(np.ascontiguousarray(canvas.permute(1, 2, 0).numpy()), interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    for (cx, cy), text in zip(spots, captions or ()):
        ax.text(cx, cy, text, ha="center", va="top", fontsize=7, linespacing=1.1)
    for r, label in enumerate(list(row_labels or ())[:nrows]):
        ax.text(left_margin - 1, pad + r * (h + band) + h / 2, label, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9, y=0.99)
    return figure_to_array(fig, close=False)
