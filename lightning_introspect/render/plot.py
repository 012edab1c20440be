"""Line and bar charts drawn with PIL: a chart is data (panels of series), drawing it is one call.

The callbacks' fit-end charts (per-class bars, probe accuracy by depth, drift by depth, the weight
overlays, the sanity curves) were matplotlib figures: matplotlib makes a Python object of every tick,
label and line and lays each out when drawing, 50-300 ms a figure, together about a third of what the
default set adds to a 10-epoch demo fit. Drawn here they take a few milliseconds each. The price is a
smaller vocabulary -- shared x axis, categorical or numeric; lines with markers, dashes, bands, bars,
filled or outlined polygons, horizontal lines, notes; one legend under the title -- which is what those
charts use. Everything is drawn at twice the size and shrunk once (smooth edges without per-primitive
antialiasing) with matplotlib's DejaVu Sans (:func:`~lightning_introspect.render.grid.font`).

A :class:`Chart` keeps what it shows (``chart.panels[i].series``: kind, x, y, colour, label), so tests
and callers can read the numbers back without parsing pixels.

Example:
    >>> chart = Chart(title="accuracy", xlabel="layer")
    >>> panel = chart.panel(ylim=(0.0, 1.0), ylabel="accuracy", xticks=[(0, "conv"), (1, "fc")])
    >>> _ = panel.line([0, 1], [0.4, 0.9], label="epoch 3")
    >>> chart.render().shape[2], [s.label for s in panel.series]
    (3, ['epoch 3'])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_introspect.render.grid import font

__all__ = ["COLORS", "Chart", "Panel", "Series", "color", "nice_ticks", "text_image"]

#: the series colours, in order (matplotlib's default cycle, so charts read like the package's other figures)
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_SS = 2  # supersampling: drawn at twice the size, shrunk once
_DASHES = {"solid": None, "dashed": (7.0, 4.0), "dotted": (1.5, 3.0)}
_KINDS = ("line", "bars", "band", "hline", "polygon", "markers")


def color(i: int) -> str:
    """The ``i``-th series colour (cycling).

    Example:
        >>> color(0), color(10)
        ('#1f77b4', '#1f77b4')
    """
    return COLORS[i % len(COLORS)]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 times a power of ten) within ``[lo, hi]``.

    Example:
        >>> nice_ticks(0.0, 1.05)
        [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
        >>> nice_ticks(-0.1, 1.05, 3)
        [0.0, 0.5, 1.0]
    """
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    magnitude = 10.0 ** math.floor(math.log10((hi - lo) / max(1, count)))

    def ticks(step: float) -> list[float]:
        first = math.ceil(lo / step - 1e-9)
        return [round((first + i) * step, 12) for i in range(int(math.floor(hi / step + 1e-9)) - first + 1)]

    # the step of 1, 2 or 5 times a power of ten whose tick count is nearest ``count + 1`` (the coarser on a tie)
    candidates = [ticks(m * magnitude) for m in (10.0, 5.0, 2.0, 1.0)]
    return min(candidates, key=lambda values: abs(len(values) - (count + 1)))


