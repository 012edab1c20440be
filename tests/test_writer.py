"""The logger layer: names limited and escaped once, write errors raised inside the call, writers that
pickle, the ``logger=False`` fallback directory, and TensorBoard written through its public API only.

Tags are read back from the event files (``tests.helpers.read_events``) or found as files on disk.
"""

from __future__ import annotations

import copy
import os
import pathlib
import pickle
import re
import shutil
import threading
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect._lightning import LightningModule, pl
from lightning_introspect.loggers import adapter
from lightning_introspect.loggers.adapter import (
    MAX_COMPONENT_BYTES,
    FileWriter,
    NullWriter,
    TensorBoardWriter,
    markdown_cell,
    sanitize_component,
    sanitize_tag,
    writer_for,
)
from tests.helpers import quick_trainer, read_events

LONG = "a_very_long_class_name_" * 14  # 322 characters
ODD_NAMES = [
    LONG,
    LONG + "x",  # differs only beyond any truncation
    "traffic\nlight",
    "traffic light",
    "cat/dog",
    "cat_dog",
    "back\\slash",
    "..",
    ".",
    "pipe|star*",
    "ünïcödé",
    "tab\there",
    " padded ",
    "trailing.",
]
_TAG_COMPONENT = re.compile(r"[\w.\- ~]+")


def _summary_writer(path: Any) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path))


# ------------------------------------------------------------------------------------------ names
def test_sanitised_names_are_valid_bounded_deterministic_and_distinct() -> None:
    out = [sanitize_component(name) for name in ODD_NAMES]
    assert len(set(out)) == len(ODD_NAMES)  # no two names collide, also after truncation
    assert [sanitize_component(clean) for clean in out] == out  # a tag may pass through twice
    assert sanitize_component("x~12345678") == "x~12345678" and sanitize_component("x~1") != "x~1"
    assert out == [sanitize_component(name) for name in ODD_NAMES]  # deterministic
    for name, clean in zip(ODD_NAMES, out):
        assert _TAG_COMPONENT.fullmatch(clean) and "/" not in clean and clean not in (".", ".."), (name, clean)
        assert len(clean.encode()) <= MAX_COMPONENT_BYTES
        assert clean == clean.strip()
    # names that need nothing are left alone; changed ones keep a readable prefix
    for name in ("airplane", "features.3", "layer_1-bias", "ünïcödé", "traffic light"):
        assert sanitize_component(name) == name
    assert sanitize_component("traffic\nlight").startswith("traffic_light~")
    assert sanitize_component(LONG).startswith(LONG[:40])
    # whole tags: per component, empty components dropped, nothing left that climbs out of a directory
    assert sanitize_tag("introspect/per_class/f1/airplane") == "introspect/per_class/f1/airplane"
    assert sanitize_tag("/introspect//x/") == "introspect/x"
    for tag in ("../../etc/passwd", "a/../../b", "..", "/abs/x", "C:\\windows\\x"):
        parts = sanitize_tag(tag).split("/")
        assert ".." not in parts and "" not in parts and not os.path.isabs(sanitize_tag(tag))


def test_odd_tags_read_back_from_tensorboard_as_sanitised(tmp_path: Any) -> None:
    import matplotlib.pyplot as plt

    sw = _summary_writer(tmp_path)
    writer = TensorBoardWriter(sw)
    tags = {name: f"introspect/per_class/f1/{name}" for name in ODD_NAMES}
    writer.scalars({tag: float(i) for i, tag in enumerate(tags.values())}, 3)
    writer.histogram(f"introspect/weights/{LONG}", [1, 2], [0.0, 1.0, 2.0], 3)
    writer.image(f"introspect/attributions/{ODD_NAMES[2]}", torch.rand(3, 4, 4), 3)
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    writer.figure(f"introspect/x/{ODD_NAMES[4]}", fig, 3)
    writer.text(f"introspect/x/{ODD_NAMES[9]}", "| a |\n|---|\n| 1 |", 3)
    sw.close()
    events = read_events(str(tmp_path))
    assert set(events["scalars"]) == {sanitize_tag(t) for t in tags.values()}
    for i, tag in enumerate(tags.values()):
        assert events["scalars"][sanitize_tag(tag)] == [(3, float(i))]
    assert set(events["histograms"]) == {sanitize_tag(f"introspect/weights/{LONG}")}
    assert set(events["images"]) == {
        sanitize_tag(f"introspect/attributions/{ODD_NAMES[2]}"),
        sanitize_tag(f"introspect/x/{ODD_NAMES[4]}"),
    }
    layout = "custom_scalars__config__"  # the chart layout of the scalars (a tensor event, not text)
    assert set(events["text"]) == {sanitize_tag(f"introspect/x/{ODD_NAMES[9]}") + "/text_summary", layout}
    written = [*events["scalars"], *events["histograms"], *events["images"], *(t for t in events["text"] if t != layout)]
    assert all(all(_TAG_COMPONENT.fullmatch(p) for p in tag.split("/")) for tag in written)


