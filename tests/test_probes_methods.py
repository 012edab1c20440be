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
    _lbfgs,
    _lbfgs_direction,
    _softmax_objective,
    classification_scores,
    downsample_input,
    fit_probe,
    fit_probes,
    pool_activation,
    probe_split,
)


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
    other = fit_probe(x[:, :10], y, solver=solver, warm_start=cold.state)  # width changed: starts cold
    assert other.n_features == 10


def test_torch_solver_inside_inference_mode_leaves_global_rng():
    x, y = noisy_blobs(n=300, d=8)
    state = torch.random.get_rng_state()
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        result = fit_probe(xi, yi, solver="torch")
    assert result.accuracy > 0.3 and result.n_iter > 0
    assert torch.equal(torch.random.get_rng_state(), state)


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


# ------------------------------------------------------------------- the batched torch solver's parts
def _two_loop(g, pairs, gamma):
    """Textbook L-BFGS two-loop recursion (Nocedal & Wright, alg. 7.4) for one problem, in float64."""
    q = g.clone()
    alphas = []
    for s, y in reversed(pairs):
        a = (s @ q) / (y @ s)
        alphas.append(a)
        q = q - a * y
    r = gamma * q
    for (s, y), a in zip(pairs, reversed(alphas)):
        b = (y @ r) / (y @ s)
        r = r + (a - b) * s
    return -r


def test_compact_direction_equals_the_two_loop_recursion():
    gen = torch.Generator().manual_seed(0)
    count, m, p = 3, 5, 12
    a = torch.randn(count, p, p, generator=gen, dtype=torch.float64)
    hessians = a @ a.transpose(1, 2) + torch.eye(p, dtype=torch.float64)  # SPD: every pair has s.y > 0
    s_all = torch.randn(count, m, p, generator=gen, dtype=torch.float64)
    y_all = torch.einsum("lij,lmj->lmi", hessians, s_all)
    valid = torch.ones(count, m, dtype=torch.bool)
    valid[1, :2] = False  # problem 1 has only 3 pairs so far, problem 2 skipped its third
    valid[2, 2] = False
    keep = valid.to(torch.float64)[..., None]
    pairs = torch.cat([s_all * keep, y_all * keep], 1)
    g = torch.randn(count, p, generator=gen, dtype=torch.float64)
    gamma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    ours = _lbfgs_direction(g, pairs, valid, gamma)
    for i in range(count):
        used = [(s_all[i, j], y_all[i, j]) for j in range(m) if valid[i, j]]
        torch.testing.assert_close(ours[i], _two_loop(g[i], used, gamma[i]), rtol=1e-9, atol=1e-9)


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


def test_batched_lbfgs_solves_each_problem_on_its_own():
    # three independent quadratics of different conditioning; one starts at its minimum
    gen = torch.Generator().manual_seed(2)
    scales = torch.tensor([[1.0, 2.0, 3.0], [1.0, 10.0, 100.0], [1.0, 1.0, 1.0]])
    centers = torch.randn(3, 3, generator=gen)
    start = torch.zeros(3, 3)
    start[2] = centers[2]

    def fun(theta, rows):
        diff = theta - centers[list(rows)]
        return 0.5 * (scales[list(rows)] * diff * diff).sum(1), scales[list(rows)] * diff

    theta, n_iter = _lbfgs(fun, start, max_iter=100, tol=1e-6)
    torch.testing.assert_close(theta, centers, rtol=0, atol=1e-5)
    assert n_iter[2] == 0 and n_iter[0] > 0 and n_iter[1] >= n_iter[0]  # the ill-conditioned one needs more


def test_batched_fit_equals_each_layer_fitted_alone(digits):
    x, y = digits
    layers = {"pixels": x, "half": x[:, ::2].contiguous(), "blobs": noisy_blobs(n=x.shape[0], d=9, seed=3)[0]}
    together = fit_probes(layers, y, solver="torch")
    for name, feats in layers.items():
        alone = fit_probe(feats, y, solver="torch")
        assert together[name].accuracy == pytest.approx(alone.accuracy, abs=1.5 / alone.n_test)
        assert together[name].state["coef"].shape == (10, feats.shape[1])  # padding removed
        gap = np.abs(together[name].state["coef"] - alone.state["coef"]).max()
        assert gap <= 1e-3 * np.abs(alone.state["coef"]).max()


def test_width_groups_pad_only_similar_or_tiny_layers():
    from lightning_introspect.methods.probes import _width_groups

    assert _width_groups([64, 128, 256, 512], n=10_000) == [[0, 1], [2, 3]]  # padding stays within 2x
    assert _width_groups([512, 16, 64, 32], n=200) == [[1, 3, 2, 0]]  # tiny problems: one batch, narrowest first
    assert _width_groups([512, 16, 64, 32], n=500) == [[1, 3, 2], [0]]  # 500 x 512 is not tiny any more
    assert _width_groups([8], n=10) == [[0]]


def test_split_groups_and_finished_problems_leaving_the_batch_give_each_layers_own_fit(digits, monkeypatch):
    # force one group per width: layers finish at different iterations and leave their batch early
    monkeypatch.setattr("lightning_introspect.methods.probes._PAD_FREE_VALUES", 0)
    x, y = digits
    layers = {"wide": x, "narrow": x[:, :9].contiguous(), "mid": x[:, :24].contiguous(), "same": x[:, ::3].contiguous()}
    together = fit_probes(layers, y, solver="torch")
    iters = {name: r.n_iter for name, r in together.items()}
    assert len(set(iters.values())) > 1  # they really stopped at different iterations
    for name, feats in layers.items():
        alone = fit_probe(feats, y, solver="torch")
        assert abs(together[name].n_iter - alone.n_iter) <= 3  # padded within a group: rounding differs a little
        assert together[name].accuracy == pytest.approx(alone.accuracy, abs=1.5 / alone.n_test)
        gap = np.abs(together[name].state["coef"] - alone.state["coef"]).max()
        assert gap <= 5e-3 * np.abs(alone.state["coef"]).max()
