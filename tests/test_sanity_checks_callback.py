"""The SanityChecks callback: non-interference, tags written, on-demand check, errors, state, CLI types."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_introspect._lightning import pl
from lightning_introspect.callbacks.sanity_checks import SanityChecks
from lightning_introspect.demo import DigitsCNN, DigitsDataModule
from lightning_introspect.methods.explainers import DEFAULT_METHODS
from lightning_introspect.methods.sanity_report import SanityReport
from tests.helpers import quick_trainer, read_events

FAST = dict(methods=["saliency", "grad_cam"], num_samples=4, layers=2, repeats=1, progress=False, on_error="raise")


def _fit(tmp_path, callbacks, epochs=2):
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32, limit=96, seed=0)
    dm.setup("fit")
    model = DigitsCNN(width=8)
    trainer = quick_trainer(tmp_path, callbacks, epochs=epochs)
    trainer.fit(model, datamodule=dm)
    return model, trainer


@pytest.mark.slow
def test_fit_is_bitwise_unchanged_and_every_tag_is_written(tmp_path):
    plain, _ = _fit(tmp_path / "plain", [])
    rng_plain = torch.get_rng_state()
    cb = SanityChecks(mode="both", order="both", every_n_epochs=1, metrics=["spearman_abs", "ssim"], **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        watched, trainer = _fit(tmp_path / "watched", [cb])
    assert torch.equal(rng_plain, torch.get_rng_state()), "global torch RNG drifted"
    a, b = plain.state_dict(), watched.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"
    assert all(p.grad is None or torch.equal(p.grad, q.grad) for p, q in zip(plain.parameters(), watched.parameters()))
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in watched.modules())

    # once mid-fit (every_n_epochs=1, epoch 0) and once at fit end (not twice for the last epoch)
    assert [step for step, _ in cb.history] == [3, 6]
    report = cb.report
    assert isinstance(report, SanityReport) and report.layers == ["classifier", "features.8", "features.4", "features.0"]  # top-down's first two, bottom-up's
    assert set(report.verdicts) == {"saliency", "grad_cam"} and set(report.verdicts.values()) <= {"pass", "fail", "inconclusive"}
    assert set(report.class_sensitivity_verdicts) == {"saliency", "grad_cam"}
    assert set(report.details) == {"randomization", "bottom_up", "class_least", "class_second"}

    events = read_events(str(tmp_path / "watched"))
    scalars, images, text = events["scalars"], events["images"], events["text"]
    for method in ("saliency", "grad_cam"):
        for mode in ("cascading", "bottom_up", "independent"):
            for metric in ("spearman_abs", "spearman", "ssim"):  # spearman: needed by the verdict
                for layer in ("features.0", "features.4") if mode == "bottom_up" else ("classifier", "features.8"):
                    assert f"introspect/sanity/{method}/{metric}/{mode}/{layer}" in scalars
        for what in ("score", "score_low", "score_high", "threshold", "passed", "class_score", "class_passed", "class_threshold",
                     "class_second_score", "bottom_up_score", "bottom_up_passed", "emprt"):
            assert [s for s, _ in scalars[f"introspect/sanity/{method}/{what}"]] == [3, 6], what
        expected = {"pass": 1.0, "inconclusive": 0.5, "fail": 0.0}[report.verdicts[method]]
        assert scalars[f"introspect/sanity/{method}/passed"][-1][1] == expected
        detail = report.details["randomization"][method]
        assert scalars[f"introspect/sanity/{method}/score_low"][-1][1] == pytest.approx(detail.low, abs=1e-6)
        assert scalars[f"introspect/sanity/{method}/emprt"][-1][1] == pytest.approx(report.emprt[method]["score"], abs=1e-6)
    assert "introspect/sanity/seconds" in scalars
    for mode in ("cascading", "bottom_up", "independent"):
        assert images[f"introspect/sanity/maps/{mode}"] == [3, 6]
        for metric in ("spearman_abs", "ssim"):  # the metrics asked for
            assert images[f"introspect/sanity/curve/{mode}/{metric}"] == [3, 6]
        assert f"introspect/sanity/curve/{mode}/spearman" not in images
    assert images["introspect/sanity/class_maps"] == [3, 6]
    assert any(tag.startswith("introspect/sanity/verdicts") for tag in text)


def test_on_demand_check_leaves_the_model_untouched_and_round_trips_state(tmp_path, capsys):
    model = DigitsCNN(width=8).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    cb = SanityChecks(methods=["saliency", "guided_backprop"], num_samples=3, layers=1, repeats=2, progress=True)
    x = torch.randn(3, 1, 32, 32)
    with pytest.warns(UserWarning, match=r"\[batchnorm\]"):
        report = cb.check(model, x)
    assert cb.report is report and report.num_samples == 3 and report.repeats == 2 and report.layers == ["classifier", "features.0"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    captured = capsys.readouterr()  # progress goes to a trainer's progress bar; outside a fit nothing is printed
    assert "SanityChecks" not in captured.err + captured.out and "randomisation" not in captured.err + captured.out
    with warnings.catch_warnings():  # each caveat kind warns once per callback
        warnings.simplefilter("error")
        cb.progress = False
        cb.check(model, x)

    path = tmp_path / "state.pt"
    torch.save(cb.state_dict(), path)
    fresh = SanityChecks()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.report is not None and fresh.report.to_dict() == cb.report.to_dict()
    assert fresh.summary_lines() == cb.summary_lines() and cb.summary_lines()[0].startswith("SanityChecks randomisation")


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"methods": ["no_such_method"]}, "methods"),
        ({"methods": []}, "methods"),
        ({"mode": "random"}, "mode"),
        ({"bn_mode": "reset"}, "bn_mode"),
        ({"verdict_metric": "hog"}, "verdict_metric"),
        ({"verdict_depth": 0}, "verdict_depth"),
        ({"target": "all"}, "target"),
        ({"task": "detection"}, "task"),
        ({"layers": 0}, "layers"),
        ({"layers": []}, "layers"),
        ({"thresholds": {"randomisation": 0.5}}, "thresholds"),
        ({"thresholds": 1.5}, "thresholds"),
        ({"others": ["third"]}, "others"),
        ({"metrics": ["hog"]}, "metrics"),
        ({"num_samples": 0}, "num_samples"),
        ({"repeats": 0}, "repeats"),
        ({"order": "sideways"}, "order"),
        ({"resamples": 0}, "resamples"),
        ({"confidence": 1.0}, "confidence"),
        ({"thresholds": {"class_sensitivity": -0.1}}, "thresholds"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}"):
        SanityChecks(**kwargs)


def test_bad_layer_names_raise_before_training(tmp_path):
    for kwargs, argument in (({"layers": ["features.99"]}, "layers"), ({"cam_layer": "featurs.9"}, "cam_layer")):
        cb = SanityChecks(**kwargs)
        model = DigitsCNN(width=8)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        trainer = quick_trainer(tmp_path, [cb], epochs=1, logger=False)
        with pytest.raises(ValueError, match=f"`{argument}`.*features.9"):
            trainer.fit(model, datamodule=DigitsDataModule(limit=64))
        assert trainer.global_step == 0
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_default_methods_follow_the_attributions_callback(tmp_path):
    from lightning_introspect.callbacks.attributions import Attributions

    cb = SanityChecks()
    trainer = quick_trainer(tmp_path, [Attributions(methods=["saliency", "grad_cam"]), cb], logger=False)
    cb.setup(trainer, DigitsCNN(width=8), "fit")
    assert cb._resolved_methods == ["saliency", "grad_cam"]
    alone = SanityChecks()
    alone.setup(quick_trainer(tmp_path, [alone], logger=False), DigitsCNN(width=8), "fit")
    assert alone._resolved_methods == list(DEFAULT_METHODS)


def test_constructor_types_work_with_lightning_cli_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(SanityChecks, "sanity")
    cfg = parser.parse_string(
        "sanity:\n  methods: [saliency, grad_cam]\n  layers: [classifier, features.8]\n  mode: both\n"
        "  thresholds: {randomization: 0.4, class_sensitivity: 0.7}\n  bn_mode: keep\n  num_samples: 4\n"
    )
    # thresholds from a config written for the absolute similarities of before must not pass silently
    with pytest.warns(FutureWarning, match="fractions of the way from a reference floor"):
        init = parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
    cb = init.sanity
    assert isinstance(cb, SanityChecks)
    assert cb.layers == ["classifier", "features.8"] and cb.thresholds == {"randomization": 0.4, "class_sensitivity": 0.7}
    assert cb.mode == "both" and cb.bn_mode == "keep" and cb.num_samples == 4


def test_curve_charts_draw_the_reports_similarities_per_method():
    """Each metric's chart holds every method's curve (1 at the original model, then the report's similarity
    per randomised block), its +-std band and, for the verdict's metric, the method's threshold."""
    from lightning_introspect.callbacks.sanity_checks import curve_figures
    from lightning_introspect.render.sanity import curve_chart

    torch.manual_seed(0)
    cb = SanityChecks(methods=["saliency", "grad_cam"], num_samples=3, layers=3, repeats=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = cb.check(DigitsCNN(width=8).eval(), torch.randn(3, 1, 32, 32))
    metrics = ["spearman_abs", "spearman", "ssim"]
    assert list(report.curves) == ["bottom_up"]  # the default order
    steps = report.steps("bottom_up")
    for metric in metrics:
        chart = curve_chart(report, "bottom_up", metric)
        panel = chart.panels[0]
        assert [t for _, t in panel.xticks][1:] == steps
        lines = [s for s in panel.series if s.kind == "line"]
        assert [s.label.split(" (")[0] for s in lines] == ["saliency", "grad_cam"]
        for method, line in zip(["saliency", "grad_cam"], lines):
            curve = report.curves["bottom_up"][method][metric]
            assert line.y == pytest.approx((1.0, *(curve[name] for name in steps)))
            band = next(s for s in panel.series if s.kind == "band" and s.color == line.color)
            std = report.curves_std["bottom_up"][method][metric]
            assert band.y2[1:] == pytest.approx(tuple(curve[n] + std[n] for n in steps))
        thresholds = [s for s in panel.series if s.kind == "hline"]
        verdict_metric = {report.details["bottom_up"][m].metric for m in ["saliency", "grad_cam"]}
        assert bool(thresholds) == (metric in verdict_metric)
    images = curve_figures(report, "bottom_up", metrics)
    assert list(images) == metrics and not (images["spearman"] == images["ssim"]).all()


def _hand_report() -> SanityReport:
    """A small report written by hand, so the scalars it flattens to are known."""
    return SanityReport(
        methods=["saliency", "grad_cam"],
        layers=["fc", "conv"],
        curves={"cascading": {"saliency": {"spearman": {"fc": 0.2, "conv": float("nan")}}}},
        curves_std={},
        agreement={},
        verdicts={"saliency": "pass", "grad_cam": "fail"},
        verdict_scores={"saliency": 0.2, "grad_cam": 0.9},
        class_sensitivity={},
        class_sensitivity_verdicts={"saliency": "pass"},
        class_sensitivity_scores={"saliency": 0.1},
        caveats=[],
        thresholds={"randomization": 0.5, "class_sensitivity": 0.6},
        verdict_metric="spearman",
        verdict_depth=1,
        bn_mode="affine",
        seed=0,
        num_samples=2,
    )


def test_report_scalars_flatten_the_report_and_drop_non_finite_values():
    from lightning_introspect.render.sanity import plotted_metrics, report_scalars, sanity_summary_lines

    scalars = report_scalars(_hand_report())
    assert scalars == {
        "saliency/spearman/cascading/fc": 0.2,
        "saliency/score": 0.2,
        "saliency/passed": 1.0,
        "grad_cam/score": 0.9,
        "grad_cam/passed": 0.0,
        "saliency/class_score": 0.1,
        "saliency/class_passed": 1.0,
    }
    assert plotted_metrics(_hand_report(), "cascading", ["ssim", "spearman"]) == ["spearman"]
    assert sanity_summary_lines(_hand_report())[0] == "SanityChecks randomisation: saliency pass (0.20), grad_cam fail (0.90)"
    assert sanity_summary_lines(None) == []


def test_plain_map_sums_channels_and_resizes_like_interpolate():
    import torch.nn.functional as F

    from lightning_introspect.render.sanity import plain_map

    maps = torch.randn(3, 4, 4)
    got = plain_map(maps, (8, 8))
    expected = F.interpolate(maps.sum(0)[None, None], size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    assert got is not None and torch.allclose(got, expected)


def test_default_thresholds_say_nothing_about_their_changed_meaning():
    import warnings as _warnings

    with _warnings.catch_warnings():
        _warnings.simplefilter("error", FutureWarning)
        SanityChecks(num_samples=2)
