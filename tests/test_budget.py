"""The introspection budget: its arithmetic on a controlled clock, and what the callbacks do with it in a fit."""

from __future__ import annotations

import types
import warnings
from typing import Any

import pytest
import torch

from lightning_introspect.callbacks import budget as budget_module
from lightning_introspect.callbacks.base import FIGURE_GUESS
from lightning_introspect.callbacks.budget import IntrospectionBudget, Option
from lightning_introspect.config import IntrospectionConfig, introspection_callbacks
from tests.helpers import read_events


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Member:
    """A stand-in callback: its own seconds, its runs still to come, its full-size estimate."""

    def __init__(self, seconds: float = 0.0, runs: int = 0, full: float | None = None) -> None:
        self.seconds_total, self.runs, self.budget_full_seconds = seconds, runs, full
        self.enabled, self.disabled = True, False

    def budget_runs_left(self, trainer: Any) -> int:
        return self.runs


def fake_trainer(global_step: int, *, batches: int = 10, max_epochs: int = 10) -> Any:
    return types.SimpleNamespace(num_training_batches=batches, accumulate_grad_batches=1, global_step=global_step,
                                 max_epochs=max_epochs, current_epoch=global_step // batches)


@pytest.fixture
def clock(monkeypatch: Any) -> Clock:
    c = Clock()
    monkeypatch.setattr(budget_module.time, "perf_counter", c)
    return c


def test_the_allowance_is_the_fraction_of_the_projected_fit_minus_spent_and_recurring(clock: Clock) -> None:
    recurring, heavy = Member(seconds=1.0), Member(seconds=2.0, runs=1, full=2.0)
    budget = IntrospectionBudget(0.5)
    budget.attach([recurring, heavy])
    budget.begin_fit()
    budget.start_clock(fake_trainer(0))
    assert budget.allowance(fake_trainer(0)) is None  # nothing trained yet: no projection
    budget.record(2.0)  # the heavy member's 2 s were a sized run, not recurring work
    clock.now += 3.0 + 10.0  # 3 s of introspection in all, 10 s of the fit's own time
    trainer = fake_trainer(20)  # 2 of 10 epochs done
    total, done, planned = budget.projection(trainer)
    assert (total, done, planned) == pytest.approx((50.0, 2.0, 10.0))
    # 0.5 * 50 s - 3 s spent - recurring 1 s / 2 epochs * 8 epochs left
    assert budget.allowance(trainer) == pytest.approx(25.0 - 3.0 - 4.0)


def test_choose_takes_the_largest_option_within_the_runs_share(clock: Clock) -> None:
    other = Member(runs=1, full=6.0)  # another analysis still to come, 6 s at full size
    me = Member(runs=2)
    budget = IntrospectionBudget(1.0)
    budget.attach([me, other])
    budget.begin_fit()
    budget.start_clock(fake_trainer(0))
    clock.now += 10.0
    trainer = fake_trainer(50)  # half way: projected own time 20 s, allowance 20 s
    options = [Option({"steps": 32}, 6.0), Option({"steps": 16}, 3.0), Option({"steps": 8}, 1.5)]
    choice = budget.choose(trainer, me, options)
    # my share: 20 s * 6 / (6 * 2 runs + 6 other) = 6.67 s -> the full size fits
    assert choice.grant == pytest.approx(20.0 * 6.0 / 18.0)
    assert choice.option is options[0] and not choice.reduced and "ran as configured" in choice.note
    me.seconds_total = 12.0  # a sized run: allowance 20 - 12 = 8 s; share 8 * 6 / 18 = 2.67 s
    budget.record(12.0)
    clock.now += 12.0
    choice = budget.choose(trainer, me, options)
    assert choice.option is options[2] and choice.reduced and "steps=8" in choice.note
    me.seconds_total = 19.5
    budget.record(7.5)
    clock.now += 7.5
    choice = budget.choose(trainer, me, options)
    assert choice.option is None and "skipped" in choice.note and "A budget of about" in choice.note
    assert me.budget_choice is choice and [c[2] for c in budget.choices][-1] is choice


def test_sizes_given_explicitly_run_as_configured_whatever_the_budget(clock: Clock) -> None:
    me = Member(seconds=50.0, runs=1)
    budget = IntrospectionBudget(0.1)
    budget.attach([me])
    budget.begin_fit()
    budget.start_clock(fake_trainer(0))
    clock.now += 60.0
    only = Option({"steps": 32}, 5.0)
    choice = budget.choose(fake_trainer(10), me, [only])
    assert choice.option is only and "given explicitly" in choice.note


def test_before_the_first_step_runs_take_their_smallest_size_and_no_extra_is_drawn(clock: Clock) -> None:
    me = Member(runs=3)
    budget = IntrospectionBudget(10.0)  # however generous: the fit's length is not known yet
    budget.attach([me])
    budget.begin_fit()
    budget.start_clock(fake_trainer(0))
    options = [Option({"steps": 32}, 100.0), Option({"steps": 16}, 50.0)]
    choice = budget.choose(fake_trainer(0), me, options)
    assert choice.option is options[-1] and choice.grant is None and "unknown" in choice.note and "smallest" in choice.note
    assert not budget.affords(fake_trainer(0), me, 0.01)
    only = [Option({"steps": 32}, 100.0)]  # sizes given explicitly: kept
    assert budget.choose(fake_trainer(0), me, only).option is only[0]


def test_an_extra_is_drawn_only_on_top_of_every_analysis_still_to_come(clock: Clock) -> None:
    heavy = Member(runs=1, full=4.0)
    budget = IntrospectionBudget(1.0)
    budget.attach([heavy])
    budget.begin_fit()
    budget.start_clock(fake_trainer(0))
    clock.now += 5.0
    trainer = fake_trainer(50)  # projected 10 s, allowance 10 s, 4 s reserved for the analysis
    assert budget.affords(trainer, heavy, 6.0)
    assert not budget.affords(trainer, heavy, 6.5)


@pytest.mark.parametrize("value", [0, -0.5, float("nan"), "half", True])
def test_a_budget_that_is_not_a_positive_fraction_is_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="`budget`"):
        IntrospectionBudget(value)


