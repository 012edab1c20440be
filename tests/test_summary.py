"""``introspection_summary``: every callback's findings as text, skips and budget decisions included."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from lightning_introspect import introspection_summary
from lightning_introspect.callbacks.feature_visualization import FeatureVisualization
from lightning_introspect.callbacks.per_class_metrics import PerClassMetrics
from tests.helpers import quick_trainer
from tests.zoo import Classifier, blobs_dm


def test_the_summary_of_a_fit_names_each_callback_its_findings_and_its_skips(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3)))
    metrics, featviz = PerClassMetrics(num_classes=3), FeatureVisualization()
    trainer = quick_trainer(tmp_path, [metrics, featviz], epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=blobs_dm())
    lines = introspection_summary(trainer)
    assert lines == introspection_summary([metrics, featviz])  # a trainer or the callbacks: the same
    assert [line for line in lines if line.startswith("[PerClassMetrics] ")] == [f"[PerClassMetrics] {x}" for x in metrics.summary_lines()]
    assert featviz.skip_reason is not None  # tabular inputs: nothing to visualise as an image
    assert f"[FeatureVisualization] skipped: {featviz.skip_reason}" in lines
    assert not any(line.startswith("[ModelSummary]") for line in lines)
