"""The full callback set under mixed precision: every callback runs (``on_error="raise"``) and writes its
tags, read back from the TensorBoard event files. Attribution and the other gradient methods run in fp32
outside autocast, so their maps are fp32 and finite.

The same test runs with ``bf16-mixed`` on the CPU (always) and, marked ``gpu``, with ``bf16-mixed`` and
``16-mixed`` on a CUDA device (``pytest -m gpu`` on a machine with one): the model trains on the GPU, the
callbacks compute there, and what they keep (results and checkpoint state) is on the CPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_introspect._lightning import pl
from lightning_introspect.config import introspection_callbacks
from lightning_introspect.demo import DigitsCNN, DigitsDataModule, demo_config
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
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32, limit=64, seed=0)
    dm.setup("fit")
    callbacks = introspection_callbacks(demo_config(fast=True, mean=dm.mean, std=dm.std), budget=False)
    for cb in callbacks:
        cb.on_error = "raise"
        if hasattr(cb, "progress"):
            cb.progress = False
    model = DigitsCNN()
    trainer = quick_trainer(tmp_path, callbacks, epochs=2, precision=precision, accelerator=accelerator)
    trainer.fit(model, datamodule=dm)
    assert trainer.precision == precision and trainer.global_step == 4
    device = "cuda" if accelerator == "gpu" else "cpu"
    assert all(p.device.type == device for p in model.parameters())  # nothing moved the model

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
