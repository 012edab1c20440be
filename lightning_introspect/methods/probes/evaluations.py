"""The probe fits of a run of evaluations (each epoch, and the baselines), as numbers: which layers can be
fitted, which solver, inline or in a background worker, the warm start from the previous epoch, and the
per-layer accuracies recorded in the order the evaluations were made.

Pure Python + torch (no Lightning): the caller says when an evaluation's features are ready (:meth:`ProbeEvaluations.fit`)
and logs what :meth:`ProbeEvaluations.finished` hands back.

Example:
    >>> import torch
    >>> from lightning_introspect.methods.probes import FeatureCache
    >>> cache = FeatureCache(200)
    >>> x = torch.randn(200, 8)
    >>> cache.add({"a": x, "b": torch.randn(200, 3)}, (x[:, 0] > 0).long())
    >>> evaluations = ProbeEvaluations(solver="torch")
    >>> evaluations.fit(0, cache, step=10) is None  # no layer skipped
    True
    >>> [(key, step, sorted(results)) for key, step, results in evaluations.finished()]
    [(0, 10, ['a', 'b'])]
    >>> evaluations.best_layer
    'a'
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import torch

from lightning_introspect.methods.probes.cache import FeatureCache, LayerCaches
from lightning_introspect.methods.probes.fitting import (
    ProbeResult,
    auto_solver,
    best_layer,
    blas_threads,
    fit_probes,
)

#: ``solver="auto"`` on CPU: fit inline with torch up to this many cached feature values in all layers
INLINE_FIT_VALUES = 1 << 20

Finished = tuple[int | str, int, dict[str, ProbeResult]]


class ProbeEvaluations:
    """The fits of one run (a fit of the model): epochs (int keys, warm-started from the previous epoch) and
    baselines (str keys, e.g. ``"init"``, ``"input"``), recorded in submission order.

    ``solver="torch"`` fits inline (on the cache's device); ``"sklearn"`` in a background thread (one BLAS
    thread), so the caller's loop goes on; ``"auto"`` picks per evaluation by the size of the cached features
    (:func:`~lightning_introspect.methods.probes.auto_solver`, at most :data:`INLINE_FIT_VALUES` numbers inline).

    Args:
        solver: ``"torch"``, ``"sklearn"`` or ``"auto"``.
        test_fraction, seed, max_iter, tol, C: as in :func:`~lightning_introspect.methods.probes.fit_probes`.
        order: the probed layers in execution order (ties of :attr:`best_layer` go to the shallowest).

    Attributes:
        history: ``{key: {layer: test accuracy}}``.
        macro_f1: the same shape, with macro-F1.
        results: ``{key: {layer: ProbeResult}}``.
        best_layer: the layer with the highest accuracy at the latest epoch.
        warm: ``{layer: ProbeResult.state}`` of the latest epoch's fits (the next epoch starts there).
        timings: seconds in the caller's thread: ``fit_inline``, ``submit``, ``wait``.
    """

    def __init__(
        self,
        *,
        solver: str = "auto",
        test_fraction: float = 0.3,
        seed: int = 0,
        max_iter: int = 100,
        tol: float = 1e-3,
        C: float = 1.0,
        order: Sequence[str] = (),
    ) -> None:
        self.solver = solver
        self.test_fraction, self.seed, self.max_iter, self.tol, self.C = test_fraction, seed, max_iter, tol, C
        self.order = list(order)
        self.history: dict[int | str, dict[str, float]] = {}
        self.macro_f1: dict[int | str, dict[str, float]] = {}
        self.results: dict[int | str, dict[str, ProbeResult]] = {}
        self.best_layer: str | None = None
        self.warm: dict[str, dict[str, Any]] = {}
        self.timings: dict[str, float] = dict.fromkeys(("fit_inline", "submit", "wait"), 0.0)
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.jobs: list[tuple[int | str, int, concurrent.futures.Future]] = []
        self._done: list[Finished] = []

    # the background worker and its futures are live objects: a copy (pickle, deepcopy) starts without them
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "executor": None, "jobs": []}

    def fit(self, key: int | str, cache: FeatureCache | LayerCaches, step: int) -> str | None:
        """Fit the probes of one evaluation on ``cache``: inline (torch) or submitted to the background worker.

        Returns:
            Why layers were skipped (fewer than 4 samples or a single class), or ``None`` when none was.

        Raises:
            ValueError: cached features with NaN / Inf values (no probe can be fitted on them).
        """
        labels: torch.Tensor | dict[str, torch.Tensor]
        skipped = None
        if isinstance(cache, LayerCaches):  # per-pixel probes: every layer its own pixels and labels
            names = [n for n in cache.names if cache.size_of(n) >= 4 and torch.unique(cache.labels_of(n)).numel() >= 2]
            few = [n for n in self.order if n not in names]
            if few:
                skipped = (
                    f"the layers {few} have fewer than 4 labelled pixels or a single class for {key!r}; a probe needs "
                    "at least two classes. Their probes are skipped."
                )
            if not names:
                return skipped
            labels = {n: cache.labels_of(n) for n in names}
        else:
            labels = cache.labels
            if cache.size < 4 or torch.unique(labels).numel() < 2:
                return (
                    f"only {cache.size} labelled samples with {torch.unique(labels).numel()} class(es) for {key!r}; a "
                    "probe needs at least two classes. Skipped."
                )
            names = cache.names
        broken = [n for n in names if not bool(torch.isfinite(cache.features(n)).all())]
        if broken:
            raise ValueError(
                f"LinearProbes: the activations of {broken} hold NaN / Inf values at {key!r} (non-finite weights or "
                "inputs?), so no probe can be fitted."
            )
        solver = self.solver
        if solver == "auto":  # on CPU: by the size of the cached features
            solver = auto_solver(sum(cache.features(n).numel() for n in names), INLINE_FIT_VALUES)
        if solver == "torch":
            self.collect(wait=True)  # keeps the results in order and the warm start sequential
            start = time.perf_counter()
            self._done.append((key, step, self._solve({n: cache.features(n) for n in names}, labels, key, solver)))
            self.timings["fit_inline"] += time.perf_counter() - start
            return skipped
        start = time.perf_counter()
        if self.executor is None:
            self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="linear-probes")
        features = {n: cache.features(n).detach().cpu().numpy().copy() for n in names}
        labels_np: Any = (
            {n: v.detach().cpu().numpy().copy() for n, v in labels.items()} if isinstance(labels, dict)
            else labels.detach().cpu().numpy().copy()
        )
        self.jobs.append((key, step, self.executor.submit(self._solve, features, labels_np, key, solver)))
        self.timings["submit"] += time.perf_counter() - start
        return skipped

    def _solve(self, features: dict[str, Any], labels: Any, key: int | str, solver: str) -> dict[str, ProbeResult]:
        """Fit every layer's probe (the background thread for sklearn). Only epochs read / write the warm start."""
        trained = isinstance(key, int)
        with blas_threads(1) if solver == "sklearn" else contextlib.nullcontext():
            results = fit_probes(
                features, labels, solver=solver, test_fraction=self.test_fraction, seed=self.seed,
                max_iter=self.max_iter, tol=self.tol, C=self.C, warm_start=self.warm if trained else None,
            )
        if trained:
            self.warm = {n: r.state for n, r in results.items() if r.state is not None}
        return results

    def ready(self) -> bool:
        """Whether the oldest background fit has finished (its results can be handed back)."""
        return bool(self.jobs) and self.jobs[0][2].done()

    @property
    def pending(self) -> bool:
        """Whether fits are running or finished results wait to be handed back."""
        return bool(self.jobs or self._done)

    def collect(self, wait: bool = False) -> None:
        """Move finished background fits (in submission order) to the finished ones; ``wait`` for all of them."""
        while self.jobs:
            key, step, future = self.jobs[0]
            if not future.done():
                if not wait:
                    return
                start = time.perf_counter()
                concurrent.futures.wait([future])
                self.timings["wait"] += time.perf_counter() - start
            self.jobs.pop(0)
            self._done.append((key, step, future.result()))

    def finished(self, wait: bool = False) -> list[Finished]:
        """The evaluations finished since the last call, recorded, in submission order: ``(key, step, results)``."""
        self.collect(wait=wait)
        done, self._done = self._done, []
        for key, _step, results in done:
            self.record(key, results)
        return done

    def record(self, key: int | str, results: dict[str, ProbeResult]) -> None:
        """Keep one evaluation's results (and update :attr:`best_layer`)."""
        self.results[key] = results
        self.history[key] = {n: float(r.accuracy) for n, r in results.items()}
        self.macro_f1[key] = {n: float(r.macro_f1) for n, r in results.items()}
        latest = self.latest_epoch()
        if latest is not None:
            self.best_layer = best_layer(self.history[latest], self.order)

    def latest_epoch(self) -> int | None:
        """The latest recorded epoch (``None`` before the first)."""
        return max((k for k in self.history if isinstance(k, int)), default=None)

    def shutdown(self, *, wait: bool) -> None:
        """Stop the background worker: after its running fit (``wait``) or at once, dropping what is queued."""
        executor, self.executor = self.executor, None
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=not wait)
        if not wait:
            self.jobs = []

    def state_dict(self) -> dict[str, Any]:
        """Plain values (loadable with ``weights_only=True``): the recorded scores, the best layer, the warm start.
        Waits for the background fits still running, and keeps the finished ones not yet handed back."""
        self.collect(wait=True)
        for key, _step, results in self._done:
            self.record(key, results)
        return {
            "history": [[k, dict(v)] for k, v in self.history.items()],
            "macro_f1": [[k, dict(v)] for k, v in self.macro_f1.items()],
            "best_layer": self.best_layer or "",
            "warm": {
                n: {k: (v if isinstance(v, str) else torch.as_tensor(v)) for k, v in st.items()}
                for n, st in self.warm.items()
                if st is not None
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave (a resumed fit goes on from there)."""
        self.history = {k: {n: float(a) for n, a in v.items()} for k, v in state.get("history", [])}
        self.macro_f1 = {k: {n: float(a) for n, a in v.items()} for k, v in state.get("macro_f1", [])}
        self.best_layer = state.get("best_layer") or None
        self.warm = {
            n: {k: (v if isinstance(v, str) else torch.as_tensor(v).numpy()) for k, v in st.items()}
            for n, st in dict(state.get("warm", {})).items()
        }
