"""Where a whole fit's introspection time goes: seconds per callback and hook, and the functions that take it.

Runs one fit of ``bench_whole_fit.py`` (the same models, data and default set, in this process) with every
Lightning hook of every callback timed, and Python's profiler switched on only inside the callbacks' runs
(``IntrospectionCallback.run``: the one-off analyses and the per-epoch work, not the training steps). Printed:
the fit's seconds, the hooks' seconds (callback, hook, calls, seconds; the total is what the callbacks add to
the fit), the time Python's cyclic garbage collector took inside and outside the runs, and the ``--top``
functions by their own time inside the runs. On CUDA the profiler's times include waiting for the device
wherever a result is read back.

    python benchmarks/profile_fit.py [--model demo|resnet64] [--epochs 10] [--device cpu|cuda] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
import gc
import io
import pstats
import sys
import time
from pathlib import Path
from typing import Any

HOOKS = (
    "setup", "teardown", "on_fit_start", "on_fit_end", "on_train_start", "on_train_end", "on_train_epoch_start",
    "on_train_epoch_end", "on_validation_epoch_start", "on_validation_epoch_end", "on_train_batch_start",
    "on_train_batch_end", "on_validation_batch_start", "on_validation_batch_end", "on_before_optimizer_step",
    "state_dict", "load_state_dict", "on_save_checkpoint", "on_load_checkpoint",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("demo", "resnet64"), default="demo")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    from lightning_introspect._lightning import pl
    from lightning_introspect.callbacks import base

    seconds: dict[tuple[str, str], float] = collections.defaultdict(float)
    calls: collections.Counter[tuple[str, str]] = collections.Counter()
    profiler = cProfile.Profile()
    depth = [0]

    inside: set[tuple[int, str]] = set()  # (callback, hook) being timed: a super() call is not counted again

    def timed(hook: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(self: Any, *a: Any, **k: Any) -> Any:
            key = (id(self), hook)
            if key in inside:
                return fn(self, *a, **k)
            inside.add(key)
            start = time.perf_counter()
            try:
                return fn(self, *a, **k)
            finally:
                inside.discard(key)
                seconds[(type(self).__name__, hook)] += time.perf_counter() - start
                calls[(type(self).__name__, hook)] += 1
        return wrapper

    for cls in _subclasses(base.IntrospectionCallback):
        for hook in HOOKS:
            own = next((k.__dict__[hook] for k in cls.__mro__ if hook in k.__dict__ and k is not pl.Callback), None)
            if own is not None:
                setattr(cls, hook, timed(hook, own))

    run = base.IntrospectionCallback.run

    @functools.wraps(run)
    def profiled_run(self: Any, *a: Any, **k: Any) -> Any:
        depth[0] += 1
        if depth[0] == 1:
            profiler.enable()
        try:
            return run(self, *a, **k)
        finally:
            if depth[0] == 1:
                profiler.disable()
            depth[0] -= 1

    base.IntrospectionCallback.run = profiled_run  # type: ignore[method-assign]

    collected: dict[str, float] = collections.defaultdict(float)
    started = [0.0]

    def on_collect(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collected[f"generation {info['generation']} {'inside runs' if depth[0] else 'outside'}"] += time.perf_counter() - started[0]

    gc.callbacks.append(on_collect)
    child = Path(__file__).with_name("bench_whole_fit.py").read_text().split('CHILD = r"""')[1].split('"""')[0]
    sys.argv = ["profile_fit", args.model, str(args.epochs), "default", "gpu" if args.device == "cuda" else "cpu", "default"]
    out = io.StringIO()
    real_stdout, sys.stdout = sys.stdout, out
    try:
        exec(compile(child, "bench_whole_fit.CHILD", "exec"), {"__name__": "__main__"})
    finally:
        sys.stdout = real_stdout
        gc.callbacks.remove(on_collect)
    fit = next((line for line in out.getvalue().splitlines() if line.startswith("{")), "")
    print(f"{args.model}, {args.epochs} epochs, {args.device}: {fit[:200]}")
    print(f"\n{'callback':22s}{'hook':28s}{'calls':>6s}{'seconds':>9s}")
    for (name, hook), s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        if s >= 0.005:
            print(f"{name:22s}{hook:28s}{calls[(name, hook)]:6d}{s:9.3f}")
    print(f"{'all hooks':56s}{sum(seconds.values()):9.3f}")
    print("\ngarbage collection: " + (", ".join(f"{k} {v:.3f} s" for k, v in sorted(collected.items())) or "none"))
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
    print("\ninside the runs, by own time:\n" + text.getvalue().split("\n\n", 1)[-1])


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


if __name__ == "__main__":
    main()
