"""Benchmark: linear-probe fitting cost against one training epoch of the digits demo.

Measures, in one run on this machine:

0. the probe solver alone, at equal accuracy: ``fit_probes(solver="torch")`` (``torch.optim.LBFGS``, strong-Wolfe
   line search, on the features' device) against scikit-learn's ``LogisticRegression(solver="lbfgs")`` (what
   ``solver="sklearn"`` runs in its background thread) on the same objective, on the probe sizes the callback
   fits (2,000 cached samples x 256 features x 10 classes, one layer; and 5 layers of widths 64..512), at the
   callback's tolerance (1e-3) and sklearn's (1e-4). Printed: milliseconds, iterations, the objective's gap to
   a tightly converged reference, the accuracy difference to it, and the time ratio. A hand-written L-BFGS
   that fitted all layers as one batched problem was measured here against both and removed: on this 2-core
   CPU it took 1.3-2.3x sklearn's time and 0.85-1.8x torch.optim.LBFGS's at the same accuracy;
1. one training epoch (with its validation pass) of the demo (DigitsCNN, all digits, 32 px, batch 64);
2. fitting probes on 4 layers x 10k cached samples (synthetic features of realistic pooled widths
   64 / 128 / 256 / 512, 10 classes) with each solver, and 10k x 2048 (one layer; the GPU anchor shape);
3. the same on the real digits features of the 4 auto layers (all 1797 digits; there are no more);
4. whole demo fits (3 epochs) without probes, with the sklearn (background) path and with the torch
   path: the extra wall time and the time LinearProbes blocked the training thread.

Run: ``python benchmarks/bench_probes.py [--quick] [--threads N] [--solvers-only]``. Prints ratios; asserts nothing.
Whole-fit wall times on a shared machine swing with other people's jobs; the blocking time the
callback measures itself (``LinearProbes.timings``) is the robust number.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
import warnings
from typing import Any

import torch

from lightning_introspect._lightning import Callback, Trainer, pl
from lightning_introspect.callbacks.linear_probes import LinearProbes, auto_probe_layers
from lightning_introspect.demo import DigitsCNN, DigitsDataModule, load_digits_tensors
from lightning_introspect.methods.probes import (
    blas_threads,
    classification_scores,
    fit_probes,
    pool_activation,
    probe_split,
)
from lightning_introspect.methods.probes.fitting import _softmax_objective, _standardise

warnings.filterwarnings("ignore")


class EpochTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # after the epoch's validation pass
        self.times.append(time.perf_counter() - self._start)


def demo_fit(epochs: int, callbacks: list) -> tuple[float, EpochTimer, DigitsCNN]:
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64, seed=0)
    timer = EpochTimer()
    model = DigitsCNN()
    trainer = Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer, *callbacks],
        default_root_dir=tempfile.mkdtemp(prefix="bench_probes_"),  # the file fallback writes figures there
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return time.perf_counter() - start, timer, model


def synthetic(n: int, widths: list[int], classes: int = 10, seed: int = 0, latent: int = 32) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """ReLU features mixed from a class-dependent latent code: correlated and non-negative like pooled conv
    features, so L-BFGS needs tens of iterations as on real ones; later "layers" separate the classes better."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    feats = {}
    for i, d in enumerate(widths):
        centers = torch.randn(classes, latent, generator=gen) * (0.35 + 0.1 * i)
        z = centers[y] + torch.randn(n, latent, generator=gen)
        mix = torch.randn(latent, d, generator=gen) / math.sqrt(latent)
        feats[f"layer{i}_{d}"] = (z @ mix + 0.3 * torch.randn(n, d, generator=gen)).relu()
    return feats, y


def time_solver(features: dict[str, torch.Tensor], labels: torch.Tensor, solver: str, *, blas: int | None = 1) -> tuple[float, dict]:
    start = time.perf_counter()
    if solver == "sklearn":
        with blas_threads(blas):
            results = fit_probes({k: v.numpy() for k, v in features.items()}, labels.numpy(), solver="sklearn")
    else:
        results = fit_probes(features, labels, solver="torch")
        if labels.device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start, results


# ---------------------------------------------------------------------------- [0] solver comparison
def _problem(x: torch.Tensor, y: torch.Tensor, C: float = 1.0) -> dict:
    """The probe's objective on one layer exactly as ``fit_probes`` sets it up: same split, same
    standardisation, sklearn's scaling of the L2 penalty (bias not penalised)."""
    train, test = probe_split(y, 0.3, 0)
    tr = torch.as_tensor(train)
    z = _standardise(x.float(), tr)
    classes = torch.unique(y[tr])
    onehot_t = torch.nn.functional.one_hot(torch.searchsorted(classes, y[tr]), classes.numel()).float().T.contiguous()
    ztr = z[tr].unsqueeze(0)
    return {
        "z": z, "ztr": ztr, "ztr_t": ztr.transpose(1, 2).contiguous(), "onehot_t": onehot_t, "classes": classes,
        "train": train, "test": test, "penalty": 0.5 / (C * train.size), "y": y.numpy(),
    }


