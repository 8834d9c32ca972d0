"""Where a dataset's images come from: a folder, or WebDataset tar shards named by a pattern or a list,
local or at fsspec URLs, or parquet files.

:func:`expand_shards` turns what the user wrote (``"data/shard-{0000..0099}.tar"``, a list of paths) into
shard paths without opening any file; :func:`local_shards` makes them local for the Rust core, which reads
local tar shards only (``scan::scan_shards``): remote shards fetched into the spool
(:mod:`fastdiff.remote`), parquet files converted to tar shards (:mod:`fastdiff.parquet`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastdiff.parquet import ParquetShard, parquet_to_shard
from fastdiff.remote import FetchFailure, FetchPolicy, default_spool_dir, fetch_shards, is_remote

#: What a dataset source may be: a folder, a shard path or pattern, or a list of shard paths or patterns.
Source = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

#: What a shard's path ends in: a WebDataset tar shard, or a parquet file (converted to one).
SHARD_SUFFIXES = (".tar", ".parquet")

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def _closing_brace(spec: str, start: int) -> int | None:
    depth = 0
    for i in range(start, len(spec)):
        if spec[i] == "{":
            depth += 1
        elif spec[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _split_top_level(body: str) -> list[str]:
    parts, depth, last = [], 0, 0
    for i, c in enumerate(body):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    parts.append(body[last:])
    return parts


def _range(lo: str, hi: str) -> list[str]:
    a, b = int(lo), int(hi)
    # Zero padding as bash pads: to the wider bound when either bound is written with a leading zero.
    padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (lo, hi))
    width = max(len(lo), len(hi)) if padded else 0
    step = 1 if b >= a else -1
    return [f"{n:0{width}d}" for n in range(a, b + step, step)]


def expand_braces(spec: str) -> list[str]:
    """Expand bash-style braces in ``spec``, left to right, groups nested or in sequence.

    ``{0000..0099}`` is a numeric range (inclusive, descending when the first bound is larger), zero-padded
    to the wider bound when either bound has a leading zero, as bash pads; ``{a,b,c}`` a list (items may
    hold braces themselves). A brace group that is neither (``{x}``, an unmatched ``{``) stays as written.

    Args:
        spec: The pattern, e.g. ``"data/shard-{0000..0099}.tar"``.

    Returns:
        Every expansion, in the order the groups give (``"s-{0..2}-{a,b}"``: ``s-0-a, s-0-b, s-1-a, ...``).
    """
    start = spec.find("{")
    while start != -1:
        end = _closing_brace(spec, start)
        if end is None:
            return [spec]
        body = spec[start + 1 : end]
        m = _RANGE.match(body)
        parts = _range(m[1], m[2]) if m else _split_top_level(body)
        if m or len(parts) > 1:
            head, tails = spec[:start], expand_braces(spec[end + 1 :])
            return [head + item + tail for p in parts for item in expand_braces(p) for tail in tails]
        start = spec.find("{", start + 1)
    return [spec]


def expand_shards(spec: Source) -> list[str]:
    """The shard paths ``spec`` names, in order: each pattern expanded (see :func:`expand_braces`).

    Args:
        spec: A path, fsspec URL (``s3://bucket/shard-{0000..0099}.tar``) or brace pattern of ``.tar``
            (WebDataset) or ``.parquet`` files (``"data/shard-{0000..0099}.tar"``), or a list of them
            (each expanded, the results concatenated).

    Returns:
        The shard paths, as written (not made absolute; nothing is checked on disk).

    Raises:
        ValueError: ``spec`` is empty, or an expansion ends in neither ``.tar`` nor ``.parquet`` (the
            message names it).
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise ValueError("no shards given: an empty list of shard paths")
    out: list[str] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise ValueError(f"shard paths must be str or os.PathLike, got {item!r}")
        for path in expand_braces(os.fspath(item)):
            if not path.endswith(SHARD_SUFFIXES):
                raise ValueError(f"{path!r} (from {os.fspath(item)!r}) is not a .tar or .parquet shard")
            out.append(path)
    return out


def is_shards(spec: Source) -> bool:
    """Whether ``spec`` names shards (a list, or a path, URL or pattern ending in ``.tar`` or
    ``.parquet``), not a folder."""
    if isinstance(spec, (str, os.PathLike)):
        return all(p.endswith(SHARD_SUFFIXES) for p in expand_braces(os.fspath(spec)))
    return True


def shards_root(shards: Sequence[str]) -> str:
    """The name a shard dataset goes by in reports: the folder holding its shards (their common folder)."""
    folders = [os.path.dirname(os.path.normpath(s)) or "." for s in shards]
    try:
        return os.path.commonpath(folders)
    except ValueError:  # absolute and relative paths mixed
        return os.path.commonpath([os.path.abspath(f) for f in folders])


@dataclasses.dataclass(frozen=True)
class LocalShards:
    """Result of :func:`local_shards`.

    Attributes:
        paths: The local tar shards, in the order given, without the ones that failed.
        failed: Shards that could not be fetched or converted, with the reason.
        parquet: The conversion of each parquet source (rows, rows without image bytes), by source as given.
        bytes_fetched: Bytes received from remote storage.
        pending: With ``fetch_later``: the remote tar shards whose index was fetched but not the shard
            (their copy's path, in ``paths``, to their URL), for :func:`fetch_pending`.
    """

    paths: list[Path]
    failed: list[FetchFailure]
    parquet: dict[str, ParquetShard]
    bytes_fetched: int
    pending: dict[Path, str] = dataclasses.field(default_factory=dict)


def local_shards(
    shards: Sequence[str],
    *,
    spool_dir: str | os.PathLike[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    policy: FetchPolicy | None = None,
    image_column: str = "image",
    caption_column: str | None = "text",
    index_suffix: str | None = None,
    fetch_later: bool = False,
) -> LocalShards:
    """Local tar shards for ``shards``: local ``.tar`` paths as they are (``file://`` stripped), remote
    ones fetched into ``spool_dir/remote``, ``.parquet`` files (local or fetched) converted into
    ``spool_dir/parquet``.

    Args:
        shards: Local paths or fsspec URLs of ``.tar`` (WebDataset) or ``.parquet`` files, expanded.
        spool_dir: Where fetched and converted shards are kept (:func:`fastdiff.remote.default_spool_dir`
            when ``None``).
        storage_options: The fsspec filesystem's arguments (s3fs: ``key``, ``secret``, ``endpoint_url``…).
        policy: Fetch concurrency, timeout and retries (:class:`fastdiff.remote.FetchPolicy`).
        image_column: Parquet column of the image bytes.
        caption_column: Parquet column of the captions (``None``: no captions).
        index_suffix: The shard index sidecar's suffix, fetched with each remote tar shard when present;
            a fetched index whose recorded size is the copy's dates the copy as indexed (see
            :func:`_dated_as_indexed`), so the scan uses it.
        fetch_later: Fetch only the index of each remote tar shard now, and the shards that have one later
            (:func:`fetch_pending`, once the loader knows which shards its rank reads); needs
            ``index_suffix``.

    Returns:
        The local shards, the failures and the parquet conversions.

    Raises:
        ValueError: A parquet file lacks the columns (as :func:`fastdiff.parquet.parquet_to_shard`).
        ImportError: s3fs or pyarrow is needed and not installed (``pip install 'fastdiff[remote]'``).
    """
    spool = Path(spool_dir) if spool_dir is not None else default_spool_dir()
    remote = [s for s in shards if is_remote(s)]
    pending: dict[Path, str] = {}
    if fetch_later and index_suffix and remote:
        tars = [s for s in remote if s.lower().endswith(".tar")]
        indexes = fetch_shards(
            tars,
            spool / "remote",
            storage_options=storage_options,
            policy=policy,
            optional_suffixes=[index_suffix],
            sidecars_only=True,
        )
        pending = {p: u for u, p in indexes.paths.items() if p.with_name(p.name + index_suffix).is_file()}
        remote = [s for s in remote if s not in pending.values()]  # no index: fetched now
    fetched = (
        fetch_shards(
            remote,
            spool / "remote",
            storage_options=storage_options,
            policy=policy,
            optional_suffixes=[index_suffix] if index_suffix else [],
        )
        if remote
        else None
    )
    failed = list(fetched.failed) if fetched else []
    paths: list[Path] = []
    parquet: dict[str, ParquetShard] = {}
    later = {u: p for p, u in pending.items()}
    for spec in shards:
        if spec in later:
            paths.append(later[spec])
            continue
        if fetched is not None and spec in fetched.paths:
            local = fetched.paths[spec]
            if index_suffix:
                _dated_as_indexed(local, local.with_name(local.name + index_suffix))
        elif is_remote(spec):
            continue  # in failed
        else:
            local = Path(spec.removeprefix("file://"))
        if spec.lower().endswith(".parquet"):
            try:
                parquet[spec] = parquet_to_shard(
                    local, spool / "parquet", image_column=image_column, caption_column=caption_column
                )
            except ValueError:
                raise
            except Exception as e:  # pyarrow's ArrowInvalid for a damaged file, OSError
                failed.append(FetchFailure(spec, f"{type(e).__name__}: {e}", 1))
                continue
            local = parquet[spec].path
        paths.append(local)
    return LocalShards(paths, failed, parquet, fetched.bytes_fetched if fetched else 0, pending)


def fetch_pending(
    pending: Mapping[str, str],
    own: Sequence[str] | None,
    index_suffix: str,
    *,
    on_error: str = "skip",
    storage_options: Mapping[str, Any] | None = None,
    policy: FetchPolicy | None = None,
) -> None:
    """Fetch the shards :func:`local_shards` left for later (``fetch_later``) that this rank reads, into
    their copies' paths, with their indexes (unchanged ones are not fetched again), and date each copy as
    indexed (:func:`_dated_as_indexed`).

    Args:
        pending: Copy path to URL of every shard left for later.
        own: The copies this rank reads (the loader's ``report["own_shards"]``); ``None``: all (the
            sample-level split reads every shard).
        index_suffix: The index sidecar's suffix.
        on_error: ``"raise"``: a shard that cannot be fetched raises; else it is left out with a
            ``UserWarning`` naming it and the reason (its samples then fail as they are read, each a
            skip, and stand-ins take their place).
        storage_options: As :func:`local_shards`.
        policy: As :func:`local_shards`.

    Raises:
        OSError: A shard cannot be fetched, with ``on_error="raise"``.
        ValueError: A fetched shard's index records another size than the shard has (the shard changed
            after it was indexed, and the scan used that index): ``fastdiff index`` it again.
    """
    chosen = {Path(p): u for p, u in pending.items() if own is None or p in own}
    for folder in sorted({p.parent for p in chosen}):  # the spool's folder of remote copies
        fetched = fetch_shards(
            [u for p, u in chosen.items() if p.parent == folder],
            folder,
            storage_options=storage_options,
            policy=policy,
            optional_suffixes=[index_suffix],
        )
        for failure in fetched.failed:
            if on_error == "raise":
                raise OSError(f"shard {failure.url} cannot be fetched: {failure.reason}")
            warnings.warn(f"shard {failure.url} left out: {failure.reason}", UserWarning, stacklevel=3)
        _check_indexed(fetched.paths, index_suffix)


def _check_indexed(fetched: Mapping[str, Path], index_suffix: str) -> None:
    for url, local in fetched.items():
        _dated_as_indexed(local, local.with_name(local.name + index_suffix))
        index = json.loads(local.with_name(local.name + index_suffix).read_bytes())
        if int(index["size"]) != local.stat().st_size:
            raise ValueError(
                f"{url}: its index records a shard of {index['size']} bytes, the shard has "
                f"{local.stat().st_size}: the shard changed after it was indexed (run `fastdiff index` on "
                "it and upload the index again)"
            )


def _dated_as_indexed(shard: Path, index: Path) -> None:
    """Give a spooled copy of a remote shard the modification time its fetched index records.

    An index is current when its shard's size and modification time are those it records (the scan's
    ``stat``); a fresh copy has a new modification time, so every fetched index would be stale. The fetch
    checked the copy against the remote object (size, ETag), and the index came from beside that object:
    when the index records the copy's size, the copy is dated as indexed. An index recording another size
    (the shard changed after it was indexed), or one that cannot be read, is left for the scan to report.
    """
    try:
        listing = json.loads(index.read_bytes())
        size, mtime_ns = int(listing["size"]), int(listing["mtime_ns"])
        stat = shard.stat()
    except (OSError, ValueError, KeyError, TypeError):
        return
    if stat.st_size == size and stat.st_mtime_ns != mtime_ns:
        os.utime(shard, ns=(stat.st_atime_ns, mtime_ns))
