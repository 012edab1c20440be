"""Run every benchmark in this folder, one after the other, and print one table of ratios.

    python benchmarks/run_all.py [--quick] [--device cpu|cuda] [--skip SCRIPT ...]

Each benchmark runs in its own process; its full output is printed under a header, then a summary
table collects the headline ratio of each one (all measured in this run, on this machine). Run by
hand, not by CI: on 2 CPU cores the whole set takes about 40 minutes (``--quick``: about 6).

A full run also writes its tables into ``docs/performance.md``, between the generated markers
(``<!-- run_all:<table>:begin -->`` / ``end``), with the date and a description of the machine, so
the published numbers are always those of one run. ``--quick`` runs leave the page alone unless
``--write-docs`` is given; ``--no-write-docs`` keeps a full run's numbers off the page, and so does ``--skip``
(the skipped rows would read n/a).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS_PAGE = os.path.join(os.path.dirname(HERE), "docs", "performance.md")
# one row of bench_callback_costs' per-callback table: name, runs, s / run, / epoch, / val pass
COST_ROW = re.compile(r"^(\S.*?)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")
# one row of bench_whole_fit's table: model, epochs, none s, default s, ratio[, no-budget s, ratio]
FIT_ROW = re.compile(r"^(demo|resnet64)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)(?:\s+([\d.]+)\s+([\d.]+))?.*?clocks ([\d.]+)x")

# script, extra args (normal / quick), [(label, regex with one or two groups, format)]
BENCHMARKS: list[tuple[str, list[str], list[str], list[tuple[str, str]]]] = [
    (
        "bench_whole_fit.py",
        [],
        ["--models", "demo", "--epochs", "10", "--repeats", "1"],
        [
            ("whole fit, default set (default budget) / none, demo CNN, 10 epochs", r"RATIO whole_fit_demo_10ep ([\d.]+)"),
            ("the same, by the callbacks' own clocks", r"RATIO whole_fit_clocks_demo_10ep ([\d.]+)"),
            ("the same, 50 epochs", r"RATIO whole_fit_demo_50ep ([\d.]+)"),
            ("the same, budget=False (every analysis as configured), 10 epochs", r"RATIO whole_fit_nobudget_demo_10ep ([\d.]+)"),
            ("whole fit, default set / none, ResNet at 64 px, 10 epochs", r"RATIO whole_fit_resnet64_10ep ([\d.]+)"),
            ("the same, 50 epochs", r"RATIO whole_fit_resnet64_50ep ([\d.]+)"),
            ("the same, budget=False, 10 epochs", r"RATIO whole_fit_nobudget_resnet64_10ep ([\d.]+)"),
        ],
    ),
    (
        "bench_fit_overhead.py",
        [],
        ["--repeats", "1", "--long-epochs", "18"],
        [
            ("fit time, default callback set / none, 6 epochs", r"RATIO fit_overhead_default_6ep ([\d.]+)"),
            ("fit time, default callback set / none, long fit", r"RATIO fit_overhead_default_\d\d+ep ([\d.]+)"),
            ("recurring overhead per epoch / one epoch, default set (callbacks' own clocks)", r"RATIO recurring_per_epoch_default ([-\d.]+)"),
            ("the same, wall (median epoch with / without, minus 1; noisy)", r"RATIO recurring_per_epoch_wall_default ([-\d.]+)"),
            ("one-off overhead per fit, in epochs, default set", r"RATIO one_off_epochs_default ([-\d.]+)"),
            ("peak memory, default callback set / none", r"RATIO peak_memory_default ([\d.]+)"),
        ],
    ),
    (
        "bench_memory.py",
        [],
        ["--size", "128", "--only", "none", "default"],
        [
            ("peak memory on 3x384x384 images (128 with --quick), default set / none", r"RATIO peak_memory_\d+px ([\d.]+)"),
            ("the same, Attributions alone / none", r"RATIO peak_memory_\d+px_Attributions ([\d.]+)"),
            ("the same, SanityChecks alone / none", r"RATIO peak_memory_\d+px_SanityChecks ([\d.]+)"),
            ("the same, Misclassifications alone / none", r"RATIO peak_memory_\d+px_Misclassifications ([\d.]+)"),
            ("peak allocated CUDA memory on those images (--device cuda), default set / none", r"RATIO peak_cuda_memory_\d+px ([\d.]+)"),
        ],
    ),
    (
        "bench_callback_costs.py",
        [],
        ["--size", "32"],
        [
            ("misclassification review / training epoch (ResNet-style, 64 px (32 with --quick), 512 images)", r"RATIO misclassification_review_per_epoch ([\d.]+)"),
            ("feature visualisation run / training epoch (same)", r"RATIO feature_visualization_run_per_epoch ([\d.]+)"),
            ("sanity check / training epoch (same)", r"RATIO sanity_check_per_epoch ([\d.]+)"),
        ],
    ),
    (
        "bench_histograms.py",
        [],
        ["--repeats", "1", "--arch", "resnet18"],
        [
            ("histograms: naive add_histogram / ours, 1 torch thread (CPU time)", r"single-threaded \(CPU\): ([\d.]+)x"),
            ("histograms: naive / ours, torch's default threads (wall)", r"with \d+ torch threads \(wall\): ([\d.]+)x"),
            ("histograms: ours / one training step (wall, 1 thread)", r"ours / one training step: wall ([\d.]+)"),
        ],
    ),
    (
        "bench_attributions.py",
        [],
        ["--repeats", "5"],
        [
            ("saliency+Grad-CAM: ours / captum (DigitsCNN)", r"DigitsCNN\s+saliency \+ grad_cam\s+[\d.]+\s+[\d.]+\s+([\d.]+)"),
            ("saliency+Grad-CAM: ours / fwd+bwd (DigitsCNN)", r"DigitsCNN\s+saliency \+ grad_cam\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)"),
            ("saliency+Grad-CAM: ours / captum (SmallResNet)", r"SmallResNet\s+saliency \+ grad_cam\s+[\d.]+\s+[\d.]+\s+([\d.]+)"),
            ("guided Grad-CAM: ours / captum (SmallResNet)", r"SmallResNet\s+guided_grad_cam\s+[\d.]+\s+[\d.]+\s+([\d.]+)"),
            ("LRP epsilon: ours / fwd+bwd (SmallResNet)", r"SmallResNet\s+lrp \(epsilon\)\s+[\d.]+\s+\S+\s+\S+\s+([\d.]+)"),
        ],
    ),
    (
        "bench_lrp.py",
        [],
        ["--repeats", "5"],
        [("LRP epsilon: ours / captum LRP (captum-compatible CNN)", r"captum-compatible[\s\S]*?lrp epsilon\s+([\d.]+) ms[\s\S]*?captum LRP\s+([\d.]+) ms")],
    ),
    (
        "bench_probes.py",
        [],
        ["--quick"],
        [
            ("probes 4 layers x 10k, sklearn (1 BLAS thread) / one demo epoch", r"sklearn \(1 BLAS thread[^)]*\): [\d.]+ s = ([\d.]+) x"),
            ("probes 4 layers x 10k, torch L-BFGS / one demo epoch", r"torch \(CPU\): [\d.]+ s = ([\d.]+) x"),
        ],
    ),
    (
        "bench_segmentation.py",
        [],
        [],
        [
            ("segmentation review / validation pass (shapes U-Net, 32 px demo)", r"RATIO segmentation_review_per_val_pass_demo ([\d.]+)"),
            ("segmentation review / validation pass (U-Net, 128 px)", r"RATIO segmentation_review_per_val_pass_128px ([\d.]+)"),
            ("attributions run incl. localisation / validation pass (32 px demo)", r"RATIO attributions_run_per_val_pass_demo ([\d.]+)"),
            ("attributions run incl. localisation / validation pass (128 px)", r"RATIO attributions_run_per_val_pass_128px ([\d.]+)"),
            ("localisation scores per run / validation pass (32 px demo)", r"RATIO localization_per_val_pass_demo ([\d.]+)"),
            ("localisation scores per run / validation pass (128 px)", r"RATIO localization_per_val_pass_128px ([\d.]+)"),
        ],
    ),
    (
        "bench_featviz.py",
        [],
        ["--repeats", "2", "--steps", "20"],
        [("feature vis. batch 16, fourier+tv+transforms, steps/s", r"batch 16[\s\S]*?fourier \+ tv \+ transforms\s+([\d.]+)")],
    ),
]

# the scripts with a --device option (bench_probes measures the sklearn thread vs torch on the CPU)
TAKES_DEVICE = {"bench_memory.py", "bench_whole_fit.py", "bench_segmentation.py", "bench_callback_costs.py", "bench_fit_overhead.py", "bench_histograms.py", "bench_attributions.py", "bench_lrp.py", "bench_featviz.py"}


def machine_description(device: str) -> str:
    """One line that says where the numbers were measured: CPU, core count, OS, Python, torch, device."""
    try:
        import torch

        torch_version = f"torch {torch.__version__}"
        if device == "cuda" and torch.cuda.is_available():
            torch_version += f", {torch.cuda.get_device_name(0)}"
    except ImportError:  # the benchmarks need torch, but the description must not fail without it
        torch_version = "torch not importable"
    cpu = platform.processor() or platform.machine()
    return (f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, {torch_version}, device {device}")


def cost_rows(output: str) -> list[tuple[str, ...]]:
    """The per-callback rows that ``bench_callback_costs.py`` prints after its ``callback run`` header."""
    rows: list[tuple[str, ...]] = []
    in_table = False
    for line in output.splitlines():
        if line.startswith("callback run"):
            in_table = True
        elif in_table:
            match = COST_ROW.match(line)
            if match is None:
                break
            rows.append(match.groups())
    return rows


def fit_rows(output: str) -> list[tuple[str, ...]]:
    """The rows of ``bench_whole_fit.py``'s table, as the docs table shows them."""
    names = {"demo": "digits demo CNN (32 px)", "resnet64": "small ResNet (64 px)"}
    rows = []
    for line in output.splitlines():
        match = FIT_ROW.match(line)
        if match:
            model, epochs, none, default, ratio, nobudget, ratio_nb, clocks = match.groups()
            rows.append((names[model], epochs, none, default, f"**{ratio}x**", f"{clocks}x",
                         f"{nobudget} ({ratio_nb}x)" if nobudget else "-"))
    return rows


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def replace_between_markers(text: str, name: str, body: str) -> str:
    r"""``text`` with what lies between the ``run_all:<name>`` markers replaced by ``body``.

    Raises:
        ValueError: when the page lacks the markers (the page, not this script, decides where tables go).

    Example:
        >>> page = "a\n<!-- run_all:t:begin -->\nold\n<!-- run_all:t:end -->\nb"
        >>> replace_between_markers(page, "t", "new")
        'a\n<!-- run_all:t:begin -->\nnew\n<!-- run_all:t:end -->\nb'
    """
    begin, end = f"<!-- run_all:{name}:begin -->", f"<!-- run_all:{name}:end -->"
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"Expected the markers {begin} and {end} in the page, in that order.")
    return text[: i + len(begin)] + "\n" + body.strip("\n") + "\n" + text[j:]


