"""The cache manifest ``fastdiff-cache.json``: which encoders made a cache folder's entries.

The format is fixed by the cache's design (read by the native store, which takes the salts from it to
key the entries): ``{"format": "fastdiff-cache-1", "latents": {...}, "text": {...}, "failed": {...},
"model": "...", "kind": "sd"|"sdxl"}``, either half optional (see :class:`Manifest`). Written
atomically: to a temporary file in the cache folder, flushed to disk, then renamed over the old one
(``os.replace``), so a reader sees the old manifest or the new one, never a part.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, TypedDict

#: ``format`` of the manifest and the shards.
FORMAT = "fastdiff-cache-1"
#: File name of the manifest in a cache folder.
MANIFEST = "fastdiff-cache.json"
#: Storage dtypes of the entries, by their manifest names.
StorageDtype = Literal["bf16", "f16", "f32"]


class LatentSpec(TypedDict):
    """The ``latents`` half: ``salt`` (32 hex), ``dtype`` of the stored tensors, ``channels`` and
    ``downscale`` of the VAE (entries are ``[channels, H / downscale, W / downscale]`` for a bucket
    ``(H, W)``), ``tensors`` (``["latents", "latents_std"]``), and ``vae``: ``digest`` (64 hex),
    ``scaling_factor``, ``shift_factor`` (``None`` when the VAE has none) and ``class``."""

    salt: str
    dtype: StorageDtype
    channels: int
    downscale: int
    tensors: list[str]
    vae: dict[str, Any]


class TextSpec(TypedDict):
    """The ``text`` half: ``salt`` (32 hex), ``dtype``, ``tensors`` (name -> per-caption shape:
    ``prompt_embeds`` ``[L, D]``, SDXL's ``pooled_prompt_embeds`` ``[P]``) and ``encoders``: ``digest``
    (32 hex, of every text encoder's and tokenizer's digest) and ``max_length`` (tokens, ``L``)."""

    salt: str
    dtype: StorageDtype
    tensors: dict[str, list[int]]
    encoders: dict[str, Any]


class Manifest(TypedDict, total=False):
    """A parsed ``fastdiff-cache.json``. ``failed`` maps an image's content hash (32 hex) to why it
    could not be encoded (a served sample of it is that failure, as in pixel mode); ``model`` is the
    ``--model`` path the cache was built from, ``kind`` its pipeline kind."""

    format: str
    latents: LatentSpec
    text: TextSpec
    failed: dict[str, str]
    model: str
    kind: str


def read_manifest(cache: Path) -> Manifest | None:
    """The manifest of the cache folder ``cache``, or ``None`` when it has none yet.

    Raises:
        ValueError: The file is not JSON, or its ``format`` is not :data:`FORMAT` (the message names
            the file).
        OSError: The file exists but cannot be read.
    """
    path = cache / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        manifest: Manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a cache manifest (invalid JSON: {e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{path}: format {found!r} is not {FORMAT!r}")
    return manifest


def write_manifest(cache: Path, manifest: Manifest) -> Path:
    """Write ``manifest`` as ``cache/fastdiff-cache.json`` atomically (temporary file, ``fsync``,
    ``os.replace``); ``format`` is set to :data:`FORMAT`.

    Returns:
        The manifest's path.

    Raises:
        OSError: ``cache`` is not a writable folder.
    """
    path = cache / MANIFEST
    tmp = cache / f".{MANIFEST}.{os.getpid()}.tmp"
    data = {**manifest, "format": FORMAT}
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def with_halves(
    manifest: Manifest | None,
    *,
    latents: LatentSpec | None,
    text: TextSpec | None,
    model: str,
    kind: str,
) -> Manifest:
    """``manifest`` (or a new one) with the halves being built replaced by ``latents``/``text``
    (``None``: that half is kept as it is), and ``model``/``kind`` set.

    A half whose salt changed loses its old entries' meaning: they become orphans (``--gc``). The
    ``failed`` records are kept while the latents' salt stays, and dropped when it changes.
    """
    out: Manifest = dict(manifest or {})  # type: ignore[assignment]
    if latents is not None:
        if out.get("latents", {}).get("salt") != latents["salt"]:
            out["failed"] = {}
        out["latents"] = latents
    if text is not None:
        out["text"] = text
    out.setdefault("failed", {})
    out["model"], out["kind"], out["format"] = model, kind, FORMAT
    return out
