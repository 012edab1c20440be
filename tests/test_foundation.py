"""The foundation: logger adapter, base callback, guards, config, layering rules."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import warnings
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect._lightning import LightningModule, pl
from lightning_introspect._torch import (
    eval_mode,
    fresh_input,
    gradients_on,
    hooks,
    introspection_mode,
    resolve_layers,
)
from lightning_introspect.callbacks.base import IntrospectionCallback, draw_samples, split_batch
from lightning_introspect.config import (
    CALLBACKS,
    IntrospectionConfig,
    callback_class,
    introspection_callbacks,
)
from lightning_introspect.loggers import FileWriter, TensorBoardWriter, safe_relative_path, writer_for
from tests.helpers import quick_trainer, read_events


# ------------------------------------------------------------------------------------ layering
def test_methods_never_import_lightning():
    code = (
        "import pkgutil, importlib, sys\n"
        "import lightning_introspect.methods as m\n"
        "for info in pkgutil.walk_packages(m.__path__, m.__name__ + '.'):\n"
        "    importlib.import_module(info.name)\n"
        "import lightning_introspect.render, lightning_introspect._torch\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('pytorch_lightning', 'lightning'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ------------------------------------------------------------------------------------ guards
def test_eval_mode_restores_each_flag_also_on_error():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    net[1].eval()
    with pytest.raises(RuntimeError), eval_mode(net):
        assert not any(m.training for m in net.modules())
        raise RuntimeError("boom")
    assert [m.training for m in net.modules()] == [True, True, False, True]


def test_hooks_removed_when_block_raises():
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError), hooks() as handles:
        handles.append(net.register_forward_hook(lambda *a: None))
        raise ValueError
    assert not net._forward_hooks


def test_gradients_inside_inference_mode_and_rng_untouched():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    before = torch.get_rng_state()
    with torch.inference_mode():
        x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
        with introspection_mode(net):
            xi = fresh_input(x)
            (g,) = torch.autograd.grad(net(xi).sum(), xi)
            torch.rand(3)  # a draw inside the forked RNG must not leak out
    assert g.shape == (2, 3) and torch.isfinite(g).all()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.grad is None for p in net.parameters())


def test_gradients_on_disables_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16), gradients_on("cpu"):
        y = nn.Linear(2, 2)(torch.ones(1, 2))
    assert y.dtype == torch.float32


def test_resolve_layers_globs_and_errors():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Sequential(nn.Linear(2, 2)))
    assert list(resolve_layers(net, "2.*")) == ["2.0"]
    assert list(resolve_layers(net, ["0", "2.0"])) == ["0", "2.0"]
    with pytest.raises(ValueError, match=r"`layers`.*'2\.0'"):
        resolve_layers(net, "2.1")
    with pytest.raises(ValueError, match="pattern"):
        resolve_layers(net, "features.*")


# ------------------------------------------------------------------------------------ loggers
@pytest.mark.parametrize("tag", ["../../escape", "/etc/passwd", "a/../../b", "..", "introspect/ok/tag name"])
def test_file_writer_never_leaves_root(tmp_path, tag):
    root = tmp_path / "logs"
    writer = FileWriter(root)
    writer.text(tag, "hello", 3)
    written = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert written and all(os.path.commonpath([str(root), p]) == str(root) for p in written)
    assert ".." not in safe_relative_path(tag).split("/")


def test_file_writer_formats(tmp_path):
    writer = FileWriter(tmp_path)
    writer.image("introspect/x/img", torch.rand(3, 8, 8), 1)
    writer.image("introspect/x/hwc", np.zeros((8, 8, 3), dtype=np.uint8), 1)
    writer.histogram("introspect/x/h", [1, 2, 3], [0.0, 1.0, 2.0, 3.0], 2)
    writer.scalar("introspect/x/s", 0.5, 4)
    assert (tmp_path / "introspect/x/img/00000001.png").exists()
    assert (tmp_path / "introspect/x/h/00000002.json").exists()
    assert "introspect/x/s,4,0.5" in (tmp_path / "scalars.csv").read_text()


def test_tensorboard_writer_round_trip(tmp_path):
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    sw = SummaryWriter(str(tmp_path))
    writer = TensorBoardWriter(sw)
    writer.scalar("introspect/t/s", 1.5, 7)
    writer.image("introspect/t/img", torch.rand(1, 8, 8), 7)
    writer.image_grid("introspect/t/grid", torch.rand(4, 3, 8, 8), 7, nrow=2)
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    writer.figure("introspect/t/fig", fig, 7)
    writer.histogram("introspect/t/h", [1, 0, 3], [0.0, 1.0, 2.0, 3.0], 7)
    writer.text("introspect/t/md", "| a |\n|---|\n| 1 |", 7)
    writer.register_layout({"t": ()})
    sw.close()
    ev = read_events(str(tmp_path))
    assert ev["scalars"]["introspect/t/s"] == [(7, 1.5)]
    assert {"introspect/t/img", "introspect/t/grid", "introspect/t/fig"} <= set(ev["images"])
    (step, buckets), = ev["histograms"]["introspect/t/h"]
    assert step == 7 and list(buckets) == [1.0, 0.0, 3.0]
    assert "introspect/t/md/text_summary" in ev["text"]


def test_batched_histograms_are_one_event_and_one_flush(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    sw = SummaryWriter(str(tmp_path))
    writer = TensorBoardWriter(sw)
    flushes = []
    sw.flush = lambda: flushes.append(1)
    with writer.batch():
        for i in range(20):
            writer.histogram(f"introspect/t/h{i}", [i, 1.0], [0.0, 1.0, 2.0], 3)
        with writer.batch():
            writer.histogram("introspect/t/nested", [1.0], [0.0, 1.0], 3)
    assert len(flushes) == 1
    del sw.flush
    sw.close()
    ev = read_events(str(tmp_path))
    assert len(ev["histograms"]) == 21 and ev["histograms"]["introspect/t/h7"] == [(3, [7.0, 1.0])]


def test_histogram_edges_must_match_counts(tmp_path):
    with pytest.raises(ValueError, match="edges"):
        FileWriter(tmp_path).histogram("t", [1, 2], [0.0, 1.0], 0)


# ------------------------------------------------------------------------------------ base callback
class _Model(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, idx):
        x, y = batch
        return self(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loaders(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long()
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True), torch.utils.data.DataLoader(ds, batch_size=16)


class _Recorder(IntrospectionCallback):
    name = "recorder"

    def __init__(self, *, fail_at: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.fail_at = fail_at
        self.ran: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module):
        if self.active(trainer) and self.is_scheduled(trainer):
            self.run(trainer, self._work, trainer, pl_module)

    def _work(self, trainer, pl_module):
        if trainer.current_epoch == self.fail_at:
            raise RuntimeError("introspection exploded")
        x, _ = self.fixed_samples(trainer)
        self.ran.append(trainer.current_epoch)
        assert x.shape[0] == self.num_samples


def test_schedule_every_n_and_fractions(tmp_path):
    cb = _Recorder(every_n_epochs=3, at=(0.5,), num_samples=4)
    train, val = _loaders()
    quick_trainer(tmp_path, [cb], epochs=7).fit(_Model(), train, val)
    # every 3rd epoch (2, 5), the 0.5 fraction (epoch 3) and the last epoch (6)
    assert cb.ran == [2, 3, 5, 6]
    ev = read_events(str(tmp_path))
    assert len(ev["scalars"]["introspect/recorder/seconds"]) == 4


def test_fraction_epochs_from_max_steps(tmp_path):
    cb = _Recorder(every_n_epochs=None, at=(0.0, 0.5, 1.0))
    trainer = quick_trainer(tmp_path, [cb], epochs=None, max_steps=8)
    train, val = _loaders()
    trainer.fit(_Model(), train, val)  # 4 batches an epoch -> 2 epochs
    assert cb.fraction_epochs(trainer) == {0.0: -1, 0.5: 0, 1.0: 1}
    assert cb.ran == [0, 1]


def test_on_error_warn_disables_and_training_continues(tmp_path):
    cb = _Recorder(fail_at=1, num_samples=4)
    train, val = _loaders()
    with pytest.warns(UserWarning, match="(?s)_Recorder failed.*introspection exploded"):
        trainer = quick_trainer(tmp_path, [cb], epochs=4)
        trainer.fit(_Model(), train, val)
    assert cb.ran == [0] and cb.disabled and trainer.current_epoch == 4


def test_on_error_raise_surfaces_cause(tmp_path):
    cb = _Recorder(fail_at=0, on_error="raise")
    train, val = _loaders()
    with pytest.raises(RuntimeError, match="introspection exploded"):
        quick_trainer(tmp_path, [cb], epochs=2).fit(_Model(), train, val)


class _Cycles(IntrospectionCallback):
    """Each run leaves a reference cycle behind (as a matplotlib figure does) and records the collector's state."""

    name = "cycles"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.left: list[weakref.ref] = []
        self.collector_on: list[bool] = []
        self.freed: list[bool] = []

    def on_train_epoch_end(self, trainer, pl_module):
        if self.active(trainer):
            self.run(trainer, self._work)
            self.freed.append(self.left[-1]() is None)  # right after the run: nobody called gc.collect()

    def _work(self):
        self.collector_on.append(gc.isenabled())
        node: dict = {}
        node["self"] = node  # unreachable after the run; only the cyclic collector can free it
        self.left.append(weakref.ref(_Cell(node)))


