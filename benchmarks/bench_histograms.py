"""Histogram logging of every parameter of a ResNet-50-sized model: ours vs ``SummaryWriter.add_histogram``.

Measured in one run, interleaved (naive, ours, naive, ours, ...):

* naive: ``SummaryWriter.add_histogram(name, param, step)`` for every parameter (TensorBoard's
  default bins: it copies to numpy float64 and bins with ``numpy.histogram``), on its own
  ``SummaryWriter`` with TensorBoard's stock record writer (pure-Python CRC-32C, checked below);
* ours: :func:`lightning_introspect.methods.weights.histograms` (32 bins, on the parameters' device;
  on the CPU one min / max pass per tensor, then cache-sized numpy chunks for the bin indices and the
  sums, one bincount per tensor; the large tensors in torch's thread count of threads at once) +
  ``write_histograms`` through ``TensorBoardWriter`` (``SummaryWriter.add_histogram_raw`` per tensor,
  one flush at the end) on a second, equally stock ``SummaryWriter``;
* context: the share of ours spent writing (TensorBoard's pure-Python CRC-32C of every record, its
  event and file overhead), drift from a snapshot of the initial weights (what ``WeightHistograms``
  adds per evaluation) and one SGD training step of the same model.

Every record of both event files is checked with TensorBoard's own CRC at the end. CPU times are
process CPU time (summed over all threads), so they include TensorBoard's writer thread (where the
CRC runs). Both sides run under one or more torch thread counts, interleaved in one run
(``--threads-list``, default ``1,N`` with N torch's default, the machine's cores): torch's intra-op
threads set to each count in turn (``histograms`` bins the large CPU tensors in that many threads),
numpy's BLAS limited to ONE thread throughout, on both sides. Left at its default, OpenBLAS splits
``add_histogram``'s float64 dot products over its threads and busy-waits after each: on a 2-core machine
that about doubled naive's CPU and wall time (figures from before that limit, naive ~1300 ms, are not
comparable) and billed the step after it (ours) 30-40 ms; one thread is naive's fastest setting, and numpy's
``np.histogram`` is single-threaded anyway. Headlines: the CPU ratio for one thread (robust to other jobs on
a shared machine), the wall ratio for several (CPU time is summed over the threads; wall time is what the
training loop waits for). Medians are the headline; minima are printed too (shared machines are noisy),
with the load average before and after.

Usage::

    python benchmarks/bench_histograms.py --repeats 5     # ResNet-50-like, CPU (or CUDA if available), 1 and N threads
    python benchmarks/bench_histograms.py --threads 1     # one configuration only (0: torch's default)
    python benchmarks/bench_histograms.py --arch resnet18 --threads-list 1,2,4 --device cpu
    python benchmarks/bench_histograms.py --engines --repeats 7   # binning engines on the CPU (below)

Engines (``--engines``): the same epoch-end binning (every parameter of a model, 32 bins, the
:class:`~lightning_introspect.methods.weights.HistogramStats` contract: counts over equal bins of each
tensor's finite range, min / max / num / sum / sum of squares, non-finite values counted and left out)
by (a) ours, :func:`~lightning_introspect.methods.weights.histograms`; (b) a plain ``torch.histc``
implementation (:func:`histc_histograms`: per tensor aminmax, a finite mask only when needed, histc,
sum, dot); (c) ``numpy.histogram`` (:func:`numpy_histograms`), on a ResNet-50-like model (161
tensors, 25.6M values) and a small CNN (:func:`small_cnn`, 22 tensors, ~1M values), CPU, at 1 thread
and torch's default thread count, interleaved repeats, medians and the ratio engine / ours. For
scale, the rest of what ``WeightHistograms`` does per evaluation on the same tensors is timed too:
``drift`` from an initial snapshot and writing the histograms through ``TensorBoardWriter``, and
``WeightHistograms``' whole epoch-end call in a real CPU fit (:func:`time_callback_epoch_end`, with
ours and with histc binning). Measured (torch 2, 2 shared cores, 5 repeats, wall medians): ResNet-50
ours 65 / 47 ms at 1 / 2 threads, histc 5.2x / 5.1x, numpy 5.4x / 6.6x; small CNN ours 3.9 / 4.2 ms,
histc 3.6x / 2.8x, numpy 4.1x / 3.6x; the whole recurring epoch-end call (no figures) 250 ms with ours
vs 430 ms with histc (ResNet-50), 26 vs 29 ms (small CNN). Every engine bins every value (totals
equal); counts differ from ours by one value at a bin edge at most.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import shutil
import statistics
import struct
import tempfile
import time

import numpy as np
import torch
from torch import nn

from lightning_introspect.callbacks.weight_histograms import write_histograms
from lightning_introspect.loggers.adapter import TensorBoardWriter
from lightning_introspect.methods.weights import HistogramStats, drift, histograms


# ------------------------------------------------------------------------ a ResNet written in torch
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


def resnet(arch: str = "resnet50", num_classes: int = 1000) -> nn.Module:
    block, depths = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}[arch]
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i, (width, depth) in enumerate(zip([64, 128, 256, 512], depths)):
        for j in range(depth):
            layers.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
            cin = width * block.expansion
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


# ----------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet18"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bins", type=int, default=32, help="our bins (WeightHistograms' default is 32)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="image side of the training step")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="run one torch thread count only (0: torch's default); numpy's BLAS runs one thread regardless",
    )
    parser.add_argument(
        "--threads-list", default=None,
        help="comma-separated torch thread counts, interleaved in one run (default: 1 and torch's default)",
    )
    parser.add_argument("--engines", action="store_true", help="compare binning engines on the CPU (see the docstring)")
    args = parser.parse_args()
    if args.engines:
        compare_engines(repeats=args.repeats, bins=args.bins)
        return
    default_threads = torch.get_num_threads()
    if args.threads is not None:
        configs = [args.threads or default_threads]
    elif args.threads_list:
        configs = [int(v) or default_threads for v in args.threads_list.split(",")]
    else:
        configs = [1, default_threads]
    configs = list(dict.fromkeys(n for n in configs if n > 0))
    try:  # numpy's BLAS: one thread on both sides (see the module docstring)
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")
        blas_note = "numpy BLAS: 1 thread"
    except ImportError:
        blas_note = "numpy BLAS threads: default (no threadpoolctl)"
    load_start = os.getloadavg()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = resnet(args.arch).to(device)
    params = {n: p for n, p in model.named_parameters()}
    n_values = sum(p.numel() for p in params.values())
    initial = {n: p.detach().cpu().clone() for n, p in params.items()}
    print(
        f"model: {args.arch}-like in plain torch, {n_values / 1e6:.2f}M parameters in {len(params)} tensors; "
        f"device: {device} (torch CPU threads: {', '.join(map(str, configs))} of default {default_threads}; {blas_note}; "
        f"{os.cpu_count()} cores); torch {torch.__version__}"
    )

    from torch.utils.tensorboard import SummaryWriter

    log_dir = tempfile.mkdtemp(prefix="bench_hist_")
    sw = SummaryWriter(os.path.join(log_dir, "naive"))
    sw_ours = SummaryWriter(os.path.join(log_dir, "ours"))
    writer = TensorBoardWriter(sw_ours)

    def naive(step: int) -> None:
        for name, p in params.items():
            sw.add_histogram(f"naive/{name}", p, step)
        sw.flush()

    def ours(step: int) -> None:  # what WeightHistograms does per evaluation, minus drift
        hists = histograms(params, bins=args.bins)
        write_histograms(writer, {f"ours/{name}": h for name, h in hists.items()}, step)

    def ours_compute(step: int) -> None:
        histograms(params, bins=args.bins)

    computed = {f"ours/{name}": h for name, h in histograms(params, bins=args.bins).items()}

    def ours_write(step: int) -> None:
        write_histograms(writer, computed, step)

    def drift_only(step: int) -> None:
        drift(params, initial)

    def timed(fn, step: int) -> tuple[float, float]:  # noqa: ANN001
        """(wall seconds, process CPU seconds): CPU time is robust to other jobs on a shared machine."""
        _sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        fn(step)
        _sync(device)
        return time.perf_counter() - start, time.process_time() - cpu

    measured = {"naive": naive, "ours": ours, "ours_compute": ours_compute, "ours_write": ours_write, "drift": drift_only}
    times: dict[int, dict[str, list[tuple[float, float]]]] = {n: {k: [] for k in measured} for n in configs}
    step = 0
    for n in configs:  # warm-up
        torch.set_num_threads(n)
        for fn in measured.values():
            fn(step)
    for _ in range(args.repeats):
        for n in configs:
            torch.set_num_threads(n)
            for key, fn in measured.items():
                step += 1
                times[n][key].append(timed(fn, step))

    # one SGD training step of the same model, for context
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def train_step(_: int) -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for n in configs:
        torch.set_num_threads(n)
        train_step(0)
        times[n]["train_step"] = []
    for r in range(args.repeats):
        for n in configs:
            torch.set_num_threads(n)
            times[n]["train_step"].append(timed(train_step, r))
    torch.set_num_threads(default_threads)
    sw.close()
    sw_ours.close()

    # every record of both files passes TensorBoard's own CRC check
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    records = {kind: _checked_records(os.path.join(log_dir, kind), masked_crc32c) for kind in ("naive", "ours")}
    shutil.rmtree(log_dir, ignore_errors=True)
    load_end = os.getloadavg()

    def med(v: list[tuple[float, float]], which: int) -> float:
        return statistics.median(t[which] for t in v)

    def lowest(v: list[tuple[float, float]], which: int) -> float:
        return min(t[which] for t in v)

    def row(label: str, v: list[tuple[float, float]]) -> None:
        print(f"  {label:<50}: wall {med(v, 0) * 1e3:8.1f} ms   CPU {med(v, 1) * 1e3:8.1f} ms")

    load = f"load average (1/5/15 min) {' '.join(f'{v:.2f}' for v in load_start)} before, " + " ".join(
        f"{v:.2f}" for v in load_end
    ) + f" after, on {os.cpu_count()} cores"
    print(load)
    headlines = []
    for n in configs:
        t = times[n]
        print(f"torch threads {n}: medians of {args.repeats} interleaved runs (CPU = process CPU time, all threads):")
        row("naive SummaryWriter.add_histogram, every tensor", t["naive"])
        row("ours: histograms() + raw writes, every tensor", t["ours"])
        row(f"  of which histograms() alone ({args.bins} bins)", t["ours_compute"])
        row(f"  of which writing {len(computed)} raw histograms (add_histogram_raw, flush)", t["ours_write"])
        row("drift() from the initial snapshot (context)", t["drift"])
        row(f"one SGD training step, batch {args.batch}x3x{args.size}x{args.size}", t["train_step"])
        ratio = {w: med(t["naive"], i) / med(t["ours"], i) for i, w in enumerate(("wall", "CPU"))}
        ratio_min = {w: lowest(t["naive"], i) / lowest(t["ours"], i) for i, w in enumerate(("wall", "CPU"))}
        headline = "CPU" if n == 1 else "wall"
        print(
            f"  ratio naive / ours (headline: {headline}): medians wall {ratio['wall']:.1f}x, CPU {ratio['CPU']:.1f}x; "
            f"minima wall {lowest(t['naive'], 0) * 1e3:.0f} / {lowest(t['ours'], 0) * 1e3:.0f} ms = {ratio_min['wall']:.1f}x, "
            f"CPU {lowest(t['naive'], 1) * 1e3:.0f} / {lowest(t['ours'], 1) * 1e3:.0f} ms = {ratio_min['CPU']:.1f}x; "
            f"ours / one training step: wall {med(t['ours'], 0) / med(t['train_step'], 0):.2f}"
        )
        label = "single-threaded (CPU)" if n == 1 else f"with {n} torch threads (wall)"
        headlines.append(f"{label}: {ratio[headline]:.1f}x (min {ratio_min[headline]:.1f}x)")
    print(f"all {len(records['naive'])} + {len(records['ours'])} records pass TensorBoard's CRC check")
    print("headline ratio naive / ours, medians: " + "; ".join(headlines))
    for n in configs[1:]:
        print(
            f"cores free for {n} threads (a pure numpy loop in {n} threads vs one, measured just now): "
            f"{_parallel_capacity(n):.2f}x speed-up; a multi-threaded wall time cannot gain more than that here"
        )


# -------------------------------------------------------------------------------- binning engines
def small_cnn(num_classes: int = 10) -> nn.Module:
    """A small CNN: five conv + BatchNorm stages and a linear head, 22 tensors, ~1M values."""
    layers: list[nn.Module] = []
    cin = 3
    for cout in (32, 64, 128, 256, 256):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def _finite_part(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int], float, float]:
    """``x`` flat (float32 / float64), its non-finite counts and its finite min / max (one aminmax when
    every value is finite, the mask only otherwise)."""
    x = x.detach().reshape(-1)
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if x.numel() == 0:
        return x, (0, 0, 0), 0.0, 0.0
    mn, mx = (v.item() for v in torch.aminmax(x))
    nonfinite = (0, 0, 0)
    if not (math.isfinite(mn) and math.isfinite(mx)):
        nonfinite = (int(torch.isnan(x).sum()), int((x == math.inf).sum()), int((x == -math.inf).sum()))
        x = x[torch.isfinite(x)]
        mn, mx = (v.item() for v in torch.aminmax(x)) if x.numel() else (0.0, 0.0)
    return x, nonfinite, mn, mx


def _stats(x: torch.Tensor, nonfinite: tuple[int, int, int], numel: int, lo: float, hi: float, mn: float, mx: float,
           counts: torch.Tensor, bins: int, total: float, squares: float) -> HistogramStats:
    nan, posinf, neginf = nonfinite
    return HistogramStats(
        counts=counts, edges=torch.linspace(lo, hi, bins + 1, dtype=torch.float64), min=mn, max=mx,
        num=x.numel(), sum=total, sum_squares=squares, nan=nan, posinf=posinf, neginf=neginf, numel=numel,
    )


def _range(mn: float, mx: float, n: int) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    return (mn - 0.5, mx + 0.5) if mn == mx else (mn, mx)


def histc_histograms(tensors: dict[str, torch.Tensor], bins: int) -> dict[str, HistogramStats]:
    """Engine (b): the straightforward torch implementation, one tensor after the other."""
    out = {}
    with torch.no_grad():
        for key, t in tensors.items():
            x, nonfinite, mn, mx = _finite_part(t)
            lo, hi = _range(mn, mx, x.numel())
            counts = torch.histc(x, bins, lo, hi).to(torch.int64) if x.numel() else torch.zeros(bins, dtype=torch.int64)
            total, squares = (x.sum().item(), torch.dot(x, x).item()) if x.numel() else (0.0, 0.0)
            out[key] = _stats(x, nonfinite, t.numel(), lo, hi, mn, mx, counts, bins, total, squares)
    return out


def numpy_histograms(tensors: dict[str, torch.Tensor], bins: int) -> dict[str, HistogramStats]:
    """Engine (c): ``numpy.histogram`` per tensor (the finding of min / max, sum and dot in numpy too)."""
    out = {}
    with torch.no_grad():
        for key, t in tensors.items():
            a = t.detach().reshape(-1)
            a = (a if a.dtype in (torch.float32, torch.float64) else a.float()).numpy()
            nonfinite = (0, 0, 0)
            mn, mx = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
            if not (math.isfinite(mn) and math.isfinite(mx)):
                nonfinite = (int(np.isnan(a).sum()), int((a == np.inf).sum()), int((a == -np.inf).sum()))
                a = a[np.isfinite(a)]
                mn, mx = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
            lo, hi = _range(mn, mx, a.size)
            counts, _ = np.histogram(a, bins, range=(lo, hi))
            x = torch.from_numpy(a)
            out[key] = _stats(x, nonfinite, t.numel(), lo, hi, mn, mx, torch.from_numpy(counts), bins,
                              float(a.sum(dtype=np.float64)), float(a.dot(a)))
    return out


def compare_engines(repeats: int, bins: int) -> None:
    """Times engines (a), (b), (c) on two models' parameters, CPU, 1 and the default number of torch threads."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")  # as in main(): numpy's BLAS one thread for every engine
    default_threads = torch.get_num_threads()
    configs = list(dict.fromkeys([1, default_threads]))
    torch.manual_seed(0)
    models = {"resnet50": resnet("resnet50"), "small_cnn": small_cnn()}
    engines = {"ours": lambda p: histograms(p, bins=bins), "histc": lambda p: histc_histograms(p, bins),
               "numpy": lambda p: numpy_histograms(p, bins)}
    log_dir = tempfile.mkdtemp(prefix="bench_engines_")
    from torch.utils.tensorboard import SummaryWriter

    sw = SummaryWriter(log_dir)
    writer = TensorBoardWriter(sw)
    load_start = os.getloadavg()
    print(f"torch {torch.__version__}, numpy {np.__version__}, {os.cpu_count()} cores, torch threads {configs}, "
          f"numpy BLAS 1 thread, {bins} bins, {repeats} interleaved repeats")
    results: dict[tuple[str, int, str], list[tuple[float, float]]] = {}
    for name, model in models.items():
        params = {n: p.detach() for n, p in model.named_parameters()}
        # perturbed copies, so drift has something to measure; the "initial" snapshot as WeightHistograms keeps it
        current = {n: p + 0.01 * torch.randn_like(p) for n, p in params.items()}
        initial = {n: p.clone() for n, p in params.items()}
        hists = histograms(current, bins=bins)
        print(f"{name}: {len(current)} tensors, {sum(p.numel() for p in current.values()) / 1e6:.2f}M values")
        # the same contract: totals equal, counts equal but for values on or next to an edge
        for label, engine in engines.items():
            other = engine(current)
            moved = sum(int((other[k].counts - hists[k].counts).abs().sum()) // 2 for k in current)
            assert all(other[k].num == hists[k].num == current[k].numel() for k in current), label
            print(f"  {label:<6}: {moved} values in another bin than ours (edge rounding)")
        tagged = {f"{name}/{k}": h for k, h in hists.items()}
        tasks = {**{f"engine {label}": (lambda e=engine, c=current: e(c)) for label, engine in engines.items()},
                 "drift": lambda c=current, i=initial: drift(c, i),
                 "write": lambda t=tagged: write_histograms(writer, t, 0)}
        for n in configs:  # warm-up
            torch.set_num_threads(n)
            for task in tasks.values():
                task()
        for _ in range(repeats):
            for n in configs:
                torch.set_num_threads(n)
                for label, task in tasks.items():
                    start, cpu = time.perf_counter(), time.process_time()
                    task()
                    results.setdefault((name, n, label), []).append(
                        (time.perf_counter() - start, time.process_time() - cpu))
    torch.set_num_threads(default_threads)
    sw.close()
    shutil.rmtree(log_dir, ignore_errors=True)
    load_end = os.getloadavg()
    print(f"load average {load_start[0]:.2f} before, {load_end[0]:.2f} after")

    def med(v: list[tuple[float, float]], i: int) -> float:
        return statistics.median(t[i] for t in v)

    whole: dict[tuple[str, str, bool], list[float]] = {}
    for name, model in models.items():  # a real fit, torch's default threads
        for _ in range(max(1, repeats // 3)):
            for label, engine in engines.items():
                if label == "numpy":
                    continue
                for with_figures, v in time_callback_epoch_end(model, lambda p, bins=bins, e=engine: e(p), epochs=8).items():
                    whole.setdefault((name, label, with_figures), []).extend(v)

    for name in models:
        for label in ("ours", "histc"):
            plain, drawn = whole[(name, label, False)], whole[(name, label, True)]
            print(f"{name}: WeightHistograms' whole epoch-end call in a CPU fit (include_bias, torch threads "
                  f"{default_threads}), binning with {label}: median {statistics.median(plain) * 1e3:.1f} ms "
                  f"({len(plain)} epochs without figures), {statistics.median(drawn) * 1e3:.1f} ms ({len(drawn)} with)")
        for n in configs:
            r = {label: results[(name, n, label)] for label in tasks}
            ours = r["engine ours"]
            print(f"{name}, torch threads {n}: medians (ms), wall / process CPU")
            for label, v in r.items():
                ratio = ""
                if label.startswith("engine"):
                    ratio = f"   engine / ours: wall {med(v, 0) / med(ours, 0):.2f}x, CPU {med(v, 1) / med(ours, 1):.2f}x"
                print(f"  {label:<14} {med(v, 0) * 1e3:8.1f} / {med(v, 1) * 1e3:8.1f}{ratio}")
            rest = med(r["drift"], 0) + med(r["write"], 0)
            for label in engines:
                binning = med(r[f"engine {label}"], 0)
                print(f"  epoch-end work with {label:<6} (binning + drift + write): {(binning + rest) * 1e3:8.1f} ms wall, "
                      f"binning {binning / (binning + rest):.0%} of it")


def time_callback_epoch_end(
    model: nn.Module, engine, epochs: int, image: int = 32  # noqa: ANN001
) -> dict[bool, list[float]]:
    """Wall seconds of ``WeightHistograms``' whole epoch-end call (binning + drift + writing + summary text,
    and the two figures on figure epochs) in a real CPU fit of ``model`` (one batch of 2 random images per
    epoch), with ``engine`` binning; keyed by whether the call drew the figures."""
    from lightning_introspect._lightning import pl
    from lightning_introspect.callbacks import weight_histograms as wh

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def training_step(self, batch, _):  # noqa: ANN001, ANN202
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):  # noqa: ANN202
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    data = torch.utils.data.TensorDataset(torch.randn(2, 3, image, image), torch.randint(0, 10, (2,)))
    callback = wh.WeightHistograms(include_bias=True, on_error="raise")
    seconds: list[tuple[float, bool]] = []
    drew: list[bool] = []
    original_epoch_end, original_figures, original_histograms = callback._epoch_end, callback._figures, wh.histograms

    def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        drew.clear()
        start = time.perf_counter()
        original_epoch_end(*args, **kwargs)
        seconds.append((time.perf_counter() - start, bool(drew)))

    def figures(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        drew.append(True)
        original_figures(*args, **kwargs)

    callback._epoch_end, callback._figures = timed, figures
    wh.histograms = engine
    log_dir = tempfile.mkdtemp(prefix="bench_callback_")
    try:
        trainer = pl.Trainer(
            default_root_dir=log_dir, max_epochs=epochs, accelerator="cpu", callbacks=[callback], logger=pl.loggers.TensorBoardLogger(log_dir),
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        )
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=2))
    finally:
        wh.histograms = original_histograms
        shutil.rmtree(log_dir, ignore_errors=True)
    out: dict[bool, list[float]] = {False: [], True: []}
    for t, with_figures in seconds[1:]:  # the first call includes one-off work
        out[with_figures].append(t)
    return out


def _parallel_capacity(n: int, repeats: int = 5) -> float:
    """Median wall-time speed-up of ``n`` threads over one on the same GIL-free numpy work (how many cores
    the other jobs of a shared machine leave free)."""
    from concurrent.futures import ThreadPoolExecutor

    arrays = [np.ones(1 << 20, dtype=np.float32) for _ in range(n)]

    def work(a: np.ndarray) -> None:
        for _ in range(40):
            np.multiply(a, 1.0000001, out=a)

    gains = []
    with ThreadPoolExecutor(n) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            for a in arrays:
                work(a)
            serial = time.perf_counter() - start
            start = time.perf_counter()
            list(pool.map(work, arrays))
            gains.append(serial / (time.perf_counter() - start))
    return statistics.median(gains)


def _checked_records(log_dir: str, masked_crc32c) -> list[bytes]:  # noqa: ANN001
    """Every record of the event files under ``log_dir``, each checked with ``masked_crc32c``."""
    out = []
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        with open(path, "rb") as fh:
            raw = fh.read()
        pos = 0
        while pos < len(raw):
            header = raw[pos : pos + 8]
            (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", raw[pos + 8 : pos + 12])
            data = raw[pos + 12 : pos + 12 + length]
            (data_crc,) = struct.unpack("<I", raw[pos + 12 + length : pos + 16 + length])
            if masked_crc32c(header) != header_crc or masked_crc32c(data) != data_crc:
                raise RuntimeError(f"record at byte {pos} of {path} fails TensorBoard's CRC check")
            out.append(data)
            pos += 16 + length
    return out


if __name__ == "__main__":
    main()
