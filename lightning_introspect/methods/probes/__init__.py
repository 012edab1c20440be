"""Linear classifier probes on intermediate activations (Alain & Bengio 2016).

A probe is a multinomial logistic regression trained on the (pooled) activations of one layer to
predict the labels: its test accuracy measures how *linearly separable* the classes are at that layer.
This package holds the pure parts (torch + numpy + scikit-learn, no Lightning), one concern per module;
every public name is importable from the package itself:

* :mod:`.pooling`: :func:`pool_activation` turns a layer output into one feature vector per sample (conv
  maps pooled over space: ``"avg"``, ``"max"``, ``"avgmax"``, or ``"flatten"``; token layers by
  :mod:`.tokens`); :func:`downsample_input` makes a small thumbnail of the raw input for the input baseline;
* :mod:`.tokens`: token activations ``(N, T, D)``: which 3-D outputs are token-major (by module type), the
  class token (the patch-grid rule), :func:`pool_tokens` (class token, or the mean over the tokens that are
  not padding) and :func:`token_mask` (the batch's ``attention_mask`` or a ``pad_token_id``);
* :mod:`.projection`: :class:`RandomProjection` reduces very wide features to ``max_features`` with a seeded
  random projection (dense Gaussian, or a sparse sign sketch when the dense matrix would be large);
* :mod:`.cache`: :class:`FeatureCache` keeps a bounded, aligned sample of features and labels (reservoir
  sampling or the first N samples), at most ``max_samples x width`` floats per layer; :class:`LayerCaches`
  one per layer (per-pixel probes);
* :mod:`.pixels`: segmentation (per-pixel probes): :func:`nearest_labels` resizes the masks to a feature
  map's size, :func:`sample_pixels` draws a bounded set of labelled positions per image,
  :func:`pixel_features` reads the feature vectors there;
* :mod:`.fitting`: :func:`fit_probe` / :func:`fit_probes` standardise, split (stratified, seeded), fit and
  score the probe with either solver: scikit-learn ``LogisticRegression`` (lbfgs) or the same model in
  torch (``torch.optim.LBFGS``, full batch, on the features' device). Both can warm-start from a previous fit;
* :mod:`.evaluations`: :class:`ProbeEvaluations`, the fits of a run of evaluations (epochs and baselines):
  inline or in a background worker, warm-started, recorded as per-layer accuracies;
* :mod:`.checks`: what the probes accept (labels, masks, choices).

Example:
    >>> import torch
    >>> from sklearn.datasets import load_digits
    >>> digits = load_digits()
    >>> x, y = torch.tensor(digits.data, dtype=torch.float32), torch.tensor(digits.target)
    >>> result = fit_probe(x, y, solver="torch", seed=0)
    >>> result.accuracy > 0.9
    True
"""

from __future__ import annotations

from lightning_introspect.methods.probes.cache import CACHE_POLICIES, FeatureCache, LayerCaches
from lightning_introspect.methods.probes.checks import (
    check_choice,
    check_probe_labels,
    check_probe_masks,
    probe_label_problem,
)
from lightning_introspect.methods.probes.evaluations import ProbeEvaluations
from lightning_introspect.methods.probes.fitting import (
    SOLVER_CHOICES,
    ProbeResult,
    auto_solver,
    best_layer,
    blas_threads,
    classification_scores,
    fit_probe,
    fit_probes,
    probe_split,
)
from lightning_introspect.methods.probes.pixels import nearest_labels, pixel_features, sample_pixels
from lightning_introspect.methods.probes.pooling import (
    POOLING_CHOICES,
    downsample_input,
    first_tensor,
    pool_activation,
)
from lightning_introspect.methods.probes.projection import RandomProjection
from lightning_introspect.methods.probes.tokens import (
    TOKEN_POOLING_CHOICES,
    TokenPooling,
    module_layout,
    pool_tokens,
    prefix_tokens,
    resolve_token_pooling,
    token_mask,
)

__all__ = [
    "CACHE_POLICIES",
    "POOLING_CHOICES",
    "SOLVER_CHOICES",
    "TOKEN_POOLING_CHOICES",
    "FeatureCache",
    "LayerCaches",
    "ProbeEvaluations",
    "ProbeResult",
    "RandomProjection",
    "TokenPooling",
    "auto_solver",
    "best_layer",
    "blas_threads",
    "check_choice",
    "check_probe_labels",
    "check_probe_masks",
    "classification_scores",
    "downsample_input",
    "first_tensor",
    "fit_probe",
    "fit_probes",
    "module_layout",
    "nearest_labels",
    "pixel_features",
    "pool_activation",
    "pool_tokens",
    "prefix_tokens",
    "probe_label_problem",
    "probe_split",
    "resolve_token_pooling",
    "sample_pixels",
    "token_mask",
]
