"""The ``fastdiff`` command: ``scan | bench | train | demo``.

Each subcommand's arguments and body live in its own module (``bench``, ``train``, ``demo``); this file
only registers them, plus ``scan``, which is a thin view of :attr:`fastdiff.DataLoader.report`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fastdiff`` command and its subcommands."""
    from fastdiff import bench, demo, scan, train

    description = __doc__.splitlines()[0].replace("``", "")
    parser = argparse.ArgumentParser(prog="fastdiff", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    scan_p = sub.add_parser("scan", help="scan a folder: formats, sizes, buckets, captions, skipped files")
    scan.add_scan_arguments(scan_p)
    scan_p.set_defaults(func=scan.run_scan)
    bench_p = sub.add_parser("bench", help="images/s of fastdiff vs the torchvision+PIL DataLoader")
    bench.add_bench_arguments(bench_p)
    bench_p.set_defaults(func=bench.run_bench)
    train_p = sub.add_parser(
        "train", help="fine-tune Stable Diffusion (--model), or train a tiny text-to-image model from scratch"
    )
    train.add_train_arguments(train_p)
    train_p.set_defaults(func=train.run_train)
    demo_p = sub.add_parser("demo", help="make a synthetic captioned set, train on it, draw samples")
    demo.add_demo_arguments(demo_p)
    demo_p.set_defaults(func=demo.run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastdiff`` console script; returns the exit status."""
    from fastdiff._fastdiff import FastdiffError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, FastdiffError) as e:
        # Bad input (a missing folder, an unknown config key, a broken file with on_error="raise"):
        # the message names the file or key; a traceback would only hide it. Set FASTDIFF_TRACEBACK=1
        # to get one.
        if os.environ.get("FASTDIFF_TRACEBACK"):
            raise
        print(f"fastdiff {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
