"""The pure probe methods: pooling, projection, bounded cache, split, scores and both solvers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import f1_score

from lightning_introspect.methods.probes import (
    FeatureCache,
    RandomProjection,
    classification_scores,
    downsample_input,
    fit_probe,
    fit_probes,
    pool_activation,
    probe_split,
)
from lightning_introspect.methods.probes.fitting import _softmax_objective


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target)


def noisy_blobs(n=1200, d=40, classes=5, noise=2.5, seed=0):
    """Overlapping Gaussian blobs: a probe gets well below 100 %, so solver differences would show."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = centers[y] + noise * torch.randn(n, d, generator=gen)
    return x, y


# ------------------------------------------------------------------------------------------- pooling
def test_pooling_values_and_shapes():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert torch.equal(pool_activation(x, "avg"), x.mean((2, 3)))
    assert torch.equal(pool_activation(x, "max"), x.amax((2, 3)))
    assert torch.equal(pool_activation(x, "avgmax"), torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1))
    assert torch.equal(pool_activation(x, "flatten"), x.reshape(2, -1))
    seq = torch.randn(2, 5, 7)  # (N, C, L): pooled over L
    assert pool_activation(seq, "avg").shape == (2, 5)
    flat = torch.randn(3, 9)
    for p in ("avg", "max", "avgmax", "flatten"):
        assert torch.equal(pool_activation(flat, p), flat)
    half = torch.randn(2, 3, 4, 4).half()
    assert pool_activation(half, "avg").dtype == torch.float32
    assert torch.equal(pool_activation((x, "extra"), "avg"), x.mean((2, 3)))  # tuple outputs: first tensor


def test_pooling_errors_name_argument_and_choices():
    with pytest.raises(ValueError, match=r"`pooling`.*'avg', 'max', 'avgmax', 'flatten'.*'mean'"):
        pool_activation(torch.randn(2, 3), "mean")
    with pytest.raises(ValueError, match="batch dimension"):
        pool_activation(torch.randn(3), "avg")
    with pytest.raises(ValueError, match="dict"):
        pool_activation({"a": torch.randn(2, 3)}, "avg")


def test_downsample_input_shapes():
    assert downsample_input(torch.rand(4, 1, 32, 32)).shape == (4, 64)
    assert downsample_input(torch.rand(4, 3, 32, 32), max_features=48).shape == (4, 48)  # 3 x 4 x 4
    assert downsample_input(torch.rand(4, 2, 100)).shape == (4, 128)
    assert downsample_input(torch.rand(4, 10)).shape == (4, 10)
    thumb = downsample_input(torch.ones(2, 1, 32, 32))
    assert torch.allclose(thumb, torch.ones_like(thumb))


# ---------------------------------------------------------------------------------------- projection
@pytest.mark.parametrize("dense_limit", [1 << 22, 0], ids=["dense", "sketch"])
def test_random_projection_is_seeded_and_preserves_norms(dense_limit):
    state = torch.random.get_rng_state()
    x = torch.randn(64, 2000, generator=torch.Generator().manual_seed(1))
    a = RandomProjection(2000, 256, seed=3, dense_limit=dense_limit)
    b = RandomProjection(2000, 256, seed=3, dense_limit=dense_limit)
    c = RandomProjection(2000, 256, seed=4, dense_limit=dense_limit)
    assert a.kind == ("dense" if dense_limit else "sketch")
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    ratio = a(x).norm(dim=1) / x.norm(dim=1)
    assert abs(ratio.pow(2).mean().item() - 1.0) < 0.1  # E||Rx||^2 = ||x||^2
    assert torch.equal(torch.random.get_rng_state(), state)  # private generator only
    with pytest.raises(ValueError, match=r"\(N, 2000\)"):
        a(torch.randn(2, 10))


# ------------------------------------------------------------------------------------------- cache
def _stream(batches=10, size=100, width=6):
    """Batches whose features encode (sample index, label) so alignment can be checked."""
    for b in range(batches):
        idx = torch.arange(b * size, (b + 1) * size)
        labels = idx % 7
        feats = idx[:, None].float().repeat(1, width)
        yield {"a": feats, "b": feats[:, :2] * 2}, labels


