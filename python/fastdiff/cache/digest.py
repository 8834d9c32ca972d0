"""Digests of the files that decide an encoder's output, and the salts made from them.

A cache entry's key includes its half's *salt* (``fastdiff-cache.json``: ``latents.salt``,
``text.salt``), so an entry made by another VAE, text encoder, tokenizer, dtype or tensor set is never
served: changing any of them (one value of the VAE's ``config.json``, say ``scaling_factor``) gives a
new salt, and every entry of that half counts as missing. The digests are SHA-256 (``hashlib``), the
salt its first 16 bytes as 32 lowercase hex characters, the width of the cache's keys; SHA-256 rather
than the keys' blake3 because these hash a few files once per build, where speed does not matter and
the standard library has it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Bytes of a salt (32 hex characters), as the cache's keys.
SALT_BYTES = 16
#: Bytes read per ``update`` while hashing a file.
CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """SHA-256 of the bytes of ``path``, 64 hex characters.

    Raises:
        OSError: The file cannot be read.
    """
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file under ``folder`` (names starting with ``.`` excepted): each file's path
    relative to ``folder`` (``/``-separated) and :func:`file_digest`, in path order; 64 hex characters.
    Renaming, adding, removing or editing any file changes it.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        OSError: A file cannot be read.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    h = hashlib.sha256()
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    for relative in files:
        if any(part.startswith(".") for part in relative.parts):
            continue
        h.update(json.dumps([relative.as_posix(), file_digest(folder / relative)]).encode())
    return h.hexdigest()


def component_digest(model: Path, config_folder: Path, name: str) -> str:
    """Digest of pipeline component ``name`` (``"vae"``, ``"text_encoder"``, ``"tokenizer_2"``, ...).

    A pipeline folder (``model == config_folder``): :func:`folder_digest` of ``model/name``. A single
    file: SHA-256 of the file's digest and the configs folder's ``name/`` digest (the file holds every
    component, so any change of its bytes changes every component's digest).

    Returns:
        64 hex characters.

    Raises:
        FileNotFoundError, OSError: A file or folder is missing or unreadable.
    """
    if model.is_dir():
        return folder_digest(model / name)
    pair = [file_digest(model), folder_digest(config_folder / name)]
    return hashlib.sha256(json.dumps(pair).encode()).hexdigest()


def salt(inputs: Mapping[str, Any]) -> str:
    """The salt of a cache half: the first :data:`SALT_BYTES` bytes of SHA-256 of ``inputs`` as JSON
    (keys sorted, no spaces), in hex.

    Args:
        inputs: Everything that changes the half's entries: component digests, dtype, tensor names,
            max length (JSON values).

    Returns:
        32 lowercase hex characters.
    """
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).digest()[:SALT_BYTES].hex()
