"""Map similarity of the sanity checks: our choices against the alternatives, at realistic map sizes.

Two questions, each answered with a time ratio (median of ``--repeats`` runs, one torch thread so a
shared machine's load matters less) on 64 maps of 1x64x64 and 16 maps of 1x224x224:

* Spearman ranks: ``scipy.stats.rankdata(method="average", axis=1)`` (what
  :mod:`lightning_introspect.methods.similarity` uses) against a vectorised torch ranking (one sort,
  then the first and last position of each run of ties; written out below). Both give the same ranks
  exactly (checked). Printed: the ranking alone and the whole ``spearman_similarity`` call.
* SSIM: ours (separable window as band-matrix products, moments of a shared map computed once) against
  ``torchmetrics.functional.structural_similarity_index_measure(..., reduction="none")`` on the same
  normalised maps and window. The largest difference is printed (agreement to 1e-5 is the tests' bar).
  Printed: one pair of batches, and the sanity check's pattern (one trained map against ``--blocks``
  randomised maps, measured with ``map_similarities`` in one call vs one torchmetrics call per pair).

Usage::

    python benchmarks/bench_similarity.py               # both sizes, 5 repeats
    python benchmarks/bench_similarity.py --repeats 9 --blocks 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from scipy.stats import rankdata
from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

from lightning_introspect.methods.similarity import (
    map_similarities,
    spearman_similarity,
    ssim_sigma,
    ssim_similarity,
)

SIZES = ((64, 64), (16, 224))  # (number of maps, side)


def torch_average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Row-wise 1-based ranks of ``(N, D)`` float64 values, ties sharing their mean rank (torch only)."""
    n, d = x.shape
    values, order = x.sort(dim=1)
    pos = torch.arange(d, dtype=torch.float64).expand(n, d)
    starts = torch.ones(n, d, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    last = torch.where(ends, pos, torch.full_like(pos, d - 1)).flip(1).cummin(dim=1).values.flip(1)
    return torch.empty(n, d, dtype=torch.float64).scatter_(1, order, (first + last) / 2 + 1)


def scipy_average_ranks(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(rankdata(x.numpy(), method="average", axis=1))


def spearman_with(ranker: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``spearman_similarity(a, b)`` (absolute) with the given ranking, for timing the whole call."""
    ra = ranker(a.abs().sum(1).flatten(1).double())
    rb = ranker(b.abs().sum(1).flatten(1).double())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return ((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).float()


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: caches (window matrices), allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def normalised(maps: torch.Tensor) -> torch.Tensor:
    x = maps.abs().sum(1)
    return (x / x.flatten(1).amax(1).view(-1, 1, 1)).unsqueeze(1)


def compare(n: int, side: int, gen: torch.Generator, repeats: int, blocks: int) -> None:
    """Print the rank, Spearman and SSIM timings for ``n`` maps of ``1 x side x side``."""
    a = torch.rand(n, 1, side, side, generator=gen)
    b = a + 0.5 * torch.rand(n, 1, side, side, generator=gen)
    a[:, :, : side // 4] = 0.0  # ties, as in maps with dead regions
    flat = a.abs().sum(1).flatten(1).double()
    assert torch.equal(torch_average_ranks(flat), scipy_average_ranks(flat))
    assert torch.allclose(spearman_with(scipy_average_ranks, a, b), spearman_similarity(a, b), atol=1e-6)
    print(f"\n{n} maps of 1x{side}x{side}")
    t_torch = median_ms(lambda: torch_average_ranks(flat), repeats)
    t_scipy = median_ms(lambda: scipy_average_ranks(flat), repeats)
    print(f"  ranks      torch {t_torch:8.2f} ms   scipy {t_scipy:8.2f} ms   scipy / torch {t_scipy / t_torch:5.2f}")
    t_torch = median_ms(lambda: spearman_with(torch_average_ranks, a, b), repeats)
    t_scipy = median_ms(lambda: spearman_with(scipy_average_ranks, a, b), repeats)
    print(f"  spearman   torch {t_torch:8.2f} ms   scipy {t_scipy:8.2f} ms   scipy / torch {t_scipy / t_torch:5.2f}")

    x, y = normalised(a), normalised(b)
    sigma = ssim_sigma(x.shape)
    diff = (ssim_similarity(a, b) - tm_ssim(x, y, sigma=sigma, data_range=1.0, reduction="none")).abs().max()
    t_ours = median_ms(lambda: ssim_similarity(a, b), repeats)
    t_tm = median_ms(lambda: tm_ssim(x, y, sigma=sigma, data_range=1.0, reduction="none"), repeats)
    print(f"  ssim       ours  {t_ours:8.2f} ms   torchmetrics {t_tm:8.2f} ms   torchmetrics / ours {t_tm / t_ours:5.2f}"
          f"   max |diff| {float(diff):.1e}")
    randomised = [torch.rand(n, 1, side, side, generator=gen) for _ in range(blocks)]
    pairs = [(a, r) for r in randomised]
    t_ours = median_ms(lambda: map_similarities(pairs, ["ssim"]), repeats)
    t_tm = median_ms(lambda: [tm_ssim(x, normalised(r), sigma=sigma, data_range=1.0, reduction="none") for r in randomised], repeats)
    print(f"  ssim x{blocks:<3d} ours  {t_ours:8.2f} ms   torchmetrics {t_tm:8.2f} ms   torchmetrics / ours {t_tm / t_ours:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=8, help="randomised maps per trained map in the batched SSIM case")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print(f"torch threads: 1, repeats: {args.repeats} (median)")
    for n, side in SIZES:
        compare(n, side, gen, args.repeats, args.blocks)


if __name__ == "__main__":
    main()
