"""Faithfulness curves (deletion / insertion, ROAD) and their reference maps: known answers on a linear model,
brute-force equality, scipy agreement; and the Attributions callback logging them."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_introspect._torch.guards import private_generator
from lightning_introspect.methods.attribution_runs import region_confidence, region_pairs
from lightning_introspect.methods.faithfulness import (
    deletion_curve,
    edge_map,
    faithfulness_curves,
    insertion_curve,
    linear_imputation,
    random_map,
    road,
)
from lightning_introspect.methods.image_stats import gaussian_blur
from lightning_introspect.methods.targets import RegionTarget


# ------------------------------------------------------------------------------ a model with a known answer
def _linear(w_diff: torch.Tensor, bias: float = 0.0) -> nn.Linear:
    """Two classes; class 1's logit minus class 0's is ``w_diff . x + bias``: independent features."""
    net = nn.Linear(w_diff.numel(), 2)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
        net.weight[1] = w_diff
        net.bias[1] = bias
    return net


def _order_auc(net: nn.Module, x: torch.Tensor, order: tuple[int, ...], *, insertion: bool = False) -> float:
    """The AUC of removing (inserting) the features of one sample in ``order``, feature by feature, zero baseline."""
    probs = []
    for k in range(len(order) + 1):
        kept = torch.zeros_like(x) if insertion else x.clone()
        for j in order[:k]:
            kept[j] = x[j] if insertion else 0.0
        probs.append(float(F.softmax(net(kept[None]), 1)[0, 1]))
    return float(np.trapezoid(probs, dx=1.0 / len(order)))


@pytest.mark.parametrize("signs", ["positive", "mixed"])
def test_the_true_contribution_map_has_the_best_auc_of_every_order(signs):
    # For independent features the logit after removing a set S is the logit minus sum_{i in S} w_i x_i, so
    # removing in decreasing order of w_i x_i minimises the probability at every step: the lowest deletion AUC of
    # all orders (and the highest insertion AUC). With positive contributions that order is |w x|'s.
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(6, generator=gen) + 0.5
    w = torch.rand(6, generator=gen) + 0.2
    if signs == "mixed":
        w = w * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0])
    net = _linear(w, bias=-1.0)
    contribution = (w * x)[None]
    truth = contribution.abs() if signs == "positive" else contribution
    with torch.no_grad():
        aucs = {order: _order_auc(net, x, order) for order in itertools.permutations(range(6))}
        inserted = {order: _order_auc(net, x, order, insertion=True) for order in itertools.permutations(range(6))}
    deletion = deletion_curve(net, x[None], truth, 1, steps=6, baseline="zero")
    insertion = insertion_curve(net, x[None], truth, 1, steps=6, baseline="zero")
    assert float(deletion.auc[0]) == pytest.approx(min(aucs.values()), abs=1e-6)
    assert float(insertion.auc[0]) == pytest.approx(max(inserted.values()), abs=1e-6)
    best = tuple(int(i) for i in truth[0].argsort(descending=True))
    assert float(deletion.auc[0]) == pytest.approx(aucs[best], abs=1e-6)
    # a reversed map is the worst order
    worst = deletion_curve(net, x[None], -truth, 1, steps=6, baseline="zero")
    assert float(worst.auc[0]) == pytest.approx(max(aucs.values()), abs=1e-6)
    if signs == "mixed":  # ordering by magnitude is not optimal when contributions have both signs
        assert float(deletion_curve(net, x[None], contribution.abs(), 1, steps=6, baseline="zero").auc[0]) > min(aucs.values()) + 1e-4


# ------------------------------------------------------------------------------ brute force, batching
def _tiny_cnn(channels: int = 3, classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 6, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, classes),
    )


@pytest.mark.parametrize("baseline", ["blur", "mean", "zero"])
def test_curves_equal_a_brute_force_loop_over_samples_and_steps(baseline):
    net = _tiny_cnn()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=gen)
    maps = torch.randn(3, 3, 8, 8, generator=gen)  # no ties: the order is the sorted channel sum
    steps, p = 5, 64
    with torch.no_grad():
        pred = net(x).argmax(1)
        if baseline == "blur":
            base = gaussian_blur(x, 8 / 16)
        elif baseline == "mean":
            base = x.mean(dim=(0, 2, 3), keepdim=True).expand_as(x)
        else:
            base = torch.zeros_like(x)
        want = {"deletion": torch.zeros(3, steps + 1), "insertion": torch.zeros(3, steps + 1)}
        for i in range(3):
            order = maps[i].sum(0).flatten().argsort(descending=True)
            for k in range(steps + 1):
                first = torch.zeros(p, dtype=torch.bool)
                first[order[: round(k * p / steps)]] = True
                first = first.view(1, 8, 8)
                for kind in want:
                    image = torch.where(first, base[i], x[i]) if kind == "deletion" else torch.where(first, x[i], base[i])
                    want[kind][i, k] = F.softmax(net(image[None]), 1)[0, pred[i]]
    got = faithfulness_curves(net, x, {"m": maps}, "pred", steps=steps, baseline=baseline, max_batch=7)["m"]  # chunks cut across samples
    for kind in want:
        torch.testing.assert_close(got[kind].curve, want[kind])
        auc = ((want[kind][:, 1:] + want[kind][:, :-1]) / 2).sum(1) / steps
        torch.testing.assert_close(got[kind].auc, auc)
    torch.testing.assert_close(got["deletion"].fractions, torch.arange(steps + 1) / steps)
    # the single-curve functions give the same numbers
    torch.testing.assert_close(deletion_curve(net, x, maps, "pred", steps=steps, baseline=baseline).curve, want["deletion"])


def test_endpoints_are_the_input_and_the_baseline():
    net = _tiny_cnn(channels=1)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    maps = torch.rand(4, 1, 8, 8)
    target = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        p_input = F.softmax(net(x), 1)[torch.arange(4), target]
        p_blur = F.softmax(net(gaussian_blur(x, 0.5)), 1)[torch.arange(4), target]
    d = deletion_curve(net, x, maps, target, steps=4)
    i = insertion_curve(net, x, maps, target, steps=4)
    torch.testing.assert_close(d.curve[:, 0], p_input)
    torch.testing.assert_close(d.curve[:, -1], p_blur)
    torch.testing.assert_close(i.curve[:, 0], p_blur)
    torch.testing.assert_close(i.curve[:, -1], p_input)
    one = deletion_curve(net, x, maps, target, steps=1)  # no step between the ends
    torch.testing.assert_close(one.curve, torch.stack([p_input, p_blur], 1))
    torch.testing.assert_close(one.auc, (p_input + p_blur) / 2)


def test_ties_are_broken_by_the_seeded_generator_and_never_across_values():
    net = _tiny_cnn(channels=1)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    flat = torch.zeros(2, 1, 8, 8)
    first = deletion_curve(net, x, flat, 1, steps=8, generator=private_generator(5))
    again = deletion_curve(net, x, flat, 1, steps=8, generator=private_generator(5))
    other = deletion_curve(net, x, flat, 1, steps=8, generator=private_generator(6))
    torch.testing.assert_close(first.curve, again.curve, rtol=0, atol=0)
    assert not torch.allclose(first.curve, other.curve)
    # two levels: half way, exactly the top level is removed, whatever the seed
    two = torch.zeros(2, 1, 8, 8)
    two[..., :3, :] = 1.0
    two[..., 3, :4] = 1.0  # 28 pixels, the half is 32: the top 28 and 4 tied zeros at step 1 of 2
    with torch.no_grad():
        top_removed = torch.where(two.bool(), torch.zeros_like(x), x)
        p_top = F.softmax(net(top_removed), 1)[:, 1]
    for seed in (0, 1):
        got = deletion_curve(net, x, two, 1, steps=16, baseline="zero", generator=private_generator(seed))
        torch.testing.assert_close(got.curve[:, 7], p_top)  # 7/16 of 64 = 28 pixels


def test_every_map_in_one_run_gets_the_same_tie_breaks_as_alone():
    net = _tiny_cnn(channels=1)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    maps = {"coarse": (torch.rand(2, 1, 8, 8) * 3).floor(), "flat": torch.zeros(2, 8, 8)}
    together = faithfulness_curves(net, x, maps, 2, steps=4, generator=private_generator(9), max_batch=11)
    for name, m in maps.items():
        alone = insertion_curve(net, x, m, 2, steps=4, generator=private_generator(9))
        torch.testing.assert_close(together[name]["insertion"].curve, alone.curve)


def test_segmentation_region_target_scores_the_mean_probability_over_the_region():
    torch.manual_seed(0)
    net = nn.Conv2d(1, 3, 3, padding=1)
    x = torch.rand(2, 1, 6, 6)
    with torch.no_grad():
        out = net(x)
    pairs = region_pairs(out.argmax(1), "all", background=None)
    target = RegionTarget(pairs.class_id, pairs.masks)
    got = deletion_curve(net, x[pairs.sample], torch.rand(len(pairs), 1, 6, 6), target, steps=3, baseline="zero")
    torch.testing.assert_close(got.curve[:, 0], region_confidence(out, pairs))
    with torch.no_grad():
        zero = net(torch.zeros(1, 1, 6, 6)).expand(2, -1, -1, -1)
    torch.testing.assert_close(got.curve[:, -1], region_confidence(zero, pairs))


def test_tabular_features_and_a_coarse_map():
    net = _linear(torch.tensor([1.0, -2.0, 3.0]))
    x = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]])
    got = deletion_curve(net, x, torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]), 1, steps=3, baseline="mean")
    mean = x.mean(0)
    with torch.no_grad():
        after_one = torch.stack([torch.tensor([mean[0], 1.0, 1.0]), torch.tensor([2.0, 0.0, mean[2]])])
        torch.testing.assert_close(got.curve[:, 1], F.softmax(net(after_one), 1)[:, 1])
    # a Grad-CAM-like 2x2 map of a 4x4 image is resized bilinearly: its top-left cell goes first
    cnn = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    coarse = torch.tensor([[[[4.0, 0.0], [0.0, 0.0]]]])
    img = torch.rand(1, 1, 4, 4)
    res = deletion_curve(cnn, img, coarse, 0, steps=16, baseline="zero")
    with torch.no_grad():
        removed = img.clone()
        removed[..., 0, 0] = 0.0
        torch.testing.assert_close(res.curve[:, 1], F.softmax(cnn(removed), 1)[:, 0])


def test_bad_inputs_raise_clear_value_errors():
    net = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) or tabular"):
        deletion_curve(net, torch.rand(2, 3, 4), torch.rand(2, 3, 4), 0)
    with pytest.raises(ValueError, match="'blur'"):
        deletion_curve(net, torch.rand(2, 4), torch.rand(2, 4), 0)
    with pytest.raises(ValueError, match="one of 'blur', 'mean', 'zero'"):
        deletion_curve(net, torch.rand(2, 4), torch.rand(2, 4), 0, baseline="black")
    with pytest.raises(ValueError, match="finite"):
        deletion_curve(net, torch.rand(2, 4), torch.tensor([[float("nan")] * 4] * 2), 0, baseline="zero")
    with pytest.raises(ValueError, match="steps"):
        deletion_curve(net, torch.rand(2, 4), torch.rand(2, 4), 0, steps=0, baseline="zero")
    with pytest.raises(ValueError, match="neighbours"):
        road(net, torch.rand(2, 4), torch.rand(2, 4), 0)
    with pytest.raises(ValueError, match="fractions"):
        road(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), 0, fractions=(1.0,))


_FUNCTIONS = {
    "faithfulness_curves": lambda net, x, t: faithfulness_curves(net, x, {"a": torch.rand(4, 1, 8, 8, generator=private_generator(0))}, t, steps=3),
    "road": lambda net, x, t: road(net, x, edge_map(x), t, fractions=(0.5,)),
}


@pytest.mark.parametrize("case", ["ok", "model_raises", "target_raises"])
@pytest.mark.parametrize("name", list(_FUNCTIONS))
def test_functions_leave_no_trace_as_every_attribution_method(name, case):
    from tests.test_method_side_effects import _assert_unchanged, _setup, _snapshot, _target_that_raises

    net, x = _setup(fail=case == "model_raises")  # BatchNorm, Dropout, a frozen BatchNorm, existing .grad
    target = _target_that_raises if case == "target_raises" else [0, 1, 2, 0]
    before = _snapshot(net, x)
    if case == "ok":
        _FUNCTIONS[name](net, x, target)
    else:
        with pytest.raises(RuntimeError, match="boom"):
            _FUNCTIONS[name](net, x, target)
    _assert_unchanged(net, x, before)
    with torch.inference_mode():  # called from a validation hook
        xi = x.clone()
        before = _snapshot(net, xi)
        if case == "ok":
            _FUNCTIONS[name](net, xi, "pred")
        _assert_unchanged(net, xi, before)


# --------------------------------------------------------------------------------------------- ROAD
def _dense_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The same system written densely, pixel by pixel: each removed pixel is the weighted mean of its neighbours."""
    c, h, w = image.shape
    unknown = [(y, x) for y in range(h) for x in range(w) if removed[y, x]]
    where = {q: i for i, q in enumerate(unknown)}
    a, b = np.zeros((len(unknown), len(unknown))), np.zeros((len(unknown), c))
    for i, (y, x) in enumerate(unknown):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if (dy, dx) == (0, 0) or not (0 <= y + dy < h and 0 <= x + dx < w):
                    continue
                weight = 1 / 12 if dy and dx else 1 / 6
                a[i, i] += weight
                if (y + dy, x + dx) in where:
                    a[i, where[(y + dy, x + dx)]] -= weight
                else:
                    b[i] += weight * image[:, y + dy, x + dx]
    out = image.copy()
    solved = np.linalg.solve(a, b)
    for i, (y, x) in enumerate(unknown):
        out[:, y, x] = solved[i]
    return out


