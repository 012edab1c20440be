"""Peak memory of a fit on large images: the default callback set / none, and each callback alone.

A small conv net fits synthetic 3x384x384 images (a bright square in one of four quadrants decides the
class; the images are generated per index, so the data set itself holds no memory) for a few batches and
``--epochs`` epochs on the CPU. Each configuration runs in its own subprocess, so its peak resident memory
(``resource.getrusage(...).ru_maxrss``) is its own: no callbacks, the default set
(``introspection_callbacks({})``, the default budget) and every callback of that set alone (its own
section enabled, the others off). Printed: the peaks in MB and their ratio to the fit without callbacks;
the headline is ``RATIO peak_memory_384px`` (the default set / none; the target is at most 1.5).

The callbacks' extra passes (sanity checks, the perturbation test, feature visualisation, attributions)
run in chunks sized to a memory budget, so their peaks stay near the training step's own.

With ``--device cuda`` the fits run on the GPU and the peak allocated CUDA memory
(``torch.cuda.max_memory_allocated``) is reported beside the peak RSS (``RATIO peak_cuda_memory_384px``).

    python benchmarks/bench_memory.py [--size 384] [--epochs 2] [--batch-size 16] [--device cpu|cuda] [--only none default SanityChecks]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, tempfile, warnings
import torch
from torch import nn
warnings.filterwarnings("ignore")
torch.set_num_threads(int(sys.argv[5]))
from lightning_introspect._lightning import LightningModule, Trainer, pl
from lightning_introspect.config import CALLBACKS, introspection_callbacks

which, size, epochs, batch, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[6]
CLASSES, TRAIN_BATCHES, VAL_BATCHES = 4, 4, 4


class Squares(torch.utils.data.Dataset):
    # image i: noise plus a bright square in quadrant (i % 4), drawn from a generator seeded by (seed, i)
    def __init__(self, n, seed):
        self.n, self.seed = n, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(self.seed * 100003 + i)
        x = torch.randn(3, size, size, generator=gen) * 0.5
        c = i % CLASSES
        h = size // 2
        top, left = (c // 2) * h, (c % 2) * h
        side = size // 4
        dy, dx = (int(v) for v in torch.randint(0, h - side, (2,), generator=gen))
        x[:, top + dy : top + dy + side, left + dx : left + dx + side] += 1.5
        return x, c


class Net(LightningModule):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, CLASSES))

    def forward(self, x):
        return self.classifier(self.features(x))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        return logits

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


pl.seed_everything(0, verbose=False)
train = torch.utils.data.DataLoader(Squares(TRAIN_BATCHES * batch, 0), batch_size=batch, shuffle=True)
val = torch.utils.data.DataLoader(Squares(VAL_BATCHES * batch, 1), batch_size=batch)
if which == "none":
    callbacks = []
elif which == "default":
    callbacks = introspection_callbacks({})
else:  # one callback of the default set alone, under the same budget
    sections = {s: {"enabled": CALLBACKS[s].split(":")[1] == which} for s in CALLBACKS}
    callbacks = introspection_callbacks(sections)
loggers = __import__(f"{pl.__name__}.loggers", fromlist=["TensorBoardLogger"])
with tempfile.TemporaryDirectory() as tmp:
    trainer = Trainer(max_epochs=epochs, accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=loggers.TensorBoardLogger(tmp), callbacks=callbacks,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      log_every_n_steps=1)
    trainer.fit(Net(), train, val)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
                  "callbacks": [type(c).__name__ for c in callbacks],
                  "skipped": {type(c).__name__: c.skip_reason for c in callbacks if getattr(c, "skip_reason", None)},
                  "own_seconds": {type(c).__name__: round(c.seconds_total, 2) for c in callbacks}}))
"""

DEFAULT_SET = ("PerClassMetrics", "Misclassifications", "WeightHistograms", "LinearProbes", "Attributions",
               "FeatureVisualization", "SanityChecks")


def run(which: str, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, which, str(args.size), str(args.epochs), str(args.batch_size), str(args.threads),
                          args.device],
                         capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr[-3000:])
        res.check_returncode()
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["seconds"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=384, help="image side in pixels")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", default=None, help="configurations to run: none, default, or callback class names")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the fit on the GPU, and its peak allocated CUDA memory reported beside the peak RSS")
    args = parser.parse_args()
    configs = args.only or ["none", "default", *DEFAULT_SET]
    results: dict[str, dict] = {}
    for which in configs:  # one line as each finishes: a run stopped by a time limit still reports the finished ones
        results[which] = res = run(which, args)
        cuda_mb = f", peak CUDA {res['peak_cuda_mb']:.0f} MB" if res["peak_cuda_mb"] is not None else ""
        print(f"{which}: peak RSS {res['peak_rss_mb']:.0f} MB{cuda_mb} ({res['seconds']:.1f} s)", flush=True)
    base = results.get("none", {}).get("peak_rss_mb")
    cuda = args.device == "cuda"
    base_cuda = results.get("none", {}).get("peak_cuda_mb")
    print(f"3x{args.size}x{args.size} images, batch {args.batch_size}, {args.epochs} epochs, {args.device}, {args.threads} torch threads")
    print(f"{'configuration':24s}{'peak RSS MB':>12s}{'/ none':>8s}" + (f"{'CUDA MB':>10s}{'/ none':>8s}" if cuda else "") + f"{'seconds':>9s}")
    for which, res in results.items():
        ratio = f"{res['peak_rss_mb'] / base:8.2f}" if base else f"{'':8s}"
        on_gpu = f"{res['peak_cuda_mb']:10.0f}" + (f"{res['peak_cuda_mb'] / base_cuda:8.2f}" if base_cuda else f"{'':8s}") if cuda else ""
        skipped = f"  (skipped: {res['skipped']})" if res.get("skipped") else ""
        print(f"{which:24s}{res['peak_rss_mb']:12.0f}{ratio}{on_gpu}{res['seconds']:9.1f}{skipped}")
    if base and "default" in results:
        print(f"RATIO peak_memory_{args.size}px {results['default']['peak_rss_mb'] / base:.3f}")
        if cuda and base_cuda:
            print(f"RATIO peak_cuda_memory_{args.size}px {results['default']['peak_cuda_mb'] / base_cuda:.3f}")
    for which, res in results.items():
        if which not in ("none", "default") and base:
            print(f"RATIO peak_memory_{args.size}px_{which} {res['peak_rss_mb'] / base:.3f}")


if __name__ == "__main__":
    main()