def text_image(text: str, font: Any, *, angle: int = 0, fill: tuple[int, int, int] = (0, 0, 0)) -> Any:
    """``text`` on a transparent PIL image, rotated by ``angle`` degrees (counter-clockwise)."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(text)
    image = Image.new("RGBA", (max(1, right - left + 2), max(1, bottom - top + 2)), (255, 255, 255, 0))
    ImageDraw.Draw(image).text((1 - left, 1 - top), text, fill=fill, font=font)
    return image.rotate(angle, expand=True, resample=Image.Resampling.BICUBIC) if angle else image


@dataclass(frozen=True)
class Series:
    """One thing drawn in a panel.

    Attributes:
        kind: ``"line"`` (``marker`` at each point, broken at NaN), ``"bars"`` (from 0 to ``y``, ``width``
            data units wide), ``"band"`` (filled between ``y`` and ``y2``), ``"hline"`` (at ``y[0]``, across
            the panel), ``"polygon"`` (the outline ``x, y``: filled, or only drawn when ``width`` > 0 and
            ``alpha`` is 0) or ``"markers"`` (``marker`` at each point).
        x, y, y2: the data.
        color: ``"#rrggbb"``; ``colors`` one per point for bars and markers instead.
        label: the legend entry (``None``: none).
        marker: ``"o"``, ``"s"``, ``"x"`` or ``None``.
        dash: ``"solid"``, ``"dashed"`` or ``"dotted"``.
        alpha: fill opacity (bars, bands, polygons).
        width: line width in pixels; for bars their width in data units.
    """

    kind: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    color: str
    y2: tuple[float, ...] = ()
    colors: tuple[str, ...] = ()
    label: str | None = None
    marker: str | None = None
    dash: str = "solid"
    alpha: float = 1.0
    width: float = 1.5


def _floats(values: Sequence[Any]) -> tuple[float, ...]:
    return tuple(math.nan if v is None else float(v) for v in values)


@dataclass
class Panel:
    """One set of axes: its range, ticks, labels and series (added with the methods below, drawn in order).

    ``ylim`` / ``xlim`` ``None``: the data's range (y with a 5 % margin; bars always include 0); ``xticks``
    ``[(x, label)]`` and ``xlabel`` (shown under the panel when its chart's panels have their own x axes; else
    the last panel's ticks are shown and the chart's ``xlabel``); ``yticks`` ``None``: about five round values,
    else ``[(y, label)]``.
    """

    ylim: tuple[float, float] | None = None
    xlim: tuple[float, float] | None = None
    ylabel: str = ""
    xlabel: str = ""
    xticks: list[tuple[float, str]] = field(default_factory=list)
    yticks: list[tuple[float, str]] | None = None
    grid: bool = True
    series: list[Series] = field(default_factory=list)
    notes: list[tuple[float, float, str, str, int]] = field(default_factory=list)

    def _add(self, series: Series) -> Series:
        if series.kind not in _KINDS:
            raise ValueError(f"Expected a series kind in {_KINDS}, but got {series.kind!r}.")
        self.series.append(series)
        return series

    def line(self, x: Sequence[Any], y: Sequence[Any], *, color: str = COLORS[0], label: str | None = None,
             marker: str | None = "o", dash: str = "solid", width: float = 1.5) -> Series:
        """A polyline through ``(x, y)`` (broken where y is NaN / None), with ``marker`` at each point."""
        return self._add(Series("line", _floats(x), _floats(y), color, label=label, marker=marker, dash=dash, width=width))

    def band(self, x: Sequence[Any], low: Sequence[Any], high: Sequence[Any], *, color: str = COLORS[0],
             alpha: float = 0.15) -> Series:
        """The area between ``low`` and ``high`` (points with a NaN left out)."""
        return self._add(Series("band", _floats(x), _floats(low), color, y2=_floats(high), alpha=alpha))

    def bars(self, x: Sequence[Any], heights: Sequence[Any], *, width: float = 0.8, color: str = COLORS[0],
             colors: Sequence[str] = (), label: str | None = None, alpha: float = 1.0) -> Series:
        """Bars centred at ``x`` from 0 to ``heights`` (NaN / None: no bar)."""
        return self._add(Series("bars", _floats(x), _floats(heights), color, colors=tuple(colors), label=label,
                                alpha=alpha, width=width))

    def hline(self, y: float, *, color: str = COLORS[0], label: str | None = None, dash: str = "dashed",
              width: float = 1.0) -> Series:
        """A horizontal line at ``y`` across the panel."""
        return self._add(Series("hline", (), (float(y),), color, label=label, dash=dash, width=width))

    def polygon(self, x: Sequence[Any], y: Sequence[Any], *, color: str = COLORS[0], alpha: float = 0.5,
                width: float = 0.0, label: str | None = None) -> Series:
        """A filled polygon (``alpha`` > 0) and / or its outline (``width`` > 0) through ``(x, y)``."""
        return self._add(Series("polygon", _floats(x), _floats(y), color, label=label, alpha=alpha, width=width))

    def markers(self, x: Sequence[Any], y: Sequence[Any], *, marker: str = "x", color: str = COLORS[0],
                colors: Sequence[str] = (), label: str | None = None) -> Series:
        """``marker`` at each point (drawn over the panel's frame)."""
        return self._add(Series("markers", _floats(x), _floats(y), color, colors=tuple(colors), label=label, marker=marker))

    def note(self, x: float, y: float, text: str, *, color: str = "#7f7f7f", angle: int = 0) -> None:
        """Small text centred at ``(x, y)``."""
        self.notes.append((float(x), float(y), text, color, angle))

    # ------------------------------------------------------------------------------- ranges
    def x_range(self) -> tuple[float, float]:
        if self.xlim is not None:
            return self.xlim
        xs = [t[0] for t in self.xticks]
        for s in self.series:
            half = s.width / 2 if s.kind == "bars" else 0.0
            xs += [v - half for v in s.x if math.isfinite(v)] + [v + half for v in s.x if math.isfinite(v)]
        if not xs:
            return (0.0, 1.0)
        lo, hi = min(xs), max(xs)
        pad = 0.5 if self.xticks and all(float(t[0]).is_integer() for t in self.xticks) else 0.03 * (hi - lo or 1.0)
        return (lo - pad, hi + pad)

    def y_range(self) -> tuple[float, float]:
        if self.ylim is not None:
            return self.ylim
        ys = [v for s in self.series for v in (*s.y, *s.y2) if math.isfinite(v)]
        if any(s.kind == "bars" for s in self.series):
            ys.append(0.0)
        if not ys:
            return (0.0, 1.0)
        lo, hi = min(ys), max(ys)
        pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi) * 0.1, 0.05)
        return (lo - pad if lo != 0.0 or hi <= 0 else 0.0, hi + pad)


