"""lightning_introspect: PyTorch Lightning callbacks to see inside a network while it trains.

Public names: the callbacks, :func:`introspection_callbacks` and ``__version__``.
"""

from lightning_introspect.callbacks.base import IntrospectionCallback
from lightning_introspect.config import IntrospectionConfig, introspection_callbacks

__version__ = "0.1.0"

__all__ = ["IntrospectionCallback", "IntrospectionConfig", "__version__", "introspection_callbacks"]
