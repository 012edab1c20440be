"""The default callback set on ordinary models: every callback logs its documented tags or is skipped once, clearly.

For each model of :mod:`tests.zoo` (ResNet with a reused ReLU, U-Net, ViT, GRU and transformer text
classifiers, tabular MLP, dict / tuple outputs, validation steps returning the loss or ``preds``) a
2-epoch fit runs with ``introspection_callbacks({})`` -- nothing switched off, nothing tuned,
``on_error`` at its default -- and a TensorBoard logger. Checked, per callback:

* the fit completes (introspection never ends it);
* EITHER the callback's documented tags are in the event files (read back with TensorBoard's own
  ``EventAccumulator``) OR it emitted exactly one ``IntrospectionSkipWarning`` naming it, whose text
  ends with the callback's ``skip_reason``;
* no callback failed mid-fit (no ``IntrospectionFailureWarning``, no "failed and is disabled"): a
  contained crash is not a clear refusal.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any

import pytest

from lightning_introspect.callbacks.base import IntrospectionFailureWarning, IntrospectionSkipWarning
from lightning_introspect.config import introspection_callbacks
from tests.emulated_device import emulated_accelerator, mixups
from tests.helpers import quick_trainer, read_events
from tests.zoo import ZOO, ZooEntry

# Per callback, tags from its docstring that a run on a model it serves must write (regular expressions
# over tag names; text tags are stored by TensorBoard as ``<tag>/text_summary``).
DOCUMENTED_TAGS: dict[str, tuple[str, ...]] = {
    "PerClassMetrics": (r"introspect/per_class/recall/.+", r"introspect/per_class/table"),
    "Misclassifications": (r"introspect/misclassifications/error_rate/overall", r"introspect/misclassifications/top_wrong"),
    "WeightHistograms": (r"introspect/weights/drift/.+", r"introspect/weights/summary"),
    "LinearProbes": (r"introspect/probes/(?!input/).+/accuracy", r"introspect/probes/table"),
    "Attributions": (r"introspect/attributions/saliency",),
    "FeatureVisualization": (r"introspect/featviz/table", r"introspect/featviz/hf_fraction/.+"),
    "SanityChecks": (r"introspect/sanity/verdicts", r"introspect/sanity/.+/score"),
}
# What a segmentation model (the U-Net) must get on top: the segmentation analyses, not the classification ones.
SEGMENTATION_TAGS: dict[str, tuple[str, ...]] = {
    **DOCUMENTED_TAGS,
    "PerClassMetrics": (r"introspect/per_class/mean_iou", r"introspect/per_class/iou/.+", r"introspect/per_class/table"),
    "Misclassifications": (r"introspect/misclassifications/segmentation/miou", r"introspect/misclassifications/segmentation/worst"),
    "Attributions": (r"introspect/attributions/saliency", r"introspect/attributions/localization/.+/pointing_game"),
}


def all_tags(log_dir: str) -> set[str]:
    events = read_events(log_dir)
    return {tag for kind in ("scalars", "images", "histograms", "text") for tag in events[kind]}


def has_tag(tags: set[str], pattern: str) -> bool:
    return any(re.fullmatch(rf"{pattern}(/text_summary)?", tag) for tag in tags)


def fit_with_defaults(
    tmp_path: Any, entry: ZooEntry, emulate: pytest.MonkeyPatch | None = None
) -> tuple[Any, list[Any], list[warnings.WarningMessage]]:
    """A 2-epoch fit of ``entry`` with the default set; returns the trainer, the callbacks, every warning.
    With ``emulate``, on the accelerator of :mod:`tests.emulated_device`."""
    model, dm = entry.build()
    callbacks = introspection_callbacks({})
    assert len(callbacks) == len(DOCUMENTED_TAGS)
    trainer = quick_trainer(tmp_path, callbacks, epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with emulated_accelerator(trainer, emulate) if emulate is not None else contextlib.nullcontext():
            trainer.fit(model, datamodule=dm)
    return trainer, callbacks, list(caught)


def check_each_callback_logs_or_skips_once(
    log_dir: str, callbacks: list[Any], caught: list[warnings.WarningMessage], documented: dict[str, tuple[str, ...]] = DOCUMENTED_TAGS
) -> dict[str, str]:
    """The zoo contract; returns ``{callback: "logged" | "skipped: <reason>"}``."""
    failures = [str(w.message) for w in caught
                if issubclass(w.category, IntrospectionFailureWarning) or "failed and is disabled" in str(w.message)]
    assert not failures, "a callback crashed (contained) at default settings:\n" + "\n\n".join(failures)
    tags = all_tags(log_dir)
    outcome: dict[str, str] = {}
    problems = []
    for cb in callbacks:
        name = type(cb).__name__
        skips = [str(w.message) for w in caught
                 if issubclass(w.category, IntrospectionSkipWarning) and str(w.message).startswith(f"{name} is skipped")]
        if skips:
            if len(skips) != 1:
                problems.append(f"{name}: {len(skips)} skip warnings, expected one: {skips}")
            elif skips[0] != f"{name} is skipped for this fit: {cb.skip_reason}":
                problems.append(f"{name}: skip warning {skips[0]!r} does not end with skip_reason {cb.skip_reason!r}")
            outcome[name] = f"skipped: {cb.skip_reason}"
            continue
        missing = [p for p in documented[name] if not has_tag(tags, p)]
        if missing:
            problems.append(f"{name}: no skip warning and documented tags missing: {missing} (disabled={cb.disabled})")
        outcome[name] = "logged"
    assert not problems, "\n".join(problems) + f"\nlogged tags: {sorted(t for t in tags if not t.endswith('seconds'))}"
    return outcome


@pytest.mark.parametrize(
    "entry", [pytest.param(e, id=e.name, marks=[pytest.mark.slow] if e.slow else []) for e in ZOO]
)
def test_default_set_logs_its_tags_or_skips_once_on_every_zoo_model(tmp_path: Any, entry: ZooEntry) -> None:
    trainer, callbacks, caught = fit_with_defaults(tmp_path, entry)
    assert trainer.state.finished and trainer.current_epoch == 2
    documented = SEGMENTATION_TAGS if entry.task == "segmentation" else DOCUMENTED_TAGS
    outcome = check_each_callback_logs_or_skips_once(str(tmp_path), callbacks, caught, documented)
    if entry.task == "segmentation":  # every callback serves segmentation: none may skip
        assert set(outcome.values()) == {"logged"}, outcome
    # what every classifier of the zoo is served by, whatever its inputs
    for name in ("PerClassMetrics", "WeightHistograms"):
        assert outcome[name] == "logged", (name, outcome[name])
    if entry.inputs == "image":  # gradients w.r.t. float images exist: nothing image-related may skip
        assert outcome["Attributions"] == "logged", outcome["Attributions"]
    if entry.inputs == "tokens":  # token ids are explained at the embedding output, as coloured sentences (text)
        assert outcome["Attributions"] == "logged", outcome["Attributions"]
        assert "introspect/attributions/saliency/text_summary" in read_events(str(tmp_path))["text"]


@pytest.mark.parametrize("entry", [pytest.param(e, id=e.name) for e in ZOO if not e.slow])
def test_default_set_on_an_emulated_accelerator(tmp_path: Any, entry: ZooEntry, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zoo contract with the model on an accelerator (emulated on the CPU: our code mixing host and device tensors,
    or calling numpy on a device tensor, raises as on CUDA), and no analysis lost to such a mix-up."""
    trainer, callbacks, caught = fit_with_defaults(tmp_path, entry, emulate=monkeypatch)
    assert trainer.state.finished and trainer.current_epoch == 2
    found = mixups(caught)
    assert not found, found
    documented = SEGMENTATION_TAGS if entry.task == "segmentation" else DOCUMENTED_TAGS
    check_each_callback_logs_or_skips_once(str(tmp_path), callbacks, caught, documented)
