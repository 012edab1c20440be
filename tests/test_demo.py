"""The README's first command: `lightning-introspect demo` (here with --fast) and what it logs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lightning_introspect.cli import main
from lightning_introspect.config import CALLBACKS
from tests.helpers import read_events


def test_demo_fast_writes_documented_tags(tmp_path, capsys):
    assert main(["demo", "--fast", "--epochs", "2", "--out", str(tmp_path), "--name", "t"]) == 0
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {tmp_path}" in out
    assert "What the introspection callbacks found" in out
    ev = read_events(str(tmp_path / "t"))
    assert "val_acc" in ev["scalars"]
    names = {tag.split("/")[1] for kind in ("scalars", "images", "histograms") for tag in ev[kind] if tag.startswith("introspect/")}
    from lightning_introspect.config import callback_class

    expected = {callback_class(section).name for section in CALLBACKS}
    assert expected <= names, f"callbacks that logged nothing: {expected - names}"


def test_cli_rejects_bad_epochs(capsys):
    assert main(["demo", "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err


def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "lightning_introspect.cli", "demo", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--accelerator" in res.stdout


def test_segmentation_demo_fast_logs_the_segmentation_analyses(tmp_path, capsys):
    assert main(["demo", "--task", "segmentation", "--fast", "--epochs", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "val_pixel_acc" in out and f"{tmp_path}" in out
    ev = read_events(str(tmp_path / "shapes"))
    tags = {tag for kind in ("scalars", "images", "histograms", "text") for tag in ev[kind]}
    from lightning_introspect.config import callback_class

    names = {tag.split("/")[1] for tag in tags if tag.startswith("introspect/")}
    expected = {callback_class(section).name for section in CALLBACKS}
    assert expected <= names, f"callbacks that logged nothing: {expected - names}"
    for wanted in (
        "introspect/per_class/mean_iou",
        "introspect/per_class/iou/disc",
        "introspect/attributions/localization/saliency/pointing_game",
        "introspect/attributions/localization/saliency/chance",
    ):
        assert wanted in tags, (wanted, sorted(t for t in tags if "seconds" not in t))
    assert any(t.startswith("introspect/misclassifications/segmentation/") for t in tags), sorted(tags)


@pytest.mark.parametrize("task", ["classification", "segmentation", "text", "vit"])
def test_every_demo_on_an_emulated_accelerator(tmp_path, monkeypatch, task):
    """Each demo's full callback set (attention rollout, token attributions and AttnLRP on the transformers,
    the segmentation analyses on the U-Net) with the model on an accelerator emulated on the CPU
    (:mod:`tests.emulated_device`): no analysis lost to a host / device mix-up in our code."""
    import warnings

    from lightning_introspect import _lightning
    from lightning_introspect.demo import run_demo
    from lightning_introspect.errors import IntrospectionFailureWarning
    from tests.emulated_device import emulated_accelerator, mixups

    fit = _lightning.Trainer.fit

    def emulated_fit(trainer, *args, **kwargs):
        with emulated_accelerator(trainer, monkeypatch):
            return fit(trainer, *args, **kwargs)

    monkeypatch.setattr(_lightning.Trainer, "fit", emulated_fit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_demo(task=task, out=str(tmp_path), epochs=2, fast=True)
    problems = mixups(caught) + [str(w.message) for w in caught if issubclass(w.category, IntrospectionFailureWarning)]
    assert not problems, problems
    assert result["trainer"].state.finished
