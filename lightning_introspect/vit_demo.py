"""The vision-transformer demo task: a tiny ViT of our own on scikit-learn's bundled digits (nothing is
downloaded), the model of ``lightning-introspect demo --task vit``.

The digits are upsampled to 16x16 and cut into 4x4 patches: a class token and a 4x4 grid of patch tokens
(17 tokens) go through two pre-norm transformer blocks whose attention is written out as
``softmax(q k^T / sqrt(d)) v``, and the head reads the class token. So every ViT path of the callbacks
runs: attention rollout on the captured probabilities, Grad-CAM on the patch tokens of a block, feature
visualisation of a block's embedding dimensions, linear probes on the class token, LRP through the
attention.

Example:
    >>> vit = DigitsViT()
    >>> vit(torch.zeros(2, 1, 16, 16)).shape
    torch.Size([2, 10])
    >>> [name for name, _ in vit.blocks.named_children()]
    ['0', '1']
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightning_introspect.demo import DIGIT_NAMES, CrossEntropyClassifier

#: the side the digits are upsampled to and the patch side: a 4x4 grid of patch tokens
IMAGE_SIZE = 16
PATCH_SIZE = 4


class ClassTokenAndPosition(nn.Module):
    """Prepends the class token to the patch tokens ``(N, P, D)`` and adds the learned position embedding.

    The two parameters live in a module of their own (not on the model) so that ``SanityChecks`` finds them:
    its randomisation re-initialises modules that run in the forward pass, and a bare parameter of the
    model itself belongs to none. ``reset_parameters`` is their initialisation, so a re-initialisation is
    the model's own, not a redraw.
    """

    def __init__(self, num_patches: int, dim: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.position = nn.Parameter(torch.empty(1, num_patches + 1, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for param in (self.cls_token, self.position):  # small, as in ViT: the patches dominate at the start
            nn.init.trunc_normal_(param, std=0.02, a=-0.04, b=0.04)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position


class SelfAttention(nn.Module):
    """Multi-head self-attention written out: ``softmax(q k^T / sqrt(d)) v`` per head, then a projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"Expected `dim` ({dim}) to be divisible by `heads` ({heads}).")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)  # (N, heads, T, T)
        return self.proj((weights @ v).transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (GELU MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsViT(CrossEntropyClassifier):
    """A tiny vision transformer for 1x16x16 digits.

    Layer names: ``patch_embed`` (the 4x4 patch convolution), ``tokens`` (class token and positions),
    ``blocks.0`` and ``blocks.1`` (each ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.0`` /
    ``mlp.2``), ``norm`` and ``head`` (on the class token). Grad-CAM's automatic layer is ``blocks.0``:
    with a class-token head the last block's patch tokens reach the output only through themselves.

    Args:
        num_classes: output classes.
        dim: embedding width.
        heads: attention heads per block.
        depth: transformer blocks.
        lr: AdamW learning rate (cosine decay over the fit).
        image_size: input side (a multiple of ``patch``).
        patch: patch side.
    """

    def __init__(
        self,
        num_classes: int = 10,
        dim: int = 64,
        heads: int = 4,
        depth: int = 2,
        lr: float = 3e-3,
        image_size: int = IMAGE_SIZE,
        patch: int = PATCH_SIZE,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if image_size % patch:
            raise ValueError(f"Expected `image_size` ({image_size}) to be a multiple of `patch` ({patch}).")
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.tokens = ClassTokenAndPosition((image_size // patch) ** 2, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, P, D), the grid in row-major order
        return self.head(self.norm(self.blocks(self.tokens(patches)))[:, 0])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)
        # a transformer this small still trains faster and ends steadier with the rate decayed to zero
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=steps, pct_start=0.15)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def vit_config(*, fast: bool = False, mean: float = 0.0, std: float = 1.0) -> dict[str, Any]:
    """The introspection config of the ViT demo: every callback on with its default options, plus what the
    data require (classes, normalisation) and the transformer methods (attention rollout, gradient-weighted
    rollout, Grad-CAM on tokens) for the attribution callbacks.

    Args:
        fast: tiny settings for tests (seconds).
        mean: the data's normalisation mean, to show inputs as they are.
        std: the data's normalisation std.
    """
    from lightning_introspect.config import CALLBACKS

    methods = ["saliency", "grad_cam", "attention_rollout", "grad_rollout", "lrp"]
    config: dict[str, Any] = {
        "common": {"class_names": DIGIT_NAMES, "mean": mean, "std": std, "value_range": [0.0, 1.0]},
        "per_class_metrics": {"num_classes": 10},
        "misclassifications": {},
        "weight_histograms": {},
        "linear_probes": {},
        "attributions": {"methods": methods},
        "feature_visualization": {},
        # every block, given explicitly (a size given is never reduced by the budget): the demo shows the whole
        # cascade, from the patch embedding to the head
        "sanity_checks": {"methods": methods, "layers": "auto"},
    }
    if fast:
        config["misclassifications"].update(num_samples=64)
        config["attributions"].update(num_samples=4)
        config["feature_visualization"].update(steps=6, num_channels=2, classes=[0, 1, 2])
        config["sanity_checks"].update(num_samples=4, repeats=1)
    return {k: v for k, v in config.items() if k in CALLBACKS or k == "common"}


__all__ = ["IMAGE_SIZE", "PATCH_SIZE", "Block", "ClassTokenAndPosition", "DigitsViT", "SelfAttention", "vit_config"]
