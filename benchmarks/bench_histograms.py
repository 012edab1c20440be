"""Histogram logging of every parameter of a ResNet-50-sized model: ours vs ``SummaryWriter.add_histogram``.

Measured in one run, interleaved (naive, ours, naive, ours, ...):

* naive: ``SummaryWriter.add_histogram(name, param, step)`` for every parameter (TensorBoard's
  default bins: it copies to numpy float64 and bins with ``numpy.histogram``), on its own
  ``SummaryWriter`` with TensorBoard's stock record writer (pure-Python CRC-32C, checked below);
* ours: :func:`lightning_introspect.methods.weights.histograms` (32 bins, on the parameters' device;
  on the CPU one min / max pass per tensor, then cache-sized numpy chunks for the bin indices and the
  sums, one bincount per tensor) + ``write_histograms`` through ``TensorBoardWriter`` (raw histograms,
  one event per step with its ``Summary`` encoded in one go, flushed) on a second ``SummaryWriter``,
  which ``TensorBoardWriter`` switches to our numpy CRC-32C (``loggers/_crc32c.py``; same bytes,
  checked below with TensorBoard's own CRC);
* context: the CRC of ours' one histogram event with TensorBoard's pure-Python ``masked_crc32c`` vs
  ours, drift from a snapshot of the initial weights (what ``WeightHistograms`` adds per evaluation)
  and one SGD training step of the same model.

CPU times are process CPU time, so they include TensorBoard's writer thread (where the CRC runs).
``--threads N`` (default 1) gives torch AND numpy's BLAS N threads. Left at its default, numpy's
OpenBLAS busy-waits after each of ``add_histogram``'s dot products: on a 2-core machine that about
doubled naive's CPU and wall time and billed the step after it (ours) 30-40 ms, so single-threaded
figures from before this option (naive ~1300 ms) are not comparable with the ones it prints.
The ratio of medians is the headline; the ratio of minima is printed too (shared machines are noisy).

Usage::

    python benchmarks/bench_histograms.py            # ResNet-50-like, CPU (or CUDA if available), 1 thread
    python benchmarks/bench_histograms.py --threads 0 --repeats 7   # the libraries' default threads
    python benchmarks/bench_histograms.py --arch resnet18 --repeats 5 --device cpu
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
        "--threads", type=int, default=1,
        help="torch and numpy-BLAS CPU threads (default 1: numpy's binning in add_histogram is single-threaded, "
        "and a shared machine makes multi-threaded timings erratic); 0 keeps the libraries' defaults",
    )
    args = parser.parse_args()
    blas_note = "BLAS threads: default"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        try:  # numpy's BLAS too: its idle worker threads spin after add_histogram's dot product, and that
            # CPU time (and the stolen core) would be charged to whatever runs next -- here, ours
            from threadpoolctl import threadpool_limits

            threadpool_limits(args.threads, user_api="blas")
            blas_note = f"numpy BLAS threads: {args.threads}"
        except ImportError:
            blas_note = "numpy BLAS threads: default (no threadpoolctl)"

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = resnet(args.arch).to(device)
    params = {n: p for n, p in model.named_parameters()}
    n_values = sum(p.numel() for p in params.values())
    initial = {n: p.detach().cpu().clone() for n, p in params.items()}
    print(
        f"model: {args.arch}-like in plain torch, {n_values / 1e6:.2f}M parameters in {len(params)} tensors; "
        f"device: {device} ({torch.get_num_threads()} torch CPU threads, {blas_note}); torch {torch.__version__}"
    )

    from torch.utils.tensorboard import SummaryWriter

    log_dir = tempfile.mkdtemp(prefix="bench_hist_")
    sw = SummaryWriter(os.path.join(log_dir, "naive"))  # stays stock: nothing of ours touches it
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

    def drift_only(step: int) -> None:
        drift(params, initial)

    def timed(fn, step: int) -> tuple[float, float]:  # noqa: ANN001
        """(wall seconds, process CPU seconds): CPU time is robust to other jobs on a shared machine."""
        _sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        fn(step)
        _sync(device)
        return time.perf_counter() - start, time.process_time() - cpu

    for fn in (naive, ours, ours_compute, drift_only):  # warm-up
        fn(0)
    times: dict[str, list[tuple[float, float]]] = {"naive": [], "ours": [], "ours_compute": [], "drift": []}
    for r in range(1, args.repeats + 1):
        times["naive"].append(timed(naive, r))
        times["ours"].append(timed(ours, r))
        times["ours_compute"].append(timed(ours_compute, r))
        times["drift"].append(timed(drift_only, r))

    # one SGD training step of the same model, for context
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def train_step(_: int) -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    train_step(0)
    times["train_step"] = [timed(train_step, r) for r in range(args.repeats)]
    crc_kinds = {"naive": _record_writer_kind(sw), "ours": _record_writer_kind(sw_ours)}
    sw.close()
    sw_ours.close()

    # every record of both files passes TensorBoard's own (pure-Python) CRC check; time the CRC of ours' event
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as stock_crc

    from lightning_introspect.loggers._crc32c import masked_crc32c as fast_crc

    records = {kind: _checked_records(os.path.join(log_dir, kind), stock_crc) for kind in ("naive", "ours")}
    event = max(records["ours"], key=len)
    times["crc_stock"] = [timed(lambda _: stock_crc(event), r) for r in range(args.repeats)]
    times["crc_ours"] = [timed(lambda _: fast_crc(event), r) for r in range(args.repeats)]
    shutil.rmtree(log_dir, ignore_errors=True)

    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}

    def fmt(key: str) -> str:
        return f"wall {wall[key] * 1e3:8.1f} ms   CPU {cpu[key] * 1e3:8.1f} ms"

    def row(label: str, key: str) -> None:
        print(f"  {label:<50}: {fmt(key)}")

    kb = f"{len(event) / 1e3:.0f} KB"
    print(f"medians of {args.repeats} interleaved runs (CPU = process CPU time, all threads):")
    row("naive SummaryWriter.add_histogram, every tensor", "naive")
    row("ours: histograms() + raw writes, every tensor", "ours")
    row(f"  of which histograms() alone ({args.bins} bins)", "ours_compute")
    row(f"  CRC of its one {kb} event, with our numpy CRC", "crc_ours")
    row("  (the same CRC with TensorBoard's pure Python)", "crc_stock")
    row("drift() from the initial snapshot (context)", "drift")
    row(f"one SGD training step, batch {args.batch}x3x{args.size}x{args.size}", "train_step")
    print(
        f"record writers: naive {crc_kinds['naive']}, ours {crc_kinds['ours']}; "
        f"all {len(records['naive'])} + {len(records['ours'])} records pass TensorBoard's CRC check"
    )
    cpu_min = {k: min(c for _, c in v) for k, v in times.items()}
    print(
        f"ratio naive / ours: wall {wall['naive'] / wall['ours']:.1f}x, CPU {cpu['naive'] / cpu['ours']:.1f}x "
        f"(minima: CPU {cpu_min['naive'] * 1e3:.0f} / {cpu_min['ours'] * 1e3:.0f} ms = "
        f"{cpu_min['naive'] / cpu_min['ours']:.1f}x); ours / one training step: wall {wall['ours'] / wall['train_step']:.2f}"
    )


def _record_writer_kind(summary_writer: object) -> str:
    """The class name of the record writer behind a ``SummaryWriter`` (stock: ``RecordWriter``)."""
    record_writer = summary_writer.file_writer.event_writer._async_writer._writer  # type: ignore[attr-defined]
    return type(record_writer).__name__


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
