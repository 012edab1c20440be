"""Charts drawn from numbers: the confusion matrix image and grouped bar charts (tensors / lists in,
images and figures out; no logging, no Lightning). Every bar chart of the package goes through
:func:`bar_polygons`, so bars look the same everywhere."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any


def short_label(text: object, max_chars: int = 24) -> str:
    """A class name as a chart can show it: whitespace runs (newlines included) become one space, and a
    long name keeps its start and end around an ellipsis.

    Example:
        >>> short_label("two   words"), short_label("x" * 30, 9)
        ('two words', 'xxxx…xxxx')
    """
    flat = " ".join(str(text).split())
    if len(flat) <= max_chars:
        return flat
    head = (max_chars - 1) // 2
    return flat[:head] + "…" + flat[len(flat) - (max_chars - 1 - head):]


def _text_image(text: str, font: Any, *, angle: int = 0, fill: tuple[int, int, int] = (0, 0, 0)) -> Any:
    """``text`` on a transparent PIL image, rotated by ``angle`` degrees (counter-clockwise)."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(text)
    image = Image.new("RGBA", (max(1, right - left + 2), max(1, bottom - top + 2)), (255, 255, 255, 0))
    ImageDraw.Draw(image).text((1 - left, 1 - top), text, fill=fill, font=font)
    return image.rotate(angle, expand=True) if angle else image


