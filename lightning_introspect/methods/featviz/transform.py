"""Transformation robustness: random changes of the image at every optimisation step.

A *transform* is any callable ``transform(images, generator) -> images`` on ``(N, C, H, W)`` display-space
images that keeps them differentiable; ``generator`` is the optimisation's private ``torch.Generator``
(draw from it, not from the global RNG, and the same seed gives the same images). A callable that takes
the images only is accepted too. :class:`TransformRobustness` is the built-in one (pad, jitter, scale,
rotate in one resampling); :class:`Compose` chains several; :func:`resolve_transforms` turns the
``transforms`` argument of
:func:`~lightning_introspect.methods.featviz.render.visualize_features` into one callable.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class TransformRobustness:
    """Random pad, jitter, scale and rotation applied to the image at every optimisation step.

    In order: pad by ``pad`` pixels (``fill``: ``"reflection"``, ``"border"`` or a constant value in the
    image range), shift by an integer in ``[-jitter, jitter]`` pixels per axis, scale by a factor drawn
    from ``scale``, rotate by up to ``degrees``, shift again by ``[-jitter_after, jitter_after]``
    pixels; the output keeps the input's size (a model with a flatten layer still works). Each image of
    a batch gets its own draw. All done with one ``affine_grid`` + ``grid_sample``.

    Use :meth:`for_size` for defaults scaled to an image size (Lucid's 128 px settings scaled down:
    at 32 px it is pad 3, jitter 2, scale 0.9-1.1, rotate 10 degrees, jitter 1).

    Example:
        >>> t = TransformRobustness.for_size(32)
        >>> (t.pad, t.jitter, t.jitter_after)
        (3, 2, 1)
        >>> t(torch.rand(2, 1, 32, 32), generator=torch.Generator().manual_seed(0)).shape
        torch.Size([2, 1, 32, 32])
    """

    pad: int = 3
    jitter: int = 2
    scale: tuple[float, float] = (0.9, 1.1)
    degrees: float = 10.0
    jitter_after: int = 1
    fill: str | float = "reflection"

    def __post_init__(self) -> None:
        for name in ("pad", "jitter", "jitter_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Expected `{name}` to be a non-negative int (pixels), but got {value!r}.")
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"Expected `scale` to be (low, high) with 0 < low <= high, but got {self.scale!r}.")
        if not 0 <= self.degrees < 180:
            raise ValueError(f"Expected `degrees` in [0, 180), but got {self.degrees!r}.")
        if isinstance(self.fill, str) and self.fill not in ("reflection", "border"):
            raise ValueError(f"Expected `fill` to be 'reflection', 'border' or a number, but got {self.fill!r}.")

    @classmethod
    def for_size(cls, size: int, *, strength: float = 1.0) -> TransformRobustness:
        """Lucid's defaults (pad 12, jitter 8, scale 0.9-1.1, rotate 10 deg, jitter 4 at 128 px) scaled to ``size``.

        ``strength`` multiplies the pixel amounts, the scale range and the angle.
        """
        f = size / 128.0 * strength

        def px(v: float) -> int:
            return max(1, round(v * f)) if strength > 0 else 0

        return cls(
            pad=px(12),
            jitter=px(8),
            scale=(1 - 0.1 * strength, 1 + 0.1 * strength),
            degrees=10.0 * strength,
            jitter_after=px(4),
        )

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = images.shape
        p = self.pad
        if p > 0:
            if isinstance(self.fill, str):
                mode = "reflect" if self.fill == "reflection" and p < min(h, w) else "replicate"
                canvas = F.pad(images, (p, p, p, p), mode=mode)
            else:
                canvas = F.pad(images, (p, p, p, p), mode="constant", value=float(self.fill))
        else:
            canvas = images
        hp, wp = h + 2 * p, w + 2 * p

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)

        def shift(k: int) -> torch.Tensor:
            return torch.randint(-k, k + 1, (n, 2), generator=generator).double()

        t1, t2 = shift(self.jitter), shift(self.jitter_after)
        s = uniform(*self.scale)
        theta_rad = uniform(-self.degrees, self.degrees) * math.pi / 180.0
        cos, sin = torch.cos(theta_rad) / s, torch.sin(theta_rad) / s
        # Pixel coordinates relative to the centre: input = A (output - t2) - t1, A = rotation / scale.
        a = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (n, 2, 2)
        d_out = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64)
        d_in = torch.tensor([wp / 2.0, hp / 2.0], dtype=torch.float64)
        mat = a * d_out.view(1, 1, 2) / d_in.view(1, 2, 1)
        offset = (-(a @ t2.unsqueeze(-1)).squeeze(-1) - t1) / d_in
        theta = torch.cat([mat, offset.unsqueeze(-1)], dim=-1).to(images.dtype).to(images.device)
        grid = F.affine_grid(theta, [n, images.shape[1], h, w], align_corners=False)
        return F.grid_sample(canvas, grid, mode="bilinear", padding_mode="border", align_corners=False)

class Compose:
    """Several transforms applied in order, each as ``t(images, generator)`` (or ``t(images)``).

    Example:
        >>> flip = lambda x: x.flip(-1)
        >>> t = Compose([flip, TransformRobustness(pad=0, jitter=0, scale=(1.0, 1.0), degrees=0.0, jitter_after=0)])
        >>> x = torch.rand(1, 1, 4, 4)
        >>> torch.allclose(t(x, torch.Generator()), x.flip(-1), atol=1e-6)
        True
    """

    def __init__(self, transforms: Sequence[Callable[..., torch.Tensor]]) -> None:
        self.transforms = [_with_generator(t, "transforms") for t in transforms]
        self._given = list(transforms)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for t in self.transforms:
            images = t(images, generator)
        return images

    def __repr__(self) -> str:
        return f"Compose({self._given!r})"


def _takes_generator(fn: Callable[..., torch.Tensor]) -> bool:
    """Whether ``fn`` can be called with two positional arguments (images, generator)."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn  # a module's __call__ reads (*args, **kwargs)
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: call it with the images only
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return any(p.kind == p.VAR_POSITIONAL for p in params) or len(positional) >= 2