def test_the_yaml_budget_key_and_explicit_options(tmp_path: Any) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("budget: 0.3\nmisclassifications:\n  num_samples: 64\n")
    config = IntrospectionConfig.from_yaml(path)
    assert config.budget == 0.3
    callbacks = introspection_callbacks(path)
    budgets = {id(cb.budget) for cb in callbacks}
    assert len(budgets) == 1 and callbacks[0].budget.fraction == 0.3
    review = next(cb for cb in callbacks if type(cb).__name__ == "Misclassifications")
    assert review._given == {"num_samples": 64}  # the defaults are not "given": the budget may size them
    assert introspection_callbacks({}, budget=0.2)[0].budget.fraction == 0.2
    from lightning_introspect.config import DEFAULT_BUDGET

    assert {cb.budget.fraction for cb in introspection_callbacks({})} == {DEFAULT_BUDGET}
    assert all(cb.budget is None for cb in introspection_callbacks({"budget": False}))
    assert all(cb.budget is None for cb in introspection_callbacks({}, budget=False))


def _fit(tmp_path: Any, budget: float | None, **featviz: Any) -> tuple[list[Any], Any]:
    from lightning_introspect._lightning import Trainer, pl
    from lightning_introspect.demo import DigitsCNN, DigitsDataModule

    pl.seed_everything(0, verbose=False)
    config = {
        "per_class_metrics": {"num_classes": 10}, "weight_histograms": False, "linear_probes": False,
        "attributions": False, "sanity_checks": False,
        "misclassifications": {"at": [0.5]},
        "feature_visualization": {"layers": ["features.4"], "num_channels": 2, "classes": [0, 1], **featviz},
    }
    callbacks = introspection_callbacks(config, budget=budget)
    loggers = __import__(f"{pl.__name__}.loggers", fromlist=["TensorBoardLogger"])
    trainer = Trainer(max_epochs=2, callbacks=callbacks, logger=loggers.TensorBoardLogger(str(tmp_path)),
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      limit_train_batches=4, limit_val_batches=2)
    model = DigitsCNN()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=DigitsDataModule(limit=256))
    return callbacks, model


