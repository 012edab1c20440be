"""Where introspection results go: one small interface, TensorBoard first, files otherwise."""

from lightning_introspect.loggers.adapter import (
    FileWriter,
    IntrospectionWriter,
    NullWriter,
    TensorBoardWriter,
    markdown_cell,
    safe_relative_path,
    sanitize_component,
    sanitize_tag,
    writer_for,
)

__all__ = [
    "FileWriter",
    "IntrospectionWriter",
    "NullWriter",
    "TensorBoardWriter",
    "markdown_cell",
    "safe_relative_path",
    "sanitize_component",
    "sanitize_tag",
    "writer_for",
]