def _with_generator(fn: object, argument: str) -> Transform:
    if not callable(fn):
        raise ValueError(f"Expected every entry of `{argument}` to be a callable (images[, generator]) -> images, but got {fn!r}.")
    if isinstance(fn, (TransformRobustness, Compose)) or _takes_generator(fn):
        return fn
    return lambda images, _generator: fn(images)


def resolve_transforms(transforms: object, size: int) -> Transform | None:
    """The ``transforms`` argument as one callable ``(images, generator) -> images``, or ``None``.

    ``None`` / ``False`` -> none; ``True`` / ``"auto"`` -> :meth:`TransformRobustness.for_size`; a float ->
    that strength (0 = none); a :class:`TransformRobustness` as it is; any other callable ``(images,
    generator) -> images`` or ``images -> images``; a list / tuple of those -> :class:`Compose`.

    Example:
        >>> resolve_transforms(True, 32) == TransformRobustness.for_size(32), resolve_transforms(0.0, 32)
        (True, None)
        >>> resolve_transforms([lambda x: x.flip(-1)], 32)(torch.eye(2).view(1, 1, 2, 2), torch.Generator()).tolist()
        [[[[0.0, 1.0], [1.0, 0.0]]]]
    """
    if transforms is None or transforms is False:
        return None
    if transforms is True or (isinstance(transforms, str) and transforms == "auto"):
        return TransformRobustness.for_size(size)
    if isinstance(transforms, TransformRobustness):
        return transforms
    if isinstance(transforms, (int, float)) and not isinstance(transforms, bool) and transforms >= 0:
        return TransformRobustness.for_size(size, strength=float(transforms)) if transforms > 0 else None
    if isinstance(transforms, (list, tuple)) and transforms:
        return Compose(transforms)
    if callable(transforms) and not isinstance(transforms, (str, bool)):
        return _with_generator(transforms, "transforms")
    raise ValueError(
        "Expected `transforms` to be None/False, True/'auto', a non-negative strength (float), a "
        f"TransformRobustness, a callable (images[, generator]) -> images or a list of those, but got {transforms!r}."
    )


__all__ = ["Compose", "Transform", "TransformRobustness", "resolve_transforms"]