@dataclass
class Chart:
    """Panels stacked over a shared x axis, a title and a legend of the labelled series, as one image.

    Attributes:
        title: centred on top (may hold newlines).
        xlabel: under the last panel's tick labels (shared x axis).
        shared_x: the panels share the last panel's x axis (its range and ticks, shown once at the bottom);
            ``False``: each panel has its own, shown under it with the panel's ``xlabel``.
        width: the image's width in pixels.
        panel_height: each panel's plotting height in pixels.
        legend: show the legend (one row or more of the labelled series, under the title).
    """

    title: str = ""
    xlabel: str = ""
    shared_x: bool = True
    width: int = 640
    panel_height: int = 200
    legend: bool = True
    panels: list[Panel] = field(default_factory=list)

    def panel(self, **kwargs: Any) -> Panel:
        """Add a panel below the others (keyword arguments as :class:`Panel`'s) and return it."""
        self.panels.append(Panel(**kwargs))
        return self.panels[-1]

    def labels(self) -> list[str]:
        """The legend entries, in order (a label repeated across panels is listed once)."""
        seen: list[str] = []
        for panel in self.panels:
            seen += [s.label for s in panel.series if s.label is not None and s.label not in seen]
        return seen

    def render(self) -> np.ndarray:
        """The chart as an ``(H, W, 3)`` uint8 RGB array."""
        return _render(self)


# ------------------------------------------------------------------------------------------ drawing
def _rgb(hex_color: str, alpha: float = 1.0) -> tuple[int, ...]:
    h = hex_color.lstrip("#")
    rgb = tuple(int(h[i : i + 2], 16) for i in (0, 2, 4))
    return rgb if alpha >= 1.0 else (*rgb, round(255 * max(0.0, alpha)))


def _tick_text(value: float) -> str:
    return f"{value:.4g}".replace("-", "\u2212")


def _legend_rows(entries: list[tuple[str, Series]], label_font: Any, width: int) -> list[list[tuple[str, Series, float]]]:
    rows: list[list[tuple[str, Series, float]]] = [[]]
    used = 0.0
    for label, series in entries:
        w = 26 * _SS + label_font.getlength(label) + 14 * _SS
        if rows[-1] and used + w > width - 20 * _SS:
            rows.append([])
            used = 0.0
        rows[-1].append((label, series, w))
        used += w
    return rows if rows[0] else []


