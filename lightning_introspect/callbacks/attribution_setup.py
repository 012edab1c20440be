"""What :class:`~lightning_introspect.callbacks.attributions.Attributions` explains in a fit: the methods this
model and these inputs allow, the task, and the layer of the layer methods (Grad-CAM) or of token scores,
resolved once from the fixed samples and one output of the model.

A model or input the callback cannot explain at all is :class:`CannotExplain` (the reason of the callback's
skip); explicit arguments the model contradicts (class ids, class names) raise ``IntrospectionInputError``;
methods one model cannot serve are dropped with one warning each kind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lightning_introspect._torch.layers import get_layer
from lightning_introspect.callbacks.attribution_tokens import token_plan
from lightning_introspect.callbacks.checks import gradient_problem, lrp_problem
from lightning_introspect.callbacks.outputs import logits_only
from lightning_introspect.errors import IntrospectionInputError
from lightning_introspect.methods.attention import ATTENTION_METHODS, attention_problem
from lightning_introspect.methods.attribution import LAYER_METHODS, auto_layer
from lightning_introspect.methods.task import resolve_task
from lightning_introspect.methods.token_attribution import is_token_ids

if TYPE_CHECKING:
    from lightning_introspect.callbacks.attributions import Attributions

log = logging.getLogger(__name__)

__all__ = ["AttributionSetup", "CannotExplain", "resolve_attribution_setup"]

Warn = Callable[[str, str], None]


class CannotExplain(Exception):
    """The model or its inputs cannot be explained in this fit; the message is the reason (a skip, not an error)."""


@dataclass(frozen=True)
class AttributionSetup:
    """What a fit explains.

    Attributes:
        methods: the methods to run (may be empty: every one was dropped with a warning).
        task: ``"classification"`` or ``"segmentation"``.
        cam_layer: the Grad-CAM layer (``None`` when no method needs one).
        embedding_layer: token ids: the embedding layer whose output is explained (``None`` otherwise).
        note: one line on the layer in use and how it was chosen (``None`` when there is none).
    """

    methods: list[str]
    task: str
    cam_layer: str | None = None
    embedding_layer: str | None = None
    note: str | None = None


def resolve_attribution_setup(cb: Attributions, model: Any, x: torch.Tensor, out: Any, y: torch.Tensor | None) -> AttributionSetup:
    """The setup for the fixed samples ``x`` (labels ``y``, the model's output ``out``), under ``cb``'s arguments.

    Raises:
        CannotExplain: the inputs are neither images, tabular nor token ids, the output is no logits, or no
            gradient (token ids: no embedding output) connects them.
        IntrospectionInputError: ``task``, ``targets`` or ``class_names`` contradict the model's output.
    """
    methods = list(cb.methods)
    if x.ndim not in (2, 4):
        raise CannotExplain(f"the inputs of shape {tuple(x.shape)} are neither images (N, C, H, W) nor tabular (N, F).")
    if not isinstance(out, torch.Tensor) or out.ndim < 2:
        raise CannotExplain(
            f"the model output {getattr(out, 'shape', type(out).__name__)} is not logits of shape (N, C, ...); "
            "pass `output_transform` to pick them out."
        )
    embedding_layer = note = None
    if is_token_ids(x):
        plan = token_plan(cb, model, x, methods)
        if plan.problem is not None:
            raise CannotExplain(plan.problem)
        methods, embedding_layer, note = plan.methods, plan.embedding_layer, plan.note
        log.info("Attributions: %s", note)
    else:
        problem = gradient_problem(model, x, cb.output_transform, reraise=cb.on_error == "raise")
        if problem is not None:
            raise CannotExplain(problem)
    methods = _servable(model, x, methods, output_transform=cb.output_transform, warn=cb.warn_once)
    task = resolve_task(cb.task, out, y, argument="task")
    if task == "segmentation" and cb.per_class is not None:
        cb.warn_once("per-class-seg", "Attributions: `per_class` draws samples by their one label; segmentation samples have masks, "
                     "so `num_samples` random samples are drawn instead.")
    _check_classes(int(out.shape[1]), cb.targets, cb.class_names)
    cam_layer = None
    if any(m in LAYER_METHODS for m in methods) or ("guided_backprop" in methods and cb.top_k is not None):
        cam_layer, note = _cam_layer(model, x, cb.cam_layer, task=task, output_transform=cb.output_transform)
    return AttributionSetup(methods, task, cam_layer, embedding_layer, note)


def _servable(model: Any, x: torch.Tensor, methods: list[str], *, output_transform: Any, warn: Warn) -> list[str]:
    """``methods`` less those this model or input kind cannot serve (one warning each kind)."""
    if x.ndim == 2 and any(m in LAYER_METHODS for m in methods):
        dropped = [m for m in methods if m in LAYER_METHODS]
        warn("tabular", f"Attributions: {dropped} need a spatial feature map; tabular inputs (N, F) skip them.")
        methods = [m for m in methods if m not in LAYER_METHODS]
    problem = lrp_problem(model, output_transform, x[:2].to(model.device)) if "lrp" in methods else None
    if problem is not None:
        warn("lrp-skipped", f"Attributions: {problem}")
        methods.remove("lrp")
    rollouts = [m for m in methods if m in ATTENTION_METHODS]
    problem = attention_problem(model, x[:1].to(model.device)) if rollouts else None
    if problem is not None:
        warn("attention-skipped", f"Attributions: {rollouts} are skipped for this model: {problem}")
        methods = [m for m in methods if m not in ATTENTION_METHODS]
    return methods


def _check_classes(num_classes: int, targets: str | list[int], class_names: list[str] | None) -> None:
    """Explicit ``targets`` and ``class_names`` against the classes the model outputs."""
    if isinstance(targets, list):
        bad = [t for t in targets if t >= num_classes]
        if bad:
            raise IntrospectionInputError(
                f"Expected `targets` class ids in [0, {num_classes - 1}] (the model outputs {num_classes} classes), but got {bad}."
            )
    if class_names is not None and len(class_names) < num_classes:
        raise IntrospectionInputError(f"Expected `class_names` to name all {num_classes} classes, but got {len(class_names)}.")


def _cam_layer(model: Any, x: torch.Tensor, cam_layer: str, *, task: str, output_transform: Any) -> tuple[str, str]:
    """The Grad-CAM layer (``cam_layer``, or ``"auto"`` resolved on ``x[:1]``) and the note saying how it was chosen."""
    how = "given"
    if cam_layer == "auto":
        with logits_only(model, output_transform):
            layer = auto_layer(model, x[:1].to(model.device))
        how = ("chosen automatically (the deepest feature map before the output head)" if task == "segmentation"
               else "chosen automatically (last convolutional feature map, or a vision transformer's last block whose patch tokens reach the output)")
    else:
        get_layer(model, cam_layer, argument="cam_layer")
        layer = cam_layer
    log.info("Attributions: Grad-CAM layer %r (%s).", layer, how)
    return layer, f"Grad-CAM layer `{layer}` ({how})."
