"""Feature visualisation speed: optimisation steps per second on the DigitsCNN at 32 px.

Compares the parameterisations (pixels, Fourier), transformation robustness, the frequency penalty
and a decoder prior, for a single image and a batch of 16 (what the callback optimises at once for
3 + 3 channels and 10 classes). Also the forward + backward to the input alone, as the floor: through the
module itself, and through ``frozen_params`` (detached, channels-last weights via ``torch.func.functional_call``:
what ``visualize_features`` runs on CPU). Prints a table and ratios, all measured in this one run.

    python benchmarks/bench_featviz.py [--device cpu|cuda] [--steps 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_introspect.demo import DigitsCNN
from lightning_introspect.methods.featviz import (
    MLPDecoder,
    class_logit,
    frozen_params,
    visualize_features,
)


def _rates(fns: dict, steps: int, repeats: int) -> dict[str, float]:
    """Steps per second of each ``fn(steps)``; the settings are interleaved round by round, so a
    change in machine load hits them all alike, and the median round counts."""
    for fn in fns.values():
        fn(2)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn(steps)
            times[label].append(time.perf_counter() - start)
    return {label: steps / statistics.median(t) for label, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = DigitsCNN().to(device).eval()
    decoder = MLPDecoder(16, (1, 32, 32)).to(device).eval()
    settings = {
        "pixels": {"param": "pixels"},
        "fourier": {"param": "fourier"},
        "pixels + transforms": {"param": "pixels", "transforms": True},
        "fourier + transforms": {"param": "fourier", "transforms": True},
        "fourier + tv + transforms": {"param": "fourier", "transforms": True, "frequency_penalty": 2.0},
        "prior (MLP decoder)": {"prior": decoder, "latent_penalty": 0.1},
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"DigitsCNN, 32x32 images, {args.steps} steps, median of {args.repeats}; device: {name}; torch {torch.__version__}")
    for batch in (1, 16):
        objective = class_logit([i % 10 for i in range(batch)])

        def floor(steps: int, batch: int = batch) -> None:
            x = torch.randn(batch, 1, 32, 32, device=device, requires_grad=True)
            for _ in range(steps):
                (g,) = torch.autograd.grad(model(x)[:, 0].sum(), x)
            if device.type == "cuda":
                torch.cuda.synchronize()

        fast = frozen_params(model)

        def floor_fast(steps: int, batch: int = batch, fast: dict = fast) -> None:
            x = torch.randn(batch, 1, 32, 32, device=device, requires_grad=True)
            for _ in range(steps):
                out = torch.func.functional_call(model, fast, (x,)) if fast else model(x)
                (g,) = torch.autograd.grad(out[:, 0].sum(), x)
            if device.type == "cuda":
                torch.cuda.synchronize()

        fns = {"floor": floor, "floor_fast": floor_fast}
        for label, kwargs in settings.items():

            def run(steps: int, kwargs: dict = kwargs, objective=objective, batch: int = batch) -> None:
                visualize_features(model, objective, shape=(batch, 1, 32, 32), steps=steps, lr=0.1, seed=0, **kwargs)
                if device.type == "cuda":
                    torch.cuda.synchronize()

            fns[label] = run
        rates = _rates(fns, args.steps, args.repeats)
        floor_rate = rates.pop("floor")
        fast_rate = rates.pop("floor_fast")
        print(f"\nbatch {batch}: forward + backward to the input alone: {floor_rate:8.1f} steps/s through the module, "
              f"{fast_rate:8.1f} through frozen_params ({'channels-last' if fast else 'not used on this device'}; "
              "visualize_features uses it from 4 x 32 x 32 input values)")
        print(f"RATIO featviz_frozen_params_floor_speedup_b{batch} {fast_rate / floor_rate:.3f}")
        print(f"  {'setting':28s} {'steps/s':>9s} {'images/s':>9s} {'vs pixels':>9s} {'vs floor':>9s}")
        base = rates["pixels"]
        for label, rate in rates.items():
            print(f"  {label:28s} {rate:9.1f} {rate * batch:9.0f} {rate / base:9.2f} {rate / floor_rate:9.2f}")


if __name__ == "__main__":
    main()
