"""Progress of long introspection work: a bar line where the trainer shows its bars, nothing without them."""

from __future__ import annotations

import types
import warnings
from typing import Any

import pytest

from lightning_introspect.callbacks import progress as progress_module
from lightning_introspect.callbacks.progress import IntrospectionProgress


class FakeRich:
    """The part of rich's ``Progress`` that Lightning's RichProgressBar exposes as ``.progress``."""

    def __init__(self) -> None:
        self.tasks: dict[int, dict[str, Any]] = {}
        self.removed: list[int] = []

    def add_task(self, description: str, total: Any = None) -> int:
        self.tasks[len(self.tasks)] = {"description": description, "total": total, "completed": 0}
        return len(self.tasks) - 1

    def update(self, task: int, advance: int = 0, description: str | None = None) -> None:
        self.tasks[task]["completed"] += advance
        if description is not None:
            self.tasks[task]["description"] = description

    def remove_task(self, task: int) -> None:
        self.removed.append(task)


def test_a_rich_bar_gets_a_task_that_advances_and_is_removed() -> None:
    rich = FakeRich()
    trainer = types.SimpleNamespace(progress_bar_callback=types.SimpleNamespace(is_enabled=True, progress=rich), is_global_zero=True)
    with IntrospectionProgress(trainer, "sanity checks", total=3) as bar:
        bar.update(message="layer 1")
        bar.update(2)
    assert rich.tasks[0]["total"] == 3 and rich.tasks[0]["completed"] == 3
    assert rich.tasks[0]["description"].startswith("introspection: sanity checks")
    assert rich.removed == [0]


@pytest.mark.parametrize("bar", [None, types.SimpleNamespace(is_enabled=False, progress=FakeRich())])
def test_without_an_enabled_bar_nothing_is_shown(bar: Any) -> None:
    trainer = types.SimpleNamespace(progress_bar_callback=bar, is_global_zero=True)
    with IntrospectionProgress(trainer, "x", total=2) as shown:
        shown.update(2)
    assert shown._tqdm is None and shown._rich is None and shown.count == 2
    if bar is not None:
        assert bar.progress.tasks == {}


def _bar(kind: str) -> Any:
    """The trainer's bar, named: Lightning's default is Rich when ``rich`` is installed, else TQDM."""
    from lightning_introspect._lightning import pl

    return {"tqdm": pl.callbacks.TQDMProgressBar, "rich": pl.callbacks.RichProgressBar}[kind]()


def _fit(tmp_path: Any, progress_bar: bool, kind: str = "tqdm") -> None:
    from lightning_introspect._lightning import Trainer, pl
    from lightning_introspect.callbacks.feature_visualization import FeatureVisualization
    from lightning_introspect.demo import DigitsCNN, DigitsDataModule

    pl.seed_everything(0, verbose=False)
    cb = FeatureVisualization(layers=["features.4"], num_channels=1, classes=[0], steps=2, at=None)
    trainer = Trainer(max_epochs=1, callbacks=[cb, *([_bar(kind)] if progress_bar else [])], logger=False, enable_checkpointing=False, enable_model_summary=False,
                      enable_progress_bar=progress_bar, limit_train_batches=2, limit_val_batches=1, default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(DigitsCNN(), datamodule=DigitsDataModule(limit=64))


def test_the_trainers_tqdm_bar_shows_an_introspection_line_and_nothing_without_it(tmp_path: Any, capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(progress_module, "DELAY", 0.0)  # show at once: the tiny run takes milliseconds
    _fit(tmp_path / "bar", True)
    shown = capsys.readouterr()
    assert "introspection: feature visualisation" in shown.out + shown.err
    _fit(tmp_path / "nobar", False)
    quiet = capsys.readouterr()
    assert "introspection:" not in quiet.out + quiet.err


def test_the_trainers_rich_bar_gets_an_introspection_task_while_the_work_runs(tmp_path: Any, monkeypatch: Any) -> None:
    rich_progress = pytest.importorskip("rich.progress")
    added: list[str] = []
    add_task = rich_progress.Progress.add_task

    def recording(self: Any, description: str, *args: Any, **kwargs: Any) -> Any:
        added.append(description)
        return add_task(self, description, *args, **kwargs)

    monkeypatch.setattr(rich_progress.Progress, "add_task", recording)
    _fit(tmp_path, True, kind="rich")
    assert any(d.startswith("introspection: feature visualisation") for d in added), added


def test_the_sanity_check_shows_its_steps_in_the_trainers_bar(tmp_path: Any, capsys: Any, monkeypatch: Any) -> None:
    from lightning_introspect._lightning import Trainer, pl
    from lightning_introspect.callbacks.sanity_checks import SanityChecks
    from lightning_introspect.demo import DigitsCNN, DigitsDataModule

    monkeypatch.setattr(progress_module, "DELAY", 0.0)
    pl.seed_everything(0, verbose=False)
    cb = SanityChecks(methods=["saliency"], num_samples=2, layers=1, repeats=1)
    trainer = Trainer(max_epochs=1, callbacks=[cb, _bar("tqdm")], logger=False, enable_checkpointing=False, enable_model_summary=False,
                      limit_train_batches=2, limit_val_batches=1, default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(DigitsCNN(), datamodule=DigitsDataModule(limit=64))
    shown = capsys.readouterr()
    assert cb.report is not None
    assert "introspection: sanity checks" in shown.out + shown.err and "[SanityChecks]" not in shown.out + shown.err
