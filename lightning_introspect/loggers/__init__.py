"""Where introspection results go: one small interface, TensorBoard first, files otherwise."""

from lightning_introspect.loggers.adapter import (
    FileWriter,
    IntrospectionWriter,
    NullWriter,
    TensorBoardWriter,
    safe_relative_path,
    writer_for,
)

__all__ = [
    "FileWriter",
    "IntrospectionWriter",
    "NullWriter",
    "TensorBoardWriter",
    "safe_relative_path",
    "writer_for",
]
