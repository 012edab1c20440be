"""What a user sees: warnings reported at the user's own line (not at ours, not at Lightning's), and
without a logger, each fit in its own ``introspect_runs/version_<N>/`` directory, named by the warning.

Frames are compared by file name and line: the recorded warning's ``filename`` is this test file and its
``lineno`` is the line that made the call (``trainer.fit``, a constructor, ``introspection_callbacks``).
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from lightning_introspect import Attributions, FeatureVisualization, PerClassMetrics, WeightHistograms
from lightning_introspect._warnings import external_stacklevel, internal_prefixes
from lightning_introspect.config import introspection_callbacks
from lightning_introspect.errors import IntrospectionFailureWarning, IntrospectionSkipWarning
from lightning_introspect.loggers import adapter
from tests.helpers import quick_trainer
from tests.zoo import Classifier, blobs_dm, digits_dm, small_cnn

HERE = os.path.abspath(__file__)


def _line_of(marker: str) -> int:
    """The line of this file that holds ``marker`` (a comment next to the call a warning must point at)."""
    lines = inspect.getsource(inspect.getmodule(_line_of)).splitlines()  # type: ignore[arg-type]
    hits = [i + 1 for i, line in enumerate(lines) if line.rstrip().endswith(f"# <{marker}>")]
    assert len(hits) == 1, marker
    return hits[0]


def _recorded(caught: list[warnings.WarningMessage], category: type[Warning]) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, category)]


# ------------------------------------------------------------------------------ warnings at the user's line
def test_the_internal_prefixes_cover_us_and_lightning_but_not_this_file() -> None:
    import lightning_introspect
    from lightning_introspect._lightning import pl

    prefixes = internal_prefixes()
    assert os.path.dirname(os.path.abspath(lightning_introspect.__file__)).startswith(tuple(p.rstrip(os.sep) for p in prefixes))
    assert os.path.abspath(pl.__file__).startswith(prefixes)
    assert os.path.abspath(torch.__file__).startswith(prefixes)
    assert not HERE.startswith(prefixes)
    assert external_stacklevel() == 2  # called here: the caller of this test is pytest, outside


def test_a_skip_during_fit_points_at_the_users_fit_call(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3)))
    trainer = quick_trainer(tmp_path, [FeatureVisualization(on_error="raise")], epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=blobs_dm())  # <skip-fit>
    (skip,) = _recorded(caught, IntrospectionSkipWarning)
    assert "not images" in str(skip.message)
    assert (skip.filename, skip.lineno) == (HERE, _line_of("skip-fit"))


def test_a_failure_mid_fit_points_at_the_users_fit_call(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Any, trainer: Any) -> None:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(WeightHistograms, "_epoch_end", broken)
    torch.manual_seed(0)
    weights = WeightHistograms()
    trainer = quick_trainer(tmp_path, [weights], epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Classifier(small_cnn()), datamodule=digits_dm())  # <failure-fit>
    (failure,) = _recorded(caught, IntrospectionFailureWarning)
    assert weights.disabled and "broken on purpose" in str(failure.message)
    assert (failure.filename, failure.lineno) == (HERE, _line_of("failure-fit"))


def test_a_renamed_argument_points_at_the_users_constructor_call() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Attributions(layer="features.0")  # <renamed-direct>
        introspection_callbacks({"attributions": {"layer": "features.0"}}, budget=False)  # <renamed-config>
    renamed = [w for w in _recorded(caught, DeprecationWarning) if "`layer` is renamed to `cam_layer`" in str(w.message)]
    assert [(w.filename, w.lineno) for w in renamed] == [(HERE, _line_of("renamed-direct")), (HERE, _line_of("renamed-config"))]


# ------------------------------------------------------------------------------ no logger: versioned runs
def test_each_fit_of_one_trainer_without_a_logger_gets_its_own_version_directory(tmp_path: Any) -> None:
    """Two fits of the same Trainer (the second continues training), then a validate: version_0 holds the
    first fit, version_1 the second, nothing else is created, and each warning names where its files are."""
    torch.manual_seed(0)
    model, dm = Classifier(small_cnn()), digits_dm()
    callbacks = [WeightHistograms(on_error="raise"), PerClassMetrics(num_classes=10, on_error="raise")]
    trainer = quick_trainer(tmp_path, callbacks, epochs=1, logger=False)
    runs = tmp_path / adapter.FALLBACK_DIR
    messages = []
    for fit in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit_loop.max_epochs = fit + 1  # continue training for one more epoch
            trainer.fit(model, datamodule=dm)  # <fallback-fit>
        said = [w for w in caught if "no TensorBoardLogger" in str(w.message)]
        assert len(said) == 1, [str(w.message) for w in caught]
        assert (said[0].filename, said[0].lineno) == (HERE, _line_of("fallback-fit"))
        messages.append(str(said[0].message))
    trainer.validate(model, datamodule=dm)
    assert sorted(os.listdir(runs)) == ["version_0", "version_1"]
    steps = []
    for fit, message in enumerate(messages):
        root = runs / f"version_{fit}"
        assert message.endswith(f" under {root}."), message  # the directory the files are in, said truthfully
        files = [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for d, _, fs in os.walk(root) for f in fs]
        assert "scalars.csv" in files and any(f.startswith("introspect/weights/") for f in files)
        assert all(f == "scalars.csv" or f.startswith("introspect/") for f in files)
        assert not any("introspect/introspect" in f for f in files)
        rows = (root / "scalars.csv").read_text().splitlines()
        assert rows.count("tag,step,value") == 1
        steps.append({int(row.split(",")[1]) for row in rows[1:] if row.startswith("introspect/weights/drift/")})
    # each directory holds its own fit only: the second fit's drift steps are all later than the first's
    assert steps[0] and steps[1] and max(steps[0]) < min(steps[1])


# ------------------------------------------------------------------------------ custom-scalars layout
def _served_layout(log_dir: str) -> dict[str, Any]:
    """The layout TensorBoard's custom-scalars plugin serves for ``log_dir`` (its own code, no server)."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(log_dir)
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, log_dir)
    plugin = CustomScalarsPlugin(base_plugin.TBContext(logdir=log_dir, multiplexer=multiplexer, data_provider=provider))
    served = plugin.layout_impl(context.RequestContext(), "")
    return json.loads(served) if isinstance(served, str) else served


