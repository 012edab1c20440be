"""Feature visualisation under its first import path: re-exports :mod:`lightning_introspect.methods.featviz`.

The code lives in the ``featviz`` package, one module per concern (objectives, parameterisations,
frequency penalties, transforms, the autoencoder prior, the optimisation loop); this module keeps
``from lightning_introspect.methods.feature_visualization import visualize_features`` (and every other
public name) working. Both paths name the same objects.

Example:
    >>> from lightning_introspect.methods import featviz
    >>> visualize_features is featviz.visualize_features
    True
"""

from __future__ import annotations

from lightning_introspect.methods.featviz import *  # noqa: F403 (the alias re-exports the package's names)
from lightning_introspect.methods.featviz import __all__ as __all__
