"""What a feature-visualisation run optimises, and with which settings.

The choices :class:`~lightning_introspect.callbacks.feature_visualization.FeatureVisualization` makes
before it calls :func:`~lightning_introspect.methods.featviz.render.visualize_features`: the prior
decoder named by an import path, the comparison columns and each column's keyword arguments, the layers
and channels picked automatically, the unit keys, and which units came out with NaN / Inf. No
Lightning, no logging: usable in a notebook.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_introspect.methods.featviz import FeatureVisualizationResult, TransformRobustness

REGULARIZERS = ("frequency", "transform", "prior")


def resolve_prior(spec: str | nn.Module | None, *, argument: str = "prior") -> nn.Module | None:
    """An ``nn.Module`` decoder from ``None``, a module, or an import path ``"pkg.module:attr"`` / ``"pkg.module.attr"``.

    The attribute may be a module instance or a zero-argument callable (a class or a factory) that
    returns one. Import paths are code chosen by whoever writes them: a config is refused one before it
    gets here unless the user opted in (see :data:`lightning_introspect.config.IMPORT_OPTIONS`).

    Raises:
        ValueError: ``spec`` is not ``None``, a module or an import path; the path cannot be imported;
            or it does not give an ``nn.Module``.

    Example:
        >>> resolve_prior(None) is None, type(resolve_prior("torch.nn:Identity")).__name__
        (True, 'Identity')
    """
    if spec is None or isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"Expected `{argument}` to be None, an nn.Module or an import path 'package.module:attribute', but got {spec!r}.")
    path = spec.strip()
    module_name, attr = path.split(":", 1) if ":" in path else path.rsplit(".", 1) if "." in path else (path, "")
    if not attr:
        raise ValueError(f"Expected `{argument}` as 'package.module:attribute', but got {spec!r}.")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"Cannot import `{argument}` {spec!r}: {err}.") from err
    if not isinstance(obj, nn.Module) and callable(obj):
        obj = obj()
    if not isinstance(obj, nn.Module):
        raise ValueError(f"Expected `{argument}` {spec!r} to give an nn.Module decoder (latent -> image), but got {type(obj).__name__}.")
    return obj


def comparison_columns(regularizers: Sequence[str], compare: bool) -> list[str]:
    """The settings compared side by side: ``none``, each regulariser and ``all`` (when ``compare`` and
    there are two or more), only ``all`` without ``compare``, ``none`` without regularisers.

    Example:
        >>> comparison_columns(["frequency", "transform"], True), comparison_columns(["frequency"], False)
        (['none', 'frequency', 'transform', 'all'], ['all'])
    """
    if not regularizers and not compare:
        return ["none"]
    if not compare:
        return ["all"]
    return ["none", *regularizers] + (["all"] if len(regularizers) > 1 else [])


def setting_options(
    setting: str,
    regularizers: Sequence[str],
    size: int,
    *,
    frequency_param: str = "fourier",
    frequency_penalty: float = 2.0,
    penalty: str = "tv",
    transform_strength: float = 1.0,
    prior: nn.Module | None = None,
    latent_dim: int | None = None,
    latent_penalty: float = 0.1,
) -> dict[str, Any]:
    """``visualize_features`` keyword arguments of one column: ``setting`` is ``"none"``, one regulariser
    or ``"all"`` (every one of ``regularizers``); ``size`` is the image side the transforms scale to.

    Example:
        >>> setting_options("none", ["frequency"], 32)
        {'param': 'pixels'}
        >>> sorted(setting_options("all", ["frequency", "transform"], 32))
        ['frequency_penalty', 'param', 'penalty', 'transforms']
    """
    on = set(regularizers) if setting == "all" else ({setting} if setting in REGULARIZERS else set())
    kwargs: dict[str, Any] = {"param": "pixels"}
    if "frequency" in on:
        kwargs.update(param=frequency_param, frequency_penalty=frequency_penalty, penalty=penalty)
    if "transform" in on and transform_strength > 0:
        kwargs["transforms"] = TransformRobustness.for_size(size, strength=transform_strength)
    if "prior" in on:
        kwargs.update(prior=prior, latent_dim=latent_dim, latent_penalty=latent_penalty)
    return kwargs


def spread_picks(names: Sequence[str], k: int) -> list[str]:
    """``k`` of ``names`` spread evenly, the last one always included (all of them when ``k >= len(names)``).

    Example:
        >>> spread_picks(["a", "b", "c", "d", "e", "f"], 2)
        ['c', 'f']
    """
    k = min(k, len(names))
    picks = sorted({math.ceil((i + 1) * len(names) / k) - 1 for i in range(k)})
    return [names[i] for i in picks]


def channel_spread(activation: torch.Tensor) -> torch.Tensor:
    """How much each channel of an activation ``(N, C, ...)`` varies over the samples and positions:
    its standard deviation, or ``|value|`` when there is one value per channel.

    Example:
        >>> channel_spread(torch.tensor([[0.0, 1.0], [0.0, 3.0]])).tolist()
        [0.0, 1.4142135381698608]
    """
    a = activation.detach().float().transpose(0, 1).flatten(1)
    return a.std(dim=1) if a.shape[1] > 1 else a.abs().flatten()


def top_channels(spread: torch.Tensor, k: int) -> list[int]:
    """The ids of the ``k`` largest entries of ``spread``, sorted (ties: the lower id first).

    Example:
        >>> top_channels(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2)
        [1, 3]
    """
    top = torch.argsort(spread, descending=True, stable=True)[: min(k, spread.numel())]
    return sorted(int(i) for i in top)


def unit_keys(layer_names: Sequence[str], chosen: Mapping[str, Sequence[int]], classes: Sequence[int]) -> list[str]:
    """Unit keys in batch order: ``"<layer>/<channel>"`` for each chosen channel, then ``"class/<c>"``.

    Example:
        >>> unit_keys(["conv"], {"conv": [0, 2]}, [3])
        ['conv/0', 'conv/2', 'class/3']
    """
    keys = [f"{name}/{ch}" for name in layer_names for ch in chosen.get(name, [])]
    return keys + [f"class/{k}" for k in classes]


def nonfinite_units(keys: Sequence[str], results: Mapping[str, FeatureVisualizationResult], columns: Sequence[str]) -> dict[str, list[str]]:
    """Unit key -> the settings whose image or final objective holds NaN / Inf.

    One check per setting on what ``visualize_features`` returned; the units are looked at only for a
    setting that is not finite. Empty when all is finite.
    """
    out: dict[str, list[str]] = {}
    for s in columns:
        r = results[s]
        if bool(torch.isfinite(r.images).all()) and bool(torch.isfinite(r.objective).all()):
            continue
        finite = torch.isfinite(r.images.flatten(1)).all(dim=1) & torch.isfinite(r.objective)
        for i, key in enumerate(keys):
            if not bool(finite[i]):
                out.setdefault(key, []).append(s)
    return out



def optimisation_space(
    x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None, value_range: tuple[float, float] | None
) -> tuple[tuple[float, float], list[float], list[float]]:
    """``(value_range, mean, std)`` of the optimised images: as given (defaults ``(0, 1)``, 0 and 1), or,
    when none of the three is given, the model's input space within the min / max of the samples ``x``.

    Example:
        >>> optimisation_space(torch.tensor([-2.0, 3.0]), None, None, None)
        ((-2.0, 3.0), [0.0], [1.0])
        >>> optimisation_space(torch.zeros(1), [0.5], None, None)
        ((0.0, 1.0), [0.5], [1.0])
    """
    if mean is None and std is None and value_range is None:
        return (float(x.min()), float(x.max())), [0.0], [1.0]
    return value_range or (0.0, 1.0), list(mean or [0.0]), list(std or [1.0])


def image_shape(x: torch.Tensor, image_size: int | None) -> tuple[int, int, int]:
    """``(C, H, W)`` of the optimised images: the samples' channels, and their size or ``image_size`` squared.

    Raises:
        ValueError: ``x`` is not a batch of images ``(N, C, H, W)``.

    Example:
        >>> image_shape(torch.zeros(2, 3, 8, 6), None), image_shape(torch.zeros(2, 3, 8, 6), 16)
        ((3, 8, 6), (3, 16, 16))
    """
    if x.ndim != 4:
        raise ValueError(f"FeatureVisualization needs image inputs (N, C, H, W); the data gives {tuple(x.shape)}.")
    h, w = x.shape[-2:]
    if image_size is not None:
        h = w = image_size
    return int(x.shape[1]), int(h), int(w)


def check_units(
    shapes: Mapping[str, tuple[int, ...] | None],
    out_shape: tuple[int, ...],
    channels: str | Sequence[int],
    classes: str | Sequence[int] | None,
    *,
    max_auto_classes: int = 10,
    task: str = "classification",
    background: int | None = None,
    tokens: Collection[str] = (),
) -> list[int]:
    """Check the asked channels and classes against the layers' and the model's output shapes, and
    return the classes to visualise.

    The channels of a conv or linear layer are its dimension 1; those of a token layer (``tokens``: a
    vision transformer's ``(N, T, D)`` outputs) are its embedding dimensions, the last dimension.

    ``classes="auto"``: for a classifier's ``(N, C)`` output the first ``max_auto_classes`` classes; for a
    segmentation model's ``(N, C, H, W)`` output (``task="segmentation"``) the first ``max_auto_classes``
    classes other than ``background`` (the class covering most pixels of the samples' masks: a
    "background image" shows the absence of objects, not an object); none for other outputs.

    Args:
        shapes: ``{layer name: output shape}`` of every layer to visualise (``None``: it did not run).
        out_shape: the model's output shape.
        channels: ``"auto"`` or channel ids used in every layer.
        classes: ``"auto"``, class ids or ``None``.
        max_auto_classes: the most classes ``"auto"`` picks.
        task: ``"classification"`` or ``"segmentation"`` (resolved by
            :func:`~lightning_introspect.methods.task.resolve_task`).
        background: the class ``"auto"`` leaves out for segmentation (``None``: none left out).
        tokens: the names among ``shapes`` whose outputs are tokens ``(N, T, D)`` (or ``(T, N, D)``).

    Raises:
        ValueError: a layer without a channel dimension, or channel / class ids out of range (naming the
            argument and the valid range).

    Example:
        >>> check_units({"conv": (2, 8, 4, 4)}, (2, 5), [0, 7], "auto", max_auto_classes=3)
        [0, 1, 2]
        >>> check_units({}, (2, 4, 8, 8), "auto", "auto", task="segmentation", background=0)
        [1, 2, 3]
        >>> check_units({"blocks.1": (2, 17, 64)}, (2, 10), [64], None, tokens={"blocks.1"})
        Traceback (most recent call last):
        ...
        ValueError: Expected `channels` in [0, 63] (layer 'blocks.1' has 64 embedding dimensions), but got [64].
    """
    for name, shape in shapes.items():
        if shape is None or len(shape) < 2 or (name in tokens and len(shape) != 3):
            need = "tokens (N, T, D)" if name in tokens else "(N, C, ...) tensors"
            raise ValueError(f"Expected layer {name!r} in `layers` to output {need}, but got shape {shape}.")
        n_ch, what = (shape[-1], "embedding dimensions") if name in tokens else (shape[1], "channels")
        if not isinstance(channels, str):
            bad = [ch for ch in channels if ch >= n_ch]
            if bad:
                raise ValueError(f"Expected `channels` in [0, {n_ch - 1}] (layer {name!r} has {n_ch} {what}), but got {bad}.")
    dense = task == "segmentation" and len(out_shape) == 4
    if isinstance(classes, (list, tuple)) and classes:
        if len(out_shape) != 2 and not dense:
            raise ValueError(
                f"`classes` needs a classifier output (N, num_classes) or a segmentation output (N, C, H, W), but the model "
                f"gives {out_shape}; set classes=None."
            )
        bad = [k for k in classes if k >= out_shape[1]]
        if bad:
            raise ValueError(f"Expected `classes` in [0, {out_shape[1] - 1}] (the model outputs {out_shape[1]} classes), but got {bad}.")
    if isinstance(classes, str):  # "auto", the only string the callback accepts
        if dense:
            return [k for k in range(out_shape[1]) if k != background][:max_auto_classes]
        return list(range(min(out_shape[1], max_auto_classes))) if len(out_shape) == 2 else []
    return [] if classes is None else list(classes)

__all__ = [
    "REGULARIZERS",
    "channel_spread",
    "check_units",
    "comparison_columns",
    "image_shape",
    "nonfinite_units",
    "optimisation_space",
    "resolve_prior",
    "setting_options",
    "spread_picks",
    "top_channels",
    "unit_keys",
]


def concat_results(parts: Sequence[FeatureVisualizationResult]) -> FeatureVisualizationResult:
    """The results of consecutive chunks of one batch as one result (images in chunk order).

    Example:
        >>> r = lambda n: FeatureVisualizationResult(torch.zeros(n, 1, 2, 2), torch.zeros(n), torch.zeros(n),
        ...                                          torch.zeros(3, n), torch.zeros(n))
        >>> joined = concat_results([r(2), r(1)])
        >>> tuple(joined.images.shape), tuple(joined.trace.shape)
        ((3, 1, 2, 2), (3, 3))
    """
    if len(parts) == 1:
        return parts[0]
    latents = [p.latents for p in parts]
    return FeatureVisualizationResult(
        images=torch.cat([p.images for p in parts]),
        objective=torch.cat([p.objective for p in parts]),
        initial_objective=torch.cat([p.initial_objective for p in parts]),
        trace=torch.cat([p.trace for p in parts], dim=1),
        high_frequency_fraction=torch.cat([p.high_frequency_fraction for p in parts]),
        latents=None if any(lat is None for lat in latents) else torch.cat([lat for lat in latents if lat is not None]),
        settings=dict(parts[0].settings),
        input_mean=parts[0].input_mean,  # one normalisation for every part of a run
        input_std=parts[0].input_std,
    )