def test_the_custom_scalars_layout_has_one_chart_per_quantity(tmp_path: Any) -> None:
    """A fit with five callbacks: the layout TensorBoard serves places every scalar tag in exactly one chart,
    the tags of a chart differ in one component only (one quantity, its series the layers / classes /
    methods), and the charts a user looks for are there with exactly their tags."""
    import re

    from lightning_introspect import LinearProbes, Misclassifications, SanityChecks
    from tests.helpers import read_events

    torch.manual_seed(0)
    callbacks = [
        PerClassMetrics(num_classes=10, on_error="raise"),
        WeightHistograms(on_error="raise"),
        LinearProbes(on_error="raise"),
        Misclassifications(on_error="raise", at=[1.0], statistics=["noise"], perturbations=["noise"], num_samples=64, figures=False),
        SanityChecks(num_samples=2, methods=["saliency", "grad_cam"], repeats=1, progress=False, on_error="raise"),
    ]
    trainer = quick_trainer(tmp_path, callbacks, epochs=2)
    trainer.fit(Classifier(small_cnn()), datamodule=digits_dm())
    trainer.loggers[0].experiment.close()
    tags = sorted(t for t in read_events(str(tmp_path / "run"))["scalars"] if t.startswith("introspect/"))
    layout = _served_layout(str(tmp_path))
    charts = {
        (category["title"], chart["title"]): [t for t in tags if any(re.match(rx, t) for rx in chart["multiline"]["tag"])]
        for category in layout["category"]
        for chart in category["chart"]
    }
    placed = [t for members in charts.values() for t in members]
    assert sorted(placed) == tags  # every scalar tag in exactly one chart
    for key, members in charts.items():
        assert members, key  # no chart without data
        parts = [t.split("/") for t in members]
        assert len({len(p) for p in parts}) == 1, (key, members)
        varying = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
        assert len(varying) <= 1, (key, members)  # one quantity; its series differ in one place
    by_title = {title: members for (_, title), members in charts.items()}
    assert by_title["recall"] == [t for t in tags if t.startswith("introspect/per_class/recall/")]
    assert len(by_title["recall"]) == 10 and by_title["precision"] != by_title["recall"]
    assert by_title["drift"] == [t for t in tags if t.startswith("introspect/weights/drift/")]
    probe_accuracy = by_title["accuracy per layer"]
    assert probe_accuracy == [t for t in tags if t.startswith("introspect/probes/") and t.endswith("/accuracy")]
    assert len(probe_accuracy) >= 3  # the input baseline and the layers, in one chart
    assert by_title["score per method"] == ["introspect/sanity/grad_cam/score", "introspect/sanity/saliency/score"]
    assert {f"introspect/{name}/seconds" for name in ("per_class", "weights", "probes", "sanity")} <= set(by_title["seconds"])
    largest = max(len(members) for members in charts.values())
    assert largest <= max(len(by_title["seconds"]), 10)  # no chart of 40-60 mixed series