def test_linear_imputation_equals_a_dense_solve_and_is_the_neighbour_mean():
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 5, 6, generator=gen, dtype=torch.float64)
    removed = torch.rand(5, 6, generator=gen) < 0.45
    removed[0, 0] = True  # a corner: only 3 neighbours
    got = linear_imputation(image, removed)
    want = _dense_imputation(image.numpy(), removed.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    assert torch.equal(got[:, ~removed], image[:, ~removed])
    # each imputed pixel is the weighted mean of its neighbours in the result
    padded = F.pad(got[None], (1, 1, 1, 1))
    ones = F.pad(torch.ones(1, 1, 5, 6, dtype=torch.float64), (1, 1, 1, 1))
    kernel = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]], dtype=torch.float64)
    sums = F.conv2d(padded.transpose(0, 1), kernel.view(1, 1, 3, 3))[:, 0]
    norm = F.conv2d(ones, kernel.view(1, 1, 3, 3))[0, 0]
    torch.testing.assert_close((sums / norm)[:, removed], got[:, removed])
    # the noise lands only on the removed pixels, from the generator
    noisy = linear_imputation(image, removed, noise=0.1, generator=private_generator(1))
    assert torch.equal(noisy[:, ~removed], image[:, ~removed])
    assert torch.equal(noisy, linear_imputation(image, removed, noise=0.1, generator=private_generator(1)))
    assert 0.02 < float((noisy - got)[:, removed].std()) < 0.3