def write_docs(path: str, summary: list[tuple[str, str]], costs: list[tuple[str, ...]], *, quick: bool,
               seconds: float, device: str, fits: list[tuple[str, ...]] | None = None) -> None:
    """Write the summary table (and the per-callback cost table, when parsed) into the docs page."""
    stamp = (f"*Generated by `benchmarks/run_all.py{' --quick' if quick else ''}` on "
             f"{datetime.date.today().isoformat()} ({seconds:.0f} s in all) on {machine_description(device)}.*")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = replace_between_markers(text, "summary", stamp + "\n\n" + markdown_table(("measurement", "ratio"), summary))
    if costs:
        header = ("callback run (defaults)", "runs", "seconds per run", "per training epoch", "per validation pass")
        text = replace_between_markers(text, "callback_costs", stamp + "\n\n" + markdown_table(header, costs))
    if fits:
        header = ("model", "epochs", "no callbacks (s)", "default set (s)", "ratio", "by the callbacks' clocks",
                  "default set, budget=False (s)")
        text = replace_between_markers(text, "whole_fit", stamp + "\n\n" + markdown_table(header, fits))
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"tables written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller models")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device of the benchmarks that take one")
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=None,
                        help=f"write the tables into {os.path.relpath(DOCS_PAGE)} (default: on for full runs, off with --quick)")
    parser.add_argument("--skip", nargs="+", default=[], choices=[b[0] for b in BENCHMARKS], metavar="SCRIPT",
                        help="benchmark scripts to leave out (their rows read n/a), e.g. bench_whole_fit.py")
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    costs: list[tuple[str, ...]] = []
    fits: list[tuple[str, ...]] = []
    start = time.perf_counter()
    for script, normal, quick, patterns in BENCHMARKS:
        if script in args.skip:
            rows.extend((label, "n/a") for label, _ in patterns)
            continue
        cmd = [sys.executable, os.path.join(HERE, script), *(quick if args.quick else normal)]
        if script in TAKES_DEVICE:
            cmd += ["--device", args.device]
        print(f"\n===== {script} {' '.join(cmd[2:])}", flush=True)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        print(res.stdout.rstrip())
        if res.returncode != 0:
            print(res.stderr[-3000:])
        print(f"({time.perf_counter() - t0:.0f} s)")
        if script == "bench_callback_costs.py":
            costs = cost_rows(res.stdout)
        if script == "bench_whole_fit.py":
            fits = fit_rows(res.stdout)
        for label, pattern in patterns:
            match = re.search(pattern, res.stdout)
            if match is None:
                rows.append((label, "n/a"))
            elif match.lastindex == 2:  # two timings: print their ratio
                rows.append((label, f"{float(match.group(1)) / float(match.group(2)):.2f}"))
            else:
                rows.append((label, match.group(1)))
    seconds = time.perf_counter() - start
    print(f"\n===== summary ({machine_description(args.device)}, {seconds:.0f} s in all)")
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    if args.write_docs if args.write_docs is not None else not (args.quick or args.skip):
        write_docs(DOCS_PAGE, rows, costs, quick=args.quick, seconds=seconds, device=args.device, fits=fits)


if __name__ == "__main__":
    main()
