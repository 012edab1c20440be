"""What :class:`~lightning_introspect.callbacks.linear_probes.LinearProbes` probes in a fit: the layers, the task
(per-sample or per-pixel probes) and how token layers are pooled, resolved against the model at ``setup``.

The decisions are :func:`~lightning_introspect.methods.probe_layers.plan_probe_layers`' on two example samples of
the probe data; this module draws them, says why a model or its data cannot be probed (:class:`CannotProbe`, the
reason of the callback's skip) and describes what was merged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_introspect._torch.layers import resolve_layers
from lightning_introspect.callbacks.data import draw_samples
from lightning_introspect.callbacks.outputs import extract_logits
from lightning_introspect.callbacks.probe_pass import device_of, to_device
from lightning_introspect.methods.probe_layers import ProbeLayersUnavailable, plan_probe_layers
from lightning_introspect.methods.probes import TokenPooling, probe_label_problem

__all__ = ["CannotProbe", "ProbeSetup", "merged_layers_note", "resolve_probe_setup"]


class CannotProbe(Exception):
    """The model or its data cannot be probed in this fit; the message is the reason (a skip, not an error)."""


@dataclass
class ProbeSetup:
    """The layers a fit probes and how.

    Attributes:
        modules: ``{name: module}`` to probe, in execution order.
        tokens: ``{name: TokenPooling}`` of the layers whose outputs are tokens.
        task: ``"classification"`` or ``"segmentation"``; ``None`` when no example batch could be drawn yet (the
            data is built in ``LightningModule.setup``): the layers are then only looked up by name, and the
            call counts, the task and the token layers are decided at fit start.
        merged: ``{name: kept name}`` of the named layers left out because another gives the same output.
    """

    modules: dict[str, nn.Module] = field(default_factory=dict)
    tokens: dict[str, TokenPooling] = field(default_factory=dict)
    task: str | None = None
    merged: dict[str, str] = field(default_factory=dict)


def resolve_probe_setup(
    model: nn.Module,
    loader: Any,
    *,
    layers: str | list[str],
    task: str,
    token_pooling: str,
    target_transform: Callable[[Any], torch.Tensor] | None,
    seed: int,
    source: str,
) -> ProbeSetup:
    """Resolve the layers on two samples of ``loader`` and check that they can be probed.

    Args:
        model: the model the layers are looked up in and run.
        loader: the probe data (``None``: none yet).
        layers, task, token_pooling, target_transform: the ``LinearProbes`` arguments of the same names.
        seed: seeds the draw of the example samples.
        source: where the batches come from, as a skip reason names it.

    Returns:
        The setup; its ``task`` is ``None`` when no example could be drawn yet.

    Raises:
        ValueError: a wrong name (with close matches) or a named module that runs more than once per forward pass
            (naming the block to probe instead).
        CannotProbe: the data carries no labels, or ``"auto"`` cannot run the model on the bare inputs.
    """
    example = None
    if loader is not None:
        with contextlib.suppress(Exception):  # data not ready at setup (built in LightningModule.setup): later
            example = draw_samples(loader, 2, seed=seed)
    if example is not None and target_transform is None and example[1] is None:
        raise CannotProbe(str(probe_label_problem(None, source)))
    if example is None:
        return ProbeSetup({} if layers == "auto" else resolve_layers(model, layers, argument="layers"))
    x = to_device(example[0], device_of(model))
    # with a target_transform (one label per sample) "auto" stays classification
    task = "classification" if task == "auto" and target_transform is not None else task
    try:
        plan = plan_probe_layers(
            model, layers, x, labels=None if target_transform is not None else example[1], task=task,
            logits_of=extract_logits, token_pooling=token_pooling,
        )
    except ProbeLayersUnavailable as err:
        raise CannotProbe(str(err)) from err
    if plan.task == "classification" and target_transform is None:
        problem = probe_label_problem(example[1], source)
        if problem is not None:
            raise CannotProbe(problem)
    return ProbeSetup(plan.modules, plan.tokens, plan.task, plan.merged)


def merged_layers_note(merged: Mapping[str, str]) -> str:
    """The warning for named layers probed under another name (they give the same output)."""
    pairs = ", ".join(f"{n!r} as {k!r}" for n, k in merged.items())
    return (
        f"LinearProbes: some layers in `layers` give the same output as another on an example batch (a block "
        f"and its last norm, a wrapper and its only child), so each output is probed once: {pairs}."
    )
