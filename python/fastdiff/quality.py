"""``fastdiff scan --quality``: the images and captions that make a fine-tune worse, found from the measures
the Rust workers take of every decoded image (:meth:`fastdiff.DataLoader.measure_quality`).

Flags, each per image and counted per subset:

- **exact duplicates**: files with the same bytes (blake3 content hash);
- **near duplicates**: difference hashes (dHash, 64 bits; N. Krawetz, "Kind of Like That", 2013) at most
  :data:`NEAR_DUPLICATE_BITS` bits apart (a resized, recompressed or slightly recoloured copy is 0–4 bits
  away; unrelated photos about 32), each group the images within that distance of its first image (in
  path order); flat images (the hash's 9×8 luma cells spread less than :data:`MIN_DETAIL` levels) are
  left out, their hash bits being noise. Candidate pairs come from the pigeonhole principle (two hashes
  within ``t`` bits agree exactly on one of ``t + 1`` disjoint bit blocks), so the search is about
  linear in the image count;
- **upscaled**: images the loader must enlarge more than ``max_upscale`` × to cover their bucket
  (``max(bucket_w / w, bucket_h / h)``, upright sizes);
- **transparent**: more than :data:`TRANSPARENT_SHARE` of the area transparent (mean ``1 - alpha``);
- **grayscale in a colour set**: images with fewer than :data:`GRAY_COLOURED_SHARE` coloured pixels
  (of their opaque pixels) in a subset where most images are colour;
- **captions**: missing (no caption file or entry), empty (only whitespace), or long: more tokens than
  the tokenizer's ``model_max_length`` when a tokenizer is given (CLIP's 77 for SD), else more than
  :data:`LONG_CAPTION_WORDS` words.

The contact sheet (:func:`contact_sheet`) draws every flagged image small, labelled with its flags.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict, cast

from fastdiff.loader import DataLoader
from fastdiff.types import ImageQuality, SkipCode, SkippedFile

#: Near duplicates: dHashes at most this many bits apart (of 64).
NEAR_DUPLICATE_BITS = 6
#: Near duplicates are looked for among images whose 9×8 luma cells spread at least this much (std, levels).
MIN_DETAIL = 4.0
#: Upscaled: enlarged more than this factor to cover the bucket (the default of ``max_upscale``).
MAX_UPSCALE = 2.0
#: Transparent: more than this share of the image's area transparent.
TRANSPARENT_SHARE = 0.5
#: Grayscale: fewer than this share of coloured pixels (channels more than 12 levels apart).
GRAY_COLOURED_SHARE = 0.005
#: Long caption without a tokenizer: more words than this (CLIP's 77 tokens hold about 60–75 words).
LONG_CAPTION_WORDS = 75


class QualityReport(TypedDict):
    """What :func:`quality_report` finds (the JSON of ``fastdiff scan --quality --json``).

    Keys:
        images: Images measured (loaded by the scan).
        errors: Images that could not be decoded now (path, code, message).
        exact_duplicates: Groups of paths with identical bytes (each group sorted, groups by first path).
        near_duplicates: Groups of paths whose dHashes are within :data:`NEAR_DUPLICATE_BITS` bits of the
            group's first path (exact duplicates count once), with the largest such distance.
        upscaled: ``{path, scale, size: [w, h], bucket: [h, w]}`` of images enlarged more than
            ``max_upscale``.
        transparent: ``{path, share}`` of images more than :data:`TRANSPARENT_SHARE` transparent.
        grayscale: Paths of grayscale images in subsets where most images are colour.
        captions_missing: Paths without a caption.
        captions_empty: Paths whose caption is whitespace only.
        captions_long: ``{path, length, unit}`` of long captions (unit ``"tokens"`` or ``"words"``).
        subsets: Per subset (the loader's order): ``root``, ``images``, ``flagged`` (images with any
            flag) and a count per flag.
        thresholds: The thresholds used.
    """

    images: int
    errors: list[SkippedFile]
    exact_duplicates: list[list[str]]
    near_duplicates: list[dict[str, Any]]
    upscaled: list[dict[str, Any]]
    transparent: list[dict[str, Any]]
    grayscale: list[str]
    captions_missing: list[str]
    captions_empty: list[str]
    captions_long: list[dict[str, Any]]
    subsets: list[dict[str, Any]]
    thresholds: dict[str, float]


@dataclasses.dataclass(frozen=True)
class _Measured:
    """The measures of one decodable image."""

    path: str
    subset: int
    content_hash: str
    dhash: int
    transparent: float
    coloured: float
    detail: float

    @staticmethod
    def of(row: ImageQuality) -> _Measured:
        assert row["measures"] is not None
        return _Measured(row["path"], row["subset"], *row["measures"])


def _near_groups(hashes: Sequence[int], bits: int) -> list[tuple[list[int], int]]:
    """Indices grouped by dHash distance: in index order, each image not yet grouped leads a group of
    the later ungrouped images at most ``bits`` from it (so every member is within ``bits`` of its
    leader: no chains of small steps between unrelated images); groups of two or more, each with its
    largest distance to the leader."""
    blocks = bits + 1
    edges = [64 * k // blocks for k in range(blocks + 1)]
    near: dict[int, set[int]] = defaultdict(set)
    for k in range(blocks):
        mask = (1 << (edges[k + 1] - edges[k])) - 1
        by_block: dict[int, list[int]] = defaultdict(list)
        for i, h in enumerate(hashes):
            by_block[(h >> edges[k]) & mask].append(i)
        for members in by_block.values():
            for a, i in enumerate(members):
                for j in members[a + 1 :]:
                    if (hashes[i] ^ hashes[j]).bit_count() <= bits:
                        near[i].add(j)
                        near[j].add(i)
    grouped: set[int] = set()
    out = []
    for leader in range(len(hashes)):
        if leader in grouped:
            continue
        members = sorted(j for j in near[leader] if j > leader and j not in grouped)
        if members:
            grouped.update(members, [leader])
            far = max((hashes[leader] ^ hashes[j]).bit_count() for j in members)
            out.append(([leader, *members], far))
    return out


def quality_report(
    loader: DataLoader, *, max_upscale: float = MAX_UPSCALE, tokenizer: Any | None = None
) -> QualityReport:
    """Measure every image of ``loader`` (decoded small on its threads) and flag what the module lists.

    Args:
        loader: A loader of the dataset (its scan, buckets and subsets).
        max_upscale: Flag images enlarged more than this factor to cover their bucket (> 0).
        tokenizer: A ``transformers`` tokenizer (called on each caption, its ``model_max_length`` the
            limit), or ``None`` to count words.

    Returns:
        The flags, per image and per subset.

    Raises:
        ValueError: ``max_upscale`` is not positive.
    """
    if not max_upscale > 0:
        raise ValueError(f"max_upscale must be positive, got {max_upscale}")
    rows = loader.measure_quality()
    captions = loader.captions
    measured = [_Measured.of(r) for r in rows if r["error"] is None]
    errors = [
        SkippedFile(path=r["path"], code=cast(SkipCode, r["error"][0]), message=r["error"][1])
        for r in rows
        if r["error"] is not None
    ]

    by_content: dict[str, list[str]] = defaultdict(list)
    for m in measured:
        by_content[m.content_hash].append(m.path)
    exact = sorted(sorted(g) for g in by_content.values() if len(g) > 1)
    # One representative per content (exact copies are not near duplicates of each other again), and
    # no flat image: its hash bits are noise, and all flat images would match.
    firsts = [m for m in measured if by_content[m.content_hash][0] == m.path and m.detail >= MIN_DETAIL]
    near: list[dict[str, Any]] = sorted(
        (
            {"paths": sorted(firsts[i].path for i in g), "max_distance": far}
            for g, far in _near_groups([m.dhash for m in firsts], NEAR_DUPLICATE_BITS)
        ),
        key=lambda g: g["paths"],
    )

    upscaled: list[dict[str, Any]] = []
    for r in rows:
        (w, h), (bh, bw) = r["size"], r["bucket"]
        scale = max(bw / w, bh / h)
        if scale > max_upscale:
            upscaled.append({"path": r["path"], "scale": round(scale, 3), "size": [w, h], "bucket": [bh, bw]})
    transparent: list[dict[str, Any]] = [
        {"path": m.path, "share": round(m.transparent, 4)}
        for m in measured
        if m.transparent > TRANSPARENT_SHARE
    ]
    by_subset: dict[int, list[_Measured]] = defaultdict(list)
    for m in measured:
        by_subset[m.subset].append(m)
    grayscale: list[str] = []
    for members in by_subset.values():
        gray = [m.path for m in members if m.coloured < GRAY_COLOURED_SHARE]
        if len(gray) < len(members) / 2:
            grayscale += gray

    missing: list[str] = []
    empty: list[str] = []
    long: list[dict[str, Any]] = []
    limit = None if tokenizer is None else int(tokenizer.model_max_length)
    for r, caption in zip(rows, captions, strict=True):
        if not r["caption_found"]:
            missing.append(r["path"])
        elif not caption.strip():
            empty.append(r["path"])
        else:
            if tokenizer is not None:
                length, unit, over = len(tokenizer(caption).input_ids), "tokens", limit
            else:
                length, unit, over = len(caption.split()), "words", LONG_CAPTION_WORDS
            if over is not None and length > over:
                long.append({"path": r["path"], "length": length, "unit": unit})

    flags: dict[str, set[str]] = {
        "exact_duplicates": {p for g in exact for p in g},
        "near_duplicates": {p for g in near for p in g["paths"]},
        "upscaled": {u["path"] for u in upscaled},
        "transparent": {t["path"] for t in transparent},
        "grayscale": set(grayscale),
        "captions_missing": set(missing),
        "captions_empty": set(empty),
        "captions_long": {c["path"] for c in long},
    }
    subsets = []
    for index, sub in enumerate(loader.report["subsets"]):
        paths = {r["path"] for r in rows if r["subset"] == index}
        entry: dict[str, Any] = {"root": sub["root"], "images": len(paths)}
        entry["flagged"] = len(paths & set().union(*flags.values()))
        entry.update({name: len(paths & members) for name, members in flags.items()})
        subsets.append(entry)
    return QualityReport(
        images=len(rows),
        errors=errors,
        exact_duplicates=exact,
        near_duplicates=near,
        upscaled=upscaled,
        transparent=transparent,
        grayscale=sorted(grayscale),
        captions_missing=missing,
        captions_empty=empty,
        captions_long=long,
        subsets=subsets,
        thresholds={
            "near_duplicate_bits": NEAR_DUPLICATE_BITS,
            "min_detail": MIN_DETAIL,
            "max_upscale": max_upscale,
            "transparent_share": TRANSPARENT_SHARE,
            "gray_coloured_share": GRAY_COLOURED_SHARE,
            "long_caption": float(limit if limit is not None else LONG_CAPTION_WORDS),
        },
    )


def flagged_paths(report: QualityReport) -> dict[str, list[str]]:
    """The paths of the per-image flags (all but the duplicate groups), by flag name."""
    return {
        "upscaled": [u["path"] for u in report["upscaled"]],
        "transparent": [t["path"] for t in report["transparent"]],
        "grayscale": report["grayscale"],
        "captions missing": report["captions_missing"],
        "captions empty": report["captions_empty"],
        "captions long": [c["path"] for c in report["captions_long"]],
    }


def flags_by_path(report: QualityReport) -> dict[str, list[str]]:
    """Each flagged image's flags, by path (sorted)."""
    out: dict[str, list[str]] = defaultdict(list)
    for group in report["exact_duplicates"]:
        for p in group:
            out[p].append("exact duplicate")
    for g in report["near_duplicates"]:
        for p in g["paths"]:
            out[p].append(f"near duplicate (<= {g['max_distance']} bits)")
    for u in report["upscaled"]:
        out[u["path"]].append(f"upscaled {u['scale']:.1f}x")
    for t in report["transparent"]:
        out[t["path"]].append(f"{100 * t['share']:.0f}% transparent")
    for p in report["grayscale"]:
        out[p].append("grayscale")
    for p in report["captions_missing"]:
        out[p].append("no caption")
    for p in report["captions_empty"]:
        out[p].append("empty caption")
    for c in report["captions_long"]:
        out[c["path"]].append(f"caption {c['length']} {c['unit']}")
    return dict(sorted(out.items()))