def test_a_tiny_budget_shrinks_skips_mid_fit_runs_keeps_the_last_and_never_changes_training(tmp_path: Any) -> None:
    callbacks, model = _fit(tmp_path / "tiny", 1e-4)
    _, reference = _fit(tmp_path / "none", None)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    review = next(cb for cb in callbacks if type(cb).__name__ == "Misclassifications")
    featviz = next(cb for cb in callbacks if type(cb).__name__ == "FeatureVisualization")
    # the review always runs (its smallest size is the tables only); its perturbation test and figures go
    assert review.history and review.run_sizes["strengths"] == 0 and review.run_sizes["figures"] is False
    assert review.report["perturbations"] == {}
    featviz_choices = [c for name, _, c in featviz.budget.choices if name == "FeatureVisualization"]
    assert len(featviz_choices) == 2  # half way, then the last epoch
    assert featviz_choices[0].option is None and "skipped" in featviz_choices[0].note
    last = featviz_choices[1]  # the last run is never skipped: its smallest size
    assert last.option is not None and last.option.sizes == {"settings": ["all"], "steps": 16} and "never skipped" in last.note
    assert featviz.run_columns == ["all"] and featviz.run_steps == 16 and set(featviz.results) == {"all"}
    texts = read_events(str(tmp_path / "tiny"))["text"]
    assert "introspect/featviz/budget/text_summary" in texts and "introspect/misclassifications/budget/text_summary" in texts


def test_a_run_sized_by_the_budget_equals_a_run_configured_with_those_sizes(tmp_path: Any) -> None:
    callbacks, _ = _fit(tmp_path / "budget", 1e6)
    featviz = next(cb for cb in callbacks if type(cb).__name__ == "FeatureVisualization")
    assert featviz.run_steps == featviz.steps and featviz.run_columns == featviz.columns  # a huge budget: as configured
    assert featviz.budget_choice is not None and not featviz.budget_choice.reduced
    sized, _ = _fit(tmp_path / "sized", None, steps=featviz.run_steps, compare=len(featviz.run_columns) > 1)
    again = next(cb for cb in sized if type(cb).__name__ == "FeatureVisualization")
    assert set(again.images) == set(featviz.images)
    for key, image in featviz.images.items():
        assert torch.equal(image, again.images[key])


