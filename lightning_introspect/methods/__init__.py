"""Pure torch (+ numpy / sklearn) introspection methods. No Lightning import: usable in a notebook."""

__all__: list[str] = []