def test_odd_tags_become_files_inside_the_root(tmp_path: Any) -> None:
    root = tmp_path / "logs"
    writer = FileWriter(root)
    for name in ODD_NAMES:
        writer.text(f"introspect/x/{name}", "hello", 3)
        writer.histogram(f"introspect/h/{name}", [1, 2], [0.0, 1.0, 2.0], 3)
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert len(files) == 2 * len(ODD_NAMES)  # nothing overwritten: every name has its own file
    assert all(os.path.commonpath([str(root), p]) == str(root) for p in files)
    assert all(len(part.encode()) <= 255 for p in files for part in p.split(os.sep))
    for name in ODD_NAMES:
        assert (root / sanitize_tag(f"introspect/x/{name}") / "00000003.md").read_text() == "hello"


def test_markdown_cell_keeps_a_table_intact() -> None:
    import markdown

    names = ["cat|dog", "two\nlines", "*bold*", "<b>html</b>", "a_b_c", "[link](x)", "`code`", "&amp;", "back\\slash"]
    table = "| name | n |\n|---|---|\n" + "".join(f"| {markdown_cell(n)} | {i} |\n" for i, n in enumerate(names))
    html = markdown.markdown(table, extensions=["tables"])
    rows = re.findall(r"<tr>(.*?)</tr>", html, flags=re.S)[1:]
    assert len(rows) == len(names)
    for i, (name, row) in enumerate(zip(names, rows)):
        cells = re.findall(r"<td>(.*?)</td>", row, flags=re.S)
        assert len(cells) == 2 and cells[1] == str(i), (name, row)
        assert "<b>" not in cells[0] and "<em>" not in cells[0] and "<strong>" not in cells[0] and "<a " not in cells[0]
        assert "<code>" not in cells[0], (name, cells[0])
    assert markdown_cell("x" * 50, max_chars=10) == "x" * 9 + "…"


# --------------------------------------------------------------------------------- public API only
def test_tensorboard_writer_uses_only_public_summary_writer_methods(tmp_path: Any) -> None:
    """Every write goes through a public ``SummaryWriter`` method (no private attribute, no file writer)."""
    import matplotlib.pyplot as plt

    sw = _summary_writer(tmp_path)
    calls: list[str] = []

    class Recording:
        def __getattr__(self, name: str) -> Any:
            assert not name.startswith("_") and name != "file_writer", f"TensorBoardWriter used {name}"
            calls.append(name)
            return getattr(sw, name)

    writer = TensorBoardWriter(Recording())  # type: ignore[arg-type]
    with writer.batch():
        writer.scalars({"introspect/t/s": 1.0}, 1)
        writer.histograms({"introspect/t/h": ([1.0, 2.0], [0.0, 1.0, 2.0], {})}, 1)
        writer.image("introspect/t/img", np.zeros((4, 4, 3), dtype=np.uint8), 1)
        fig, ax = plt.subplots()
        writer.figure("introspect/t/fig", fig, 1)
        writer.text("introspect/t/md", "x", 1)
    writer.register_layout({"t": ()})
    sw.close()
    assert set(calls) <= {
        "get_logdir", "add_scalar", "add_histogram_raw", "add_image", "add_figure", "add_text",
        "add_custom_scalars", "flush",
    }
    assert calls.count("flush") == 2  # the batch's one, the layout's one
    assert not plt.get_fignums()


