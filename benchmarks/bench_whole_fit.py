"""The figure users feel: a whole fit with the default callback set / the same fit without, side by side.

Two models, two fit lengths, each fit in its own process (so each starts cold, as a user's does):

* ``demo``: the digits demo CNN (32 px, 1,257 training images);
* ``resnet64``: a small ResNet (three residual stages, ~0.3M parameters) on the same digits at 64 px;

at 10 and 50 epochs, with ``introspection_callbacks({...})`` (every callback on, its defaults, the
default budget) and with nothing. The 10-epoch fits also run the default set with ``budget=False``,
every analysis at its configured sizes, to show what the budget saves. Printed: seconds, ratios, and the
budget's decisions of the budgeted 10-epoch demo fit.

A fit's wall time on a small shared machine varies by 10-20 % from run to run, so each configuration
runs ``--repeats`` times (``--long-repeats`` for fits longer than 10 epochs), the configurations
interleaved (none, default, no budget, none, ...) so that drift hits them alike; the seconds shown are
medians, the ratio is median / median, and the range of the per-round ratios is printed beside it. The
callbacks' own clocks give a steadier second reading: (median fit without + median time inside the
callbacks) / median fit without.

    python benchmarks/bench_whole_fit.py [--epochs 10 50] [--models demo resnet64] [--repeats 3] [--device cpu|cuda] [--budget 0.1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, tempfile, time, warnings
import torch
from torch import nn
import torch.nn.functional as F
warnings.filterwarnings("ignore")
torch.set_num_threads(2)
from lightning_introspect._lightning import LightningModule, Trainer, pl
from lightning_introspect.config import introspection_callbacks
from lightning_introspect.demo import DigitsCNN, DigitsDataModule

model_name, epochs, mode, accelerator, budget = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.short(x))


class ResNet64(DigitsCNN):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                      Block(32, 32, 1), Block(32, 64, 2), Block(64, 96, 2))
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


pl.seed_everything(0, verbose=False)
dm = DigitsDataModule(seed=0, size=64 if model_name == "resnet64" else 32)
dm.setup("fit")
model = ResNet64() if model_name == "resnet64" else DigitsCNN()
config = {"per_class_metrics": {"num_classes": 10}}
budget = False if mode == "nobudget" else (None if budget == "default" else float(budget))
callbacks = [] if mode == "none" else introspection_callbacks(config, budget=budget)
loggers = __import__(f"{pl.__name__}.loggers", fromlist=["TensorBoardLogger"])
with tempfile.TemporaryDirectory() as tmp:
    trainer = Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=loggers.TensorBoardLogger(tmp),
                      callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
budget = next((cb.budget for cb in callbacks if getattr(cb, "budget", None) is not None), None)
print(json.dumps({"seconds": seconds, "params": sum(p.numel() for p in model.parameters()),
                  "own": {type(c).__name__: round(c.seconds_total, 2) for c in callbacks},
                  "choices": [c.note for _, _, c in budget.choices] if budget else []}))
"""


def run(model: str, epochs: int, mode: str, device: str, budget: str = "default") -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, model, str(epochs), mode, "gpu" if device == "cuda" else "cpu", budget],
                         capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr[-3000:])
        res.check_returncode()
    return json.loads(res.stdout.strip().splitlines()[-1])


def median_seconds(fits: list[dict]) -> float:
    return statistics.median(f["seconds"] for f in fits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--models", nargs="+", choices=("demo", "resnet64"), default=["demo", "resnet64"])
    parser.add_argument("--repeats", type=int, default=3, help="fits per configuration for fits of up to 10 epochs")
    parser.add_argument("--long-repeats", type=int, default=1, help="fits per configuration for longer fits")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--budget", default="default",
                        help="the default set's budget fraction (default: the package's default), e.g. 0.1 to see how far it moves the ratio")
    args = parser.parse_args()
    short = min(args.epochs)
    print(f"{'model':10s}{'epochs':>7s}{'none s':>9s}{'default s':>11s}{'ratio':>7s}{'no budget s':>13s}{'ratio':>7s}")
    notes: list[str] = []
    for model in args.models:
        for epochs in args.epochs:
            modes = ["none", "default"] + (["nobudget"] if epochs == short else [])
            repeats = args.repeats if epochs <= 10 else args.long_repeats
            fits: dict[str, list[dict]] = {mode: [] for mode in modes}
            for _ in range(max(1, repeats)):
                for mode in modes:
                    fits[mode].append(run(model, epochs, mode, args.device, args.budget))
            none, default = median_seconds(fits["none"]), median_seconds(fits["default"])
            ratio = default / none
            per_round = sorted(d["seconds"] / n["seconds"] for n, d in zip(fits["none"], fits["default"]))
            own = statistics.median(sum(f["own"].values()) for f in fits["default"])
            line = f"{model:10s}{epochs:7d}{none:9.1f}{default:11.1f}{ratio:7.2f}"
            print(f"RATIO whole_fit_{model}_{epochs}ep {ratio:.2f}")
            print(f"RATIO whole_fit_clocks_{model}_{epochs}ep {(none + own) / none:.2f}")
            if "nobudget" in fits:
                nobudget = median_seconds(fits["nobudget"])
                line += f"{nobudget:13.1f}{nobudget / none:7.2f}"
                print(f"RATIO whole_fit_nobudget_{model}_{epochs}ep {nobudget / none:.2f}")
                if model == args.models[0]:
                    notes = fits["default"][-1]["choices"]
            spread = f"per-round ratios {per_round[0]:.2f}-{per_round[-1]:.2f} over {len(per_round)}" if len(per_round) > 1 else "one round"
            inside = ", ".join(f"{k} {statistics.median(f['own'][k] for f in fits['default']):.1f}" for k in fits["default"][0]["own"])
            print(line + f"   (clocks {(none + own) / none:.2f}x; {spread}; {fits['default'][0]['params'] / 1e6:.2f}M parameters; "
                  f"inside each callback: {inside})", flush=True)
    print(f"\nthe budget's decisions in the {short}-epoch {args.models[0]} fit:")
    for note in notes:
        print("  " + note)


if __name__ == "__main__":
    main()