class _Cell:
    def __init__(self, node):
        self.node, node["cell"] = node, self


def test_a_run_pauses_the_collector_and_frees_its_cycles_young(tmp_path):
    """Inside a run the cyclic collector is paused (no full collection of the user's process can start
    there); when the run returns, one young collection has freed what it left unreachable, and the
    collector is on again. A collector the user switched off stays off."""
    cb = _Cycles()
    train, val = _loaders()
    quick_trainer(tmp_path, [cb], epochs=2).fit(_Model(), train, val)
    assert cb.collector_on == [False, False] and cb.freed == [True, True] and gc.isenabled()

    cb = _Cycles()
    gc.disable()
    try:
        quick_trainer(tmp_path, [cb], epochs=1).fit(_Model(), train, val)
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_epochs": 0}, "`every_n_epochs` to be a positive int or None, but got 0"),
        ({"on_error": "ignore"}, "`on_error` to be one of 'warn', 'raise'"),
        ({"at": (1.5,)}, "`at`"),
        ({"num_samples": -1}, "`num_samples`"),
    ],
)
def test_base_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _Recorder(**kwargs)


def test_fixed_samples_private_rng_and_state_round_trip(tmp_path):
    train, val = _loaders()
    before = torch.get_rng_state()
    x1, y1 = draw_samples(val, 5, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    x2, _ = draw_samples(val, 5, seed=3)
    assert torch.equal(x1, x2) and y1.shape == (5,)
    per_class_x, per_class_y = draw_samples(val, 4, seed=3, per_class=2)
    assert sorted(per_class_y.tolist()) == [0, 0, 1, 1]
    cb = _Recorder(num_samples=5)
    cb._samples = (x1, y1)
    state = cb.state_dict()
    other = _Recorder(num_samples=5)
    other.load_state_dict(state)
    assert torch.equal(other._samples[0], x1)
    path = tmp_path / "state.pt"
    torch.save(state, path)
    from_file = _Recorder(num_samples=5)
    from_file.load_state_dict(torch.load(path, weights_only=True))  # plain data: loads without pickled code
    assert torch.equal(from_file._samples[0], x1) and torch.equal(from_file._samples[1], y1)


def test_fixed_samples_of_large_inputs_are_capped_by_memory_unless_num_samples_is_given():
    """A sample set of large inputs would hold hundreds of MB all fit long (and in every checkpoint): unless
    `num_samples` is given, the random items' inputs hold at most the memory budget, never below 8 items, and
    are the first items of the uncapped draw; `per_class` and iterable datasets follow the same rules."""
    from lightning_introspect.methods.chunks import DEFAULT_MEMORY_BUDGET

    images = torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(40) % 4
    val = DataLoader(TensorDataset(images, labels), batch_size=8)
    per_image = 3 * 16 * 16 * 4
    whole, _ = draw_samples(val, 30, seed=1)
    capped, capped_y = draw_samples(val, 30, seed=1, max_bytes=12 * per_image + 5)
    assert capped.shape[0] == 12 and torch.equal(capped, whole[:12]) and capped_y.shape == (12,)
    assert draw_samples(val, 30, seed=1, max_bytes=per_image)[0].shape[0] == 8  # the floor
    assert draw_samples(val, 5, seed=1, max_bytes=per_image)[0].shape[0] == 5  # never more than asked
    assert sorted(draw_samples(val, 30, seed=1, per_class=3, max_bytes=per_image)[1].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(images, labels))

    streamed, _ = draw_samples(DataLoader(Stream(), batch_size=8), 30, max_bytes=12 * per_image)
    assert torch.equal(streamed, images[:12])

    class Large(torch.utils.data.Dataset):  # 3x384x384 float32: 1.7 MB an image, made when read
        def __len__(self):
            return 300

        def __getitem__(self, i):
            return torch.full((3, 384, 384), float(i)), i % 4

    large = DataLoader(Large(), batch_size=16)
    trainer = SimpleNamespace(val_dataloaders=large)
    default = _Recorder(num_samples=256)
    default._given.pop("num_samples")  # as if left at its default
    x, _ = default.fixed_samples(trainer)
    assert x.shape[0] == DEFAULT_MEMORY_BUDGET // (3 * 384 * 384 * 4) == 56
    given = _Recorder(num_samples=100)  # given: the user's size wins
    assert given.fixed_samples(trainer)[0].shape[0] == 100


def test_fixed_sample_sets_of_a_fit_are_views_of_one_draw_equal_to_their_own_draws(tmp_path):
    """Attributions, FeatureVisualization, Misclassifications and SanityChecks explain the first items of the same
    permutation (same seed): one draw of the largest set serves them all, each a prefix equal to what it would
    have drawn alone, held once in memory and once in the checkpoint."""
    import io

    from lightning_introspect.callbacks.data import shared_samples
    from lightning_introspect.demo import DigitsCNN, DigitsDataModule
    from lightning_introspect.methods.chunks import DEFAULT_MEMORY_BUDGET

    dm = DigitsDataModule(batch_size=32, limit=64, seed=0)
    callbacks = introspection_callbacks({"per_class_metrics": {"enabled": False}, "linear_probes": {"enabled": False},
                                         "weight_histograms": {"enabled": False}}, budget=False)
    trainer = quick_trainer(tmp_path, callbacks, epochs=1)
    trainer.fit(DigitsCNN(), datamodule=dm)
    drawing = [cb for cb in callbacks if cb.draws_samples]
    assert sorted(type(cb).__name__ for cb in drawing) == ["Attributions", "FeatureVisualization", "Misclassifications", "SanityChecks"]
    loader = trainer.val_dataloaders
    storages = set()
    for cb in drawing:
        x, y = cb._samples
        alone_x, alone_y = draw_samples(loader, cb.num_samples, seed=cb.seed, max_bytes=DEFAULT_MEMORY_BUDGET)
        assert torch.equal(x, alone_x) and torch.equal(y, alone_y), type(cb).__name__
        storages.add(x.untyped_storage().data_ptr())
    assert len(storages) == 1
    largest = max(cb._samples[0].shape[0] for cb in drawing)
    one, many = io.BytesIO(), io.BytesIO()
    torch.save({cb.state_key: cb.state_dict() for cb in drawing}, one)  # as Lightning's checkpoint holds them
    torch.save([draw_samples(loader, cb.num_samples, seed=cb.seed, max_bytes=DEFAULT_MEMORY_BUDGET) for cb in drawing], many)
    assert one.tell() < many.tell() and largest == 64  # FeatureVisualization's 32 and the review's 256 of 64 items
    from lightning_introspect.callbacks import data as sample_data

    assert len(sample_data._SHARED) == 1
    drawing[0].setup(trainer, trainer.lightning_module, "fit")  # the next fit draws its own: nothing kept for it
    assert len(sample_data._SHARED) == 0

    # a later, larger request draws again (earlier sets keep theirs); `wanted` makes the first draw large enough
    data = DataLoader(TensorDataset(torch.randn(20, 3), torch.arange(20)))
    small = shared_samples(data, 4, seed=0, max_bytes=None)[0]
    large = shared_samples(data, 10, seed=0, max_bytes=None, wanted=[12])[0]
    assert torch.equal(large[:4], small) and large.untyped_storage().data_ptr() != small.untyped_storage().data_ptr()
    again = shared_samples(data, 12, seed=0, max_bytes=None)[0]
    assert again.untyped_storage().data_ptr() == large.untyped_storage().data_ptr() and again.shape[0] == 12
    rebuilt = DataLoader(data.dataset)  # a data module's next loader over the same dataset (a DDP rank at setup)
    assert shared_samples(rebuilt, 12, seed=0, max_bytes=None)[0].untyped_storage().data_ptr() == large.untyped_storage().data_ptr()
    assert not torch.equal(shared_samples(data, 4, seed=1, max_bytes=None)[0], small)  # another seed: its own draw


def test_split_batch_kinds():
    x, y = torch.zeros(2, 3), torch.ones(2)
    assert split_batch({"image": x, "label": y})[1] is y
    assert split_batch(x)[1] is None
    with pytest.raises(ValueError, match="dict batch"):
        split_batch({"foo": x})


def test_writer_selection(tmp_path):
    csv_logger = __import__(f"{pl.__name__}.loggers", fromlist=["CSVLogger"]).CSVLogger(str(tmp_path))
    cb = _Recorder(num_samples=4)
    train, val = _loaders()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quick_trainer(tmp_path, [cb], epochs=1, logger=csv_logger).fit(_Model(), train, val)
    assert any("no TensorBoardLogger" in str(w.message) for w in caught)
    metrics = next(p for p in tmp_path.rglob("metrics.csv"))
    assert "introspect/recorder/seconds" in metrics.read_text()
    trainer = quick_trainer(tmp_path / "none", [_Recorder(num_samples=4)], epochs=1, logger=False)
    trainer.fit(_Model(), train, val)
    assert isinstance(writer_for(trainer), FileWriter)
    assert list((tmp_path / "none").rglob("scalars.csv"))


# ------------------------------------------------------------------------------------ config
def test_config_errors_and_yaml(tmp_path):
    with pytest.raises(ValueError, match="Unknown config section"):
        IntrospectionConfig.from_dict({"no_such_callback": {}})
    path = tmp_path / "c.yaml"
    path.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="(?i)constructor|could not determine"):
        introspection_callbacks(str(path))
    path.write_text("{}\n")
    # an empty config switches every callback on, in the order of the sections
    assert [type(cb) for cb in introspection_callbacks(str(path))] == [callback_class(s) for s in CALLBACKS]
    path.write_text("attributions:\n  enabled: false\nweight_histograms: false\n")
    on = [type(cb) for cb in introspection_callbacks(str(path))]
    assert on == [callback_class(s) for s in CALLBACKS if s not in ("attributions", "weight_histograms")]


