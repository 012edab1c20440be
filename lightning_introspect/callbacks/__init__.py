"""Thin Lightning callbacks: when to run, on what sample, where to log."""

from lightning_introspect.callbacks.base import IntrospectionCallback

__all__ = ["IntrospectionCallback"]
