"""``fastdiff scan``: what a folder or dataset config holds, without decoding pixels (but with ``--quality``).

A thin view of :attr:`fastdiff.DataLoader.report`, with ``--cache`` of the cache folder's coverage
of that loader (:func:`cache_coverage`: the entries its build plan and captions need, how many the
cache serves, its corrupt shards and recorded failures), and with ``--quality`` of
:func:`fastdiff.quality.quality_report` (``--contact-sheet``: its PNG). Its loader flags are the loader
options whose schema entry (:mod:`fastdiff.options`) says ``scan``; this module must not define loader
options of its own (only what it prints: ``--json`` and the quality group).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, TypedDict

from fastdiff import _fastdiff
from fastdiff.loader import DataLoader
from fastdiff.options import LOADER_OPTIONS
from fastdiff.quality import LONG_CAPTION_WORDS, MAX_UPSCALE, contact_sheet, format_quality, quality_report
from fastdiff.types import Report

_SCAN_OPTIONS = tuple(o for o in LOADER_OPTIONS if o.scan)
_PARSERS = {"int": int, "float": float, "str": str, "choice": str, "path": str}


def add_scan_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``scan``'s arguments on ``p``: the folder or config, one flag per scan option, ``--json``."""
    p.add_argument(
        "root",
        nargs="+",
        help="folder of images (searched recursively), a dataset config .toml, or tar shards (paths or "
        "brace patterns: data/shard-{0000..0099}.tar)",
    )
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
    quality = p.add_argument_group(
        "quality", "flag duplicates, upscaled, transparent and gray images, bad captions"
    )
    quality.add_argument(
        "--quality",
        action="store_true",
        help="decode every image small and flag what makes a fine-tune worse (see fastdiff.quality)",
    )
    quality.add_argument(
        "--max-upscale",
        type=float,
        default=MAX_UPSCALE,
        help=f"flag images enlarged more than this factor to cover their bucket (default {MAX_UPSCALE:g})",
    )
    quality.add_argument(
        "--tokenizer",
        help="a transformers tokenizer folder (e.g. MODEL/tokenizer): long captions in its tokens, "
        f"over its model_max_length (default: over {LONG_CAPTION_WORDS} words)",
    )
    quality.add_argument("--contact-sheet", help="write a PNG of the flagged images, labelled, to this path")


def format_report(report: Report, batches: int) -> str:
    """Human-readable summary of a :attr:`fastdiff.DataLoader.report`; ``batches`` per epoch."""
    subsets = report["subsets"]
    lines = [
        f"root: {report['root']}" if len(subsets) <= 1 else f"subsets: {len(subsets)} (listed below)",
        f"images found: {report['found']}  loaded: {report['loaded']}  skipped: {len(report['skipped'])}"
        + (f"  held out for validation: {report['held_out']}" if report["held_out"] else ""),
        f"other files passed over: {report['passed_over']['other_files']}"
        f"  caption files: {report['passed_over']['caption_files']}"
        f"  hidden: {report['passed_over']['hidden']}",
        "formats: " + ", ".join(f"{k} {v}" for k, v in sorted(report["formats"].items())),
        f"size range (h x w): {report['min_size'][0]}x{report['min_size'][1]}"
        f" .. {report['max_size'][0]}x{report['max_size'][1]}",
        f"captions missing: {report['captions_missing']}"
        f"  read as Windows-1252: {report['captions_fallback_encoding']}",
        f"batches per epoch: {batches}",
        f"images trained per epoch: {report['images_trained']} of {report['loaded']}",
        "images per bucket (h x w: count):",
    ]
    lines += [f"  {h:5d} x {w:<5d} {n}" for (h, w), n in report["images_per_bucket"]]
    if len(subsets) > 1 or report["samples"] != report["loaded"]:
        lines.append(f"samples per epoch (repeats counted): {report['samples']}")
        for sub in subsets:
            kind = "reg" if sub["is_reg"] else "train"
            per = ", ".join(f"{h}x{w}: {n}" for (h, w), n in sub["images_per_bucket"])
            lines.append(
                f"  subset {sub['root']} ({kind}, x{sub['num_repeats']}): {sub['images']} images ({per}); "
                f"trained per epoch: {sub['images_trained']} of {sub['images']}"
            )
    merges = report["bucket_merges"]
    if merges["images_moved"]:
        lines.append(
            f"bucket merges (min_bucket_fill): {merges['images_moved']} images moved"
            f" ({merges['samples_moved']} samples), aspect error |ln(w/h) - ln(bw/bh)|"
            f" mean {merges['mean_aspect_error']:.4f} max {merges['max_aspect_error']:.4f},"
            f" extra crop mean {merges['mean_extra_crop']:.1%} max {merges['max_extra_crop']:.1%}"
        )
        lines += [f"  {fh}x{fw} -> {th}x{tw}: {n}" for (fh, fw), (th, tw), n in merges["moves"]]
    if report["small_buckets"]:
        lines.append("buckets smaller than one batch (short batch, or none with drop_last):")
        lines += [f"  {h:5d} x {w:<5d} {n}" for (h, w), n in report["small_buckets"]]
    if report["skipped"]:
        lines.append("skipped:")
        lines += [f"  [{s['code']}] {s['message']}" for s in report["skipped"]]
    if report["warnings"]:
        # Orphan conditioning files (``orphan_mask: PATH ...``) and stale shard indexes.
        lines.append("warnings:")
        lines += [f"  {w}" for w in report["warnings"]]
    return "\n".join(lines)


