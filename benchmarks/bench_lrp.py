"""Time `lrp` against one forward + backward to the input, on the same model and batch, in one run.

Prints medians of interleaved repeats and the ratios (the issue's target: LRP within 2.5x of forward +
backward on GPU-size models; captum's LRP is 5.2x on an H200 ResNet-50). Models: the demo DigitsCNN
(BatchNorm, MaxPool, AdaptiveAvgPool, Flatten), a ResNet-18-style network (BasicBlocks, BatchNorm, in-place
ReLU, identity + projection shortcuts), and a plain CNN captum's LRP supports, timed with captum too.

    python benchmarks/bench_lrp.py [--device cuda] [--threads 1] [--repeats 15]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_introspect.demo import DigitsCNN
from lightning_introspect.methods.lrp import lrp


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        down = stride != 1 or cin != cout
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if down else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += self.shortcut(x)
        return F.relu(out, inplace=True)


class ResNet18ish(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        layers, cin = [], w
        for i, cout in enumerate([w, 2 * w, 4 * w, 8 * w]):
            layers += [Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class CaptumCNN(nn.Module):
    """Only layers captum's LRP has rules for (flatten with view)."""

    def __init__(self, w: int = 16) -> None:
        super().__init__()
        self.c1, self.r1, self.p1 = nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.c2, self.r2, self.p2 = nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.c3, self.r3, self.p3 = nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.p3(self.r3(self.c3(self.p2(self.r2(self.c2(self.p1(self.r1(self.c1(x)))))))))
        return self.fc(x.view(x.shape[0], -1))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        leaf = x.detach().clone().requires_grad_()
        out = model(leaf)
        torch.autograd.grad(out.gather(1, out.argmax(1, keepdim=True)).sum(), leaf)

    return run


def bench(name: str, model: nn.Module, x: torch.Tensor, repeats: int, with_captum: bool = False) -> None:
    device = x.device
    model = model.to(device).eval()
    runs: dict[str, Callable[[], object]] = {
        "forward+backward": forward_backward(model, x),
        "lrp epsilon": lambda: lrp(model, x, "pred"),
        "lrp zplus": lambda: lrp(model, x, "pred", rule="zplus"),
        "lrp alpha_beta": lambda: lrp(model, x, "pred", rule="alpha_beta"),
    }
    if with_captum:
        from captum.attr import LRP

        captum_model = copy.deepcopy(model)
        explainer = LRP(captum_model)
        with torch.no_grad():
            pred = model(x).argmax(1)
        runs["captum LRP"] = lambda: explainer.attribute(x.detach().clone().requires_grad_(), target=pred)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up (first call also traces the model for lrp)
        fn()
    for _ in range(repeats):  # interleaved, so load changes hit every method alike
        for key, fn in runs.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - start)
    base = statistics.median(times["forward+backward"])
    print(f"{name}: batch {tuple(x.shape)} on {device}")
    for key, values in times.items():
        median = statistics.median(values)
        print(f"  {key:18s} {median * 1e3:9.2f} ms   {median / base:5.2f}x forward+backward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s), {args.repeats} interleaved repeats, medians")
    bench("DigitsCNN", DigitsCNN(), torch.randn(32, 1, 32, 32, generator=gen).to(device), args.repeats)
    bench("ResNet-18-style (width 16)", ResNet18ish(), torch.randn(32, 3, 32, 32, generator=gen).to(device), args.repeats)
    bench("captum-compatible CNN", CaptumCNN(), torch.randn(32, 1, 32, 32, generator=gen).to(device), args.repeats, with_captum=True)


if __name__ == "__main__":
    main()
