"""The README's first command: `lightning-introspect demo` (here with --fast) and what it logs."""

from __future__ import annotations

import subprocess
import sys

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
