"""Pure torch (+ numpy / sklearn) introspection methods. No Lightning import: usable in a notebook.

Names are imported lazily from their modules, so ``from lightning_introspect.methods import grad_cam``
does not pay for scikit-learn or torchmetrics. ``lrp`` is the subpackage :mod:`lightning_introspect.methods.lrp`
(rules, composites, tracing); the function is ``lightning_introspect.methods.lrp.lrp``.

Example:
    >>> import torch
    >>> from lightning_introspect.methods import saliency
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> saliency(net, torch.randn(2, 4), target=[0, 2]).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES: dict[str, tuple[str, ...]] = {
    "attribution": (
        "METHODS", "SIGNED_METHODS", "attribute", "auto_layer", "deconvnet", "grad_cam", "guided_backprop",
        "guided_grad_cam", "input_x_gradient", "saliency", "smoothgrad", "integrated_gradients",
    ),
    "attention": (
        "ATTENTION_METHODS", "AttentionMap", "attention_maps", "attention_problem", "attention_rollout", "grad_rollout", "token_grid",
    ),
    "token_attribution": (
        "TOKEN_METHODS", "find_embedding", "gradient_x_embedding", "token_attributions", "token_integrated_gradients",
        "token_saliency",
    ),
    "lrp": (
        "LRP_RULES", "AlphaBeta", "Composite", "Epsilon", "Flat", "Gamma", "WSquare", "ZBox", "ZPlus", "fold_batchnorm",
        "lrp_unsupported",
    ),
    "localization": ("chance_level", "energy_in_mask", "pointing_game"),
    "targets": ("RegionTarget", "dominant_class", "object_targets", "region_targets", "target_indices", "target_scores"),
    "task": ("TASK_KINDS", "detect_task", "resolve_task"),
    "weights": (
        "DriftStats", "HistogramStats", "cosine_distance", "drift", "histogram", "histograms", "relative_change",
        "wasserstein_1d",
    ),
    "probes": (
        "FeatureCache", "ProbeResult", "RandomProjection", "classification_scores", "fit_probe", "fit_probes",
        "pool_activation", "probe_split",
    ),
    "per_class": ("build_metrics", "due_snapshots", "least_improved", "per_class_values", "prepare_predictions"),
    "review": ("ReviewBuffer", "class_probabilities", "keep_most_confident"),
    "segmentation_review": (
        "SegmentationReviewBuffer", "boundary_mask", "per_image_miou", "perturbation_iou", "pixel_confusion",
    ),
    "image_stats": (
        "PERTURBATIONS", "STATISTICS", "BinnedErrors", "PerturbationResult", "brightness", "color_filter", "contrast",
        "BinnedMeans", "error_rate_by_bin", "gaussian_blur", "mean_by_bin", "gaussian_noise", "image_statistics", "noise_level",
        "per_class_accuracy", "perturb", "perturbation_accuracy", "saturation", "sharpness",
    ),
    "feature_visualization": (
        "FeatureVisualizationResult", "MLPDecoder", "Objective", "TransformRobustness", "central_region", "channel",
        "class_logit", "dense_class_logit", "diversity", "fit_autoencoder_prior", "high_frequency_fraction", "layer", "neuron", "objective_values",
        "stack_objectives", "visualize_features",
    ),
    "similarity": ("map_similarity", "spearman_similarity", "ssim_similarity"),
    "randomization": (
        "cascading_randomization", "independent_randomization", "randomization_blocks", "randomization_curves",
        "reinitialize_",
    ),
    "class_check": ("class_sensitivity",),
    "caveats": ("Caveat", "SanityCaveatWarning", "detect_caveats"),
    "sanity_report": ("SanityReport", "decide_verdicts", "run_sanity_checks", "verdict_score"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

