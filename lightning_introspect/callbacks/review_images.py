"""The image part of :class:`~lightning_introspect.callbacks.misclassifications.Misclassifications`: whether the
inputs are images (gallery, statistics and perturbation test need them), the classification perturbation test,
and the sizes of a review under a budget (subset, strengths, figures).

The numbers are :mod:`lightning_introspect.methods.image_stats`; the segmentation perturbation test is
:mod:`lightning_introspect.callbacks.segmentation_review`'s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from lightning_introspect._torch.guards import introspection_mode, module_device
from lightning_introspect.callbacks.budget import Option, best_of
from lightning_introspect.callbacks.data import split_batch
from lightning_introspect.callbacks.outputs import extract_logits
from lightning_introspect.callbacks.progress import IntrospectionProgress
from lightning_introspect.errors import IntrospectionInputError
from lightning_introspect.methods.image_stats import (
    is_image_batch,
    normalize,
    perturbation_accuracy,
    perturbation_batch_size,
    unnormalize,
)

if TYPE_CHECKING:
    from lightning_introspect._lightning import pl
    from lightning_introspect.callbacks.misclassifications import Misclassifications

__all__ = [
    "batch_images", "perturbation_inputs", "perturbation_test", "review_options", "review_sizes", "seconds_per_sample",
    "subset", "subset_size", "timed_perturbations",
]


def subset(values: Sequence[float], k: int | None) -> list[float]:
    """``k`` of the strengths ``values`` spread over their range (``None``: all; 1: the middle one)."""
    values = sorted(values)
    if k is None or k >= len(values):
        return list(values)
    if k <= 0:
        return []
    if k == 1:
        return [values[len(values) // 2]]
    return [values[round(i * (len(values) - 1) / (k - 1))] for i in range(k)]


def batch_images(cb: Misclassifications, batch: Any) -> torch.Tensor | None:
    """The batch's inputs un-normalised, or ``None`` (once they are found not to be images: warned once, and
    ``cb._images`` is off for the rest of the epoch)."""
    if not cb._images:
        return None
    try:
        x = split_batch(batch)[0]
    except ValueError:  # a batch structure we cannot read inputs from: treat as non-image
        x = None
    if not is_image_batch(x):
        cb._images = False
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        kept = ("the gallery's image column, image statistics and perturbation test are skipped (the worst-image and "
                "boundary tables remain)" if cb.resolved_task == "segmentation" else
                "gallery, image statistics and perturbation test are skipped (error rates per class remain)")
        cb.warn_once(
            "non-image",
            f"Misclassifications: the inputs ({shape}) are not images (N, C, H, W) with 1 or 3 channels; the {kept}.",
        )
        return None
    return unnormalize(x, cb.mean, cb.std)


def perturbation_inputs(cb: Misclassifications, trainer: pl.Trainer, labels: str = "labels") -> tuple[torch.Tensor, Any] | None:
    """This review's share of the fixed subset for the perturbation test, or ``None`` (said once) when
    there is nothing to perturb: no strengths left, no ``labels`` (or masks), or not images."""
    if not any(cb.run_strengths().values()):
        return None
    x, y = cb.run_subset(*cb.fixed_samples(trainer))
    if y is None or not is_image_batch(x):
        cb.warn_once("perturb-no-labels", f"Misclassifications: the fixed samples have no {labels} or are not images; "
                     "the perturbation test is skipped.")
        return None
    return x, y


@contextmanager
def timed_perturbations(cb: Misclassifications, trainer: pl.Trainer, passes: int, n: int, calls: int) -> Iterator[IntrospectionProgress]:
    """Time a perturbation test of ``passes`` passes over ``n`` images (``calls`` model calls in all, for
    the progress bar): its unit cost, and the budget."""
    start = time.perf_counter()
    with IntrospectionProgress(trainer, "perturbation test", total=calls) as bar:
        yield bar
    elapsed = time.perf_counter() - start
    cb.unit_costs.observe("forward_sample", elapsed, passes * n)
    cb.charge(elapsed)


def perturbation_test(
    cb: Misclassifications, trainer: pl.Trainer, pl_module: pl.LightningModule, n_classes: int
) -> dict[str, Any]:
    """The classification perturbation test: accuracy per class under each kind and strength, on this review's
    share of the fixed subset; ``{}`` when there is nothing to perturb or the outputs were non-finite (noted)."""
    inputs = cb.perturbation_inputs(trainer)
    if inputs is None:
        return {}
    (x, y), strengths = inputs, cb.run_strengths()
    device = module_device(pl_module)
    raw = unnormalize(x, cb.mean, cb.std)
    nonfinite: list[int] = []  # samples with NaN / Inf probabilities, per call of `predict`

    progress: list[IntrospectionProgress] = []

    def predict(inputs: torch.Tensor) -> torch.Tensor:
        for bar in progress:
            bar.update()
        logits = extract_logits(pl_module(normalize(inputs, cb.mean, cb.std).to(device)), cb.output_transform)
        if logits is None:
            raise IntrospectionInputError("Misclassifications: the model's forward output holds no logits; pass `output_transform`.")
        probs = cb._probabilities(logits)
        if not bool(torch.isfinite(probs).all()):
            nonfinite.append(int((~torch.isfinite(probs).all(dim=1)).sum()))
        return probs

    passes = 1 + sum(len(v) for v in strengths.values())
    calls = passes * -(-int(x.shape[0]) // perturbation_batch_size(raw))  # `predict` runs once per chunk of a pass
    with introspection_mode(pl_module, grad=False), cb.timed_perturbations(trainer, passes, int(x.shape[0]), calls) as bar:
        progress.append(bar)
        results = perturbation_accuracy(
            predict, raw, y, num_classes=n_classes, strengths=strengths, seed=cb.seed, noise_scale=float(raw.std()) or 1.0
        )
    if nonfinite:  # argmax over NaN is arbitrary: such accuracies would be silently wrong numbers
        cb._report_nonfinite_perturbation(trainer, max(nonfinite), int(x.shape[0]))
        return {}
    return {kind: {"strengths": r.strengths, "accuracy": r.accuracy, "per_class": r.per_class} for kind, r in results.items()}


# ------------------------------------------------------------------------------- sizes (budget)
def review_sizes(cb: Misclassifications, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """This review's sizes (``num_samples``, ``strengths``, ``figures``): as configured, or the budget's choice."""
    sizes = {"num_samples": subset_size(cb, trainer), "strengths": "all", "figures": cb.figures}
    if cb.budget is None:
        return sizes
    option = cb.sized(trainer, review_options(cb, trainer, pl_module))
    return sizes if option is None else dict(option.sizes)  # the smallest option (tables only) always fits


def review_options(cb: Misclassifications, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Option]:
    """The sizes a review may take under a budget, largest first: half the perturbation subset (not below 64
    images), then 64 images at one strength per perturbation, then no perturbation test, then no figures;
    arguments given explicitly are kept."""
    given = set(cb._given)
    per_sample = seconds_per_sample(cb, trainer, pl_module) if cb._images and cb.perturbations else 0.0
    figure = cb.figure_seconds()
    most = max((len(cb.strengths[kind]) for kind in cb.perturbations), default=0)

    def option(n: int, k: int | None, figures: bool) -> Option:
        passes = sum(len(subset(cb.strengths[kind], k)) for kind in cb.perturbations) + 1 if k != 0 and most else 0
        seconds = per_sample * n * passes + figure * figures * (1 + bool(passes))
        return Option({"num_samples": n, "strengths": "all" if k is None else k, "figures": figures}, seconds)

    n, k, figures = subset_size(cb, trainer), None, cb.figures
    options = [option(n, k, figures)]
    if "num_samples" not in given and n > 64 and most:
        n = max(64, n // 2)
        options.append(option(n, k, figures))
    if not given & {"perturbations", "blur_sigmas", "noise_stds", "color_strengths"} and most > 1:
        n, k = (n if "num_samples" in given else min(n, 64)), 1
        options.append(option(n, k, figures))
    if "perturbations" not in given and most:
        k = 0
        options.append(option(n, k, figures))
    if "figures" not in given and figures:
        options.append(option(n, k, False))
    return options


def subset_size(cb: Misclassifications, trainer: pl.Trainer) -> int:
    """The images the perturbation test has: ``num_samples``, or fewer where the validation set is smaller or the
    fixed subset was capped by memory (large images, ``num_samples`` not given)."""
    if not (cb._images and cb.perturbations):
        return cb.num_samples
    return min(cb.num_samples, int(cb.fixed_samples(trainer)[0].shape[0]))


def seconds_per_sample(cb: Misclassifications, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
    """Seconds of one forward per image: measured in earlier perturbation tests, else by a probe batch
    (the best of three: the first call of a model pays one-off set-up costs)."""
    if not cb.unit_costs.known("forward_sample"):
        x, _ = cb.fixed_samples(trainer)
        probe = x[: min(128, perturbation_batch_size(x))].to(module_device(pl_module))  # at most one chunk of the test
        with introspection_mode(pl_module, grad=False):
            cb.unit_costs.observe("forward_sample", best_of(3, lambda: pl_module(probe)), int(probe.shape[0]))
    return cb.unit_costs.get("forward_sample", 0.0)
