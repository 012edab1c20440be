"""Feature visualisation: optimise the *input* until a neuron, channel, layer or class logit fires.

Instead of changing the weights to lower a loss, we change an image to raise an objective of the
(frozen) model's activations. Unregularised, the optimum is high-frequency, checkerboard-like noise,
so three kinds of regulariser are offered (Olah et al. 2017, "Feature Visualization", Distill).
One module per concern:

* :mod:`.objectives` -- what to maximise: :func:`channel`, :func:`neuron`, :func:`layer`,
  :func:`class_logit`, :func:`dense_class_logit` (a class over the centre of a segmentation output),
  :func:`token_channel` (an embedding dimension of a vision transformer, over its patch tokens),
  :func:`diversity`, composed with ``+``, ``-`` and scalar ``*``;
  :func:`stack_objectives` for one batch serving several objectives;
* :mod:`.param` -- what is optimised: :class:`Pixels`, :class:`Fourier` (1/f-scaled spectrum, a soft
  frequency regulariser, colour-decorrelated for RGB), :class:`Latent` (a decoder's latent: a learned
  prior), or your own :class:`ImageParameterization`;
* :mod:`.frequency` -- frequency penalties (total variation, high-frequency energy) and the
  :func:`high_frequency_fraction` that measures how natural an image looks;
* :mod:`.transform` -- transformation robustness: :class:`TransformRobustness` (random pad, jitter,
  scale, rotation), any callable of your own, :class:`Compose`;
* :mod:`.prior` -- :func:`fit_autoencoder_prior`: a small autoencoder whose decoder serves as the prior;
* :mod:`.layers` -- :func:`~.layers.main_conv_chain`: the convolutions on the main path, and
  :func:`~.layers.vit_blocks` / :func:`~.layers.patch_token_layouts`: a vision transformer's blocks and
  where their patch tokens are, for an automatic choice of layers (imported from its module: it uses the
  attribution and probe-layer methods);
* :mod:`.render` -- the optimisation loop :func:`visualize_features` (your own optimiser via
  ``optimizer=``), :class:`ActivationRecorder` and :class:`FeatureVisualizationResult`.

``lightning_introspect.methods.feature_visualization`` re-exports the same names (the original
single-module home of this code); both import paths stay supported.

No Lightning import here: usable in a notebook.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    >>> res = visualize_features(net, channel("0", [0, 1]) - 0.1 * diversity("0"), shape=(2, 3, 16, 16),
    ...                          param=Fourier(decay_power=1.2), transforms=True, frequency_penalty=1.0, steps=8)
    >>> res.images.shape, res.settings["param"]
    (torch.Size([2, 3, 16, 16]), 'fourier')
"""

from __future__ import annotations

from lightning_introspect.methods.featviz.frequency import (
    PENALTIES,
    frequency_penalty_of,
    high_frequency_energy,
    high_frequency_fraction,
    total_variation,
)
from lightning_introspect.methods.featviz.objectives import (
    DEFAULT_REGION,
    OUTPUT,
    ChannelSpec,
    Objective,
    central_region,
    channel,
    class_logit,
    dense_class_logit,
    diversity,
    layer,
    neuron,
    patch_token_channels,
    stack_objectives,
    token_channel,
)
from lightning_introspect.methods.featviz.param import (
    PARAMS,
    RANGE_FNS,
    Fourier,
    ImageParameterization,
    Latent,
    Pixels,
    color_correlation_from_data,
    default_color_correlation,
    infer_latent_dim,
)
from lightning_introspect.methods.featviz.prior import MLPDecoder, fit_autoencoder_prior
from lightning_introspect.methods.featviz.render import (
    ActivationRecorder,
    FeatureVisualizationResult,
    ImageSpace,
    OptimizerFactory,
    frozen_params,
    objective_values,
    visualize_features,
)
from lightning_introspect.methods.featviz.transform import (
    Compose,
    Transform,
    TransformRobustness,
    resolve_transforms,
)

__all__ = [
    "DEFAULT_REGION",
    "OUTPUT",
    "PARAMS",
    "PENALTIES",
    "RANGE_FNS",
    "ActivationRecorder",
    "ChannelSpec",
    "Compose",
    "FeatureVisualizationResult",
    "Fourier",
    "ImageParameterization",
    "ImageSpace",
    "Latent",
    "MLPDecoder",
    "Objective",
    "OptimizerFactory",
    "Pixels",
    "Transform",
    "TransformRobustness",
    "central_region",
    "channel",
    "class_logit",
    "color_correlation_from_data",
    "default_color_correlation",
    "dense_class_logit",
    "diversity",
    "fit_autoencoder_prior",
    "frequency_penalty_of",
    "frozen_params",
    "high_frequency_energy",
    "high_frequency_fraction",
    "infer_latent_dim",
    "layer",
    "neuron",
    "objective_values",
    "patch_token_channels",
    "resolve_transforms",
    "stack_objectives",
    "token_channel",
    "total_variation",
    "visualize_features",
]