def _layouts(log_dir: Any) -> list[Any]:
    """Every custom-scalars layout written under ``log_dir``, in order (TensorBoard shows the last)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    if "custom_scalars__config__" not in acc.Tags()["tensors"]:
        return []
    out = []
    for event in acc.Tensors("custom_scalars__config__"):
        layout = layout_pb2.Layout()
        layout.ParseFromString(event.tensor_proto.string_val[0])
        out.append(layout)
    return out


def test_the_layout_is_written_when_a_chart_opens_and_shared_by_the_writers_of_a_summary_writer(tmp_path: Any) -> None:
    sw = _summary_writer(tmp_path)
    first, second = TensorBoardWriter(sw), TensorBoardWriter(sw)  # two callbacks' writers of one run
    first.register_layout({"weights": {}, "odd/name\n": {}})
    first.scalars({"introspect/weights/drift/a": 1.0, "introspect/weights/drift/b": 2.0}, 1)
    second.scalars({"introspect/weights/drift/a": 1.5}, 2)  # no new chart: no new layout
    second.scalars({"introspect/weights/drift/c": 1.5}, 2)  # a new series of a known chart: none either
    second.scalars({"introspect/per_class/recall/cat": 0.5}, 2)  # a new chart: the layout again, with both
    sw.close()
    layouts = _layouts(tmp_path)
    assert len(layouts) == 2
    charts = {(c.title, chart.title): list(chart.multiline.tag) for c in layouts[-1].category for chart in c.chart}
    assert charts == {
        ("introspect/weights", "drift"): [r"^introspect/weights/drift/[^/]+$"],
        ("introspect/per_class", "recall"): [r"^introspect/per_class/recall/[^/]+$"],
    }


def test_a_chart_whose_pattern_would_catch_another_charts_tags_lists_its_own() -> None:
    layout = adapter.ScalarLayout()
    layout.declare({"probes": {"accuracy per layer": r"[^/]+/accuracy"}})
    layout.add(["introspect/probes/a/accuracy", "introspect/probes/b/accuracy", "introspect/probes/a/other"])
    charts = layout.as_dict()["introspect/probes"]
    assert charts["accuracy per layer"] == ["Multiline", [r"^introspect/probes/(?:[^/]+/accuracy)$"]]
    # `introspect/probes/a/[^/]+` would also match a's accuracy: the chart of `a` lists its one tag instead
    assert charts["a"] == ["Multiline", [r"^(?:introspect/probes/a/other)$"]]
    # declared later, a chart takes the tags already seen that it matches
    assert layout.declare({"probes": {"other per layer": r"[^/]+/other"}})
    assert set(layout.as_dict()["introspect/probes"]) == {"accuracy per layer", "other per layer"}


# ----------------------------------------------------------------------------------- batching, errors
def test_a_batch_flushes_once_at_its_end_and_leaves_nothing_pending(tmp_path: Any) -> None:
    sw = _summary_writer(tmp_path)
    writer = TensorBoardWriter(sw)
    flushes: list[int] = []
    original = sw.flush
    sw.flush = lambda: (flushes.append(1), original())  # type: ignore[method-assign]
    with writer.batch():
        for i in range(20):
            writer.histogram(f"introspect/t/h{i}", [i, 1.0], [0.0, 1.0, 2.0], 3)
        with writer.batch():
            writer.scalar("introspect/t/s", 2.0, 3)
        assert flushes == []
    assert flushes == [1]
    # everything is on disk now, before the SummaryWriter closes: nothing left for its thread to write later
    events = read_events(str(tmp_path))
    assert len(events["histograms"]) == 20 and events["scalars"]["introspect/t/s"] == [(3, 2.0)]
    writer.scalar("introspect/t/s", 3.0, 4)  # outside a batch: flushed by the call itself
    assert flushes == [1, 1] and read_events(str(tmp_path))["scalars"]["introspect/t/s"] == [(3, 2.0), (4, 3.0)]
    with pytest.raises(RuntimeError, match="boom"), writer.batch():
        writer.scalar("introspect/t/s", 5.0, 5)
        raise RuntimeError("boom")
    assert flushes == [1, 1, 1]  # what a failing call wrote still goes out now
    sw.close()


def _break_directory(path: Any) -> None:
    """Replace a directory by a plain file: every later open() under it fails (also for root)."""
    shutil.rmtree(path)
    path.write_text("not a directory")


def test_tensorboard_write_errors_raise_inside_the_call(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # TensorBoard's writer thread dies with the error (and reports it to threading.excepthook) before the
    # call re-raises it: collect those reports here, and wait for the threads below, so none leaks out.
    thread_errors: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    before = set(threading.enumerate())
    run = tmp_path / "run"
    sw = _summary_writer(run)
    writer = TensorBoardWriter(sw)
    writer.scalar("introspect/t/s", 1.0, 1)
    _break_directory(run)
    with pytest.raises(OSError):
        writer.scalar("introspect/t/s", 2.0, 2)  # outside a batch: the call's own flush reports it
    sw2 = _summary_writer(tmp_path / "run2")
    writer2 = TensorBoardWriter(sw2)
    writer2.scalar("introspect/t/s", 1.0, 1)
    _break_directory(tmp_path / "run2")
    with pytest.raises(OSError), writer2.batch():  # inside a batch: at the latest when the batch ends
        writer2.histogram("introspect/t/h", [1.0], [0.0, 1.0], 2)
        writer2.scalar("introspect/t/s", 2.0, 2)
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=10)
    assert all(issubclass(e.exc_type, OSError) for e in thread_errors)


def test_file_writer_errors_raise_inside_the_call(tmp_path: Any) -> None:
    root = tmp_path / "root"
    writer = FileWriter(root)
    writer.scalar("introspect/t/s", 1.0, 1)
    _break_directory(root)
    for write in (
        lambda: writer.scalar("introspect/t/s", 2.0, 2),
        lambda: writer.text("introspect/t/md", "x", 2),
        lambda: writer.image("introspect/t/img", np.zeros((4, 4, 3), dtype=np.uint8), 2),
        lambda: writer.histogram("introspect/t/h", [1.0], [0.0, 1.0], 2),
    ):
        with pytest.raises(OSError):
            write()


# ------------------------------------------------------------------------------------------- fits
class _Model(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 4, generator=g), torch.randint(0, 3, (48,), generator=g)
    return DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16), DataLoader(TensorDataset(x[32:], y[32:]), batch_size=16)


def test_a_fit_with_odd_class_names_logs_their_sanitised_tags(tmp_path: Any) -> None:
    from lightning_introspect import PerClassMetrics, WeightHistograms

    names = [LONG, "pipe|star*", "cat/dog"]
    per_class = PerClassMetrics(num_classes=3, class_names=names, on_error="raise")
    weights = WeightHistograms(on_error="raise")
    pl.seed_everything(0, verbose=False)
    quick_trainer(tmp_path, [per_class, weights], epochs=1).fit(_Model(), *_loaders())
    events = read_events(str(tmp_path))
    written = [*events["scalars"], *events["histograms"], *events["images"], *events["text"]]
    assert written and all(t == sanitize_tag(t) for t in written)  # only sanitised tags reach the file
    per_class_tags = [t for t in events["scalars"] if t.startswith("introspect/per_class/")]
    for name in names[:2]:
        assert any(sanitize_component(name) in t.split("/") for t in per_class_tags), name
    assert len({t.rsplit("/", 1)[0] for t in per_class_tags if t.startswith("introspect/per_class/f1/")}) == 1
    # a callback holding a TensorBoard writer deep-copies and pickles after the fit, with its results
    for cb in (per_class, weights):
        for clone in (copy.deepcopy(cb), pickle.loads(pickle.dumps(cb))):
            assert clone.summary_lines() == cb.summary_lines()


def test_writers_pickle_and_find_their_experiment_again(tmp_path: Any) -> None:
    trainer = quick_trainer(tmp_path, [], epochs=1)
    trainer.fit(_Model(), *_loaders())
    writer = writer_for(trainer)
    assert isinstance(writer, TensorBoardWriter)
    writer.scalar("introspect/t/before", 1.0, 1)
    for clone in (copy.deepcopy(writer), pickle.loads(pickle.dumps(writer))):
        assert clone.__dict__["_experiment"] is None  # no threads, locks or files travel
        clone.scalar("introspect/t/after", 2.0, 2)  # resolved again through the logger
    bare = TensorBoardWriter(_summary_writer(tmp_path / "bare"))
    bare.scalar("introspect/t/x", 1.0, 1)
    copy.deepcopy(bare).scalar("introspect/t/y", 2.0, 2)
    bare.experiment.close()
    files = pickle.loads(pickle.dumps(FileWriter(tmp_path / "files")))
    files.text("introspect/t/note", "after pickling", 3)  # an unpickled file writer still writes
    assert os.path.isfile(os.path.join(tmp_path, "files", "introspect", "t", "note", "00000003.md"))
    pickle.loads(pickle.dumps(NullWriter())).scalar("introspect/t/none", 1.0, 1)
    trainer.loggers[0].experiment.close()
    events = read_events(str(tmp_path / "run"))
    assert events["scalars"]["introspect/t/after"] == [(2, 2.0), (2, 2.0)]
    assert set(read_events(str(tmp_path / "bare"))["scalars"]) == {"introspect/t/x", "introspect/t/y"}


def test_without_a_logger_each_fit_gets_its_own_version_directory(tmp_path: Any) -> None:
    from lightning_introspect import WeightHistograms

    roots = []
    for run in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = quick_trainer(tmp_path, [WeightHistograms(on_error="raise")], epochs=1, logger=False)
            trainer.fit(_Model(), *_loaders())
        messages = [str(w.message) for w in caught if "no TensorBoardLogger" in str(w.message)]
        assert len(messages) == 1, messages
        root = tmp_path / adapter.FALLBACK_DIR / f"version_{run}"
        assert str(root) in messages[0]
        roots.append(root)
    for root in roots:
        files = [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs]
        assert "scalars.csv" in files and any(f.endswith(".json") for f in files)
        assert all("introspect/introspect" not in f.replace(os.sep, "/") for f in files)
        rows = (root / "scalars.csv").read_text().splitlines()
        assert rows[0] == "tag,step,value" and rows.count("tag,step,value") == 1  # one run per file
    first, second = ((r / "scalars.csv").read_text() for r in roots)
    assert first.count("introspect/weights/seconds") == second.count("introspect/weights/seconds")


def test_new_version_dir_counts_up(tmp_path: Any) -> None:
    (tmp_path / "version_3").mkdir()
    (tmp_path / "version_x").mkdir()
    assert adapter.new_version_dir(tmp_path) == str(tmp_path / "version_4")
    assert adapter.new_version_dir(tmp_path) == str(tmp_path / "version_5")


class _BreakLogDir(pl.Callback):
    """Makes the run's log directory unwritable during epoch 0's validation, and writable again after it."""

    def __init__(self) -> None:
        self.broken = False

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch == 0:
            _break_directory(pathlib.Path(trainer.loggers[0].log_dir))
            self.broken = True

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.broken:
            path = pathlib.Path(trainer.loggers[0].log_dir)
            path.unlink()
            path.mkdir()
            self.broken = False


def test_a_failed_tensorboard_write_does_not_end_the_fit_later(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write of ours that fails is reported in its call (the callback disables itself with a warning);
    the SummaryWriter it shared with Lightning keeps working, and the fit ends normally."""
    from lightning_introspect import WeightHistograms
    from lightning_introspect.callbacks.base import IntrospectionFailureWarning

    thread_errors: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    weights = WeightHistograms(on_error="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quick_trainer(tmp_path, [_BreakLogDir(), weights], epochs=3)
        trainer.fit(_Model(), *_loaders())  # must not raise, neither during the fit nor at its teardown
    failures = [w for w in caught if issubclass(w.category, IntrospectionFailureWarning)]
    assert weights.disabled and len(failures) == 1 and "Not a directory" in str(failures[0].message)
    writer = writer_for(trainer)
    writer.scalar("introspect/t/after", 1.0, 9)  # the logger's SummaryWriter still writes
    trainer.loggers[0].experiment.close()
    assert read_events(str(tmp_path / "run"))["scalars"]["introspect/t/after"] == [(9, 1.0)]
