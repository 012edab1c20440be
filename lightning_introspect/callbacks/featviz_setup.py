"""What :class:`~lightning_introspect.callbacks.feature_visualization.FeatureVisualization` visualises, decided
on the model and the fixed samples: the task, the ``"auto"`` layers, the units checked against the model (token
layers found, classes chosen, the prior's output shape), the ``"auto"`` channels, and each unit's objective.

The choices themselves are :mod:`lightning_introspect.methods.featviz_plan` and
:mod:`lightning_introspect.methods.featviz.layers`; the callback keeps what was decided.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lightning_introspect._torch.guards import introspection_mode, module_device
from lightning_introspect._torch.hooks import layer_outputs
from lightning_introspect.methods.featviz import (
    Objective,
    channel,
    class_logit,
    dense_class_logit,
    infer_latent_dim,
    patch_token_channels,
    stack_objectives,
    token_channel,
)
from lightning_introspect.methods.featviz.layers import (
    PatchTokens,
    main_conv_chain,
    patch_token_layouts,
    vit_blocks,
)
from lightning_introspect.methods.featviz_plan import (
    channel_spread,
    check_units,
    image_shape,
    spread_picks,
    top_channels,
)
from lightning_introspect.methods.targets import dominant_class
from lightning_introspect.methods.task import as_masks, resolve_task

if TYPE_CHECKING:
    from lightning_introspect._lightning import pl
    from lightning_introspect.callbacks.feature_visualization import FeatureVisualization

MAX_AUTO_CLASSES = 10  # classes="auto": at most this many class images

__all__ = [
    "MAX_AUTO_CLASSES", "TaskFound", "as_channels", "auto_layers", "channel_objective", "check_run_units",
    "choose_channels", "chunk_objectives", "chunk_size", "class_objective", "detect_task",
]


class TaskFound(NamedTuple):
    """What :func:`detect_task` read from one forward pass and the samples' labels."""

    task: str  # "classification" or "segmentation"
    num_outputs: int | None  # channels of the model output (classes)
    background: int | None  # segmentation: the class covering most pixels of the masks


def detect_task(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, task: str) -> TaskFound:
    """The task, from one forward pass of two samples at the data's size and their labels
    (:func:`~lightning_introspect.methods.task.resolve_task`), and, for segmentation, the class covering most
    pixels of the samples' masks (the background ``classes="auto"`` leaves out). Call with the model returning
    its logits (``logits_only``)."""
    _, out = layer_outputs(model, x[:2], [])
    if task == "auto" and y is None:  # an image-to-image model (an autoencoder) is dense too: masks decide
        resolved = "classification"
    else:
        resolved = resolve_task(task, out, None if y is None else y[:2])
    background = None
    if resolved == "segmentation" and y is not None:
        masks = as_masks(y)
        valid = masks[(masks >= 0) & (masks < out.shape[1])]
        background = dominant_class(valid) if valid.numel() else None
    return TaskFound(resolved, int(out.shape[1]) if out.ndim >= 2 else None, background)


def auto_layers(model: nn.Module, example: torch.Tensor, num_layers: int, *, task: str | None, num_outputs: int | None) -> list[str]:
    """``num_layers`` layers spread evenly over the network, the last one included: a vision transformer's
    blocks whose outputs are patch tokens (:func:`vit_blocks`), else the conv layers on the main path
    (:func:`main_conv_chain` on ``example``; for segmentation without a final 1x1 conv that gives the
    ``num_outputs`` class logits); without either, the hidden ``nn.Linear`` layers."""
    blocks = vit_blocks(model, example)
    if blocks:  # a ViT's patch embedding is a conv too, but its blocks are where the features are
        return spread_picks(blocks, num_layers)
    try:
        convs = main_conv_chain(model, example)
    except ValueError:  # no spatial feature map at all
        convs = []
    if task == "segmentation" and len(convs) > 1:
        head = model.get_submodule(convs[-1])  # a 1x1 conv giving the class logits: the class images show those
        if isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1) and head.out_channels == num_outputs:
            convs = convs[:-1]
    if not convs:
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:-1]
    if not convs:
        raise ValueError("`layers='auto'` found no nn.Conv2d (or hidden nn.Linear) layers; name the layers in `layers`.")
    return spread_picks(convs, num_layers)


