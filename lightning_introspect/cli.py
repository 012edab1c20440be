"""``lightning-introspect``: the command-line entry point.

``lightning-introspect demo`` trains a small CNN on scikit-learn's digits with every introspection
callback on and tells you where to point TensorBoard; ``--task segmentation`` trains a small U-Net on
generated shapes instead, ``--task text`` a tiny transformer on generated sentences, ``--task vit`` a tiny
vision transformer on the digits.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-introspect", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a small CNN on digits (or a U-Net on shapes, a transformer on sentences, a ViT on digits) with every "
        "callback on",
    )
    demo.add_argument(
        "--task",
        choices=("classification", "segmentation", "text", "vit"),  # demo.DEMO_TASKS, without importing torch for --help
        default="classification",
        help="classification: a CNN on digits; segmentation: a U-Net on generated shapes; text: a tiny transformer on "
        "generated sentences whose label is decided by known words; vit: a tiny vision transformer on digits "
        "(default: classification)",
    )
    demo.add_argument("--out", default="introspect_runs", help="log root (default: ./introspect_runs)")
    demo.add_argument("--name", default=None, help="run name under the log root (default: digits / shapes / sentences / digits_vit)")
    demo.add_argument("--epochs", type=int, default=6, help="training epochs (default: 6)")
    demo.add_argument("--seed", type=int, default=0, help="seed for data split, init and callbacks (default: 0)")
    demo.add_argument("--accelerator", default="cpu", help="cpu | gpu | auto (default: cpu)")
    demo.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed (default: 32-true)")
    demo.add_argument("--fast", action="store_true", help="tiny data and settings, for tests (seconds)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        if args.epochs < 1:
            print(f"Expected --epochs to be a positive int, but got {args.epochs}.", file=sys.stderr)
            return 2
        os.environ.setdefault("MPLBACKEND", "Agg")
        from lightning_introspect.demo import run_demo

        result = run_demo(
            task=args.task,
            out=args.out,
            name=args.name,
            epochs=args.epochs,
            seed=args.seed,
            accelerator=args.accelerator,
            fast=args.fast,
            precision=args.precision,
        )
        print("\nWhat the introspection callbacks found:")
        for line in result["summary"]:
            print(f"  {line}")
        print(f"\nLogs written to {result['log_dir']}")
        print(f"Look at them with:\n  tensorboard --logdir {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
