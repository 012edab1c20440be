"""Charts drawn from numbers: the confusion matrix image and the grouped per-class bar chart (a
:class:`~lightning_introspect.render.plot.Chart`); lists in, images and charts out, no logging, no Lightning."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning_introspect.render.plot import Chart, color, text_image

#: the widest per-class bar chart in pixels (with hundreds of classes the bars get thinner, not the image wider)
MAX_BARS_WIDTH = 4000


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

    col_labels = [text_image(c, font) for c in cols]
    rotate = max(im.width for im in col_labels) > cell - 2
    if rotate:
        col_labels = [im.rotate(90, expand=True) for im in col_labels]
    row_labels = [text_image(r, font) for r in rows]
    xlabel = text_image("count share" if multilabel else "predicted", label_font)
    ylabel = text_image("label" if multilabel else "true", label_font, angle=90)
    title_im = text_image(title or "confusion matrix", label_font)
    bar_ticks = [text_image(f"{v:.1f}", font) for v in np.linspace(0.0, 1.0, 6)]

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


def bars_chart(
    snapshots: Mapping[str, Mapping[str, Sequence[Any]]],
    metrics: Sequence[str],
    names: Sequence[str],
    column: Callable[[str], str] = str,
) -> Chart:
    """Grouped bar chart: one panel per metric, classes on x, one bar per snapshot (no bar = no support, and
    a note where the last snapshot has none).

    Example:
        >>> chart = bars_chart({"start": {"f1": [0.1, None]}, "end": {"f1": [0.8, 0.4]}}, ["f1"], ["a", "b"])
        >>> chart.labels(), chart.panels[0].series[1].y
        (['start', 'end'], (0.8, 0.4))
    """
    keys = list(snapshots)
    n = len(names)
    # ~25 px per bar, up to MAX_BARS_WIDTH px; beyond 100 classes every k-th class is named
    chart = Chart(width=min(MAX_BARS_WIDTH, int(100 * max(5.0, 0.5 * n * max(1, len(keys)) / 2 + 2))), panel_height=150)
    width = 0.8 / max(1, len(keys))
    ticks = [(i, short_label(names[i])) for i in range(0, n, max(1, -(-n // 100)))]
    for m in metrics:
        panel = chart.panel(ylim=(0.0, 1.05), ylabel=m, xticks=ticks)
        for j, k in enumerate(keys):
            panel.bars([i + (j - (len(keys) - 1) / 2) * width for i in range(n)], snapshots[k][m], width=width,
                       color=color(j), alpha=0.9 if j == len(keys) - 1 else 0.6, label=column(k))
        for i, v in enumerate(snapshots[keys[-1]][m] if keys else []):
            if v is None:
                panel.note(i, 0.5, "no support", angle=90)
    return chart