def _objective(prob: dict, coef: torch.Tensor, intercept: torch.Tensor) -> float:
    theta = torch.cat([torch.as_tensor(coef, dtype=torch.float32), torch.as_tensor(intercept, dtype=torch.float32)[:, None]], 1)
    f, _ = _softmax_objective(prob["ztr_t"], prob["ztr"], prob["onehot_t"], theta[None], prob["penalty"])
    return float(f[0])


def _test_accuracy(prob: dict, coef: Any, intercept: Any) -> float:
    logits = prob["z"] @ torch.as_tensor(coef, dtype=torch.float32).T + torch.as_tensor(intercept, dtype=torch.float32)
    pred = prob["classes"][logits.argmax(1)].numpy()
    return classification_scores(prob["y"][prob["test"]], pred[prob["test"]])[0]


def _run_solver(solver: str, features: dict[str, torch.Tensor], labels: torch.Tensor, tol: float, max_iter: int) -> tuple[float, dict]:
    start = time.perf_counter()
    if solver == "sklearn":
        with blas_threads(1):
            results = fit_probes({k: v.numpy() for k, v in features.items()}, labels.numpy(), solver="sklearn", tol=tol, max_iter=max_iter)
    else:
        results = fit_probes(features, labels, solver="torch", tol=tol, max_iter=max_iter)
    seconds = time.perf_counter() - start
    return seconds, {n: (r.state["coef"], r.state["intercept"], r.n_iter) for n, r in results.items()}


def solver_comparison(repeats: int) -> None:
    print("\n[0] probe solvers alone, same objective (L2 logistic regression, C=1, standardised features, 70/30 split)")
    print("    gap: objective minus that of a tightly converged sklearn fit (tol 1e-8); acc: probe-test accuracy")
    cases = {
        "2000 x 256, 10 classes, 1 layer": synthetic(2000, [256], seed=2),
        "2000 samples, 5 layers (64/128/256/256/512), 10 classes": synthetic(2000, [64, 128, 256, 256, 512], seed=3),
    }
    solvers = ("torch (torch.optim.LBFGS)", "sklearn")
    for title, (feats, labels) in cases.items():
        probs = {n: _problem(x, labels) for n, x in feats.items()}
        with blas_threads(1):
            ref = fit_probes({k: v.numpy() for k, v in feats.items()}, labels.numpy(), solver="sklearn", tol=1e-8, max_iter=5000)
        f_star = {n: _objective(probs[n], r.state["coef"], r.state["intercept"]) for n, r in ref.items()}
        print(f"  {title}: reference accuracies " + ", ".join(f"{r.accuracy:.3f}" for r in ref.values()))
        for tol in (1e-3, 1e-4):
            times: dict[str, float] = {}
            for solver in solvers:
                key = solver.split()[0]
                best, fits = min((_run_solver(key, feats, labels, tol, 1000) for _ in range(repeats)), key=lambda r: r[0])
                times[solver] = best
                accs = [_test_accuracy(probs[n], c, b) for n, (c, b, _) in fits.items()]
                gaps = [_objective(probs[n], c, b) - f_star[n] for n, (c, b, _) in fits.items()]
                iters = [it for _, _, it in fits.values()]
                dev = max(abs(a - r.accuracy) for a, r in zip(accs, ref.values()))
                print(
                    f"    tol {tol:g}  {solver:28s} {best * 1e3:8.1f} ms | iterations {iters} | max objective gap "
                    f"{max(gaps):.1e} | max |acc - ref| {dev:.3f}"
                )
            print(f"    tol {tol:g}  ratio torch / sklearn: {times[solvers[0]] / times['sklearn']:.2f} x")


