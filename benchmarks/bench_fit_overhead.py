"""Fit time and peak memory of the digits demo with the default callback set vs none, in one run.

Each configuration runs in its own subprocess (so peak RSS is its own), alternating, ``--repeats``
times; the script prints the medians and the ratio.

    python benchmarks/bench_fit_overhead.py [--epochs 6] [--repeats 3] [--config demo|default]

``--config demo`` is the demo's set (everything on, demo-sized schedules); ``default`` is
``introspection_callbacks({})``-style defaults with the few arguments the digits task needs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, tempfile
import torch
torch.set_num_threads(int(sys.argv[4]))
from lightning_introspect._lightning import Trainer, pl
from lightning_introspect.config import introspection_callbacks
from lightning_introspect.demo import DigitsCNN, DigitsDataModule, demo_config
mode, epochs, config = sys.argv[1], int(sys.argv[2]), sys.argv[3]
pl.seed_everything(0, verbose=False)
dm = DigitsDataModule(seed=0); dm.setup("fit")
if mode == "none":
    callbacks = []
elif config == "demo":
    callbacks = introspection_callbacks(demo_config(mean=dm.mean, std=dm.std))
else:
    callbacks = introspection_callbacks(demo_config(mean=dm.mean, std=dm.std, defaults=True))
loggers = __import__(f"{pl.__name__}.loggers", fromlist=["TensorBoardLogger"])
with tempfile.TemporaryDirectory() as tmp:
    trainer = Trainer(max_epochs=epochs, accelerator="cpu", logger=loggers.TensorBoardLogger(tmp), callbacks=callbacks,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, log_every_n_steps=5)
    start = time.perf_counter()
    trainer.fit(DigitsCNN(), datamodule=dm)
    seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "callbacks": [type(c).__name__ for c in callbacks]}))
"""


def run(mode: str, epochs: int, config: str, threads: int) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(epochs), config, str(threads)], capture_output=True, text=True, check=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", choices=("demo", "default"), default="default")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"none": [], "callbacks": []}
    for _ in range(args.repeats):
        for mode in ("none", "callbacks"):
            results[mode].append(run(mode, args.epochs, args.config, args.threads))
    none_s = statistics.median(r["seconds"] for r in results["none"])
    cb_s = statistics.median(r["seconds"] for r in results["callbacks"])
    none_mb = max(r["peak_rss_mb"] for r in results["none"])
    cb_mb = max(r["peak_rss_mb"] for r in results["callbacks"])
    print(f"callbacks ({args.config}): {', '.join(results['callbacks'][0]['callbacks'])}")
    print(f"{'':28s}{'none':>10s}{'callbacks':>12s}{'ratio':>8s}")
    print(f"{'fit seconds (median of ' + str(args.repeats) + ')':28s}{none_s:10.2f}{cb_s:12.2f}{cb_s / none_s:8.2f}")
    print(f"{'peak RSS MB':28s}{none_mb:10.0f}{cb_mb:12.0f}{cb_mb / none_mb:8.2f}")
    print(f"RATIO fit_overhead_{args.config} {cb_s / none_s:.3f}")
    print(f"RATIO peak_memory_{args.config} {cb_mb / none_mb:.3f}")


if __name__ == "__main__":
    main()
