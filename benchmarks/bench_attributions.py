"""Attribution speed: our methods vs captum on the same model and batch (CPU by default).

For each model (the demo's DigitsCNN and a small ResNet-style network with BatchNorm and residual
blocks, both random-init, eval mode) it times, as medians over repeats after a warm-up:

* the baselines: one forward pass, and one forward + backward to the input (``autograd.grad``);
* our ``attribute`` for saliency + Grad-CAM together (one shared pass) and every method alone;
* captum's counterpart for each (saliency + Grad-CAM = ``Saliency`` then ``LayerGradCam``).

and prints one table: milliseconds, ours / captum, and ours / (forward + backward).

Run: ``python benchmarks/bench_attributions.py [--device cpu] [--threads 1] [--repeats 15]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from lightning_introspect.demo import DigitsCNN
from lightning_introspect.methods.attribution import attribute, auto_layer


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet-10-ish for 3x32x32: stem + 4 stages of one BasicBlock (16-32-64-128 channels)."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.layer1 = BasicBlock(w, w)
        self.layer2 = BasicBlock(w, 2 * w, 2)
        self.layer3 = BasicBlock(2 * w, 4 * w, 2)
        self.layer4 = BasicBlock(4 * w, 8 * w, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x))))))))


def timeit(fns: list[Callable[[], object]], repeats: int, device: torch.device) -> list[float]:
    """Median milliseconds of each function, calls interleaved round-robin so load drifts hit all alike."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for fn in fns:
        fn()
        fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            sync()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def bench(name: str, model: nn.Module, x: torch.Tensor, repeats: int, device: torch.device) -> list[tuple]:
    from captum.attr import (
        LRP,
        Deconvolution,
        GuidedBackprop,
        GuidedGradCam,
        InputXGradient,
        LayerAttribution,
        LayerGradCam,
        Saliency,
    )

    model = model.to(device).eval()
    x = x.to(device)
    with torch.no_grad():
        target = model(x).argmax(1)
    layer_name = auto_layer(model, x)
    layer = dict(model.named_modules())[layer_name]
    size = tuple(x.shape[-2:])

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def forward_backward() -> None:
        xx = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xx).gather(1, target.view(-1, 1)).sum(), xx)

    def captum_cam() -> torch.Tensor:
        cam = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
        return LayerAttribution.interpolate(cam, size, "bilinear")

    def captum_lrp() -> torch.Tensor:
        return LRP(model).attribute(x, target=target)

    def ours(*methods: str) -> Callable[[], object]:
        return lambda: attribute(model, x, target, list(methods), layer=layer_name)

    rows = []
    base_fwd, base_fb = timeit([forward, forward_backward], repeats, device)
    rows.append((name, "forward", base_fwd, None))
    rows.append((name, "forward + backward to input", base_fb, None))
    cases: list[tuple[str, Callable[[], object], Callable[[], object] | None]] = [
        ("saliency + grad_cam", ours("saliency", "grad_cam"),
         lambda: (Saliency(model).attribute(x, target=target), captum_cam())),
        ("saliency", ours("saliency"), lambda: Saliency(model).attribute(x, target=target)),
        ("input_x_gradient", ours("input_x_gradient"), lambda: InputXGradient(model).attribute(x, target=target)),
        ("guided_backprop", ours("guided_backprop"), lambda: GuidedBackprop(model).attribute(x, target=target)),
        ("deconvnet", ours("deconvnet"), lambda: Deconvolution(model).attribute(x, target=target)),
        ("grad_cam", ours("grad_cam"), captum_cam),
        ("guided_grad_cam", ours("guided_grad_cam"),
         lambda: GuidedGradCam(model, layer).attribute(x, target=target, interpolate_mode="bilinear")),
        ("all six gradient methods", ours("saliency", "input_x_gradient", "guided_backprop", "deconvnet", "grad_cam", "guided_grad_cam"), None),
    ]
    cases.append(("lrp (epsilon)", ours("lrp"), captum_lrp))
    for label, mine, theirs in cases:
        t_theirs: float | str | None = None
        if theirs is not None:
            try:
                theirs()
            except Exception as err:  # captum cannot handle this model (e.g. LRP and BatchNorm / residual additions)
                t_theirs, theirs = type(err).__name__, None
        fns = [mine, forward_backward] + ([theirs] if theirs is not None else [])
        measured = timeit(fns, repeats, device)
        t_ours, base = measured[0], measured[1]
        if theirs is not None:
            t_theirs = measured[2]
        rows.append((name, label, t_ours, t_theirs, base))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    models = [
        ("DigitsCNN", DigitsCNN(), torch.randn(args.batch, 1, 32, 32, generator=gen)),
        ("SmallResNet", SmallResNet(), torch.randn(args.batch, 3, 32, 32, generator=gen)),
    ]
    import captum

    print(f"torch {torch.__version__}, captum {captum.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, median of {args.repeats}")
    header = f"{'model':<12} {'method':<28} {'ours ms':>9} {'captum ms':>10} {'ours/captum':>12} {'ours/(fwd+bwd)':>15}"
    print(header)
    print("-" * len(header))  # ours/(fwd+bwd): vs a forward+backward timed interleaved with that row
    for name, model, x in models:
        for row in bench(name, model, x, args.repeats, device):
            if len(row) == 4:
                print(f"{row[0]:<12} {row[1]:<28} {row[2]:>9.2f} {'':>10} {'':>12} {'':>15}")
                continue
            model_name, label, t_ours, t_theirs, base = row
            if isinstance(t_theirs, float):
                theirs, ratio = f"{t_theirs:>10.2f}", f"{t_ours / t_theirs:>12.2f}"
            elif t_theirs is None:
                theirs, ratio = f"{'-':>10}", f"{'-':>12}"
            else:  # captum raised
                theirs, ratio = f"{'fails':>10}", f"{t_theirs:>12}"
            print(f"{model_name:<12} {label:<28} {t_ours:>9.2f} {theirs} {ratio} {t_ours / base:>15.2f}")


if __name__ == "__main__":
    main()