def fmt(results: dict) -> str:
    return ", ".join(f"{k}: acc {r.accuracy:.3f} ({r.n_iter} it)" for k, r in results.items())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a 2-epoch fit comparison")
    parser.add_argument("--solvers-only", action="store_true", help="only [0], the solver comparison")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: on a shared machine multi-threaded ops spin while a thread is "
        "descheduled, which makes timings swing several-fold)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs = 2 if args.quick else 3
    print(f"machine: {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
          f"cuda {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")

    solver_comparison(repeats=2 if args.quick else 3)
    if args.solvers_only:
        return

    # 1. one demo epoch
    _, timer, model = demo_fit(2, [])
    epoch = min(timer.times)
    print(f"\n[1] demo training epoch (train + validation, 1257 + 540 digits, batch 64): {epoch:.2f} s")

    # 2. synthetic 4 layers x 10k
    print("\n[2] probes on 4 layers x 10k cached samples (widths 64/128/256/512, 10 classes), max_iter=100")
    feats, labels = synthetic(10_000, [64, 128, 256, 512])
    for solver, blas in (("sklearn", 1), ("sklearn", None), ("torch", None)):
        best, results = min((time_solver(feats, labels, solver, blas=blas) for _ in range(1 if args.quick else 2)), key=lambda r: r[0])
        label = solver + (" (1 BLAS thread, as in the background worker)" if blas == 1 else " (default BLAS threads)" if solver == "sklearn" else " (CPU)")
        print(f"  {label}: {best:.2f} s = {best / epoch:.2f} x one demo epoch | {fmt(results)}")
    wide, wide_y = synthetic(10_000, [2048], seed=1)
    for solver in ("sklearn", "torch"):
        t, results = time_solver(wide, wide_y, solver, blas=None)
        print(f"  10k x 2048, one layer, {solver} (CPU, all threads): {t:.2f} s | {fmt(results)}")
    if torch.cuda.is_available():
        gpu = {k: v.cuda() for k, v in wide.items()}
        time_solver(gpu, wide_y.cuda(), "torch")  # warm-up
        t, results = time_solver(gpu, wide_y.cuda(), "torch")
        print(f"  10k x 2048, one layer, torch on {torch.cuda.get_device_name()}: {t:.3f} s | {fmt(results)}")

    # 3. real digits features of the 4 auto layers (all 1797 digits), from the model trained 2 epochs
    x, y = load_digits_tensors(32)
    dm = DigitsDataModule()
    dm.setup("fit")
    x = (x - dm.mean) / dm.std
    model.eval()
    names = auto_probe_layers(model, x[:2])
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: captured[n].append(pool_activation(o))) for n in names]
    try:
        with torch.no_grad():
            for chunk in x.split(512):
                model(chunk)
    finally:
        for h in handles:
            h.remove()
    real = {n: torch.cat(v) for n, v in captured.items()}
    print(f"\n[3] real digits features, layers {names} (widths {[v.shape[1] for v in real.values()]}), 1797 samples")
    for solver in ("sklearn", "torch"):
        t, results = time_solver(real, y, solver)
        print(f"  {solver}: {t:.2f} s = {t / epoch:.2f} x one demo epoch | {fmt(results)}")

    # 4. whole fits
    print(f"\n[4] demo fit, {epochs} epochs, LinearProbes(layers='auto') every epoch + init/input baselines")
    rounds = 1 if args.quick else 3
    print(f"  (runs alternate none / sklearn / torch, {rounds}x; per config the fastest run and its fastest epoch are kept;")
    print(f"   this machine is shared: load average {os.getloadavg()[0]:.1f} at the start of [4])")
    totals: dict[str, float] = {}
    epochs_min: dict[str, float] = {}
    cpu: dict[str, float] = {}
    kept: dict[str, LinearProbes] = {}
    for _ in range(rounds):
        for solver in ("none", "sklearn", "torch"):
            probes = LinearProbes(solver=solver, on_error="raise") if solver != "none" else None
            cpu_start = time.process_time()
            total, timer, _ = demo_fit(epochs, [probes] if probes else [])
            used = time.process_time() - cpu_start
            epochs_min[solver] = min(epochs_min.get(solver, math.inf), *timer.times)
            if total < totals.get(solver, math.inf):
                totals[solver], cpu[solver] = total, used
                if probes is not None:
                    kept[solver] = probes
    print(f"   load average {os.getloadavg()[0]:.1f} at the end)")
    base = totals["none"]
    epoch = epochs_min["none"]
    print(f"  no probes: {base:.1f} s wall, {cpu['none']:.1f} s CPU; fastest epoch {epoch:.2f} s")
    for solver in ("sklearn", "torch"):
        probes, total = kept[solver], totals[solver]
        print(
            f"  {solver}: fastest epoch {epochs_min[solver]:.2f} s ({epochs_min[solver] / epoch:.2f} x the no-probe epoch, "
            f"includes capture + fit + logging at epoch end); fit {total:.1f} s wall ({total / base:.2f} x), "
            f"{cpu[solver]:.1f} s CPU ({cpu[solver] / cpu['none']:.2f} x)"
        )
        t = probes.timings
        blocking = t["capture"] + t["baseline_pass"] + t["fit_inline"] + t["submit"] + t["wait"] + t["log"]
        solver_time = sum(r.seconds for res in probes.results.values() for r in res.values())
        print(
            f"    blocked the training thread {blocking:.2f} s in {epochs} epochs ({blocking / epochs / epoch:.2f} x one "
            f"epoch per epoch); solver time {solver_time:.2f} s"
            + (" (in the background)" if solver == "sklearn" else " (inline)")
        )
        print("    blocking by kind: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items() if v))
        print(f"    best layer {probes.best_layer}; " + "; ".join(probes.summary_lines()))


if __name__ == "__main__":
    main()