def confusion_image(
    table: Sequence[Sequence[int]], names: Sequence[str], *, multilabel: bool = False, title: str = ""
) -> Any:
    """A confusion matrix as an HWC uint8 RGB image: row shares as colour (``Blues``), counts as text.

    Rows are the true classes, columns the predicted ones (for multilabel: one row per label with its
    TN / FP / FN / TP counts); a colour bar gives the share scale. Counts are printed when the matrix
    has at most 400 cells. Drawn with numpy and PIL (as :func:`~lightning_introspect.render.grid.captioned_grid`):
    a 10-class matrix takes a few milliseconds, where a matplotlib figure with one text artist per
    cell took about 0.2 s of CPU.

    Example:
        >>> confusion_image([[5, 1], [0, 4]], ["cat", "dog"], title="end").shape[-1]
        3
    """
    import matplotlib
    import numpy as np
    from PIL import Image, ImageDraw

    from lightning_introspect.render.grid import font as _font

    counts = np.asarray(table, dtype=np.float64)
    if counts.ndim != 2 or counts.size == 0:
        raise ValueError(f"Expected `table` to be a non-empty 2-D table of counts, but got shape {counts.shape}.")
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    n_rows, n_cols = counts.shape
    rows = [short_label(n) for n in names][:n_rows]
    rows += [str(i) for i in range(len(rows), n_rows)]
    cols = ["TN", "FP", "FN", "TP"] if multilabel else [short_label(n) for n in names][:n_cols]
    cols += [str(i) for i in range(len(cols), n_cols)]
    cell = max(6, min(44, 1300 // max(n_rows, n_cols)))
    font, small, label_font = _font(11), _font(10 if cell >= 30 else 8), _font(13)
    black = (0, 0, 0)

    # the colour grid, one block of cell x cell pixels per entry
    rgb = (matplotlib.colormaps["Blues"](np.clip(shares, 0.0, 1.0))[..., :3] * 255.0 + 0.5).astype(np.uint8)
    grid = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)

    col_labels = [_text_image(c, font) for c in cols]
    rotate = max(im.width for im in col_labels) > cell - 2
    if rotate:
        col_labels = [im.rotate(90, expand=True) for im in col_labels]
    row_labels = [_text_image(r, font) for r in rows]
    xlabel = _text_image("count share" if multilabel else "predicted", label_font)
    ylabel = _text_image("label" if multilabel else "true", label_font, angle=90)
    title_im = _text_image(title or "confusion matrix", label_font)
    bar_ticks = [_text_image(f"{v:.1f}", font) for v in np.linspace(0.0, 1.0, 6)]

    gap, tick = 6, 4
    grid_h, grid_w = n_rows * cell, n_cols * cell
    left = 10 + ylabel.width + gap + max(im.width for im in row_labels) + tick + 3
    top = 10 + title_im.height + 10
    bar_x = left + grid_w + 16
    bar_w = max(12, cell // 3)
    width = bar_x + bar_w + tick + 3 + max(im.width for im in bar_ticks) + 10
    height = top + grid_h + tick + 3 + max(im.height for im in col_labels) + gap + xlabel.height + 10
    width = max(width, title_im.width + 20)

    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    canvas[top : top + grid_h, left : left + grid_w] = grid
    ramp = (matplotlib.colormaps["Blues"](np.linspace(1.0, 0.0, grid_h))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    canvas[top : top + grid_h, bar_x : bar_x + bar_w] = ramp[:, None, :]
    image = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((left - 1, top - 1, left + grid_w, top + grid_h), outline=black)
    draw.rectangle((bar_x - 1, top - 1, bar_x + bar_w, top + grid_h), outline=black)

    for r, im in enumerate(row_labels):  # y tick marks and class names
        cy = top + r * cell + cell // 2
        draw.line((left - 1 - tick, cy, left - 1, cy), fill=black)
        image.paste(im, (left - 1 - tick - 3 - im.width, cy - im.height // 2), im)
    for c, im in enumerate(col_labels):  # x tick marks and class names
        cx = left + c * cell + cell // 2
        draw.line((cx, top + grid_h, cx, top + grid_h + tick), fill=black)
        image.paste(im, (cx - im.width // 2, top + grid_h + tick + 3), im)
    for i, im in enumerate(bar_ticks):  # the colour bar's scale
        cy = top + grid_h - 1 - round(i / (len(bar_ticks) - 1) * (grid_h - 1))
        draw.line((bar_x + bar_w, cy, bar_x + bar_w + tick, cy), fill=black)
        image.paste(im, (bar_x + bar_w + tick + 3, cy - im.height // 2), im)
    label_y = top + grid_h + tick + 3 + max(im.height for im in col_labels) + gap
    image.paste(xlabel, (left + grid_w // 2 - xlabel.width // 2, label_y), xlabel)
    image.paste(ylabel, (10, top + grid_h // 2 - ylabel.height // 2), ylabel)
    title_x = max(10, min(left + grid_w // 2 - title_im.width // 2, width - 10 - title_im.width))
    image.paste(title_im, (title_x, 10), title_im)

    if n_rows * n_cols <= 400:  # the counts, white on dark cells
        for r in range(n_rows):
            for c in range(n_cols):
                fill = (255, 255, 255) if shares[r, c] > 0.5 else black
                center = (left + c * cell + cell / 2, top + r * cell + cell / 2)
                draw.text(center, f"{int(counts[r, c])}", fill=fill, font=small, anchor="mm")
    return np.asarray(image).copy()


def bar_polygons(x: Any, heights: Any, width: float) -> Any:
    """Corner vertices ``(N, 4, 2)`` of bars centred at ``x`` with ``heights`` (from 0) and ``width``."""
    import numpy as np

    x0 = np.asarray(x, dtype=np.float64) - width / 2
    h = np.asarray(heights, dtype=np.float64)
    verts = np.zeros((x0.shape[0], 4, 2))
    verts[:, :2, 0] = x0[:, None]
    verts[:, 2:, 0] = (x0 + width)[:, None]
    verts[:, 1:3, 1] = h[:, None]
    return verts


def bars_figure(
    snapshots: Mapping[str, Mapping[str, Sequence[Any]]],
    metrics: Sequence[str],
    names: Sequence[str],
    column: Callable[[str], str] = str,
) -> Any:
    """Grouped bar chart: one panel per metric, classes on x, one bar per snapshot (no bar = no support).

    The bars of one snapshot in one panel are a single ``PolyCollection`` (the same pixels as ``ax.bar``,
    without one ``Rectangle`` artist per bar), and the figure is a plain ``Figure`` (no pyplot state).
    """
    import numpy as np
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    keys = list(snapshots)
    n = len(names)
    fig = Figure(figsize=(max(5.0, 0.5 * n * max(1, len(keys)) / 2 + 2), 2.2 * len(metrics)))
    axes = fig.subplots(len(metrics), 1, squeeze=False)
    width = 0.8 / max(1, len(keys))
    x = np.arange(n)
    handles = []
    for ax, m in zip(axes[:, 0], metrics):
        for j, k in enumerate(keys):
            vals = np.array([np.nan if v is None else v for v in snapshots[k][m]], dtype=np.float64)
            bars = PolyCollection(bar_polygons(x + (j - (len(keys) - 1) / 2) * width, np.nan_to_num(vals, nan=0.0), width),
                                  facecolors=f"C{j % 10}", edgecolors="none", alpha=0.9 if j == len(keys) - 1 else 0.6,
                                  label=column(k))
            ax.add_collection(bars)
            if ax is axes[0, 0]:
                handles.append(bars)
        last = snapshots[keys[-1]][m] if keys else []
        for i, v in enumerate(last):
            if v is None:
                ax.text(i, 0.5, "no support", rotation=90, ha="center", va="center", fontsize=6, color="gray")
        ax.autoscale_view()
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(m, fontsize=8)
        ax.set_xticks(x, [short_label(n) for n in names], fontsize=7)
    fig.legend(handles, [str(h.get_label()) for h in handles], fontsize=7, ncol=max(1, min(4, len(keys))),
               loc="upper center", frameon=False)
    top = 1.0 - 0.35 / fig.get_figheight()
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.05, top=top, hspace=0.35)
    return fig
