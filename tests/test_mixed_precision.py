"""The full callback set under mixed precision and on an accelerator: every callback runs (``on_error="raise"``)
and writes its tags, read back from the TensorBoard event files. Attribution and the other gradient methods run
in fp32 outside autocast, so their maps are fp32 and finite.

The same test runs with ``bf16-mixed`` on the CPU (always), on an accelerator emulated on the CPU (always:
:mod:`tests.emulated_device` makes every mix of host and device tensors in our code raise, as CUDA does) and,
marked ``gpu``, with ``bf16-mixed`` and ``16-mixed`` on a CUDA device (``pytest -m gpu`` on a machine with one):
the model trains on the device, the callbacks compute there, and what they keep (results and checkpoint state)
is on the CPU."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from lightning_introspect._lightning import pl
from lightning_introspect.config import introspection_callbacks
from lightning_introspect.demo import DigitsCNN, DigitsDataModule, demo_config
from tests.emulated_device import emulated_accelerator
from tests.helpers import quick_trainer, read_events

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("accelerator", "precision"),
    [
        ("cpu", "bf16-mixed"),
        pytest.param("gpu", "bf16-mixed", marks=[pytest.mark.gpu, CUDA]),
        pytest.param("gpu", "16-mixed", marks=[pytest.mark.gpu, CUDA]),
    ],
)
def test_full_set_with_mixed_precision(tmp_path: Any, accelerator: str, precision: str) -> None:
    _fit_and_check(tmp_path, accelerator, precision, device="cuda" if accelerator == "gpu" else "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_full_set_on_an_emulated_accelerator(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, precision: str) -> None:
    """What the CUDA run above checks, without a GPU: the two host / device mix-ups the first CUDA run of this
    test found (LinearProbes' layer search at ``setup``, where Lightning reports the device before it moves the
    weights; LRP on the per-class targets' host samples) fail here too when undone. (bf16-mixed: the CPU's
    autocast, so the device tensors' dtypes are as under mixed precision; CUDA's own kernels are not emulated.)"""
    _fit_and_check(tmp_path, "cpu", precision, device="cuda", emulate=monkeypatch)


class _DeviceSeen(pl.Callback):
    """Where the weights are at the end of training (Lightning moves them back to the CPU at teardown)."""

    def __init__(self) -> None:
        self.devices: set[str] = set()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.devices = {p.device.type for p in pl_module.parameters()}


def _fit_and_check(tmp_path: Any, accelerator: str, precision: str, *, device: str, emulate: pytest.MonkeyPatch | None = None) -> None:
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32, limit=64, seed=0)
    dm.setup("fit")
    callbacks = introspection_callbacks(demo_config(fast=True, mean=dm.mean, std=dm.std), budget=False)
    for cb in callbacks:
        cb.on_error = "raise"
        if hasattr(cb, "progress"):
            cb.progress = False
    model, seen = DigitsCNN(), _DeviceSeen()
    trainer = quick_trainer(tmp_path, [*callbacks, seen], epochs=2, precision=precision, accelerator=accelerator)
    with emulated_accelerator(trainer, emulate) if emulate is not None else contextlib.nullcontext():
        trainer.fit(model, datamodule=dm)
    assert trainer.precision == precision and trainer.global_step == 4
    assert seen.devices == {device}  # the model trained on the device, and no callback moved it

    cbs = {type(cb).__name__: cb for cb in callbacks}
    assert not any(cb.disabled for cb in callbacks)
    for method, maps in cbs["Attributions"].maps.items():
        assert maps.dtype == torch.float32 and torch.isfinite(maps).all() and maps.device.type == "cpu", method
    assert all(w.device.type == "cpu" for w in cbs["WeightHistograms"].initial.values())
    for cb in callbacks:  # checkpoint state is device-independent: it loads on a machine without a GPU
        assert all(t.device.type == "cpu" for t in _tensors(cb.state_dict())), type(cb).__name__
    assert cbs["SanityChecks"].report is not None and cbs["SanityChecks"].report.verdicts
    assert sorted(cbs["LinearProbes"].history, key=str) == [0, 1, "init", "input"]

    events = read_events(trainer.logger.log_dir)
    text = {tag.removesuffix("/text_summary") for tag in events["text"]}
    expected = {
        "scalars": [
            "introspect/per_class/recall/0",
            "introspect/misclassifications/error_rate/overall",
            "introspect/weights/drift/features.0",
            "introspect/probes/features.9/accuracy",
            "introspect/featviz/hf_fraction/all",
            "introspect/sanity/saliency/score",
            "introspect/attributions/seconds",
        ],
        "images": [
            "introspect/per_class/confusion",
            "introspect/misclassifications/gallery",
            "introspect/weights/drift_by_depth",
            "introspect/probes/accuracy_vs_depth",
            "introspect/attributions/grad_cam",
            "introspect/attributions/lrp",
            "introspect/featviz/class/0",
            "introspect/sanity/maps/bottom_up",  # the default order (top-down runs only its verdict steps)
        ],
        "histograms": ["introspect/weights/features.0", "introspect/weights/grad/features.0"],
    }
    for kind, tags in expected.items():
        missing = [t for t in tags if t not in events[kind]]
        assert not missing, f"{kind} missing: {missing}"
    assert {"introspect/per_class/table", "introspect/weights/summary", "introspect/sanity/verdicts"} <= text
    for tag, values in events["scalars"].items():
        if tag.startswith("introspect/") and not tag.startswith("introspect/weights/nonfinite"):
            assert all(v == v for _, v in values), f"NaN in {tag}"  # bf16 did not turn anything into NaN