def test_road_scores_the_imputed_images_most_and_least_relevant_first():
    # a linear model on a 6x6 image whose weights are the map: MoRF removes the evidence, LeRF keeps it
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(36, generator=gen) * 2
    net = nn.Sequential(nn.Flatten(), _linear(w, bias=-15.0))
    x = torch.rand(3, 1, 6, 6, generator=gen) + 0.5
    maps = w.view(1, 1, 6, 6) * x
    result = road(net, x, maps, 1, fractions=(0.2, 0.5), noise=0.0)
    assert bool((result.morf < result.lerf).all())
    for i in range(3):
        order = maps[i].flatten().argsort(descending=True)
        for j, f in enumerate((0.2, 0.5)):
            c = round(f * 36)
            for scores, removed_ids in ((result.morf, order[:c]), (result.lerf, order[36 - c :])):
                removed = torch.zeros(36, dtype=torch.bool)
                removed[removed_ids] = True
                image = linear_imputation(x[i], removed.view(6, 6))
                with torch.no_grad():
                    assert float(scores[i, j]) == pytest.approx(float(F.softmax(net(image[None]), 1)[0, 1]), abs=1e-6)
    assert result.morf_accuracy.shape == (2,) and bool(((result.morf_hit == 0) | (result.morf_hit == 1)).all())


