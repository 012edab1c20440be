"""lightning_introspect: PyTorch Lightning callbacks to see inside a network while it trains.

Public names: the callbacks, :class:`IntrospectionConfig`, :func:`introspection_callbacks`,
:func:`introspection_summary` (what they found, as text lines), the
warnings and error users filter or catch (``IntrospectionSkipWarning``, ``IntrospectionFailureWarning``,
``IntrospectionInputError``) and ``__version__``. They are imported lazily, so ``import lightning_introspect.methods`` (pure torch)
never imports Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Attributions": "lightning_introspect.callbacks.attributions",
    "FeatureVisualization": "lightning_introspect.callbacks.feature_visualization",
    "IntrospectionCallback": "lightning_introspect.callbacks.base",
    "LinearProbes": "lightning_introspect.callbacks.linear_probes",
    "Misclassifications": "lightning_introspect.callbacks.misclassifications",
    "PerClassMetrics": "lightning_introspect.callbacks.per_class_metrics",
    "SanityChecks": "lightning_introspect.callbacks.sanity_checks",
    "WeightHistograms": "lightning_introspect.callbacks.weight_histograms",
    "IntrospectionConfig": "lightning_introspect.config",
    "IntrospectionFailureWarning": "lightning_introspect.errors",
    "IntrospectionInputError": "lightning_introspect.errors",
    "IntrospectionSkipWarning": "lightning_introspect.errors",
    "introspection_callbacks": "lightning_introspect.config",
    "introspection_summary": "lightning_introspect.callbacks.summary",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_introspect' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
