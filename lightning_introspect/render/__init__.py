"""Pure rendering: tensors in, images out (no logging, no Lightning)."""

from lightning_introspect.render.grid import captioned_grid, make_grid
from lightning_introspect.render.heatmap import colorize, normalize_maps, overlay, to_display

__all__ = ["captioned_grid", "colorize", "make_grid", "normalize_maps", "overlay", "to_display"]
