"""The ``fastdiff`` command: ``scan | bench | tune | train | demo``.

Each subcommand's arguments and body live in its own module (``bench.throughput``, ``bench.sweep``,
``training.config`` / ``training.run``, ``training.demo``); this file only registers them, plus
``scan``, which is a thin view of :attr:`fastdiff.DataLoader.report`, and checks before a command
starts that the optional packages it needs are installed (:func:`missing_extra`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from fastdiff._fastdiff import FastdiffError
from fastdiff.bench import sweep, throughput
from fastdiff.training import config, demo, run

#: Import names of the ``train`` extra's packages (pyproject ``[project.optional-dependencies]``).
TRAIN_MODULES = (
    "diffusers",
    "transformers",
    "tokenizers",
    "peft",
    "safetensors",
    "tqdm",
    "matplotlib",
    "PIL",
)
#: Import names of what the ``dev`` extra adds that ``fastdiff bench``'s baseline needs.
BENCH_MODULES = ("torchvision", "PIL")


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
    description = __doc__.splitlines()[0].replace("``", "")
    parser = argparse.ArgumentParser(prog="fastdiff", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    scan_p = sub.add_parser("scan", help="scan a folder: formats, sizes, buckets, captions, skipped files")
    _add_scan_arguments(scan_p)
    scan_p.set_defaults(func=_run_scan)
    bench_p = sub.add_parser("bench", help="images/s of fastdiff vs the torchvision+PIL DataLoader")
    throughput.add_bench_arguments(bench_p)
    bench_p.set_defaults(func=throughput.run_bench)
    tune_p = sub.add_parser("tune", help="which num_threads and prefetch to use on this machine, and why")
    sweep.add_tune_arguments(tune_p)
    tune_p.set_defaults(func=sweep.run_tune)
    train_p = sub.add_parser(
        "train", help="fine-tune Stable Diffusion (--model), or train a tiny text-to-image model from scratch"
    )
    config.add_train_arguments(train_p)
    train_p.set_defaults(func=run.run_train)
    demo_p = sub.add_parser("demo", help="make a synthetic captioned set, train on it, draw samples")
    demo.add_demo_arguments(demo_p)
    demo_p.set_defaults(func=demo.run_demo)
    return parser


def needed_modules(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(extra, import name)`` of each optional package that the parsed command will import."""
    if args.command in ("train", "demo"):
        return [("train", m) for m in TRAIN_MODULES]
    needs = [("train", "matplotlib")] if getattr(args, "plot", None) is not None else []
    if args.command == "bench" and not args.sweep:
        needs += [("dev", m) for m in BENCH_MODULES]
    return needs


def _importable(name: str) -> bool:
    # find_spec locates a top-level package without importing it (diffusers alone takes seconds).
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_extra(args: argparse.Namespace) -> str | None:
    """The one-line error for a command whose optional packages are not installed, else ``None``.

    Returns:
        ``"fastdiff demo: error: needs the train extra: pip install 'fastdiff[train]' (missing:
        tokenizers)"``: the first extra with a missing package, naming every missing one of it.
    """
    missing: dict[str, list[str]] = {}
    for extra, module in needed_modules(args):
        if not _importable(module):
            missing.setdefault(extra, []).append(module)
    for extra, modules in missing.items():
        return (
            f"fastdiff {args.command}: error: needs the {extra} extra: pip install 'fastdiff[{extra}]' "
            f"(missing: {', '.join(modules)})"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastdiff`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    # Before any work: without this a command would die minutes in, at its first import of the extra.
    error = missing_extra(args)
    if error is not None:
        print(error, file=sys.stderr)
        return 2
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
