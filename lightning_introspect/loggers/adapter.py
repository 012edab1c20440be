"""The logger adapter the callbacks write through.

:class:`IntrospectionWriter` is the whole interface: scalars, images, image grids, raw histograms,
matplotlib figures and markdown text. :func:`writer_for` picks the implementation for a trainer:

* a ``TensorBoardLogger`` among the trainer's loggers -> :class:`TensorBoardWriter` on its
  ``SummaryWriter`` (scalars also go to the trainer's other loggers);
* any other logger -> :class:`FileWriter`: scalars go through the trainer's loggers, everything else
  becomes files under the logger's ``log_dir`` (``<log_dir>/introspect/<callback>/.../<step>.png``);
* ``logger=False`` (or a logger without a directory of its own) -> :class:`FileWriter` under a new
  ``<default_root_dir>/introspect_runs/version_<N>/`` per fit, scalars in its ``scalars.csv``.

The fallbacks are announced by one warning naming the directory. Only global rank zero writes: on
other ranks :func:`writer_for` returns a :class:`NullWriter`.

Names: every tag a writer receives passes through :func:`sanitize_tag` once, here, so callbacks may
build tags from anything (class names of any length, layer names with odd characters): the written
tag is always a valid TensorBoard tag and a valid relative path. Text placed in a markdown table
cell goes through :func:`markdown_cell`.

Errors: every writing method (``scalar``, ``scalars``, ``image``, ``image_grid``, ``histogram``,
``histograms``, ``figure``, ``text``, ``register_layout``, ``flush``) and leaving the outermost
``batch()`` may raise ``OSError`` when the log directory cannot be written (disk full, read-only
or vanished directory). They raise inside the call that wrote the data, never later: outside a
batch each call flushes before it returns, and a batch flushes when it ends, so TensorBoard's
background writer thread has nothing of ours left to fail on at teardown; and after a failure the
``SummaryWriter`` shared with Lightning is left able to write again (see
:meth:`TensorBoardWriter._write_errors`). ``writer_for`` may raise ``OSError`` too (it creates the
fallback directory). Bad arguments raise ``ValueError``.

Charts: the scalars of a TensorBoard run are laid out in its Custom Scalars dashboard one chart per
quantity (per-class recall, drift per layer, probe accuracy per layer), kept up to date as tags appear
(:class:`ScalarLayout`).

TensorBoard is written through the public ``SummaryWriter`` methods only (``add_scalar``,
``add_histogram_raw``, ``add_image``, ``add_figure``, ``add_text``, ``add_custom_scalars``,
``flush``), with TensorBoard's own record writer and checksum.

Pickling: writers pickle and deep-copy without their live parts (the ``SummaryWriter``, its
threads and files); a :class:`TensorBoardWriter` finds its experiment again on first use.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import os
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lightning_introspect._warnings import warn

_HIST_STATS = ("min", "max", "num", "sum", "sum_squares")

#: The longest tag component, in UTF-8 bytes: far below file systems' 255-byte name limit, with
#: room for the hash suffix, and still readable in TensorBoard's tag list.
MAX_COMPONENT_BYTES = 96
_HASH_CHARS = 8
# letters and digits of any script, `_`, `.`, `-`, inner spaces; at the end, maybe the suffix we add
_VALID_COMPONENT = re.compile(r"[\w.\- ]+(~[0-9a-f]{8})?")
_INVALID_RUN = re.compile(r"[^\w.\- ]+")
# Markdown characters that act inside a table cell's inline content; each is escaped with a backslash.
_MARKDOWN_ACTIVE = re.compile(r"([\\`*_\[\]<>|~&!#])")
_LINE_BREAKS = re.compile(r"[\r\n\t\v\f\u2028\u2029]+")


@functools.lru_cache(maxsize=8192)
def sanitize_component(text: str) -> str:
    """One tag component (no ``/``) as a valid TensorBoard tag part and file name.

    A component made of letters, digits, ``_``, ``.``, ``-`` and inner spaces, not only dots and at
    most :data:`MAX_COMPONENT_BYTES` long, is kept as it is. Any other is cleaned (each run of other
    characters becomes ``_``), shortened, and suffixed with ``~`` and 8 hex digits of the SHA-1 of the
    original: deterministic, and two different originals never give the same result (``~`` never
    survives cleaning, so a kept component cannot look like a cleaned one, unless it is one: a
    cleaned component is kept as it is, so tags may pass through twice).

    Example:
        >>> sanitize_component("features.3")
        'features.3'
        >>> sanitize_component("cat/dog")
        'cat_dog~85207c77'
        >>> len(sanitize_component("x" * 300).encode())
        96
        >>> sanitize_component("..")
        '_~9d891e73'
    """
    text = str(text)
    encoded = text.encode("utf-8", "surrogatepass")
    if (
        _VALID_COMPONENT.fullmatch(text)
        and text == text.strip(" ")
        and set(text) != {"."}
        and len(encoded) <= MAX_COMPONENT_BYTES
    ):
        return text
    digest = hashlib.sha1(encoded).hexdigest()[:_HASH_CHARS]
    cleaned = _INVALID_RUN.sub("_", text).strip(" ")
    if set(cleaned) <= {"."}:
        cleaned = "_"
    room = MAX_COMPONENT_BYTES - _HASH_CHARS - 1
    cleaned = cleaned.encode("utf-8")[:room].decode("utf-8", "ignore").rstrip(" ")
    return f"{cleaned}~{digest}"


@functools.lru_cache(maxsize=8192)
def sanitize_tag(tag: str) -> str:
    r"""The tag actually written for ``tag``: each ``/``-separated component through
    :func:`sanitize_component`, empty components dropped. Also a relative path that stays inside
    the directory it is joined to (no ``..``, no absolute path, no drive).

    Example:
        >>> sanitize_tag("introspect/per_class_metrics/f1/airplane")
        'introspect/per_class_metrics/f1/airplane'
        >>> sanitize_tag("introspect/x/line\nbreak")
        'introspect/x/line_break~2e1a2284'
        >>> sanitize_tag("/introspect/../x")
        'introspect/_~9d891e73/x'
    """
    parts = [sanitize_component(part) for part in str(tag).split("/") if part]
    return "/".join(parts) or "untitled"


def safe_relative_path(tag: str) -> str:
    """The relative file path for a tag: the same as :func:`sanitize_tag` (one rule for tags and files)."""
    return sanitize_tag(tag)


def markdown_cell(text: Any, *, max_chars: int | None = None) -> str:
    r"""``text`` ready to be placed in a markdown table cell: line breaks become spaces, and the
    characters that would end the cell (``|``) or start markup (emphasis, code, links, HTML,
    entities) are backslash-escaped. ``max_chars`` shortens long text (ending in ``…``).

    Example:
        >>> print(markdown_cell("a|b\n*c* <br>"))
        a\|b \*c\* \<br\>
    """
    text = _LINE_BREAKS.sub(" ", str(text))
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    if max_chars is not None and len(text) > max_chars:
        text = text[: max(max_chars - 1, 0)] + "…"
    return _MARKDOWN_ACTIVE.sub(r"\\\1", text)


def to_uint8_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """CHW or HWC, float in [0, 1] or uint8, 1/3/4 channels or 2-D -> HWC uint8 numpy array."""
    arr = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"Expected `image` with 2 or 3 dimensions (HW, CHW or HWC), but got shape {arr.shape}.")
    if arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = (np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr


def figure_to_array(fig: Any, *, close: bool = True) -> np.ndarray:
    """Render a matplotlib figure to an HWC uint8 RGB array (Agg, no screen needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    arr = np.asarray(canvas.buffer_rgba())[:, :, :3].copy()
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return arr


def _close_figure(fig: Any) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


class IntrospectionWriter:
    """The interface every callback writes through. Tags follow ``introspect/<callback>/<what>[/<detail>]``
    and are sanitised here (:func:`sanitize_tag`)."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars({tag: value}, step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def image(self, tag: str, image: torch.Tensor | np.ndarray, step: int) -> None:
        """One image: CHW or HWC, float in [0, 1] or uint8."""
        raise NotImplementedError

    def image_grid(self, tag: str, images: torch.Tensor, step: int, *, nrow: int = 8) -> None:
        """A batch ``(N, C, H, W)`` in [0, 1] tiled into one image."""
        from lightning_introspect.render.grid import make_grid

        self.image(tag, make_grid(images, nrow=nrow), step)

    def histogram(self, tag: str, counts: Sequence[float], edges: Sequence[float], step: int, **stats: float) -> None:
        """A pre-computed histogram: ``len(edges) == len(counts) + 1``.

        ``stats`` may carry ``min``, ``max``, ``num``, ``sum``, ``sum_squares`` of the raw values;
        missing ones are estimated from the bins.
        """
        raise NotImplementedError

    def histograms(self, hists: Mapping[str, tuple[Any, Any, Mapping[str, float]]], step: int) -> None:
        """Many pre-computed histograms at one step: ``tag -> (counts, edges, stats)`` as in :meth:`histogram`."""
        with self.batch():
            for tag, (counts, edges, stats) in hists.items():
                self.histogram(tag, counts, edges, step, **stats)

    def figure(self, tag: str, fig: Any, step: int) -> None:
        """A matplotlib figure (closed after writing, also when writing fails)."""
        try:
            arr = figure_to_array(fig, close=False)
        finally:
            _close_figure(fig)
        self.image(tag, arr, step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        """Markdown text; put table cells through :func:`markdown_cell`."""
        raise NotImplementedError

    def register_layout(self, charts: Mapping[str, Mapping[str, str]]) -> None:
        """Declare charts of the scalar layout: ``{callback name: {chart title: pattern}}``, each pattern a
        regular expression for the part of the tag after ``introspect/<callback name>/`` (TensorBoard's
        custom-scalars dashboard; other writers ignore it). See :class:`ScalarLayout` for the charts
        every other tag falls into."""

    def flush(self) -> None:
        """Make written data visible now (TensorBoard polls the files)."""

    @contextlib.contextmanager
    def batch(self) -> Iterator[IntrospectionWriter]:
        """Group many writes (e.g. a histogram per layer): flushed once, when the outermost batch ends.

        Nested use is fine; only the outermost context flushes.
        """
        yield self

    @staticmethod
    def _hist_stats(counts: Sequence[float], edges: Sequence[float], stats: Mapping[str, float]) -> dict[str, float]:
        if all(key in stats for key in _HIST_STATS) and len(edges) == len(counts) + 1:
            return {key: float(stats[key]) for key in _HIST_STATS}  # the common case: nothing to estimate
        c = np.asarray(counts, dtype=np.float64)
        e = np.asarray(edges, dtype=np.float64)
        if e.shape[0] != c.shape[0] + 1:
            raise ValueError(f"Expected `edges` to have len(counts) + 1 = {c.shape[0] + 1} entries, but got {e.shape[0]}.")
        centers = (e[:-1] + e[1:]) / 2
        nonzero = np.nonzero(c)[0]
        return {
            "min": float(stats.get("min", e[nonzero[0]] if nonzero.size else e[0])),
            "max": float(stats.get("max", e[nonzero[-1] + 1] if nonzero.size else e[-1])),
            "num": float(stats.get("num", c.sum())),
            "sum": float(stats.get("sum", (c * centers).sum())),
            "sum_squares": float(stats.get("sum_squares", (c * centers**2).sum())),
        }


class NullWriter(IntrospectionWriter):
    """Writes nothing (non-zero ranks, disabled logging)."""

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        pass

    def image(self, tag: str, image: torch.Tensor | np.ndarray, step: int) -> None:
        pass

    def image_grid(self, tag: str, images: torch.Tensor, step: int, *, nrow: int = 8) -> None:
        pass

    def histogram(self, tag: str, counts: Sequence[float], edges: Sequence[float], step: int, **stats: float) -> None:
        pass

    def figure(self, tag: str, fig: Any, step: int) -> None:
        _close_figure(fig)

    def text(self, tag: str, markdown: str, step: int) -> None:
        pass


class ScalarLayout:
    """The TensorBoard custom-scalars layout of one run: one chart per quantity, its series the items.

    A scalar tag ``introspect/<callback>/<what>/<item>`` falls into the chart of ``<what>`` (category
    ``introspect/<callback>``), whose series are the items: the tag convention puts the layer, class,
    method or strength last, so ``per_class/recall/<class>``, ``weights/drift/<layer>``,
    ``attributions/localization/<method>/<score>`` and ``sanity/<method>/spearman/cascading/<layer>`` each
    make one chart of one quantity on one scale. A tag right under the callback (``introspect/<callback>/
    seconds``) shares one chart per name across the callbacks (category ``introspect``). A callback whose
    tags put the item elsewhere declares its charts (``{title: pattern}``, e.g. LinearProbes'
    ``[^/]+/accuracy``: accuracy per layer); declared charts are matched first.

    The layout holds only charts with data: it is (re)written whenever a scalar tag opens a new chart, and
    TensorBoard shows the run's latest layout. A chart's regular expression is the general one
    (``^introspect/per_class/recall/[^/]+$``) unless that would also match a tag of another chart; then it
    lists its own tags.

    Example:
        >>> layout = ScalarLayout()
        >>> layout.add(["introspect/per_class/recall/cat", "introspect/per_class/recall/dog", "introspect/weights/seconds"])
        True
        >>> layout.as_dict()["introspect/per_class"]
        {'recall': ['Multiline', ['^introspect/per_class/recall/[^/]+$']]}
    """

    def __init__(self) -> None:
        self.declared: dict[str, dict[str, re.Pattern[str]]] = {}
        self.chart_of: dict[str, tuple[str, str, str]] = {}  # tag -> (category, title, general regex)
        self.written: dict[str, dict[str, list[Any]]] | None = None
        self._patterns: dict[tuple[str, str, str], re.Pattern[str]] = {}  # chart -> its general regex
        self._listed: set[tuple[str, str, str]] = set()  # charts that list their tags (see as_dict)

    def declare(self, charts: Mapping[str, Mapping[str, str]]) -> bool:
        """Add declared charts; returns whether any tag seen so far moved to another chart."""
        for callback, patterns in charts.items():
            if not isinstance(patterns, Mapping):  # a plain list of names declares nothing
                continue
            name = sanitize_component(str(callback).replace("/", "_"))
            own = self.declared.setdefault(name, {})
            for title, pattern in patterns.items():
                own.setdefault(str(title), re.compile(str(pattern)))
        before = dict(self.chart_of)
        self.chart_of = {tag: self._chart(tag) for tag in before}
        self._patterns = {chart: re.compile(chart[2]) for chart in self.chart_of.values()}
        return self.chart_of != before

    def _chart(self, tag: str) -> tuple[str, str, str]:
        parts = tag.split("/")
        if len(parts) >= 3 and parts[0] == "introspect":
            callback, rest = parts[1], "/".join(parts[2:])
            for title, pattern in self.declared.get(callback, {}).items():
                if pattern.fullmatch(rest):
                    return f"introspect/{callback}", title, rf"^introspect/{re.escape(callback)}/(?:{pattern.pattern})$"
            if len(parts) == 3:  # right under the callback: one chart per name, across callbacks
                return "introspect", parts[2], rf"^introspect/[^/]+/{re.escape(parts[2])}$"
            return f"introspect/{callback}", "/".join(parts[2:-1]), rf"^{re.escape('/'.join(parts[:-1]))}/[^/]+$"
        if len(parts) == 1:
            return "other", tag, rf"^{re.escape(tag)}$"
        return parts[0], "/".join(parts[:-1]), rf"^{re.escape('/'.join(parts[:-1]))}/[^/]+$"

    def add(self, tags: Sequence[str]) -> bool:
        """Place new (sanitised) scalar tags; returns whether the layout changed (and must be written)."""
        changed = False
        for tag in tags:
            if tag in self.chart_of:
                continue
            chart = self.chart_of[tag] = self._chart(tag)
            if chart not in self._patterns:  # a new chart
                self._patterns[chart] = re.compile(chart[2])
                changed = True
            elif chart in self._listed:  # a chart that lists its tags gets one more
                changed = True
            # a tag another chart's general regex would also match: that chart must list its tags
            changed = changed or any(p.match(tag) for c, p in self._patterns.items() if c[:2] != chart[:2])
        return changed and self.as_dict() != self.written

    def as_dict(self) -> dict[str, dict[str, list[Any]]]:
        """``{category: {chart title: ["Multiline", [regex]]}}`` (``SummaryWriter.add_custom_scalars``)."""
        members: dict[tuple[str, str, str], list[str]] = {}
        for tag, chart in self.chart_of.items():
            members.setdefault(chart, []).append(tag)
        layout: dict[str, dict[str, list[Any]]] = {}
        self._listed = set()
        for chart, own in members.items():
            category, title, regex = chart
            pattern = self._patterns.get(chart) or re.compile(regex)
            if any(pattern.match(tag) for tag, other in self.chart_of.items() if other[:2] != (category, title)):
                regex = "^(?:" + "|".join(re.escape(tag) for tag in sorted(own)) + ")$"
                self._listed.add(chart)
            charts = layout.setdefault(category, {})
            if title in charts:  # two general patterns under one title: keep both
                charts[title][1].append(regex)
            else:
                charts[title] = ["Multiline", [regex]]
        return layout


# One layout per SummaryWriter (every callback's writer of a run shares the logger's SummaryWriter).
_LAYOUTS: weakref.WeakKeyDictionary[Any, ScalarLayout] = weakref.WeakKeyDictionary()


class TensorBoardWriter(IntrospectionWriter):
    """Writes through the public methods of a ``torch.utils.tensorboard.SummaryWriter``.

    Outside :meth:`batch` each call flushes before returning (someone watching TensorBoard sees the
    result within seconds, and a write error surfaces in the call); inside, the writes queue up and
    the outermost batch flushes once at its end.

    Args:
        experiment: the ``SummaryWriter``; optional when ``logger`` is given.
        other_loggers: Lightning loggers that also receive the scalars (``log_metrics``).
        logger: the ``TensorBoardLogger`` whose ``experiment`` to use (found again after unpickling).
    """

    def __init__(self, experiment: Any = None, other_loggers: Sequence[Any] = (), *, logger: Any = None) -> None:
        if experiment is None and logger is None:
            raise ValueError("Expected a `SummaryWriter` as `experiment` or a TensorBoardLogger as `logger`, but got neither.")
        self._experiment = experiment
        self._logger = logger
        self._log_dir = experiment.get_logdir() if experiment is not None else None
        self.other_loggers = list(other_loggers)
        self._depth = 0

    @property
    def experiment(self) -> Any:
        """The ``SummaryWriter`` (re-resolved from the logger, or reopened on its directory, after unpickling)."""
        if self._experiment is None:
            if self._logger is not None:
                self._experiment = self._logger.experiment
            else:
                from torch.utils.tensorboard import SummaryWriter

                self._experiment = SummaryWriter(self._log_dir)
        return self._experiment

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if state["_logger"] is None and state["_experiment"] is not None:
            state["_log_dir"] = state["_experiment"].get_logdir()
        state["_experiment"] = None  # threads, locks and open files: found again on first use
        state["_depth"] = 0
        return state

    @contextlib.contextmanager
    def batch(self) -> Iterator[IntrospectionWriter]:
        """Writes inside go out with ONE flush, when the outermost batch ends (where a write error surfaces)."""
        self._depth += 1
        try:
            yield self
        except BaseException:
            self._depth -= 1
            if self._depth == 0:  # what was written before the failure still goes out now, not at teardown
                with contextlib.suppress(Exception):  # the body's error is the one to report
                    self.flush()
            raise
        self._depth -= 1
        if self._depth == 0:
            self.flush()

    @contextlib.contextmanager
    def _write_errors(self) -> Iterator[Any]:
        """The experiment, for writes whose ``OSError`` must not come back later.

        TensorBoard's writer thread stops at its first error (disk full, directory gone) and re-raises
        it from EVERY later call on that ``SummaryWriter``: Lightning's own logging and its flush at
        teardown would end the fit for a write of ours long after we reported it. So after an
        ``OSError`` the failed file writer is forgotten, as ``SummaryWriter.close()`` forgets it (the
        local event file is opened and closed per record, so nothing is left open): the next write,
        ours or Lightning's, starts a new event file, and one that still fails raises in that call.
        """
        experiment = self.experiment
        try:
            yield experiment
        except OSError:
            if getattr(experiment, "all_writers", None) is not None:
                experiment.file_writer = experiment.all_writers = None
            raise

    def _written(self) -> None:
        if not self._depth:
            self.flush()

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        metrics = {sanitize_tag(tag): float(value) for tag, value in values.items()}
        with self._write_errors() as experiment:
            for tag, value in metrics.items():
                experiment.add_scalar(tag, value, global_step=step)
            layout = self._layout(experiment)
            if layout.add(list(metrics)):  # a new chart: TensorBoard shows the latest layout of a run
                self._write_layout(experiment, layout)
        for logger in self.other_loggers:
            logger.log_metrics(metrics, step=step)
        self._written()

    def image(self, tag: str, image: torch.Tensor | np.ndarray, step: int) -> None:
        arr = to_uint8_hwc(image)
        with self._write_errors() as experiment:
            experiment.add_image(sanitize_tag(tag), arr, global_step=step, dataformats="HWC")
        self._written()

    def histogram(self, tag: str, counts: Sequence[float], edges: Sequence[float], step: int, **stats: float) -> None:
        s = self._hist_stats(counts, edges, stats)
        with self._write_errors() as experiment:
            experiment.add_histogram_raw(
                sanitize_tag(tag),
                min=s["min"],
                max=s["max"],
                num=s["num"],
                sum=s["sum"],
                sum_squares=s["sum_squares"],
                bucket_limits=np.asarray(edges, dtype=np.float64)[1:].tolist(),
                bucket_counts=np.asarray(counts, dtype=np.float64).tolist(),
                global_step=step,
            )
        self._written()

    def figure(self, tag: str, fig: Any, step: int) -> None:
        try:
            with self._write_errors() as experiment:
                experiment.add_figure(sanitize_tag(tag), fig, global_step=step, close=True)
        finally:
            _close_figure(fig)  # also when rendering or writing failed
        self._written()

    def text(self, tag: str, markdown: str, step: int) -> None:
        with self._write_errors() as experiment:
            experiment.add_text(sanitize_tag(tag), markdown, global_step=step)
        self._written()

    def flush(self) -> None:
        if not self._depth:
            with self._write_errors() as experiment:
                experiment.flush()

    @staticmethod
    def _layout(experiment: Any) -> ScalarLayout:
        layout = _LAYOUTS.get(experiment)
        if layout is None:
            layout = _LAYOUTS[experiment] = ScalarLayout()
        return layout

    @staticmethod
    def _write_layout(experiment: Any, layout: ScalarLayout) -> None:
        charts = layout.as_dict()
        experiment.add_custom_scalars(charts)
        layout.written = charts

    def register_layout(self, charts: Mapping[str, Mapping[str, str]]) -> None:
        """Declare charts of the custom-scalars layout (see :class:`ScalarLayout`), shared by every writer
        of this ``SummaryWriter``. Writes the layout again only when it moves tags already written."""
        with self._write_errors() as experiment:
            layout = self._layout(experiment)
            if layout.declare(charts) and layout.as_dict() != layout.written:
                self._write_layout(experiment, layout)
        self._written()


class FileWriter(IntrospectionWriter):
    """Writes images, figures, histograms and text as files under ``root``; scalars to ``loggers``.

    Paths: ``<root>/<sanitised tag>/<step>.png|.json|.md``. Without loggers, scalars are appended to
    ``<root>/scalars.csv``. Every file is opened, written and closed within the call.
    """

    def __init__(self, root: str | os.PathLike[str], loggers: Sequence[Any] = ()) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.loggers = list(loggers)

    def path(self, tag: str, step: int, suffix: str) -> str:
        path = os.path.join(self.root, sanitize_tag(tag), f"{int(step):08d}{suffix}")
        if os.path.commonpath([self.root, os.path.abspath(path)]) != self.root:  # defence in depth
            raise ValueError(f"Refusing to write outside the log directory for tag {tag!r}.")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        metrics = {sanitize_tag(k): float(v) for k, v in values.items()}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
        if not self.loggers:
            os.makedirs(self.root, exist_ok=True)
            path = os.path.join(self.root, "scalars.csv")
            new = not os.path.exists(path)
            with open(path, "a", newline="") as fh:
                out = csv.writer(fh)
                if new:
                    out.writerow(["tag", "step", "value"])
                for tag, value in metrics.items():
                    out.writerow([tag, int(step), value])

    def image(self, tag: str, image: torch.Tensor | np.ndarray, step: int) -> None:
        from PIL import Image

        Image.fromarray(to_uint8_hwc(image)).save(self.path(tag, step, ".png"), compress_level=1)

    def histogram(self, tag: str, counts: Sequence[float], edges: Sequence[float], step: int, **stats: float) -> None:
        record = {
            "counts": [float(x) for x in counts],
            "edges": [float(x) for x in edges],
            **self._hist_stats(counts, edges, stats),
        }
        with open(self.path(tag, step, ".json"), "w") as fh:
            json.dump(record, fh)

    def text(self, tag: str, markdown: str, step: int) -> None:
        with open(self.path(tag, step, ".md"), "w", encoding="utf-8") as fh:
            fh.write(markdown)


def _is_tensorboard(logger: Any) -> bool:
    from torch.utils.tensorboard import SummaryWriter

    try:
        return isinstance(logger.experiment, SummaryWriter)
    except Exception:  # a logger whose experiment cannot be created here
        return False


#: Where results go without a logger directory: ``<default_root_dir>/<FALLBACK_DIR>/version_<N>``.
FALLBACK_DIR = "introspect_runs"

_WARNED_FALLBACK: set[str] = set()


class _FallbackRun:
    """The fallback directory of a trainer's current fit, and the callbacks that announced that fit."""

    def __init__(self) -> None:
        self.root: str | None = None
        self.members: set[int] = set()


# One fallback directory per fit of a trainer: every callback of a fit writes to the same one.
_FALLBACK_RUNS: weakref.WeakKeyDictionary[Any, _FallbackRun] = weakref.WeakKeyDictionary()
# stand-ins for trainers that take no weak reference (kept by id; tests and tools only)
_FALLBACK_RUNS_BY_ID: dict[int, _FallbackRun] = {}


def _fallback_run(trainer: Any) -> _FallbackRun:
    try:
        return _FALLBACK_RUNS.setdefault(trainer, _FallbackRun())
    except TypeError:  # no weak reference to this object
        return _FALLBACK_RUNS_BY_ID.setdefault(id(trainer), _FallbackRun())


def start_fit(trainer: Any, member: object) -> None:
    """Announce that a fit of ``trainer`` starts; every callback of the fit calls it once, at its ``setup``.

    A member that announces again means the trainer's previous fit is over: the next fallback writer of
    this trainer (no logger directory) opens a new ``version_<N>`` directory, so a second
    ``trainer.fit`` never appends to or overwrites the first one's files. ``validate`` / ``test`` after
    a fit keep writing into that fit's directory. Cheap and rank-independent (no file is touched).
    """
    run = _fallback_run(trainer)
    key = id(member)
    if key in run.members:
        run.root = None
        run.members = set()
    run.members.add(key)


def new_version_dir(parent: str | os.PathLike[str]) -> str:
    """Create and return ``<parent>/version_<N>`` with ``N`` one more than the largest there (0 first):
    a new run never writes into an earlier one's directory, also when two start at once."""
    parent = os.path.abspath(os.fspath(parent))
    os.makedirs(parent, exist_ok=True)
    numbers = [int(m.group(1)) for name in os.listdir(parent) if (m := re.fullmatch(r"version_(\d+)", name))]
    version = max(numbers, default=-1) + 1
    while True:
        path = os.path.join(parent, f"version_{version}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            version += 1


def writer_for(trainer: Any) -> IntrospectionWriter:
    """The writer for a Lightning trainer (see the module docstring for the rules)."""
    if not getattr(trainer, "is_global_zero", True):
        return NullWriter()
    loggers = list(getattr(trainer, "loggers", []) or [])
    tb = [lg for lg in loggers if type(lg).__name__ == "TensorBoardLogger" or _is_tensorboard(lg)]
    if tb:
        return TensorBoardWriter(logger=tb[0], other_loggers=[lg for lg in loggers if lg is not tb[0]])
    root = getattr(loggers[0], "log_dir", None) if loggers else None
    if root is None:
        run = _fallback_run(trainer)
        if run.root is None:
            # not `trainer.log_dir`: it broadcasts, and only rank zero gets here (a DDP deadlock)
            base = getattr(trainer, "default_root_dir", None) or os.getcwd()
            run.root = new_version_dir(os.path.join(base, FALLBACK_DIR))
        root = run.root
    root = os.path.abspath(os.fspath(root))
    if root not in _WARNED_FALLBACK:
        _WARNED_FALLBACK.add(root)
        where = (
            "scalars go to the trainer's loggers, and images, figures, histograms and tables are written as files"
            if loggers
            else "scalars (scalars.csv), images, figures, histograms and tables are written as files"
        )
        # the directory that FileWriter writes into (tags add their own `introspect/<callback>/...` below it)
        warn(f"lightning_introspect: no TensorBoardLogger on the trainer; {where} under {root}.")
    return FileWriter(root, loggers=loggers)