def check_run_units(cb: FeatureVisualization, model: nn.Module, x: torch.Tensor) -> tuple[dict[str, PatchTokens], list[int]]:
    """Check ``cb``'s channels, classes and prior against the model (one forward on 2 samples ``x``, resized
    to ``image_size``): its token layers (where their patches are) and the classes to visualise.
    Call with the model returning its logits (``logits_only``)."""
    c, h, w = image_shape(x, cb.image_size)
    probe = F.interpolate(x[:2].float(), size=(h, w), mode="bilinear", align_corners=False) if (h, w) != tuple(x.shape[-2:]) else x[:2]
    outs, out = layer_outputs(model, probe, cb.layer_names)
    shapes, out_shape = {name: tuple(o.shape) for name, o in outs.items()}, tuple(out.shape)
    named = {name: shapes.get(name) for name in cb.layer_names}
    three_d = [name for name, shape in named.items() if shape is not None and len(shape) == 3]
    token_layouts = patch_token_layouts(model, probe, three_d) if three_d else {}
    classes = check_units(
        named, out_shape, cb.channels, cb.classes, max_auto_classes=MAX_AUTO_CLASSES,
        task=cb.resolved_task or "classification", background=cb.background, tokens=set(token_layouts),
    )
    if cb.prior_module is not None and "prior" in cb.regularizers:
        dim = cb.latent_dim or infer_latent_dim(cb.prior_module)
        pdev = module_device(cb.prior_module)
        with introspection_mode(cb.prior_module, grad=False):
            decoded = cb.prior_module(torch.zeros(1, dim, device=pdev))
        if tuple(decoded.shape[1:]) != (c, h, w):
            raise ValueError(f"Expected `prior` to decode latents of size {dim} to images of shape {(c, h, w)}, but it gives {tuple(decoded.shape[1:])}.")
    return token_layouts, classes


def as_channels(activation: torch.Tensor, layout: PatchTokens | None) -> torch.Tensor:
    """A token layer's output as its embedding dimensions over the patch tokens ``(N, D, P)``; others as they are."""
    if layout is None:
        return activation
    return patch_token_channels(activation, layout.prefix, sequence_first=layout.sequence_first)


def choose_channels(
    model: nn.Module, x: torch.Tensor, layer_names: Sequence[str], token_layouts: dict[str, PatchTokens], num_channels: int
) -> tuple[dict[str, list[int]], set[str]]:
    """Per layer the ``num_channels`` channels (embedding dimensions of a token layer) whose activation varies
    most over the samples and positions (patch tokens), and the layers whose spread was non-finite (a choice
    not to keep)."""
    outs, _ = layer_outputs(model, x, list(layer_names))
    spread = {name: channel_spread(as_channels(out, token_layouts.get(name))) for name, out in outs.items()}
    unsettled = {name for name, v in spread.items() if not bool(torch.isfinite(v).all())}
    return {name: top_channels(spread[name], num_channels) for name in layer_names}, unsettled


def channel_objective(name: str, ids: Sequence[int], layout: PatchTokens | None) -> Objective:
    """The objective of the channel images of layer ``name``: a channel's mean activation over its positions;
    for a token layer the embedding dimension's mean over the patch tokens
    (:func:`~lightning_introspect.methods.featviz.objectives.token_channel`)."""
    if layout is None:
        return channel(name, list(ids))
    return token_channel(name, list(ids), prefix=layout.prefix, sequence_first=layout.sequence_first)


def class_objective(classes: Sequence[int], task: str | None, region: float) -> Objective:
    """The objective of the class images: the class logit of a classifier; for segmentation the class's mean
    logit over the central ``region`` of the output
    (:func:`~lightning_introspect.methods.featviz.objectives.dense_class_logit`)."""
    if task == "segmentation":
        return dense_class_logit(list(classes), region=region)
    return class_logit(list(classes))


def chunk_objectives(
    units: Sequence[tuple[str, int]], size: int, objective: Callable[[str, list[int]], Objective]
) -> list[tuple[Objective, int]]:
    """The ``(prefix, unit)`` images of a run split into chunks of at most ``size``: per chunk its objective
    (``objective(prefix, ids)`` per run of one prefix, stacked) and image count, in the order of ``units``."""
    chunks = []
    for start in range(0, len(units), size):
        part = units[start : start + size]
        groups: list[tuple[str, list[int]]] = []
        for prefix, unit in part:
            if groups and groups[-1][0] == prefix:
                groups[-1][1].append(unit)
            else:
                groups.append((prefix, [unit]))
        chunks.append((stack_objectives([(objective(prefix, ids), len(ids)) for prefix, ids in groups]), len(part)))
    return chunks


def chunk_size(batch_size: int | None, trainer: pl.Trainer) -> int:
    """Images optimised together: ``batch_size``, else a quarter of the training batch size (at least 1):
    one image under optimisation holds about three times the memory of a training sample (its
    parameterisation, transforms and their gradients), so the extra memory stays near a training step's."""
    if batch_size is not None:
        return batch_size
    loader = getattr(trainer, "train_dataloader", None)
    size = getattr(loader, "batch_size", None)
    return max(1, int(size) // 4) if isinstance(size, int) and size > 0 else 16