def format_coverage(c: CacheCoverage) -> str:
    """Human-readable summary of a :func:`cache_coverage`."""

    def half(present: int, needed: int | None, what: str) -> str:
        return "not in this cache" if needed is None else f"{present} / {needed} present ({what})"

    lines = [
        f"cache: {c['cache']}",
        f"  latents: {half(c['latents_present'], c['latents_needed'], 'distinct build samples')}",
        f"  text: {half(c['text_present'], c['text_needed'], 'distinct captions')}",
        f"  corrupt shards: {len(c['corrupt_shards'])}",
        *(f"    {path}: {why}" for path, why in c["corrupt_shards"]),
        f"  failed images (manifest): {c['failed']}",
    ]
    return "\n".join(lines)


class CacheCoverage(TypedDict):
    """What a cache folder holds of what a loader needs (:func:`cache_coverage`).

    Keys:
        cache: The cache folder.
        latents_present: Of ``latents_needed``, the keys the cache serves.
        latents_needed: Distinct latent keys of the loader's build plan (every distinct image, crop
            variant and flip state, whatever the rank); ``None`` when the manifest has no latents half.
        text_present: Of ``text_needed``, the keys the cache serves.
        text_needed: Distinct text keys: every caption a sample can get, plus ``""`` (the builder always
            encodes the dropped caption); ``None`` when the manifest has no text half.
        corrupt_shards: ``[path, reason]`` of each shard not served (truncated or unparsable header).
        failed: Images the builder could not decode (the manifest's ``failed``).
    """

    cache: str
    latents_present: int
    latents_needed: int | None
    text_present: int
    text_needed: int | None
    corrupt_shards: list[tuple[str, str]]
    failed: int


def cache_coverage(loader: DataLoader) -> CacheCoverage:
    """The coverage of ``loader``'s cache (built with ``cache=``): computed from the image headers, the
    content hashes the loader took and the shard headers; nothing is decoded.

    Raises:
        ValueError: ``loader`` has no cache, or as :meth:`fastdiff.DataLoader.build_latent_keys` and
            :meth:`fastdiff.DataLoader.caption_variants`.
    """
    if loader.cache is None:
        raise ValueError("cache_coverage needs a loader built with cache=")
    store = _fastdiff.CacheStore(loader.cache)
    latent_keys = sorted({k for k, _ in loader.build_latent_keys() if k is not None})
    text_salt = store.salt("text")
    text_keys: list[str] = []
    if text_salt is not None:
        captions = {c for c, _ in loader.caption_variants()} | {""}
        text_keys = sorted({_fastdiff.text_key(c, text_salt) for c in captions})
    return CacheCoverage(
        cache=str(loader.cache),
        latents_present=sum(store.contains(latent_keys)),
        latents_needed=None if store.salt("latents") is None else len(latent_keys),
        text_present=sum(store.contains(text_keys)),
        text_needed=None if text_salt is None else len(text_keys),
        corrupt_shards=store.corrupt_shards(),
        failed=len(store.failed()),
    )


def run_scan(args: argparse.Namespace) -> int:
    """Body of ``fastdiff scan``: print the report of ``args.root`` (as text, or JSON with ``--json``), with
    ``--quality`` the data-quality flags too.

    Returns:
        The exit status, 0.

    Raises:
        ValueError: ``args.root`` holds no images, the config is invalid, or a flag is out of range.
    """
    given: dict[str, Any] = {o.name: getattr(args, o.name) for o in _SCAN_OPTIONS}
    extra = {k: v for k, v in given.items() if v is not None}
    root = args.root[0] if len(args.root) == 1 else args.root
    if isinstance(root, str) and root.endswith(".toml"):
        # The config's own options apply, except those given as flags.
        loader = DataLoader.from_config(root, **extra)
    else:
        loader = DataLoader(root, **extra)
    report = loader.report
    coverage = None if loader.cache is None else cache_coverage(loader)
    quality = None
    if args.quality:
        tokenizer = None
        if args.tokenizer is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        quality = quality_report(loader, max_upscale=args.max_upscale, tokenizer=tokenizer)
        if args.contact_sheet is not None:
            contact_sheet(quality, args.contact_sheet)
    if args.json:
        out: dict[str, Any] = {**report, "batches_per_epoch": len(loader)}
        if coverage is not None:
            out["cache"] = coverage
        if quality is not None:
            out["quality"] = quality
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        print(format_report(report, len(loader)))
        if coverage is not None:
            print(format_coverage(coverage))
        if quality is not None:
            print(format_quality(quality))
    return 0