# ----------------------------------------------------------------------------------------- references
def test_edge_map_is_scipy_sobel_magnitude_summed_over_channels():
    from scipy import ndimage

    x = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = np.zeros((2, 7, 9))
    for i in range(2):
        for c in range(3):
            img = x[i, c].numpy()
            want[i] += np.hypot(ndimage.sobel(img, axis=0), ndimage.sobel(img, axis=1))
    np.testing.assert_allclose(edge_map(x)[:, 0].numpy(), want, rtol=1e-5, atol=1e-5)


def test_random_map_comes_from_the_generator():
    x = torch.zeros(2, 3, 4, 4)
    assert torch.equal(random_map(x, private_generator(3)), random_map(x, private_generator(3)))
    assert not torch.equal(random_map(x, private_generator(3)), random_map(x, private_generator(4)))
    rng = torch.get_rng_state()
    random_map(x)
    assert torch.equal(rng, torch.get_rng_state())
    with pytest.raises(ValueError, match="no edges"):
        edge_map(torch.zeros(2, 5))


# ------------------------------------------------------------------------------------------ the callback
FAITH_TAG = "introspect/attributions/faithfulness"


def test_attributions_logs_faithfulness_per_method_and_reference_and_keeps_it(tmp_path):
    from lightning_introspect._lightning import pl
    from lightning_introspect.callbacks.attributions import Attributions
    from lightning_introspect.demo import DigitsCNN, DigitsDataModule
    from tests.helpers import quick_trainer, read_events

    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32, limit=96, seed=0)
    dm.setup("fit")
    cb = Attributions(methods=["saliency", "grad_cam"], num_samples=4, faithfulness_steps=8, at=(0.0,), on_error="raise")
    model = DigitsCNN()
    trainer = quick_trainer(tmp_path, [cb], epochs=1)
    trainer.fit(model, datamodule=dm)

    events = read_events(str(tmp_path))
    steps = [h["step"] for h in cb.history]
    assert steps == [0, trainer.global_step]
    for name in ("saliency", "grad_cam", "random", "edges"):
        for key in ("deletion_auc", "insertion_auc"):
            logged = events["scalars"][f"{FAITH_TAG}/{name}/{key}"]
            assert [s for s, _ in logged] == steps
            assert [v for _, v in logged] == pytest.approx([h["faithfulness"][name][key] for h in cb.history], abs=1e-6)
    assert events["text"][f"{FAITH_TAG}/text_summary"] == steps
    # the last run's numbers are those of the functions on the final model, the fixed samples and their maps
    x, _ = cb.fixed_samples(trainer)
    explained = torch.tensor(cb.history[-1]["explained"])
    for name in ("saliency", "grad_cam"):
        want = deletion_curve(model, x, cb.maps[name], explained, steps=8, generator=private_generator(cb.seed))
        assert cb.history[-1]["faithfulness"][name]["deletion_auc"] == pytest.approx(float(want.auc.mean()), abs=1e-6)
    edges = insertion_curve(model, x, edge_map(x), explained, steps=8, generator=private_generator(cb.seed))
    assert cb.history[-1]["faithfulness"]["edges"]["insertion_auc"] == pytest.approx(float(edges.auc.mean()), abs=1e-6)
    assert any("faithfulness" in line for line in cb.summary_lines())


