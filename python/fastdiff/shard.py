"""``fastdiff shard`` and ``fastdiff index``: pack a folder into WebDataset tar shards, index shards.

A member is named by the image's path relative to the folder (``sub/dir/img.jpg``), its caption
``sub/dir/img.txt`` (the caption the loader would read, written as UTF-8 text), so a loader of the shards
sees the same images under the same names as a loader of the folder, with the same seeded schedule. Which
files are images is the loader's own scan (``fastdiff._fastdiff.scan_files``); images the scan cannot use
are packed too, so the shards report them as the folder does. Writing goes through the standard
``tarfile`` module (not the hot path); each shard is written to ``.partial`` and renamed when complete.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastdiff import _fastdiff
from fastdiff.sources import expand_shards

#: Caption extensions the loader tries by default (``DataLoader(caption_extensions=...)``).
DEFAULT_CAPTION_EXTENSIONS = (".txt", ".caption")

#: tar's per-member overhead: one 512-byte header, data padded to 512 bytes.
_BLOCK = 512

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """Bytes in a size such as ``"1GB"``, ``"500MB"``, ``"64MiB"``, ``"4096"`` (SI units: 1 GB = 10**9 bytes;
    ``KiB``/``MiB``/``GiB``/``TiB`` are powers of 1024).

    Raises:
        ValueError: Not a positive size.
    """
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"--shard-size {text!r} is not a size like 1GB, 500MB or 64MiB")
    unit = (m[2] or "").lower()
    factor = 1024 ** ("kmgt".index(unit[0]) + 1) if unit.endswith("ib") else _UNITS[unit[:1]]
    size = int(float(m[1]) * factor)
    if size <= 0:
        raise ValueError(f"--shard-size must be positive, got {text!r}")
    return size


def _member_bytes(size: int) -> int:
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


@dataclass(frozen=True)
class ShardSummary:
    """What :func:`write_shards` wrote: the shard paths in order, and the image and caption members."""

    shards: list[Path]
    images: int
    captions: int


def write_shards(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    shard_size: int = 10**9,
    caption_extensions: Sequence[str] = DEFAULT_CAPTION_EXTENSIONS,
    index: bool = True,
) -> ShardSummary:
    """Pack the images of ``folder`` and their captions into ``out/shard-000000.tar``, ``shard-000001.tar``...

    Images go in path order (as the loader sorts them), each with its caption member right after it, into
    a shard until the next image would take it past ``shard_size`` bytes (a single larger image gets a
    shard of its own; members are never split). With ``index``, each shard's sidecar index is written too
    (:func:`write_index`).

    Args:
        folder: The image folder (searched recursively, as the loader does).
        out: The folder to write to (created if missing; existing ``shard-*.tar`` files are replaced).
        shard_size: Largest shard in bytes, tar headers and padding included (> 0).
        caption_extensions: Where captions are read from (the loader's option of that name); written as
            ``KEY.txt`` whatever their extension.
        index: Write ``<shard>.index.json`` beside each shard.

    Returns:
        The shards written and the members in them.

    Raises:
        ValueError: ``folder`` holds no images, or ``shard_size`` is not positive.
        OSError: A file cannot be read or a shard written.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    root = os.path.normpath(os.fspath(folder))
    images, skipped = _fastdiff.scan_files(root, list(caption_extensions))
    members = [(p, c) for p, c in images] + [(p, None) for p in skipped if os.path.isfile(p)]
    members.sort(key=lambda m: Path(os.path.relpath(m[0], root)).parts)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Plan the shards first: (image path, member name, caption bytes or None) per shard.
    plan: list[list[tuple[str, str, bytes | None]]] = []
    used = 0
    captioned: set[str] = set()
    for path, caption in members:
        name = Path(os.path.relpath(path, root)).as_posix()
        key = _stem(name)
        text = None if caption is None or key in captioned else caption.encode()
        need = _member_bytes(os.path.getsize(path)) + (0 if text is None else _member_bytes(len(text)))
        if not plan or (used and used + need > shard_size - 2 * _BLOCK):  # tar ends with 2 zero blocks
            plan.append([])
            used, captioned = 0, set()
            text = None if caption is None else caption.encode()
        plan[-1].append((path, name, text))
        if text is not None:
            captioned.add(key)
        used += need
    shards: list[Path] = []
    for k, group in enumerate(plan):
        shard = out_dir / f"shard-{k:06d}.tar"
        partial = shard.with_name(shard.name + ".partial")
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            for path, name, text in group:
                mtime = int(os.stat(path).st_mtime)
                _add(tar, name, Path(path).read_bytes(), mtime)
                if text is not None:
                    _add(tar, f"{_stem(name)}.txt", text, mtime)
        partial.replace(shard)
        if index:
            _fastdiff.write_shard_index(shard, list(caption_extensions))
        shards.append(shard)
    n_captions = sum(t is not None for group in plan for _, _, t in group)
    return ShardSummary(shards=shards, images=len(members), captions=n_captions)


def _stem(name: str) -> str:
    """``name`` without its last extension, as the shard scan pairs captions (``a/b.c.jpg`` -> ``a/b.c``)."""
    base = name.rsplit("/", 1)[-1]
    dot = base.rfind(".")
    return name[: len(name) - len(base) + dot] if dot > 0 else name


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_index(
    shard: str | os.PathLike[str], caption_extensions: Sequence[str] = DEFAULT_CAPTION_EXTENSIONS
) -> tuple[str, int, int, str | None]:
    """Write ``<shard>.index.json``: per image member its offset, length, header (format, width, height, EXIF
    orientation) and caption, plus the shard's size and mtime (a shard that changed makes the index stale:
    the loader then warns and reads the headers).

    Args:
        shard: The tar shard.
        caption_extensions: The loader's ``caption_extensions`` (an index built with others is stale).

    Returns:
        ``(index path, image members, unusable image members, why the tar ends early or None)``.

    Raises:
        FileNotFoundError: ``shard`` does not exist.
        OSError: It cannot be read or the index written.
    """
    return _fastdiff.write_shard_index(shard, list(caption_extensions))


def add_shard_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``shard``'s arguments: ``DIR OUT --shard-size --caption-extension --no-index``."""
    p.add_argument("folder", help="folder of images (searched recursively) with their caption files")
    p.add_argument("out", help="folder to write shard-000000.tar, shard-000001.tar, ... and their indexes to")
    p.add_argument(
        "--shard-size", default="1GB", help="largest shard: 1GB, 500MB, 64MiB or bytes (default 1GB)"
    )
    p.add_argument(
        "--caption-extensions",
        nargs="+",
        default=list(DEFAULT_CAPTION_EXTENSIONS),
        help="caption file extensions tried in order (default .txt .caption); written as KEY.txt",
    )
    p.add_argument("--no-index", action="store_true", help="do not write the .index.json sidecars")


def run_shard(args: argparse.Namespace) -> int:
    """Body of ``fastdiff shard``: pack, then print what was written. Returns the exit status, 0."""
    summary = write_shards(
        args.folder, args.out, parse_size(args.shard_size), args.caption_extensions, not args.no_index
    )
    print(
        f"{summary.images} images and {summary.captions} captions in {len(summary.shards)} shards: "
        f"{summary.shards[0]} ... {summary.shards[-1].name}"
        if summary.shards
        else "no images"
    )
    return 0


def add_index_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``index``'s arguments: ``SHARDS... --caption-extensions``."""
    p.add_argument("shards", nargs="+", help="tar shards: paths or brace patterns (data/shard-{0..99}.tar)")
    p.add_argument(
        "--caption-extensions",
        nargs="+",
        default=list(DEFAULT_CAPTION_EXTENSIONS),
        help="the loader's caption extensions (default .txt .caption)",
    )


def run_index(args: argparse.Namespace) -> int:
    """Body of ``fastdiff index``: write each shard's index and print one line per shard. Returns 0."""
    for shard in expand_shards(args.shards):
        path, images, bad, tar_error = write_index(shard, args.caption_extensions)
        note = f"; {bad} unusable image members" if bad else ""
        note += f"; {tar_error}" if tar_error else ""
        print(f"{path}: {images} images{note}")
    return 0