def _render(chart: Chart) -> np.ndarray:
    from PIL import Image, ImageDraw

    s = _SS
    tick_font, label_font, title_font = font(9 * s), font(10 * s), font(12 * s)
    line_h = label_font.getbbox("Ag")[3] + 3 * s
    width, right_pad = chart.width * s, 12 * s
    panels = chart.panels or [Panel()]
    ticks = [_y_ticks(p) for p in panels]
    tick_w = max((tick_font.getlength(t) for ts in ticks for _, t in ts), default=0.0)
    ylabel_w = line_h if any(p.ylabel for p in panels) else 0
    left = int(8 * s + ylabel_w + tick_w + 6 * s)

    # x axes: one under the last panel (shared), or one under each
    x_ranges = [panels[-1].x_range()] * len(panels) if chart.shared_x else [p.x_range() for p in panels]
    axes: list[_XAxis | None] = [None] * len(panels)
    for i, panel in enumerate(panels):
        if not chart.shared_x or i == len(panels) - 1:
            xlabel = chart.xlabel if chart.shared_x else panel.xlabel
            axes[i] = _XAxis.make(panel.xticks, x_ranges[i], xlabel, tick_font, width - left - right_pad, s)
    for axis in axes:
        if axis is not None:
            left = max(left, axis.left_needed(width - right_pad, s))
    left = s * math.ceil(left / s)  # the frame on whole output pixels: crisp after shrinking
    plot_w = width - left - right_pad

    title_lines = chart.title.split("\n") if chart.title else []
    title_h = title_font.getbbox("Ag")[3] + 3 * s
    entries: list[tuple[str, Series]] = []
    if chart.legend:
        for label in chart.labels():
            entries.append((label, next(x for p in panels for x in p.series if x.label == label)))
    legend = _legend_rows(entries, label_font, width)
    top = s * math.ceil((6 * s + len(title_lines) * title_h + len(legend) * line_h + 6 * s) / s)
    gap, panel_h = 10 * s, chart.panel_height * s
    below = [axis.height(line_h, s) if axis is not None else 0 for axis in axes]
    height = top + sum(panel_h + b for b in below) + (len(panels) - 1) * gap + 8 * s

    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image, "RGBA")
    black = (0, 0, 0)
    y_cursor = 6 * s
    for line in title_lines:
        draw.text((width / 2, y_cursor), line, fill=black, font=title_font, anchor="ma")
        y_cursor += title_h
    for row in legend:
        x_cursor = (width - sum(w for _, _, w in row)) / 2
        mid = y_cursor + line_h / 2
        for label, series, w in row:
            _legend_swatch(draw, series, x_cursor, mid)
            draw.text((x_cursor + 26 * s, mid), label, fill=black, font=label_font, anchor="lm")
            x_cursor += w
        y_cursor += line_h

    py = top
    for i, panel in enumerate(panels):
        (x_lo, x_hi), (y_lo, y_hi) = x_ranges[i], panel.y_range()
        area = Image.new("RGB", (plot_w, panel_h), (255, 255, 255))
        area_draw = ImageDraw.Draw(area, "RGBA")
        to_px = _mapper((x_lo, x_hi), (y_lo, y_hi), plot_w, panel_h)
        if panel.grid:
            for value, _ in ticks[i]:
                gy = to_px(x_lo, value)[1]
                area_draw.line((0, gy, plot_w, gy), fill=(230, 230, 230), width=s)
        for series in panel.series:
            if series.kind != "markers":
                _draw_series(area_draw, series, to_px, plot_w)
        for x, y, text, col, angle in panel.notes:
            note = text_image(text, tick_font, angle=angle, fill=_rgb(col)[:3])  # type: ignore[arg-type]
            cx, cy = to_px(x, y)
            area.paste(note, (int(cx - note.width / 2), int(cy - note.height / 2)), note)
        image.paste(area, (left, py))
        draw.rectangle((left - s, py - s, left + plot_w + s - 1, py + panel_h + s - 1), outline=black, width=s)
        for series in panel.series:  # markers sit on the frame (a zero-height bar's mark), so over it
            if series.kind == "markers":
                _draw_series(draw, series, _mapper((x_lo, x_hi), (y_lo, y_hi), plot_w, panel_h, origin=(left, py)), plot_w)
        for value, text in ticks[i]:
            gy = py + to_px(x_lo, value)[1]
            draw.line((left - 4 * s, gy, left - 1, gy), fill=black, width=s)
            draw.text((left - 6 * s, gy), text, fill=black, font=tick_font, anchor="rm")
        if panel.ylabel:
            label = text_image(panel.ylabel, tick_font, angle=90)
            image.paste(label, (int(4 * s), int(py + panel_h / 2 - label.height / 2)), label)
        axis = axes[i]
        if axis is not None:
            axis.draw(image, draw, left, plot_w, py + panel_h, label_font, s)
        py += panel_h + below[i] + gap
    return np.asarray(image.reduce(s)).copy()  # each output pixel the mean of its s x s drawn pixels


