"""The ``fastdiff`` command: ``scan | bench | train | demo``.

Each subcommand's arguments and body live in its own module (``bench``, ``train``, ``demo``); this file
only registers them, plus ``scan``, which is a thin view of :attr:`fastdiff.DataLoader.report`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any


def _add_scan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="folder of images (searched recursively), or a dataset config .toml")
    # None: the DataLoader's default for a folder, the config's value for a .toml (a flag given wins).
    p.add_argument("--resolution", type=int, default=None, help="bucket resolution in pixels (default 512)")
    p.add_argument("--bucket-step", type=int, default=None, help="bucket side multiple, px (default 64)")
    p.add_argument("--min-bucket-side", type=int, default=None, help="default resolution/2")
    p.add_argument("--max-bucket-side", type=int, default=None, help="default 2*resolution")
    p.add_argument("--batch-size", type=int, default=None, help="for the batches-per-epoch count (default 1)")
    p.add_argument("--no-upscale", action="store_true", help="never enlarge images (kohya bucket_no_upscale)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="refuse images with more pixels than this (default 178956970, Pillow's limit)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the full report as JSON (found, loaded, skipped: [{path, code, message}], ...)",
    )


def format_report(report: dict[str, Any], batches: int) -> str:
    """Human-readable summary of a :attr:`fastdiff.DataLoader.report` dict."""
    subsets = report["subsets"]
    lines = [
        f"root: {report['root']}" if len(subsets) <= 1 else f"subsets: {len(subsets)} (listed below)",
        f"images found: {report['found']}  loaded: {report['loaded']}  skipped: {len(report['skipped'])}",
        "formats: " + ", ".join(f"{k} {v}" for k, v in sorted(report["formats"].items())),
        f"size range (h x w): {report['min_size'][0]}x{report['min_size'][1]}"
        f" .. {report['max_size'][0]}x{report['max_size'][1]}",
        f"captions missing: {report['captions_missing']}"
        f"  read as Windows-1252: {report['captions_fallback_encoding']}",
        f"batches per epoch: {batches}",
        "images per bucket (h x w: count):",
    ]
    lines += [f"  {h:5d} x {w:<5d} {n}" for (h, w), n in report["images_per_bucket"]]
    if len(subsets) > 1 or report["samples"] != report["loaded"]:
        lines.append(f"samples per epoch (repeats counted): {report['samples']}")
        for sub in subsets:
            kind = "reg" if sub["is_reg"] else "train"
            per = ", ".join(f"{h}x{w}: {n}" for (h, w), n in sub["images_per_bucket"])
            lines.append(
                f"  subset {sub['root']} ({kind}, x{sub['num_repeats']}): {sub['images']} images ({per})"
            )
    if report["small_buckets"]:
        lines.append("buckets smaller than one batch (short batch, or none with drop_last):")
        lines += [f"  {h:5d} x {w:<5d} {n}" for (h, w), n in report["small_buckets"]]
    if report["skipped"]:
        lines.append("skipped:")
        lines += [f"  [{s['code']}] {s['message']}" for s in report["skipped"]]
    return "\n".join(lines)


def _run_scan(args: argparse.Namespace) -> int:
    from fastdiff import DataLoader

    given = {
        "resolution": args.resolution,
        "bucket_step": args.bucket_step,
        "min_bucket_side": args.min_bucket_side,
        "max_bucket_side": args.max_bucket_side,
        "batch_size": args.batch_size,
        "max_pixels": args.max_pixels,
    }
    extra: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if args.no_upscale:
        extra["no_upscale"] = True
    if args.root.endswith(".toml"):
        # The config's own options apply, except those given as flags.
        loader = DataLoader.from_config(args.root, **extra)
    else:
        loader = DataLoader(args.root, **extra)
    report = loader.report
    if args.json:
        report["batches_per_epoch"] = len(loader)
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(format_report(report, len(loader)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fastdiff`` command and its subcommands."""
    from fastdiff import bench, demo, train

    description = __doc__.splitlines()[0].replace("``", "")
    parser = argparse.ArgumentParser(prog="fastdiff", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    scan_p = sub.add_parser("scan", help="scan a folder: formats, sizes, buckets, captions, skipped files")
    _add_scan_arguments(scan_p)
    scan_p.set_defaults(func=_run_scan)
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
