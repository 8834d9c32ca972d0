"""Where a dataset's images come from: a folder, or WebDataset tar shards named by a pattern or a list.

This module only turns what the user wrote (``"data/shard-{0000..0099}.tar"``, a list of paths) into
shard paths; reading the shards is ``rust/core`` (``scan::scan_shards``). It must not open any file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

#: What a dataset source may be: a folder, a shard path or pattern, or a list of shard paths or patterns.
Source = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

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
    """The tar shard paths ``spec`` names, in order: each pattern expanded (see :func:`expand_braces`).

    Args:
        spec: A path or brace pattern of ``.tar`` files (``"data/shard-{0000..0099}.tar"``), or a list of
            them (each expanded, the results concatenated).

    Returns:
        The shard paths, as written (not made absolute; nothing is checked on disk).

    Raises:
        ValueError: ``spec`` is empty, or an expansion does not end in ``.tar`` (the message names it).
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise ValueError("no shards given: an empty list of shard paths")
    out: list[str] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise ValueError(f"shard paths must be str or os.PathLike, got {item!r}")
        for path in expand_braces(os.fspath(item)):
            if not path.endswith(".tar"):
                raise ValueError(f"{path!r} (from {os.fspath(item)!r}) is not a .tar shard")
            out.append(path)
    return out


def is_shards(spec: Source) -> bool:
    """Whether ``spec`` names tar shards (a list, or a path or pattern ending in ``.tar``), not a folder."""
    if isinstance(spec, (str, os.PathLike)):
        return all(p.endswith(".tar") for p in expand_braces(os.fspath(spec)))
    return True


def shards_root(shards: Sequence[str]) -> str:
    """The name a shard dataset goes by in reports: the folder holding its shards (their common folder)."""
    folders = [os.path.dirname(os.path.normpath(s)) or "." for s in shards]
    try:
        return os.path.commonpath(folders)
    except ValueError:  # absolute and relative paths mixed
        return os.path.commonpath([os.path.abspath(f) for f in folders])
