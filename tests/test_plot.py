"""The PIL charts (``render.plot``): what they draw is where the data says, read back from the pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_introspect.render.plot import Chart, nice_ticks
from lightning_introspect.render.plot import _dashed as dashed


def _plot_area(image: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the single panel's inside: the black frame's rows and columns, found from
    the image's middle row / column."""
    dark = (image < 40).all(axis=2)
    mid_row, mid_col = image.shape[0] // 2, image.shape[1] // 2
    cols = np.flatnonzero(dark[mid_row])
    rows = np.flatnonzero(dark[:, mid_col])
    return int(rows.min()) + 1, int(rows.max()) - 1, int(cols.min()) + 1, int(cols.max()) - 1


def _near(pixel: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> bool:
    return bool(np.abs(pixel.astype(int) - np.array(rgb)).max() <= tol)


def test_bars_fill_the_panel_up_to_their_height_and_no_further() -> None:
    chart = Chart(width=400, panel_height=200, legend=False)
    panel = chart.panel(ylim=(0.0, 1.0), xlim=(-0.5, 1.5), grid=False)
    panel.bars([0, 1], [0.5, 0.9], width=0.8, color="#d62728")
    image = chart.render()
    top, bottom, left, right = _plot_area(image)
    h, w = bottom - top, right - left
    for x, height in ((0, 0.5), (1, 0.9)):
        col = left + round((x + 0.5) / 2.0 * w)
        below, above = bottom - round((height - 0.08) * h), bottom - round((height + 0.06) * h)
        assert _near(image[below, col], (214, 39, 40)), (x, image[below, col])
        assert _near(image[above, col], (255, 255, 255)), (x, image[above, col])
    gap = left + round((0.5 + 0.5) / 2.0 * w)  # between the two bars (x = 0.5): nothing
    assert _near(image[bottom - 5, gap], (255, 255, 255))


def test_a_line_passes_through_its_points_and_breaks_at_nan() -> None:
    chart = Chart(width=400, panel_height=200, legend=False)
    panel = chart.panel(ylim=(0.0, 1.0), xlim=(0.0, 4.0), grid=False)
    panel.line([0, 1, 2, 3, 4], [0.2, 0.2, math.nan, 0.8, 0.8], color="#2ca02c", marker=None, width=3)
    image = chart.render()
    top, bottom, left, right = _plot_area(image)

    def at(x: float, y: float) -> np.ndarray:
        return image[bottom - round(y * (bottom - top)), left + round(x / 4.0 * (right - left))]

    green = (44, 160, 44)
    assert _near(at(0.5, 0.2), green, 40) and _near(at(3.5, 0.8), green, 40)
    assert _near(at(2.0, 0.5), (255, 255, 255))  # the NaN point joins nothing
    assert _near(at(0.5, 0.8), (255, 255, 255))


def test_dashes_alternate_on_and_off_along_the_whole_line() -> None:
    pieces = dashed([(0.0, 0.0), (10.0, 0.0), (10.0, 10.0)], (3.0, 2.0))
    lengths = [sum(math.dist(a, b) for a, b in zip(p, p[1:])) for p in pieces]
    assert lengths == pytest.approx([3.0] * 4)  # 20 px of line: four whole dashes (3 on, 2 off each)
    assert pieces[1][0] == pytest.approx((5.0, 0.0)) and pieces[2][0] == pytest.approx((10.0, 0.0))  # across the corner


def test_nice_ticks_are_round_and_inside_the_range() -> None:
    assert nice_ticks(0.0, 1.05) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(-0.35, 1.05) == [-0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.0, 0.0042) == [0.0, 0.001, 0.002, 0.003, 0.004]
    assert nice_ticks(3.0, 3.0) == [3.0]


def test_legend_lists_each_label_once_and_kinds_are_checked() -> None:
    chart = Chart(title="two\nlines")
    a, b = chart.panel(), chart.panel()
    a.line([0, 1], [0, 1], label="train")
    b.line([0, 1], [1, 0], label="train")
    b.hline(0.5, label="threshold")
    assert chart.labels() == ["train", "threshold"]
    with pytest.raises(ValueError, match="series kind"):
        a._add(type(a.series[0])("pie", (), (), "#000000"))
    image = chart.render()
    assert image.dtype == np.uint8 and image.shape[2] == 3 and image.shape[1] == chart.width


def test_slanted_tick_labels_stay_inside_the_image() -> None:
    names = [f"backbone.stage{i}.block{i}.conv" for i in range(6)]
    chart = Chart(width=360, legend=False)
    chart.panel(xticks=list(enumerate(names))).bars(range(6), [1, 2, 3, 4, 5, 6])
    image = chart.render()
    ink = np.flatnonzero((image < 200).any(axis=2).any(axis=0))
    assert ink.min() > 0 and ink.max() < image.shape[1] - 1  # nothing cut at either edge