def test_public_names_resolve():
    import lightning_introspect
    import lightning_introspect.methods as methods

    for name in lightning_introspect.__all__:
        assert getattr(lightning_introspect, name) is not None
    for name in methods.__all__:
        assert getattr(methods, name) is not None, name
    for section in CALLBACKS:
        cls = callback_class(section)
        assert getattr(lightning_introspect, cls.__name__) is cls
        assert issubclass(cls, IntrospectionCallback)
    with pytest.raises(AttributeError):
        lightning_introspect.NoSuchThing  # noqa: B018


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_tensorboard_images_decode_to_the_written_pixels(tmp_path, channels):
    # our writer encodes the PNG itself (zlib level 1): TensorBoard must read back exactly the same pixels
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from lightning_introspect.loggers.adapter import TensorBoardWriter, to_uint8_hwc

    image = torch.rand(channels, 20, 30, generator=torch.Generator().manual_seed(channels))
    sw = SummaryWriter(str(tmp_path))
    TensorBoardWriter(sw).image("introspect/t/img", image, 7)
    sw.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    (event,) = acc.Images("introspect/t/img")
    expected = to_uint8_hwc(image)
    assert (event.step, event.height, event.width) == (7, 20, 30)
    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
    assert decoded.shape == expected.shape and np.array_equal(decoded, expected)