def format_quality(report: QualityReport) -> str:
    """Human-readable summary of a :func:`quality_report`."""
    lines = [f"quality of {report['images']} images (thresholds: {json.dumps(report['thresholds'])}):"]
    groups = {
        "exact duplicates": report["exact_duplicates"],
        "near duplicates": [g["paths"] for g in report["near_duplicates"]],
    }
    for name, members in groups.items():
        lines.append(f"  {name}: {len(members)} groups")
        lines += ["    " + ", ".join(g) for g in members]
    for name, paths in flagged_paths(report).items():
        lines.append(f"  {name}: {len(paths)}")
        lines += [f"    {p}" for p in paths]
    if report["errors"]:
        lines.append(f"  not decodable: {len(report['errors'])}")
    if len(report["subsets"]) > 1:
        for s in report["subsets"]:
            lines.append(f"  subset {s['root']}: {s['flagged']} of {s['images']} images flagged")
    return "\n".join(lines)


def contact_sheet(report: QualityReport, path: str | Path, *, thumb: int = 160, columns: int = 6) -> int:
    """Draw every flagged image as a ``thumb``-pixel thumbnail labelled with its flags into a PNG at
    ``path`` (Pillow decodes them); returns how many were drawn (0: no file is written).

    Raises:
        OSError: ``path`` cannot be written.
    """
    from PIL import Image, ImageDraw, ImageOps

    flagged = flags_by_path(report)
    if not flagged:
        return 0
    label = 14
    rows = -(-len(flagged) // columns)
    cell_h = thumb + 3 * label
    sheet = Image.new("RGB", (columns * thumb, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image_path, flags) in enumerate(flagged.items()):
        x, y = (i % columns) * thumb, (i // columns) * cell_h
        try:
            with Image.open(image_path) as im:
                tile = ImageOps.exif_transpose(im).convert("RGB")
                tile.thumbnail((thumb - 4, thumb - 4))
                sheet.paste(tile, (x + (thumb - tile.width) // 2, y + (thumb - tile.height) // 2))
        except OSError:
            draw.text((x + 4, y + thumb // 2), "(not decodable by Pillow)", fill="red")
        draw.text((x + 2, y + thumb), Path(image_path).name[:26], fill="black")
        draw.text((x + 2, y + thumb + label), ", ".join(flags)[:28], fill="red")
        draw.text((x + 2, y + thumb + 2 * label), ", ".join(flags)[28:56], fill="red")
    sheet.save(path)
    return len(flagged)
