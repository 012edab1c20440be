"""The LightningCLI example runs both ways: class_path callbacks, and an introspection YAML."""

from __future__ import annotations

import importlib.util
import os

import pytest

from lightning_introspect.config import IntrospectionConfig, introspection_callbacks
from tests.helpers import read_events

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(HERE, "examples")


def _load_cli():
    pytest.importorskip("jsonargparse")
    spec = importlib.util.spec_from_file_location("train_lightningcli", os.path.join(EXAMPLES, "train_lightningcli.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FAST = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.mark.slow
@pytest.mark.parametrize("with_introspection_yaml", [False, True])
def test_lightningcli_example(tmp_path, with_introspection_yaml):
    cli_module = _load_cli()
    args = ["fit", "--config", os.path.join(EXAMPLES, "config.yaml"), *FAST,
            f"--trainer.logger.init_args.save_dir={tmp_path}"]
    if with_introspection_yaml:
        args += ["--introspection", os.path.join(EXAMPLES, "introspection.yaml")]
    cli = cli_module.main(args)
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert {"PerClassMetrics", "WeightHistograms", "LinearProbes", "Attributions", "SanityChecks"} <= set(names)
    assert ("FeatureVisualization" in names) == with_introspection_yaml
    assert ("Misclassifications" in names) == with_introspection_yaml
    per_class = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "PerClassMetrics")
    assert "start" in per_class.snapshots and "end" in per_class.snapshots
    # every introspection callback of the run, from either source, worked and logged through the CLI's logger
    ours = [cb for cb in cli.trainer.callbacks if type(cb).__module__.startswith("lightning_introspect.")]
    assert len(ours) == (7 if with_introspection_yaml else 5) and not [cb.name for cb in ours if cb.disabled]
    scalars = read_events(cli.trainer.logger.log_dir)["scalars"]
    assert not [cb.name for cb in ours if f"introspect/{cb.name}/seconds" not in scalars]
    assert "introspect/per_class/recall/0" in scalars


def test_introspection_yaml_sections():
    cfg = IntrospectionConfig.from_yaml(os.path.join(EXAMPLES, "introspection.yaml"))
    assert cfg.sections["weight_histograms"].enabled is False
    names = [type(cb).__name__ for cb in introspection_callbacks(cfg)]
    assert names == ["Misclassifications", "FeatureVisualization"]


def test_config_rejects_unknown_option_and_lists_valid_ones():
    with pytest.raises(ValueError, match=r"(?s)Unknown option\(s\) \['bogus'\].*num_classes"):
        introspection_callbacks({"per_class_metrics": {"bogus": 1}})
    with pytest.raises(ValueError, match="`every_n_epochs`"):
        introspection_callbacks({"weight_histograms": {"every_n_epochs": 0}})