def test_scalars_inside_a_batch_are_written_in_order(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from lightning_introspect.loggers.adapter import TensorBoardWriter
    from tests.helpers import read_events

    sw = SummaryWriter(str(tmp_path))
    writer = TensorBoardWriter(sw)
    with writer.batch():
        writer.scalars({"introspect/t/a": 1.0, "introspect/t/b": 2.5}, 3)
        writer.scalar("introspect/t/a", 4.0, 5)
        writer.histogram("introspect/t/h", [1, 2], [0.0, 1.0, 2.0], 3)
    writer.scalar("introspect/t/b", 7.0, 6)  # outside a batch: written at once
    sw.close()
    events = read_events(str(tmp_path))
    assert events["scalars"]["introspect/t/a"] == [(3, 1.0), (5, 4.0)]
    assert events["scalars"]["introspect/t/b"] == [(3, 2.5), (6, 7.0)]
    assert [s for s, _ in events["histograms"]["introspect/t/h"]] == [3]

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (path,) = [p for p in tmp_path.iterdir() if p.name.startswith("events.out")]
    summaries = [
        e for e in EventFileLoader(str(path)).Load()
        if e.HasField("summary") and e.summary.value[0].tag != "custom_scalars__config__"  # the chart layout
    ]
    # one event per write (TensorBoard's public API), in the order written
    assert [(e.step, len(e.summary.value)) for e in summaries] == [(3, 1), (3, 1), (5, 1), (3, 1), (6, 1)]