def test_attributions_faithfulness_off_and_on_segmentation_regions(tmp_path):
    from lightning_introspect.callbacks.attributions import Attributions
    from tests.helpers import quick_trainer, read_events
    from tests.zoo import Segmenter, TinyUNet, shapes_dm

    off = Attributions(methods=["saliency"], num_samples=2, faithfulness=False, at=None, on_error="raise")
    on = Attributions(methods=["saliency", "grad_cam"], num_samples=2, faithfulness_steps=4, faithfulness_baseline="mean", at=None, on_error="raise")
    torch.manual_seed(0)
    model = Segmenter(TinyUNet())
    quick_trainer(tmp_path, [off, on], epochs=1, limit_train_batches=2, limit_val_batches=1).fit(model, datamodule=shapes_dm())
    assert off.history[-1]["faithfulness"] == {}
    faithful = on.history[-1]["faithfulness"]
    assert list(faithful) == ["saliency", "grad_cam", "random", "edges"]
    # each explained region scored for its class's mean probability over the region: the curves' start is the caption's p
    pairs = on.pairs
    x, _ = on.fixed_samples(None)
    got = deletion_curve(model, x[pairs.sample], on.maps["saliency"], pairs.target(), steps=4, baseline="mean",
                         generator=private_generator(on.seed))
    torch.testing.assert_close(got.curve[:, 0], torch.tensor(on.history[-1]["confidence"]), atol=1e-5, rtol=0)
    assert faithful["saliency"]["deletion_auc"] == pytest.approx(float(got.auc.mean()), abs=1e-6)
    scalars = read_events(str(tmp_path))["scalars"]
    assert f"{FAITH_TAG}/grad_cam/insertion_auc" in scalars and f"{FAITH_TAG}/edges/deletion_auc" in scalars
    with pytest.raises(ValueError, match="faithfulness_baseline"):
        Attributions(faithfulness_baseline="black")
    with pytest.raises(ValueError, match="faithfulness_steps"):
        Attributions(faithfulness_steps=0)