def test_reservoir_cache_is_bounded_aligned_and_uniform():
    cache = FeatureCache(150, seed=0)
    for feats, labels in _stream():
        cache.add(feats, labels)
    assert cache.size == 150 and cache.seen == 1000
    a, b, y = cache.features("a"), cache.features("b"), cache.labels
    assert a.shape == (150, 6) and b.shape == (150, 2) and y.shape == (150,)
    assert cache.nbytes == 150 * 6 * 4 + 150 * 2 * 4 + 150 * 8  # capacity, never more
    idx = a[:, 0].long()
    assert torch.equal(b[:, 0], 2 * a[:, 0]) and torch.equal(y, idx % 7)  # rows aligned across layers and labels
    assert idx.unique().numel() == 150  # no sample twice
    assert (idx >= 500).sum() > 40 and (idx < 500).sum() > 40  # the whole stream is represented, not the first N
    kept = set(idx.tolist())
    cache.reset()
    for feats, labels in _stream():
        cache.add(feats, labels)
    assert set(cache.features("a")[:, 0].long().tolist()) == kept  # re-seeded: same samples every epoch


def test_first_policy_and_cache_errors():
    cache = FeatureCache(150, policy="first")
    for feats, labels in _stream():
        cache.add(feats, labels)
    assert torch.equal(cache.features("a")[:, 0].long(), torch.arange(150))
    with pytest.raises(ValueError, match="layers"):
        cache.add({"a": torch.zeros(2, 6)}, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        cache.add({"a": torch.zeros(3, 6), "b": torch.zeros(2, 2)}, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="target_transform"):
        cache.add({"a": torch.zeros(2, 6), "b": torch.zeros(2, 2)}, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="`policy`"):
        FeatureCache(10, policy="random")
    with pytest.raises(ValueError, match="`max_samples`"):
        FeatureCache(0)


def test_cache_fills_from_inference_mode_and_stays_usable_for_autograd():
    cache = FeatureCache(10)
    with torch.inference_mode():
        cache.add({"a": torch.randn(4, 3)}, torch.tensor([0, 1, 0, 1]))
    assert not cache.features("a").is_inference()


# ------------------------------------------------------------------------------------- split, scores
def test_probe_split_is_stratified_seeded_and_disjoint():
    y = np.array([0] * 50 + [1] * 30 + [2] * 20 + [3])
    tr, te = probe_split(y, 0.3, seed=0)
    assert np.intersect1d(tr, te).size == 0 and tr.size + te.size == y.size
    assert [int((y[te] == c).sum()) for c in range(4)] == [15, 9, 6, 0]  # a singleton class stays in train
    tr2, te2 = probe_split(y, 0.3, seed=0)
    assert np.array_equal(te, te2)
    assert not np.array_equal(te, probe_split(y, 0.3, seed=1)[1])
    with pytest.raises(ValueError, match="`test_fraction`"):
        probe_split(y, 1.0)


def test_classification_scores_match_sklearn():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 6, 300)
    p = np.where(rng.random(300) < 0.6, t, rng.integers(0, 7, 300))  # includes a class only predicted
    acc, f1 = classification_scores(t, p)
    assert acc == pytest.approx(float((t == p).mean()))
    assert f1 == pytest.approx(f1_score(t, p, average="macro"))


# ------------------------------------------------------------------------------------------ solvers
def test_solvers_agree_on_digits_and_on_noisy_blobs(digits):
    for x, y in (digits, noisy_blobs()):
        sk = fit_probe(x, y, solver="sklearn", seed=0)
        th = fit_probe(x, y, solver="torch", seed=0)
        assert abs(sk.accuracy - th.accuracy) <= 0.02
        assert abs(sk.macro_f1 - th.macro_f1) <= 0.02
        assert sk.n_train == th.n_train and sk.n_test == th.n_test
        # the same objective: coefficients close relative to their scale
        gap = np.abs(sk.state["coef"] - th.state["coef"]).max() / np.abs(sk.state["coef"]).max()
        assert gap < 0.05
    assert fit_probe(*digits, solver="torch").accuracy > 0.93  # raw 8x8 digits are nearly linearly separable


@pytest.mark.parametrize("solver", ["sklearn", "torch"])
def test_warm_start_needs_fewer_iterations(solver):
    x, y = noisy_blobs(seed=1)
    cold = fit_probe(x, y, solver=solver)
    drifted = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    cold2 = fit_probe(drifted, y, solver=solver)
    warm = fit_probe(drifted, y, solver=solver, warm_start=cold.state)
    assert warm.n_iter < cold2.n_iter
    assert abs(warm.accuracy - cold2.accuracy) <= 0.01
    # width changed: the old state cannot seed it, so the fit starts cold and equals a fit without warm start
    narrow = fit_probe(x[:, :10], y, solver=solver, warm_start=cold.state)
    narrow_cold = fit_probe(x[:, :10], y, solver=solver)
    assert (narrow.n_features, narrow.n_iter, narrow.accuracy) == (10, narrow_cold.n_iter, narrow_cold.accuracy)
    np.testing.assert_array_equal(narrow.state["coef"], narrow_cold.state["coef"])


