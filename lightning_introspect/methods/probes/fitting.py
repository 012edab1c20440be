"""Fitting and scoring the probes: standardise, split (stratified, seeded), fit a multinomial logistic
regression with scikit-learn or ``torch.optim.LBFGS`` (on the features' device), score on the held-out split."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np
import torch
import torch.nn.functional as F

from lightning_introspect._torch.guards import one_blas_thread, torch_threads
from lightning_introspect.methods.probes.checks import check_choice
from lightning_introspect.methods.probes.projection import no_autocast

SOLVER_CHOICES = ("sklearn", "torch")

ArrayLike = torch.Tensor | np.ndarray


@contextlib.contextmanager
def blas_threads(n: int | None = 1) -> Iterator[None]:
    """numpy / scipy's BLAS at ``n`` threads in a block (``None``: unchanged), for sklearn fits in a
    background thread: multi-threaded BLAS there competes with the training loop for the same cores and,
    on a busy machine, spins. ``n=1`` is the shared, counted limit of
    :func:`~lightning_introspect._torch.guards.one_blas_thread` (safe while histograms are binned at the
    same time). torch's own thread pool is left alone, so training numerics do not change.
    """
    if n is None:
        yield
        return
    if n == 1:
        with one_blas_thread():
            yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n, user_api="blas"):
        yield


@dataclass
class ProbeResult:
    """The outcome of one probe fit.

    Attributes:
        accuracy: accuracy on the held-out probe-test split.
        macro_f1: macro-averaged F1 on the probe-test split (classes in the labels or predictions).
        train_accuracy: accuracy on the probe-train split.
        n_train, n_test, n_features, n_classes: sizes.
        n_iter: L-BFGS iterations used.
        seconds: wall time of standardisation + fit + scoring.
        solver: ``"sklearn"`` or ``"torch"``.
        state: warm-start state (classes, coefficients, intercept as numpy arrays) for the next fit.
    """

    accuracy: float
    macro_f1: float
    train_accuracy: float
    n_train: int
    n_test: int
    n_features: int
    n_classes: int
    n_iter: int
    seconds: float
    solver: str
    state: dict[str, Any] | None = field(default=None, repr=False)


def probe_split(labels: ArrayLike, test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train / test indices (sorted numpy int64 arrays).

    Each class with at least two samples puts ``round(test_fraction * count)`` of them (at least one,
    at most ``count - 1``) in the test split; a class with a single sample goes to the train split.

    Example:
        >>> tr, te = probe_split(np.array([0] * 10 + [1] * 10), 0.3, seed=0)
        >>> len(tr), len(te)
        (14, 6)
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"Expected `test_fraction` to be in (0, 1), but got {test_fraction!r}.")
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.nonzero(y == c)[0]
        idx = idx[rng.permutation(idx.size)]
        k = 0 if idx.size < 2 else min(idx.size - 1, max(1, round(test_fraction * idx.size)))
        test.append(idx[:k])
        train.append(idx[k:])
    empty = np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(train or [empty])).astype(np.int64), np.sort(np.concatenate(test or [empty])).astype(np.int64)


def classification_scores(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[float, float]:
    """``(accuracy, macro_f1)`` by scikit-learn; macro-F1 averages over the classes present in ``y_true``
    or ``y_pred`` (``f1_score(average="macro")``).

    Example:
        >>> classification_scores(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
        (0.75, 0.7333333333333334)
    """
    from sklearn.metrics import accuracy_score, f1_score

    t = y_true.detach().cpu().numpy() if isinstance(y_true, torch.Tensor) else np.asarray(y_true)
    p = y_pred.detach().cpu().numpy() if isinstance(y_pred, torch.Tensor) else np.asarray(y_pred)
    if t.size == 0:
        return float("nan"), float("nan")
    return float(accuracy_score(t, p)), float(f1_score(t, p, average="macro", zero_division=0.0))


def _as_numpy(x: ArrayLike, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().astype(dtype, copy=False)
    return np.asarray(x, dtype=dtype)


def _warm_ok(state: Mapping[str, Any] | None, solver: str, classes: np.ndarray, n_features: int) -> TypeGuard[Mapping[str, Any]]:
    return (
        state is not None
        and state.get("solver") == solver
        and np.array_equal(np.asarray(state["classes"]), classes)
        and np.asarray(state["coef"]).shape[-1] == n_features
    )


def _fit_sklearn(
    x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, *, C: float, max_iter: int, tol: float,
    warm_start: Mapping[str, Any] | None,
) -> tuple[np.ndarray, np.ndarray, int, dict[str, Any]]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mean = x[train].mean(0)
    std = x[train].std(0)
    std[std < 1e-8] = 1.0
    z = (x - mean) / std
    classes = np.unique(y[train])
    clf = LogisticRegression(C=C, max_iter=max_iter, tol=tol, warm_start=True)
    if _warm_ok(warm_start, "sklearn", classes, x.shape[1]):
        clf.coef_ = np.array(warm_start["coef"], dtype=np.float64)
        clf.intercept_ = np.array(warm_start["intercept"], dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(z[train], y[train])
    state = {"solver": "sklearn", "classes": clf.classes_.copy(), "coef": clf.coef_.copy(), "intercept": clf.intercept_.copy()}
    return clf.predict(z[train]), clf.predict(z[test]), int(np.max(clf.n_iter_)), state


_SMALL_CPU_PROBLEM = 1 << 20  # features (n x D); below this one CPU thread is faster than several


def _standardise(x: torch.Tensor, tr: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` with the probe-train rows' statistics (constant features: std 1)."""
    mean = x[tr].mean(0)
    std = x[tr].std(0, unbiased=False)
    return (x - mean) / torch.where(std < 1e-8, torch.ones_like(std), std)


def _softmax_objective(
    zt: torch.Tensor, z: torch.Tensor, onehot_t: torch.Tensor, theta: torch.Tensor, penalty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Objective and gradient of ``L`` independent L2-regularised multinomial logistic regressions.

    ``zt``: ``(L, D, n)`` standardised features and ``z`` the same as ``(L, n, D)``; ``onehot_t``: ``(k, n)``
    targets; ``theta``: ``(L, k, D + 1)`` (weights, then the bias in the last column). The objective is
    sklearn's: mean cross-entropy plus ``penalty * ||W||^2`` (the bias is not penalised). Logits are kept
    as ``(L, k, n)`` (the class reductions then run along contiguous rows). Returns ``f`` ``(L,)`` and
    the gradient, shaped like ``theta``.
    """
    n = zt.shape[2]
    w = theta[..., :-1]
    logits = torch.baddbmm(theta[..., -1:], w, zt)
    top = logits.amax(1, keepdim=True)
    e = (logits - top).exp_()
    total = e.sum(1, keepdim=True)
    f = ((total.log() + top).sum((1, 2)) - (logits * onehot_t).sum((1, 2))) / n + penalty * w.pow(2).sum((1, 2))
    resid = e.div_(total).sub_(onehot_t).div_(n)  # d f / d logits
    grad = torch.empty_like(theta)
    torch.baddbmm(w, resid, z, beta=2 * penalty, out=grad[..., :-1])
    torch.sum(resid, 2, out=grad[..., -1])
    return f, grad


def _fit_torch(
    x: torch.Tensor, y: torch.Tensor, train: np.ndarray, test: np.ndarray, *, C: float, max_iter: int, tol: float,
    warm_start: Mapping[str, Any] | None,
) -> tuple[np.ndarray, np.ndarray, int, dict[str, Any]]:
    """Fit one probe on ``x`` (rows aligned with ``y``) with ``torch.optim.LBFGS`` on the features' device.

    The objective is sklearn's (:func:`_softmax_objective`, its gradient written out: no autograd graph, no
    ``.backward()``), minimised with a strong-Wolfe line search and history 10 until the largest absolute
    gradient entry is at most ``tol`` (scipy's ``pgtol``, which sklearn's lbfgs uses) or ``max_iter``
    iterations. ``benchmarks/bench_probes.py`` compares it with scikit-learn and measures the time.
    Returns ``(pred_train, pred_test, n_iter, state)``.
    """
    device = x.device
    small_cpu = device.type == "cpu" and x.numel() <= _SMALL_CPU_PROBLEM
    with torch.inference_mode(False), torch.no_grad(), no_autocast(device), torch_threads(1 if small_cpu else None):
        tr = torch.as_tensor(train, device=device)
        te = torch.as_tensor(test, device=device)
        y = y.detach().to(device=device, dtype=torch.long).clone()
        classes = torch.unique(y[tr])
        classes_np = classes.cpu().numpy()
        k, width = classes.numel(), int(x.shape[1])
        onehot_t = F.one_hot(torch.searchsorted(classes, y[tr]), k).float().T.contiguous()
        # sklearn's objective: C * sum(cross-entropy) + ||W||^2 / 2, divided by C * n (the bias is not penalised).
        penalty = 0.5 / (C * max(1, tr.numel()))
        z = _standardise(x.detach().to(device=device, dtype=torch.float32), tr)
        ztr = z[tr].unsqueeze(0)
        ztr_t = ztr.transpose(1, 2).contiguous()
        theta = torch.zeros(1, k, width + 1, device=device)  # weights | bias
        if _warm_ok(warm_start, "torch", classes_np, width):
            theta[0, :, :-1] = torch.as_tensor(np.asarray(warm_start["coef"]), dtype=torch.float32, device=device)
            theta[0, :, -1] = torch.as_tensor(np.asarray(warm_start["intercept"]), dtype=torch.float32, device=device)
        optimizer = torch.optim.LBFGS(
            [theta], lr=1.0, max_iter=max_iter, tolerance_grad=tol, history_size=10, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            with torch.no_grad():  # LBFGS.step enables grad around the closure; nothing here needs it
                f, grad = _softmax_objective(ztr_t, ztr, onehot_t, theta, penalty)
            theta.grad = grad
            return f[0]

        optimizer.step(closure)
        n_iter = int(optimizer.state[theta].get("n_iter", 0))
        coef, intercept = theta[0, :, :-1], theta[0, :, -1]
        pred = classes[torch.addmm(intercept, z, coef.T).argmax(1)]
        state = {
            "solver": "torch",
            "classes": classes_np,
            "coef": coef.cpu().numpy().copy(),
            "intercept": intercept.cpu().numpy().copy(),
        }
        return pred[tr].cpu().numpy(), pred[te].cpu().numpy(), n_iter, state


def fit_probe(
    features: ArrayLike,
    labels: ArrayLike,
    *,
    solver: str = "sklearn",
    test_fraction: float = 0.3,
    seed: int = 0,
    max_iter: int = 100,
    C: float = 1.0,
    tol: float = 1e-4,
    warm_start: Mapping[str, Any] | None = None,
    split: tuple[np.ndarray, np.ndarray] | None = None,
) -> ProbeResult:
    """Fit one multinomial logistic-regression probe and score it on a held-out split.

    Features are standardised with the probe-train mean / std, the split is stratified and seeded
    (:func:`probe_split`), and the model is L2-regularised logistic regression (``C`` as in sklearn,
    the intercept not penalised) fitted with L-BFGS:

    * ``solver="sklearn"``: ``sklearn.linear_model.LogisticRegression(solver="lbfgs")`` on CPU numpy
      arrays (thread-safe; the callback runs it in a background worker);
    * ``solver="torch"``: the same objective, its gradient written out (no autograd), minimised by
      ``torch.optim.LBFGS`` (strong-Wolfe line search) on the features' device (the GPU, where the model
      is); works inside ``torch.inference_mode``.

    Args:
        features: ``(n, D)`` features (tensor or array).
        labels: ``(n,)`` integer labels.
        solver: ``"sklearn"`` or ``"torch"``.
        test_fraction: share of each class held out for scoring.
        seed: seed of the split.
        max_iter: L-BFGS iterations (about 100 reaches the converged accuracy on standardised features).
        C: inverse L2 strength (sklearn's convention).
        tol: gradient tolerance (max-abs of the gradient of the mean loss).
        warm_start: ``ProbeResult.state`` of an earlier fit with the same solver, classes and width.
        split: precomputed ``(train, test)`` indices (shared by several layers).

    Returns:
        A :class:`ProbeResult`.

    Raises:
        ValueError: bad ``solver``, or fewer than two classes in the probe-train split.
    """
    return fit_probes(
        {"probe": features}, labels, solver=solver, test_fraction=test_fraction, seed=seed, max_iter=max_iter, C=C,
        tol=tol, warm_start={"probe": warm_start} if warm_start is not None else None, split=split,
    )["probe"]


def fit_probes(
    features: Mapping[str, ArrayLike],
    labels: ArrayLike | Mapping[str, ArrayLike],
    *,
    solver: str = "sklearn",
    test_fraction: float = 0.3,
    seed: int = 0,
    max_iter: int = 100,
    C: float = 1.0,
    tol: float = 1e-4,
    warm_start: Mapping[str, Mapping[str, Any] | None] | None = None,
    split: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, ProbeResult]:
    """:func:`fit_probe` for several layers on the same samples, with one shared split.

    The layers are fitted one after the other, each its own problem; ``ProbeResult.seconds`` is each
    layer's own time (the first also carries the split).

    Args:
        features: layer name -> ``(n, D_layer)`` features (rows aligned with ``labels``).
        labels: ``(n,)`` integer labels; or layer name -> that layer's own labels (per-pixel probes: every
            layer has its own samples), each layer then with its own split.
        warm_start: layer name -> ``ProbeResult.state`` of the previous fit (missing layers start cold).
        split: precomputed ``(train, test)`` indices (default: :func:`probe_split`).
        solver, test_fraction, seed, max_iter, C, tol: as in :func:`fit_probe`.

    Returns:
        Layer name -> :class:`ProbeResult`, in the order of ``features``.

    Raises:
        ValueError: bad ``solver``, no features, or fewer than two classes in the probe-train split.

    Example:
        >>> x = torch.randn(200, 16)
        >>> y = (x[:, 0] > 0).long()
        >>> results = fit_probes({"a": x, "b": torch.randn(200, 4)}, y, solver="torch")
        >>> results["a"].accuracy > results["b"].accuracy
        True
    """
    check_choice(solver, "solver", SOLVER_CHOICES)
    if not features:
        raise ValueError("Expected `features` to map at least one layer name to its features, but got none.")
    if isinstance(labels, Mapping):
        missing = [n for n in features if n not in labels]
        if missing or split is not None:
            raise ValueError(
                f"Expected per-layer `labels` for every layer of `features` and no shared `split`, but the labels miss "
                f"{missing} (split given: {split is not None})."
            )
        warm = warm_start or {}
        out: dict[str, ProbeResult] = {}
        for name in features:
            out.update(fit_probes(
                {name: features[name]}, labels[name], solver=solver, test_fraction=test_fraction, seed=seed,
                max_iter=max_iter, C=C, tol=tol, warm_start={name: warm.get(name)},
            ))
        return out
    start = time.perf_counter()
    train, test = split if split is not None else probe_split(labels, test_fraction, seed)
    y_np = _as_numpy(labels, np.int64)
    if np.unique(y_np[train]).size < 2 or test.size == 0:
        raise ValueError(
            f"A probe needs at least two classes and a non-empty test split, but got classes {np.unique(y_np).tolist()} "
            f"in {y_np.size} samples."
        )
    warm_start = warm_start or {}
    names = list(features)
    fits: list[tuple[np.ndarray, np.ndarray, int, dict[str, Any]]] = []
    seconds: list[float] = []
    if solver == "sklearn":
        for name in names:
            begin = time.perf_counter()
            fits.append(_fit_sklearn(
                _as_numpy(features[name], np.float32), y_np, train, test, C=C, max_iter=max_iter, tol=tol,
                warm_start=warm_start.get(name),
            ))
            seconds.append(time.perf_counter() - (begin if seconds else start))  # the first carries the split
    else:
        y_t = torch.as_tensor(y_np)
        for name in names:
            begin = time.perf_counter()
            x = features[name]
            x = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float32))
            fits.append(_fit_torch(x, y_t, train, test, C=C, max_iter=max_iter, tol=tol, warm_start=warm_start.get(name)))
            seconds.append(time.perf_counter() - (begin if seconds else start))
    results = {}
    for name, (pred_train, pred_test, n_iter, state), secs in zip(names, fits, seconds, strict=True):
        accuracy, macro_f1 = classification_scores(y_np[test], pred_test)
        results[name] = ProbeResult(
            accuracy=accuracy,
            macro_f1=macro_f1,
            train_accuracy=float((pred_train == y_np[train]).mean()),
            n_train=int(train.size),
            n_test=int(test.size),
            n_features=int(features[name].shape[1]),
            n_classes=int(np.unique(y_np[train]).size),
            n_iter=n_iter,
            seconds=secs,
            solver=solver,
            state=state,
        )
    return results


def auto_solver(n_values: int, inline_limit: int) -> str:
    """The solver ``"auto"`` picks on a CPU for cached features holding ``n_values`` numbers in all layers.

    The torch solver inline while the features are small (its few milliseconds cost less than a background
    scikit-learn fit takes from training's cores), scikit-learn (meant for a background thread) above that.

    Example:
        >>> auto_solver(2_000 * 64, inline_limit=1 << 20), auto_solver(5_000 * 512, inline_limit=1 << 20)
        ('torch', 'sklearn')
    """
    return "torch" if n_values <= inline_limit else "sklearn"


def best_layer(accuracies: Mapping[str, float], order: Sequence[str]) -> str:
    """The layer with the highest probe accuracy; of equal ones the shallowest (first in ``order``).

    Layers missing from ``order`` count as deepest.

    Example:
        >>> best_layer({"a": 0.9, "b": 0.95, "c": 0.95}, ["a", "b", "c"])
        'b'
    """
    rank = {name: i for i, name in enumerate(order)}
    return max(accuracies, key=lambda n: (accuracies[n], -rank.get(n, len(order))))
