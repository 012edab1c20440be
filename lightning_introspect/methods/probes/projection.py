"""A seeded random projection that reduces very wide features to ``max_features``."""

from __future__ import annotations

import contextlib
import math

import torch

from lightning_introspect._torch.guards import private_generator


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()


class RandomProjection:
    """A seeded linear map from ``in_features`` to ``out_features`` that roughly preserves distances.

    Dense Gaussian entries ``N(0, 1/out_features)`` when the matrix has at most ``dense_limit``
    entries; otherwise a sparse sign sketch (every input feature added, with a random sign, to one
    random output feature), which needs only ``O(in_features)`` memory. Both preserve squared norms
    in expectation. The randomness comes from a private generator: the global RNG is never touched,
    and the same seed gives the same map on every call, epoch and resume.

    Args:
        in_features: width of the features to project.
        out_features: target width.
        seed: seed of the private generator.
        device: where the projection (and its outputs) live.
        dense_limit: largest number of dense matrix entries (default 4M = 16 MB).

    Example:
        >>> proj = RandomProjection(1000, 64, seed=0)
        >>> proj(torch.randn(5, 1000)).shape
        torch.Size([5, 64])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dense_limit: int = 1 << 22,
    ) -> None:
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Expected positive widths, but got in_features={in_features}, out_features={out_features}.")
        self.in_features, self.out_features = int(in_features), int(out_features)
        gen = private_generator(seed)
        with torch.inference_mode(False):
            if self.in_features * self.out_features <= dense_limit:
                self.kind = "dense"
                self.matrix: torch.Tensor | None = (
                    torch.randn(self.in_features, self.out_features, generator=gen) / math.sqrt(self.out_features)
                ).to(device)
                self.buckets = self.signs = None
            else:
                self.kind = "sketch"
                self.matrix = None
                self.buckets = torch.randint(0, self.out_features, (self.in_features,), generator=gen).to(device)
                self.signs = (torch.randint(0, 2, (self.in_features,), generator=gen) * 2 - 1).float().to(device)

    @property
    def device(self) -> torch.device:
        tensor = self.matrix if self.matrix is not None else self.buckets
        assert tensor is not None  # __init__ builds either the matrix or the sketch
        return tensor.device

    def to(self, device: torch.device | str) -> RandomProjection:
        """Move the projection to ``device`` (in place); returns itself."""
        with torch.inference_mode(False):
            for attr in ("matrix", "buckets", "signs"):
                value = getattr(self, attr)
                if value is not None:
                    setattr(self, attr, value.to(device))
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Expected features of shape (N, {self.in_features}), but got {tuple(x.shape)}.")
        if x.device != self.device:
            self.to(x.device)
        x = x.float()
        with no_autocast(x.device):  # hooks run inside the model's autocast region: keep fp32
            if self.matrix is not None:
                return x @ self.matrix
            assert self.buckets is not None and self.signs is not None  # the sketch, when there is no matrix
            out = x.new_zeros(x.shape[0], self.out_features)
            return out.index_add_(1, self.buckets, x * self.signs)
