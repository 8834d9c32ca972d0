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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fastdiff import _fastdiff
from fastdiff.dataset import load_datasets, load_toml
from fastdiff.options import SUBSET
from fastdiff.sources import expand_shards, is_shards

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
    captions: Mapping[str, str] | None = None,
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
        captions: Captions by image path (``folder``-prefixed, normalised, as
            :meth:`fastdiff.Subset.metadata_captions` gives them) instead of caption files; an image it
            does not list gets no caption member.

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
    members = [(p, c if captions is None else captions.get(p)) for p, c in images]
    members += [(p, None) for p in skipped if os.path.isfile(p)]
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


#: Subset keys that say where images and captions come from: a sharded subset gets its own values.
_SOURCE_KEYS = ("image_dir", "caption_extension", "metadata_file", "caption_column", "image_column")


@dataclass(frozen=True)
class DatasetShards:
    """What :func:`write_dataset_shards` wrote: the new config, and per subset (in config order) its
    folder and the summary of its shards (one folder used by several subsets is packed once)."""

    config: Path
    subsets: list[tuple[str, ShardSummary]]


def write_dataset_shards(
    config: str | os.PathLike[str], out: str | os.PathLike[str], shard_size: int = 10**9, index: bool = True
) -> DatasetShards:
    """Pack every subset folder of a dataset TOML (:func:`fastdiff.load_datasets`) into tar shards under
    ``out/<folder name>/`` (:func:`write_shards`) and write ``out/dataset.toml``: the same config with
    each subset's ``image_dir`` the brace pattern of its shards (relative to ``out``), so that
    ``DataLoader.from_config("out/dataset.toml")`` (or ``fastdiff train --dataset-config``) reads the
    same samples with the same options and schedule.

    The captions are packed as the loader would read them before its caption operations: from the
    subset's caption files, or its metadata file (``metadata.jsonl`` or kohya's JSON), written as
    ``KEY.txt`` members; so the new config's subsets read ``caption_extension = ".txt"`` and have no
    ``metadata_file`` (an image with several ``.jsonl`` captions keeps them one per line, with
    ``caption_per_line = true``). The other keys are kept as written.

    Args:
        config: The dataset TOML.
        out: The folder to write to (created if missing).
        shard_size: Largest shard in bytes (> 0), as :func:`write_shards`.
        index: Write each shard's ``.index.json``.

    Returns:
        The new config's path and the shards of each subset.

    Raises:
        ValueError: The config is invalid (as :func:`fastdiff.load_datasets`), a subset already reads tar
            shards, or a subset folder holds no images.
        FileNotFoundError: A metadata file does not exist.
        OSError: A file cannot be read, or a shard or the config written.
    """
    config_path, out_dir = Path(config), Path(out)
    raw = load_toml(config_path)
    datasets = load_datasets(config_path)
    dropped = {n for k in _SOURCE_KEYS for n in (k, SUBSET[k].alias) if n is not None}
    packed: dict[tuple[Any, ...], tuple[str, ShardSummary, bool]] = {}
    names: set[str] = set()
    written: list[tuple[str, ShardSummary]] = []
    for table in [raw.get("general", {})] + raw["datasets"]:  # source defaults: each subset gets its own
        for k in dropped & set(table):
            del table[k]
    for raw_dataset, (_, subsets) in zip(raw["datasets"], datasets, strict=True):
        for raw_subset, subset in zip(raw_dataset["subsets"], subsets, strict=True):
            if is_shards(subset.image_dir):
                raise ValueError(f"{config_path}: subset {subset.image_dir!r} already reads tar shards")
            folder = subset.root()
            key = (  # what decides the captions packed
                folder,
                *(getattr(subset, k) for k in ("caption_extension", "metadata_file", "caption_column")),
                *(getattr(subset, k) for k in ("caption_separator", "enable_wildcard", "caption_per_line")),
            )
            if key not in packed:
                base = name = Path(folder).name or "images"
                n = 1
                while name in names:  # two folders of one name: images, images-2, ...
                    n += 1
                    name = f"{base}-{n}"
                names.add(name)
                captions, per_line = subset.metadata_captions()
                extensions = (
                    DEFAULT_CAPTION_EXTENSIONS
                    if subset.caption_extension is None
                    else (subset.caption_extension,)
                )
                summary = write_shards(folder, out_dir / name, shard_size, extensions, False, captions)
                for shard in summary.shards if index else []:  # indexed as the new config reads them
                    write_index(shard, [".txt"])
                packed[key] = (name, summary, per_line)
            name, summary, per_line = packed[key]
            written.append((folder, summary))
            last = len(summary.shards) - 1
            pattern = f"{name}/shard-{{000000..{last:06d}}}.tar" if last else f"{name}/shard-000000.tar"
            for k in dropped & set(raw_subset):
                del raw_subset[k]
            raw_subset.update(image_dir=pattern, caption_extension=".txt")
            if per_line:
                raw_subset["caption_per_line"] = True
    new = out_dir / "dataset.toml"
    partial = new.with_name(new.name + ".partial")
    with open(partial, "wb") as f:
        tomli_w.dump(raw, f)
    partial.replace(new)
    return DatasetShards(config=new, subsets=written)


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
    p.add_argument(
        "source",
        help="folder of images (searched recursively) with their caption files, or a dataset TOML "
        "(each subset's folder packed into OUT/<folder name>/, and OUT/dataset.toml written)",
    )
    p.add_argument("out", help="folder to write shard-000000.tar, shard-000001.tar, ... and their indexes to")
    p.add_argument(
        "--shard-size", default="1GB", help="largest shard: 1GB, 500MB, 64MiB or bytes (default 1GB)"
    )
    p.add_argument(
        "--caption-extensions",
        nargs="+",
        help="caption file extensions of a folder, tried in order (default .txt .caption; a TOML's subsets "
        "say their own); written as KEY.txt",
    )
    p.add_argument("--no-index", action="store_true", help="do not write the .index.json sidecars")


def run_shard(args: argparse.Namespace) -> int:
    """Body of ``fastdiff shard``: pack, then print what was written. Returns the exit status, 0.

    Raises:
        ValueError: ``--caption-extensions`` with a TOML, or as :func:`write_shards` /
            :func:`write_dataset_shards`.
    """
    size, index = parse_size(args.shard_size), not args.no_index
    if Path(args.source).suffix.lower() != ".toml":
        extensions = args.caption_extensions or DEFAULT_CAPTION_EXTENSIONS
        print(_summary_line(write_shards(args.source, args.out, size, extensions, index)))
        return 0
    if args.caption_extensions:
        raise ValueError(
            f"{args.source}: each subset's caption_extension says where its captions are; drop "
            "--caption-extensions"
        )
    written = write_dataset_shards(args.source, args.out, size, index)
    for folder, summary in written.subsets:
        print(f"{folder}: {_summary_line(summary)}")
    print(f"wrote {written.config} (fastdiff.DataLoader.from_config or fastdiff train read it)")
    return 0


def _summary_line(summary: ShardSummary) -> str:
    if not summary.shards:
        return "no images"
    return (
        f"{summary.images} images and {summary.captions} captions in {len(summary.shards)} shards: "
        f"{summary.shards[0]} ... {summary.shards[-1].name}"
    )


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
