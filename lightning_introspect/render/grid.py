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
    """A grid of images with a caption under each, rendered with matplotlib to an HWC uint8 array.

    ``images`` are ``(N, C, H, W)`` floats in [0, 1] (C = 1 or 3). Use it where the caption carries
    meaning (true / predicted label, confidence), because TensorBoard images have no per-tile text.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from lightning_introspect.loggers.adapter import figure_to_array

    imgs = torch.stack(list(images)) if not isinstance(images, torch.Tensor) else images
    n = imgs.shape[0]
    ncol = max(1, min(nrow, n))
    nrows = max(1, math.ceil(n / ncol))
    fig, axes = plt.subplots(nrows, ncol, figsize=(cell_inches * ncol, cell_inches * nrows + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        img = imgs[i].detach().cpu().float().clamp(0, 1)
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img[:3].permute(1, 2, 0).numpy())
        if captions is not None and i < len(captions):
            ax.set_xlabel(captions[i], fontsize=7)
        if row_labels is not None and i % ncol == 0 and i // ncol < len(row_labels):
            ax.set_ylabel(row_labels[i // ncol], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return figure_to_array(fig)