def test_torch_solver_inside_inference_mode_leaves_global_rng():
    x, y = noisy_blobs(n=300, d=8)
    state = torch.random.get_rng_state()
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        result = fit_probe(xi, yi, solver="torch")
    assert torch.equal(torch.random.get_rng_state(), state)
    outside = fit_probe(x, y, solver="torch")  # the same fit as outside inference mode
    assert result.n_iter == outside.n_iter > 0 and result.accuracy == outside.accuracy > 0.3
    np.testing.assert_array_equal(result.state["coef"], outside.state["coef"])


def test_fit_probes_shares_split_and_orders_layers():
    x, y = noisy_blobs(n=400, d=12)
    results = fit_probes({"good": x, "noise": torch.randn(400, 12)}, y, solver="torch")
    assert list(results) == ["good", "noise"]
    assert results["good"].accuracy > results["noise"].accuracy + 0.2
    assert results["good"].n_test == results["noise"].n_test


def test_fit_probe_errors():
    with pytest.raises(ValueError, match="two classes"):
        fit_probe(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="`solver`"):
        fit_probe(torch.randn(10, 3), torch.arange(10) % 2, solver="saga")


def test_projection_and_torch_solver_stay_fp32_under_autocast():
    proj = RandomProjection(100, 10, seed=0)
    x = torch.randn(6, 100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = proj(x)
        result = fit_probe(*noisy_blobs(n=200, d=6), solver="torch")
    assert out.dtype == torch.float32 and torch.allclose(out, x @ proj.matrix)
    assert result.accuracy == fit_probe(*noisy_blobs(n=200, d=6), solver="torch").accuracy


# ------------------------------------------------------------------------ the torch solver's parts
def test_objective_and_gradient_match_autograd_and_sklearns_loss():
    gen = torch.Generator().manual_seed(1)
    count, n, d, k = 2, 50, 6, 4
    z = torch.randn(count, n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=gen)
    onehot_t = torch.nn.functional.one_hot(y, k).double().T.contiguous()
    theta = torch.randn(count, k, d + 1, generator=gen, dtype=torch.float64, requires_grad=True)
    f, grad = _softmax_objective(z.transpose(1, 2).contiguous(), z, onehot_t, theta.detach(), 0.01)
    logits = z @ theta[..., :-1].transpose(1, 2) + theta[..., -1].unsqueeze(1)
    reference = torch.stack([
        torch.nn.functional.cross_entropy(logits[i], y) + 0.01 * theta[i, :, :-1].pow(2).sum() for i in range(count)
    ])
    (expected_grad,) = torch.autograd.grad(reference.sum(), theta)
    torch.testing.assert_close(f, reference.detach())
    torch.testing.assert_close(grad, expected_grad)


def test_torch_solver_reaches_sklearns_optimum_when_converged(digits):
    x, y = digits
    sk = fit_probe(x, y, solver="sklearn", tol=1e-7, max_iter=2000)
    th = fit_probe(x, y, solver="torch", tol=1e-5, max_iter=2000)
    gap = np.abs(sk.state["coef"] - th.state["coef"]).max() / np.abs(sk.state["coef"]).max()
    assert gap < 5e-3  # float32 against float64: the same minimiser
    assert th.accuracy == pytest.approx(sk.accuracy, abs=1.01 / sk.n_test)
    assert th.n_iter < 2000


def test_several_layers_are_each_their_own_fit(digits):
    x, y = digits
    layers = {"pixels": x, "half": x[:, ::2].contiguous(), "blobs": noisy_blobs(n=x.shape[0], d=9, seed=3)[0]}
    together = fit_probes(layers, y, solver="torch")
    for name, feats in layers.items():
        alone = fit_probe(feats, y, solver="torch")
        assert together[name].accuracy == alone.accuracy and together[name].n_iter == alone.n_iter
        np.testing.assert_array_equal(together[name].state["coef"], alone.state["coef"])


# ------------------------------------------------------------------ layer choice, capture, results
def test_resolve_probe_layers_orders_by_execution_and_refuses_a_reused_module():
    from lightning_introspect.methods.probe_layers import ProbeLayersUnavailable, resolve_probe_layers

    class Reused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.b = torch.nn.Linear(4, 4)  # registered first, runs second
            self.a = torch.nn.Linear(4, 4)
            self.act = torch.nn.ReLU()

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    model, x = Reused(), torch.randn(2, 4)
    assert list(resolve_probe_layers(model, ["b", "a"], x)) == ["a", "b"]
    with pytest.raises(ValueError, match="act"):
        resolve_probe_layers(model, ["act"], x)

    class NeedsTwo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x, y):
            return self.fc(x) + y

    with pytest.raises(ProbeLayersUnavailable, match="name the layers explicitly"):
        resolve_probe_layers(NeedsTwo(), "auto", x)
    assert list(resolve_probe_layers(NeedsTwo(), ["fc"], x)) == ["fc"]  # named: kept, call counts unchecked