@dataclass
class _XAxis:
    """The tick labels (level when they fit between their ticks, else at 35 degrees ending under their tick) and
    the label of one x axis."""

    ticks: list[tuple[float, str]]
    images: list[Any]
    level: bool
    x_range: tuple[float, float]
    label: str

    @classmethod
    def make(cls, xticks: Sequence[tuple[float, str]], x_range: tuple[float, float], label: str, tick_font: Any,
             plot_w: float, s: int) -> _XAxis:
        lo, hi = x_range
        shown = [(x, t) for x, t in xticks if lo <= x <= hi]
        spacing = plot_w / max(1, len(shown))
        level = all(tick_font.getlength(t) + 4 * s <= spacing for _, t in shown)
        return cls(shown, [text_image(t, tick_font, angle=0 if level else 35) for _, t in shown], level, x_range, label)

    def fraction(self, x: float) -> float:
        lo, hi = self.x_range
        return (x - lo) / (hi - lo or 1.0)

    def left_needed(self, right: float, s: int) -> int:
        """The left margin that keeps every slanted label inside the image (its tick at left + f * (plot width - 1))."""
        if self.level:  # level labels are centred under ticks half a category from the edge
            return 0
        need = 0
        for (x, _), im in zip(self.ticks, self.images):
            f = self.fraction(x)
            if f < 1.0:
                need = max(need, min(math.ceil((4 * s + im.width - 3 * s - f * (right - 1)) / (1.0 - f)), int(right) // 2))
        return need

    def tick_band(self, s: int) -> int:
        """The height of the tick marks and their labels under the axis."""
        return max((im.height for im in self.images), default=0) + (8 * s if self.ticks else 0)

    def height(self, line_h: int, s: int) -> int:
        return self.tick_band(s) + (line_h if self.label else 0)

    def draw(self, image: Any, draw: Any, left: int, plot_w: int, axis_y: int, label_font: Any, s: int) -> None:
        for (x, _), im in zip(self.ticks, self.images):
            gx = left + self.fraction(x) * (plot_w - 1)
            draw.line((gx, axis_y, gx, axis_y + 4 * s), fill=(0, 0, 0), width=s)
            paste_x = gx - im.width / 2 if self.level else gx - im.width + 3 * s
            image.paste(im, (int(paste_x), int(axis_y + 6 * s)), im)
        if self.label:
            draw.text((left + plot_w / 2, axis_y + self.tick_band(s)), self.label, fill=(0, 0, 0), font=label_font, anchor="ma")


def _mapper(
    xs: tuple[float, float], ys: tuple[float, float], width: int, height: int, origin: tuple[float, float] = (0.0, 0.0)
) -> Callable[[float, float], tuple[float, float]]:
    """Data ``(x, y)`` -> pixel ``(column, row)`` of a ``width`` x ``height`` plot area at ``origin`` (y upwards)."""
    (x0, x1), (y0, y1) = xs, ys

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (origin[0] + (x - x0) / (x1 - x0 or 1.0) * (width - 1), origin[1] + (1.0 - (y - y0) / (y1 - y0 or 1.0)) * (height - 1))

    return to_px


def _y_ticks(panel: Panel) -> list[tuple[float, str]]:
    lo, hi = panel.y_range()
    if panel.yticks is not None:
        return [(y, t) for y, t in panel.yticks if lo <= y <= hi]
    return [(v, _tick_text(v)) for v in nice_ticks(lo, hi)]


def _dashed(points: list[tuple[float, float]], pattern: tuple[float, float]) -> list[list[tuple[float, float]]]:
    """The pieces of the polyline ``points`` that are "on" in a dash ``pattern`` (on, off lengths in pixels)."""
    on, off = pattern
    pieces: list[list[tuple[float, float]]] = []
    drawing, left_in_state, current = True, on, [points[0]]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        done = 0.0
        while length - done > left_in_state:
            done += left_in_state
            t = done / length
            point = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t)
            if drawing:
                pieces.append([*current, point])
            current = [point]
            drawing = not drawing
            left_in_state = on if drawing else off
        left_in_state -= length - done
        current.append((x1, y1))
    if drawing and len(current) > 1:
        pieces.append(current)
    return pieces


def _polyline(draw: Any, points: list[tuple[float, float]], fill: Any, width: int, dash: str) -> None:
    if len(points) < 2:
        return
    pattern = _DASHES.get(dash)
    pieces = [points] if pattern is None else _dashed(points, (pattern[0] * width, pattern[1] * width))
    for piece in pieces:
        draw.line(piece, fill=fill, width=width, joint="curve")


def _marker(draw: Any, kind: str | None, x: float, y: float, fill: Any, size: float) -> None:
    if kind == "o":
        draw.ellipse((x - size, y - size, x + size, y + size), fill=fill)
    elif kind == "s":
        draw.rectangle((x - size, y - size, x + size, y + size), fill=fill)
    elif kind == "x":
        w = max(1, round(size / 2))
        draw.line((x - size, y - size, x + size, y + size), fill=fill, width=w)
        draw.line((x - size, y + size, x + size, y - size), fill=fill, width=w)


def _legend_swatch(draw: Any, series: Series, x: float, y: float) -> None:
    s = _SS
    rgb = _rgb(series.color)
    if series.kind in ("line", "hline"):
        _polyline(draw, [(x, y), (x + 20 * s, y)], rgb, max(1, round(series.width * s)), series.dash)
        _marker(draw, series.marker, x + 10 * s, y, rgb, 3.5 * s)
    elif series.kind == "markers":
        _marker(draw, series.marker, x + 10 * s, y, rgb, 4 * s)
    else:
        draw.rectangle((x + 4 * s, y - 6 * s, x + 16 * s, y + 6 * s), fill=_rgb(series.color, max(series.alpha, 0.4)))


def _draw_series(draw: Any, series: Series, to_px: Any, plot_w: int) -> None:
    s = _SS
    rgb = _rgb(series.color)
    if series.kind == "line":
        width = max(1, round(series.width * s))
        run: list[tuple[float, float]] = []
        points = []
        for x, y in zip(series.x, series.y):
            if math.isfinite(x) and math.isfinite(y):
                run.append(to_px(x, y))
                points.append(run[-1])
            else:
                _polyline(draw, run, rgb, width, series.dash)
                run = []
        _polyline(draw, run, rgb, width, series.dash)
        for x, y in points:
            _marker(draw, series.marker, x, y, rgb, 3.5 * s)
    elif series.kind == "markers":
        for i, (x, y) in enumerate(zip(series.x, series.y)):
            if math.isfinite(x) and math.isfinite(y):
                col = _rgb(series.colors[i]) if series.colors else rgb
                px, py = to_px(x, y)
                _marker(draw, series.marker, px, py, col, 4 * s)
    elif series.kind == "hline":
        _, y = to_px(0.0, series.y[0])
        _polyline(draw, [(0.0, y), (float(plot_w), y)], rgb, max(1, round(series.width * s)), series.dash)
    elif series.kind == "bars":
        for i, (x, h) in enumerate(zip(series.x, series.y)):
            if not (math.isfinite(x) and math.isfinite(h)):
                continue
            x0, y0 = to_px(x - series.width / 2, 0.0)
            x1, y1 = to_px(x + series.width / 2, h)
            fill = _rgb(series.colors[i] if series.colors else series.color, series.alpha)
            draw.rectangle((x0, min(y0, y1), max(x0, x1 - 1), max(y0, y1)), fill=fill)
    elif series.kind == "band":
        keep = [(x, lo, hi) for x, lo, hi in zip(series.x, series.y, series.y2) if all(map(math.isfinite, (x, lo, hi)))]
        if len(keep) > 1:
            outline = [to_px(x, lo) for x, lo, _ in keep] + [to_px(x, hi) for x, _, hi in reversed(keep)]
            draw.polygon(outline, fill=_rgb(series.color, series.alpha))
    elif series.kind == "polygon":
        points = [to_px(x, y) for x, y in zip(series.x, series.y) if math.isfinite(x) and math.isfinite(y)]
        if len(points) > 2 and series.alpha > 0:
            draw.polygon(points, fill=_rgb(series.color, series.alpha))
        if series.width > 0:
            _polyline(draw, points, rgb, max(1, round(series.width * s)), series.dash)
