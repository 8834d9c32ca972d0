"""``fastdiff scan``: what a folder or dataset config holds, without decoding pixels.

A thin view of :attr:`fastdiff.DataLoader.report`. Its flags are the loader options whose schema entry
(:mod:`fastdiff.options`) says ``scan``; this module must not define options of its own.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from fastdiff.loader import DataLoader
from fastdiff.options import LOADER_OPTIONS
from fastdiff.types import Report

_SCAN_OPTIONS = tuple(o for o in LOADER_OPTIONS if o.scan)
_PARSERS = {"int": int, "float": float, "str": str, "choice": str}


def add_scan_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``scan``'s arguments on ``p``: the folder or config, one flag per scan option, ``--json``."""
    p.add_argument("root", help="folder of images (searched recursively), or a dataset config .toml")
    for o in _SCAN_OPTIONS:
        # None = not given: the DataLoader's default for a folder, the config's value for a .toml.
        doc = o.doc.rstrip(".").replace("``", "").replace("%", "%%")
        if o.kind == "bool":
            p.add_argument(o.flag, action="store_true", default=None, help=doc)
        else:
            unit = f"{o.unit}; " if o.unit else ""
            text = f"{doc} ({unit}default {o.default_text.replace('``', '')})"
            choices = [str(c) for c in o.allowed] or None
            p.add_argument(o.flag, type=_PARSERS[o.kind], choices=choices, default=None, help=text)
    p.add_argument(
        "--json",
        action="store_true",
        help="print the full report as JSON (found, loaded, skipped: [{path, code, message}], ...)",
    )


def format_report(report: Report, batches: int) -> str:
    """Human-readable summary of a :attr:`fastdiff.DataLoader.report`; ``batches`` per epoch."""
    subsets = report["subsets"]
    lines = [
        f"root: {report['root']}" if len(subsets) <= 1 else f"subsets: {len(subsets)} (listed below)",
        f"images found: {report['found']}  loaded: {report['loaded']}  skipped: {len(report['skipped'])}",
        f"other files passed over: {report['passed_over']['other_files']}"
        f"  caption files: {report['passed_over']['caption_files']}"
        f"  hidden: {report['passed_over']['hidden']}",
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


def run_scan(args: argparse.Namespace) -> int:
    """Body of ``fastdiff scan``: print the report of ``args.root`` (as text, or JSON with ``--json``).

    Returns:
        The exit status, 0.

    Raises:
        ValueError: ``args.root`` holds no images, the config is invalid, or a flag is out of range.
    """
    given: dict[str, Any] = {o.name: getattr(args, o.name) for o in _SCAN_OPTIONS}
    extra = {k: v for k, v in given.items() if v is not None}
    if args.root.endswith(".toml"):
        # The config's own options apply, except those given as flags.
        loader = DataLoader.from_config(args.root, **extra)
    else:
        loader = DataLoader(args.root, **extra)
    report = loader.report
    if args.json:
        print(json.dumps({**report, "batches_per_epoch": len(loader)}, indent=2, ensure_ascii=False))
    else:
        print(format_report(report, len(loader)))
    return 0