def test_attributions_logs_emprt_per_run_equal_to_the_method_on_the_same_samples(tmp_path):
    from lightning_introspect._lightning import pl
    from lightning_introspect.callbacks.attributions import Attributions
    from lightning_introspect.demo import DigitsCNN, DigitsDataModule
    from lightning_introspect.methods.emprt import emprt
    from tests.helpers import quick_trainer, read_events

    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32, limit=96, seed=0)
    cb = Attributions(methods=["saliency", "grad_cam"], num_samples=4, faithfulness=False, at=(0.0,), on_error="raise")
    off = Attributions(methods=["saliency"], num_samples=2, faithfulness=False, run_emprt=False, at=None, on_error="raise")
    model = DigitsCNN()
    trainer = quick_trainer(tmp_path, [cb, off], epochs=1)
    trainer.fit(model, datamodule=dm)

    steps = [h["step"] for h in cb.history]
    scalars = read_events(str(tmp_path))["scalars"]
    for m in ("saliency", "grad_cam"):
        logged = scalars[f"introspect/attributions/emprt/{m}"]
        assert [s for s, _ in logged] == steps
        assert [v for _, v in logged] == pytest.approx([h["emprt"][m] for h in cb.history], abs=1e-6)
    # the last run's numbers are those of the function on the final model, the fixed samples and the same seed
    x, _ = cb.fixed_samples(trainer)
    explained = torch.tensor(cb.history[-1]["explained"])
    want = emprt(model, x, explained, ["saliency", "grad_cam"],
                 generator=torch.Generator().manual_seed(cb.seed), layer=cb.resolved_cam_layer)
    for m in ("saliency", "grad_cam"):
        assert cb.history[-1]["emprt"][m] == pytest.approx(want.mean[m], abs=1e-5)
    # re-initialising every layer makes saliency maps of a trained CNN more disordered, as the paper reports
    assert cb.history[-1]["emprt"]["saliency"] > 0
    assert any("eMPRT" in line for line in cb.summary_lines())
    assert all(h["emprt"] == {} for h in off.history)
    with pytest.raises(ValueError, match="run_emprt"):
        Attributions(run_emprt="yes")


def test_emprt_given_the_trained_maps_equals_emprt_computing_them():
    from lightning_introspect.demo import DigitsCNN
    from lightning_introspect.methods.attribution import attribute
    from lightning_introspect.methods.emprt import emprt

    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    methods = ["saliency", "grad_cam"]
    maps = attribute(model, x, [1, 2, 3, 4], methods, layer="features.9")
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    given = emprt(model, x, torch.tensor([1, 2, 3, 4]), methods, generator=g(), layer="features.9", trained_maps=maps)
    computed = emprt(model, x, torch.tensor([1, 2, 3, 4]), methods, generator=g(), layer="features.9")
    assert given.mean == computed.mean
    # the maps stand in for the trained model's: different maps give a different rise in entropy
    flat = {m: torch.ones_like(v) for m, v in maps.items()}
    assert emprt(model, x, torch.tensor([1, 2, 3, 4]), methods, generator=g(), layer="features.9", trained_maps=flat).mean != computed.mean
    with pytest.raises(ValueError, match="trained_maps"):
        emprt(model, x, torch.tensor([1, 2, 3, 4]), methods, generator=g(), layer="features.9", trained_maps={"saliency": maps["saliency"]})