def test_feature_capture_caches_the_pooled_outputs_and_removes_its_hooks():
    from lightning_introspect.methods.probe_capture import INPUT_KEY, FeatureCapture

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(6 * 6 * 6, 2))
    capture = FeatureCapture({"1": net[1], "2": net[2]}, pooling="avg", max_features=50, seed=3)
    layers, inputs = FeatureCache(100), FeatureCache(100)
    x = torch.randn(5, 3, 8, 8)
    with capture.attach():
        capture.begin(torch.arange(5) % 2, capture.project(INPUT_KEY, x.flatten(1)))
        with torch.no_grad():
            net(x)
        capture.commit(layers, inputs)
    assert not any(m._forward_hooks for m in net.modules())
    with torch.no_grad():
        relu = net[1](net[0](x))
    torch.testing.assert_close(layers.features("1"), relu.mean(dim=(2, 3)))  # the avg-pooled maps
    flat = relu.flatten(1)  # 216 wide: projected to 50 by the layer's own projection
    torch.testing.assert_close(layers.features("2"), capture.projections["2"](flat))
    assert inputs.features(INPUT_KEY).shape == (5, 50) and set(capture.projections) == {"2", INPUT_KEY}
    assert torch.equal(layers.labels, torch.arange(5) % 2)
    capture.begin(torch.zeros(2, dtype=torch.long))  # a batch in which the hooks never fire
    with pytest.raises(RuntimeError, match="did not run in this forward pass"):
        capture.commit(layers, inputs)


def test_best_layer_auto_solver_and_label_check():
    from lightning_introspect.methods.probes import auto_solver, best_layer, check_probe_labels

    assert best_layer({"deep": 0.9, "shallow": 0.9, "mid": 0.5}, ["shallow", "mid", "deep"]) == "shallow"
    assert best_layer({"unknown": 0.9, "known": 0.9}, ["known"]) == "known"  # not in the order: deepest
    assert auto_solver(1 << 20, 1 << 20) == "torch" and auto_solver((1 << 20) + 1, 1 << 20) == "sklearn"
    assert check_probe_labels(np.array([1, 0])).dtype == torch.int64
    for bad in (torch.zeros(2, 3, dtype=torch.long), torch.tensor([0.0, 1.0])):
        with pytest.raises(ValueError, match="one integer label per sample"):
            check_probe_labels(bad)


def test_probe_table_and_figure_show_the_numbers_by_depth():
    from lightning_introspect.render.probes import accuracy_vs_depth_chart, probe_table

    order = ["conv", "block", "head"]
    acc, f1 = {"head": 0.95, "conv": 0.4, "block": 0.8}, {"head": 0.94, "conv": 0.3, "block": 0.7}
    table = probe_table(5, acc, f1, order=order, init={"conv": 0.5, "head": 0.2}, input_scores=(0.3, 0.25), best="head")
    rows = table.splitlines()[2:]
    assert rows[0] == "| input (baseline) | 0 | 0.300 | 0.250 | | |"
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["`conv`", "`block`", "`head` **best**"]
    assert rows[1].endswith("| 0.500 | -0.100 |") and rows[3].endswith("| 0.200 | +0.750 |")
    chart = accuracy_vs_depth_chart(5, acc, order=order, init={"conv": 0.5, "head": 0.2}, input_accuracy=0.3)
    now, init, base = chart.panels[0].series
    assert now.x == (1, 2, 3) and now.y == (0.4, 0.8, 0.95)
    assert init.x == (1, 3) and init.y == (0.5, 0.2) and init.dash == "dashed"
    assert base.kind == "hline" and base.y == (0.3,)
    assert [t for _, t in chart.panels[0].xticks] == order and chart.labels() == ["epoch 5", "init", "raw input"]
