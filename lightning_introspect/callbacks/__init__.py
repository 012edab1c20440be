"""Thin Lightning callbacks: when to run, on what sample, where to log. One file per callback."""

from lightning_introspect.callbacks.attributions import Attributions
from lightning_introspect.callbacks.base import IntrospectionCallback
from lightning_introspect.callbacks.feature_visualization import FeatureVisualization
from lightning_introspect.callbacks.linear_probes import LinearProbes
from lightning_introspect.callbacks.misclassifications import Misclassifications
from lightning_introspect.callbacks.per_class_metrics import PerClassMetrics
from lightning_introspect.callbacks.sanity_checks import SanityChecks
from lightning_introspect.callbacks.weight_histograms import WeightHistograms

__all__ = [
    "Attributions",
    "FeatureVisualization",
    "IntrospectionCallback",
    "LinearProbes",
    "Misclassifications",
    "PerClassMetrics",
    "SanityChecks",
    "WeightHistograms",
]