def _tiny_budget_fit(tmp_path: Any, cb: Any, *, epochs: int) -> Any:
    """Fit the demo CNN a few batches with ``cb`` alone under a budget far too small for anything."""
    from lightning_introspect._lightning import Trainer, pl
    from lightning_introspect.demo import DigitsCNN, DigitsDataModule

    pl.seed_everything(0, verbose=False)
    IntrospectionBudget(1e-4).attach([cb])
    trainer = Trainer(max_epochs=epochs, callbacks=[cb], logger=False, enable_checkpointing=False, enable_model_summary=False,
                      enable_progress_bar=False, limit_train_batches=2, limit_val_batches=1, default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(DigitsCNN(), datamodule=DigitsDataModule(limit=64))
    return cb


def test_the_sanity_check_under_a_tiny_budget_runs_one_repeat_of_the_two_blocks_each_cascade_starts_from(tmp_path: Any) -> None:
    from lightning_introspect.callbacks.sanity_checks import SanityChecks

    cb = _tiny_budget_fit(tmp_path, SanityChecks(methods=["saliency", "grad_cam"], num_samples=4), epochs=1)
    choice = cb.budget_choice
    assert choice is not None and choice.reduced and "never skipped" in choice.note  # the fit-end check is the last run
    assert choice.option is not None and choice.option.sizes["repeats"] == 1 and choice.option.sizes["layers"] == 2
    assert cb.report is not None and cb.report.repeats == 1
    # the bottom-up cascade (the default order) randomises the two blocks nearest the input, not those by the head
    assert cb.report.steps("bottom_up") == ["features.0", "features.4"]
    assert cb.run_sizes == {}  # the sizes hold for that run only
    assert cb.unit_costs.get("report", 0.0) > 0  # its report's writing, measured: the next run's estimate


def test_a_figures_cost_is_its_own_measure_else_the_dearest_of_its_budgets_members() -> None:
    from lightning_introspect.callbacks import PerClassMetrics, SanityChecks, WeightHistograms

    check, per_class, weights = SanityChecks(), PerClassMetrics(num_classes=3), WeightHistograms()
    assert check.figure_seconds() == FIGURE_GUESS  # nothing measured, no budget: a cautious guess
    IntrospectionBudget(0.5).attach([check, per_class, weights])
    assert check.figure_seconds() == FIGURE_GUESS
    per_class.unit_costs.observe("figure", 0.04)
    weights.unit_costs.observe("figure", 0.06)
    assert check.figure_seconds() == 0.06  # the same machine drew the others' figures
    check.unit_costs.observe("figure", 0.01)
    assert check.figure_seconds() == 0.01


def _probe_fit(tmp_path: Any, budget: float | None, **probes: Any) -> Any:
    from lightning_introspect._lightning import Trainer, pl
    from lightning_introspect.callbacks.linear_probes import LinearProbes
    from lightning_introspect.demo import DigitsCNN, DigitsDataModule

    pl.seed_everything(0, verbose=False)
    cb = LinearProbes(layers=["features.2", "features.9"], solver="torch", **probes)
    if budget is not None:
        IntrospectionBudget(budget).attach([cb])
    loggers = __import__(f"{pl.__name__}.loggers", fromlist=["TensorBoardLogger"])
    trainer = Trainer(max_epochs=4, callbacks=[cb], logger=loggers.TensorBoardLogger(str(tmp_path)), enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=False, limit_train_batches=3, limit_val_batches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(DigitsCNN(), datamodule=DigitsDataModule(limit=256))
    return cb


def test_probe_evaluations_between_the_at_fractions_are_extras_under_a_budget(tmp_path: Any) -> None:
    tight = _probe_fit(tmp_path / "tight", 1e-4)
    # at=(0.5,) of 4 epochs is epoch 1, the last is 3: those always run; 0 and 2 do not fit a tiny budget
    assert sorted(k for k in tight.history if isinstance(k, int)) == [1, 3] and tight.thinned_epochs == [0, 2]
    assert {"init", "input"} <= set(tight.history)  # the baselines are once per fit, not extras
    texts = read_events(str(tmp_path / "tight"))["text"]
    assert "introspect/probes/budget/text_summary" in texts
    free = _probe_fit(tmp_path / "free", None)
    assert sorted(k for k in free.history if isinstance(k, int)) == [0, 1, 2, 3] and free.thinned_epochs == []
    # the same epochs evaluated give the same result; another set of earlier evaluations changes the warm start
    # of the solver, which moves an accuracy by at most a test sample or two (tol=1e-3)
    assert _probe_fit(tmp_path / "again", 1e-4).history == tight.history
    assert all(abs(free.history[1][k] - tight.history[1][k]) <= 0.03 for k in free.history[1])
    # an explicit schedule is kept whatever the budget
    kept = _probe_fit(tmp_path / "kept", 1e-4, every_n_epochs=1)
    assert sorted(k for k in kept.history if isinstance(k, int)) == [0, 1, 2, 3] and kept.thinned_epochs == []


def test_under_a_budget_the_start_run_of_attributions_explains_only_and_the_last_run_scores_its_maps(tmp_path: Any) -> None:
    """Before the first step the fit's length is unknown: the untrained model's maps are logged, without the
    faithfulness curves and eMPRT that the budget cannot judge yet; the last run has both, at their smallest."""
    from lightning_introspect.callbacks.attributions import Attributions

    cb = Attributions(methods=["saliency", "grad_cam"], num_samples=4, at=(0.0, 1.0), every_n_epochs=None)
    _tiny_budget_fit(tmp_path, cb, epochs=2)
    start, last = cb.history[0], cb.history[-1]
    assert start["epoch"] == -1 and start["faithfulness"] == {} and start["emprt"] == {}
    assert set(last["faithfulness"]) >= {"saliency", "grad_cam"} and set(last["emprt"]) == {"saliency", "grad_cam"}
    notes = [c.note for name, _, c in cb.budget.choices if name == "Attributions"]
    assert "faithfulness_steps=0, emprt=False" in notes[0] and "faithfulness_steps=5, emprt=True" in notes[-1]
