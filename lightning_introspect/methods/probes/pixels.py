"""Per-pixel probes (segmentation): masks resized to a feature map, a bounded draw of labelled positions per
image, and the feature vectors at those positions."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_introspect.methods.probes.pooling import first_tensor


def _nearest_source(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """The source index of every output index along one axis, as ``F.interpolate(mode="nearest")`` picks it."""
    grid = torch.arange(n_in, dtype=torch.float32, device=device).view(1, 1, n_in)
    return F.interpolate(grid, size=n_out, mode="nearest").view(-1).round().long()


def nearest_labels(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Integer masks ``(N, H, W)`` resized to ``size`` ``(h, w)`` by nearest neighbour: each cell of a
    feature map gets the label of the mask pixel ``F.interpolate(mode="nearest")`` reads for it (the same
    choice of source pixels, made on the indices so any label value stays exact).

    Example:
        >>> m = torch.arange(16).view(1, 4, 4)
        >>> nearest_labels(m, (2, 2)).tolist()
        [[[0, 2], [8, 10]]]
    """
    h, w = int(size[0]), int(size[1])
    if tuple(masks.shape[-2:]) == (h, w):
        return masks
    rows = _nearest_source(masks.shape[-2], h, masks.device)
    cols = _nearest_source(masks.shape[-1], w, masks.device)
    return masks[:, rows][:, :, cols]


def sample_pixels(
    labels: torch.Tensor, per_image: int, *, generator: torch.Generator, ignore_index: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to ``per_image`` distinct positions of each image of ``labels`` ``(N, h, w)``, drawn uniformly
    among its pixels with a valid label (not ``ignore_index``, not negative): an image with fewer valid
    pixels gives all of them, and an ignored pixel is never drawn.

    The draw uses only ``generator`` (a CPU ``torch.Generator``; the global RNG is not touched): re-seeded
    before each pass over the same data, it gives the same positions every pass.

    Returns:
        ``(image, row, col)`` long tensors on CPU, image by image.

    Example:
        >>> labels = torch.tensor([[[0, 255], [1, 255]]])
        >>> image, row, col = sample_pixels(labels, 8, generator=torch.Generator().manual_seed(0), ignore_index=255)
        >>> sorted(zip(row.tolist(), col.tolist()))  # both valid pixels, never an ignored one
        [(0, 0), (1, 0)]
    """
    if isinstance(per_image, bool) or not isinstance(per_image, int) or per_image < 1:
        raise ValueError(f"Expected `pixels_per_image` to be a positive int, but got {per_image!r}.")
    labels = labels.detach().cpu()
    n, h, w = labels.shape
    flat = labels.reshape(n, h * w)
    valid = flat >= 0
    if ignore_index is not None:
        valid &= flat != ignore_index
    k = min(per_image, h * w)
    scores = torch.rand(n, h * w, generator=generator)
    scores[~valid] = 2.0  # past every valid pixel's draw in [0, 1): taken only when too few are valid, then dropped
    index = scores.topk(k, dim=1, largest=False).indices
    keep = valid.gather(1, index)
    image = torch.arange(n).view(n, 1).expand(n, k)[keep]
    position = index[keep]
    return image, torch.div(position, w, rounding_mode="floor"), position % w


def pixel_features(feature_map: Any, image: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """The feature vectors ``(n, D)`` (float32, detached) of a feature map ``(N, D, h, w)`` at the positions
    ``(image, row, col)`` (from :func:`sample_pixels`).

    Raises:
        ValueError: the layer output is not a feature map ``(N, D, h, w)``.

    Example:
        >>> fmap = torch.arange(8.0).view(1, 2, 2, 2)
        >>> pixel_features(fmap, torch.tensor([0]), torch.tensor([1]), torch.tensor([0])).tolist()
        [[2.0, 6.0]]
    """
    x = first_tensor(feature_map).detach()
    if x.ndim != 4:
        raise ValueError(
            f"Per-pixel probes (task='segmentation') need feature maps (N, D, h, w), but a layer gave shape {tuple(x.shape)}; "
            "probe convolutional layers."
        )
    device = x.device
    return x[image.to(device), :, row.to(device), col.to(device)].float()
