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
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import struct
import tempfile
import time

import torch
from torch import nn

from lightning_introspect.callbacks.weight_histograms import write_histograms
from lightning_introspect.loggers.adapter import TensorBoardWriter
from lightning_introspect.methods.weights import drift, histograms


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
    args = parser.parse_args()
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


def _parallel_capacity(n: int, repeats: int = 5) -> float:
    """Median wall-time speed-up of ``n`` threads over one on the same GIL-free numpy work (how many cores
    the other jobs of a shared machine leave free)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

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
