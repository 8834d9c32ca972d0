"""Building a cache: encode what a loader's build plan needs and the cache folder lacks, into shards.

:func:`build` holds the folder's ``.lock`` (``flock``, so two builders on one folder take turns instead
of interleaving manifests), writes the manifest with the halves being built (the loader keys its
samples by the manifest's salts, so it comes first), then walks ``loader.iter_build()`` — every
distinct (image, crop variant, flip) once, decoded by the Rust workers while the VAE encodes the
previous batch (the loader prefetches) — with ``missing_only``, so only the samples whose latent key
the store lacks are read and decoded at all (a rerun on a complete cache decodes nothing), and the
distinct captions of ``loader.caption_variants()`` (plus ``""``, the dropped caption)
the same way. Entries go through the native ``ShardWriter``: a shard is finished (fsynced and renamed
into place) every :data:`SHARD_ENTRIES` entries or :data:`SHARD_BYTES` bytes, so a killed build loses
at most one shard's worth, and its rerun encodes only what is missing. Images that cannot be decoded
are recorded in the manifest's ``failed`` by content hash (a served sample of one is that failure).
"""

from __future__ import annotations

import fcntl
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastdiff import _fastdiff
from fastdiff.cache.encoders import LatentEncoder, TextEncoder
from fastdiff.cache.manifest import read_manifest, with_halves, write_manifest
from fastdiff.cache.shards import Shards
from fastdiff.loader import DataLoader
from fastdiff.types import Batch, SkippedFile

#: Captions encoded per text-encoder call.
TEXT_BATCH = 64
#: Name of the lock file in a cache folder.
LOCK = ".lock"


@dataclass
class BuildReport:
    """What :func:`build` did.

    Attributes:
        latents_needed: Distinct latent keys of the build plan.
        latents_encoded: Of them, encoded by this build (the rest were in the cache).
        latents_decoded: Build-plan samples this build read and decoded (loaded or failed): the
            missing ones only, 0 on a complete cache.
        text_needed: Distinct text keys (captions) needed.
        text_encoded: Of them, encoded by this build.
        failed: ``{content hash: reason}`` of the images that could not be decoded.
        shards: The shard files this build wrote.
        seconds: Wall time in seconds.
    """

    latents_needed: int = 0
    latents_encoded: int = 0
    latents_decoded: int = 0
    text_needed: int = 0
    text_encoded: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    shards: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    #: Every latent key the plan needs (what ``gc`` keeps).
    live_latents: set[str] = field(default_factory=set)
    #: Every text key needed.
    live_text: set[str] = field(default_factory=set)


@contextmanager
def locked(cache: Path) -> Iterator[None]:
    """Hold ``cache/.lock`` exclusively (waiting, with a message, while another builder holds it)."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / LOCK).open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another `fastdiff cache` writing {cache}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(
    cache: Path,
    make_loader: Callable[[], DataLoader],
    *,
    latents: LatentEncoder | None,
    text: TextEncoder | None,
    model: str,
    kind: str,
    progress: bool = True,
) -> BuildReport:
    """Encode into ``cache`` every entry the loader's build plan needs that the cache lacks.

    Args:
        cache: The cache folder (created if missing).
        make_loader: Builds the loader (``cache=cache``, ``pixels=True``) once the manifest is written.
        latents: The VAE side, or ``None`` to leave the latents half as it is (``--no-latents``).
        text: The text side, or ``None`` (``--no-text``).
        model: The ``--model`` path, recorded in the manifest.
        kind: ``"sd"`` or ``"sdxl"``.
        progress: Show tqdm bars (images/s and ETA).

    Returns:
        Counts, failures, shards written, and every live key.

    Raises:
        ValueError, OSError, fastdiff.FastdiffError: As the loader and the encoders.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    report = BuildReport()
    with locked(cache):
        manifest = with_halves(
            read_manifest(cache),
            latents=None if latents is None else latents.spec,
            text=None if text is None else text.spec,
            model=model,
            kind=kind,
        )
        write_manifest(cache, manifest)
        loader = make_loader()
        store = _fastdiff.CacheStore(cache)
        if latents is not None:
            shards = Shards(cache, "latents", latents.spec["dtype"])
            # A None key: a file that could not be read to hash it (in the report; not decodable).
            plan = [(k, cached) for k, cached in loader.build_latent_keys() if k is not None]
            report.live_latents = {k for k, _ in plan}
            total = sum(not cached for _, cached in plan)
            encoded: set[str] = set()
            with tqdm(total=total, desc="latents", unit="img", disable=not progress) as bar:
                try:
                    for batch in loader.iter_build(missing_only=True):
                        encode_latent_batch(batch, latents, encoded, shards, report)
                        bar.update(len(batch["latent_keys"]))
                        bar.set_postfix(encoded=report.latents_encoded, refresh=False)
                finally:
                    shards.finish()
                    report.shards += shards.written
            stats = loader.stats()
            report.latents_decoded = 0 if stats is None else stats["samples"] + stats["failed"]
            report.latents_needed = len(report.live_latents)
            for skipped in loader.report["skipped"]:
                record_failure(skipped, report)
            manifest["failed"] = {**manifest.get("failed", {}), **report.failed}
            write_manifest(cache, manifest)
        if text is not None:
            encode_captions(loader, text, store, Shards(cache, "text", text.spec["dtype"]), report, progress)
    report.seconds = time.perf_counter() - start
    return report


def encode_latent_batch(
    batch: Batch,
    encoder: LatentEncoder,
    encoded: set[str],
    shards: Shards,
    report: BuildReport,
) -> None:
    """Encode the samples of one ``missing_only`` build batch whose latent key this build has not
    encoded yet (``encoded``, updated; two files with the same bytes in one bucket share a key)."""
    todo: list[tuple[int, str]] = []
    for i, key in enumerate(batch["latent_keys"]):
        if key is not None and key not in encoded:
            encoded.add(key)
            todo.append((i, key))
    if not todo:
        return
    out = encoder.encode(batch["pixel_values"][[i for i, _ in todo]])
    for j, (i, key) in enumerate(todo):
        meta = json.loads(batch["latent_provenance"][i])
        shards.add(key, meta, {name: t[j] for name, t in out.items()})
    report.latents_encoded += len(todo)


def record_failure(skipped: SkippedFile, report: BuildReport) -> None:
    """Record a file the loader skipped under its content hash (unreadable files have none: skipped)."""
    try:
        data = Path(skipped["path"]).read_bytes()
    except OSError:
        return
    report.failed[_fastdiff.content_hash(data)] = f"{skipped['code']}: {skipped['message']}"


def encode_captions(
    loader: DataLoader,
    encoder: TextEncoder,
    store: _fastdiff.CacheStore,
    shards: Shards,
    report: BuildReport,
    progress: bool,
) -> None:
    """Encode the distinct final captions of the loader (and ``""``) that the store lacks."""
    from tqdm.auto import tqdm

    variants = {caption: key for caption, key in loader.caption_variants() if key is not None}
    # The loop's caption dropout conditions a dropped caption on "" (SD): it is always needed.
    variants.setdefault("", _fastdiff.text_key("", encoder.spec["salt"]))
    report.live_text.update(variants.values())
    report.text_needed = len(report.live_text)
    by_key = {k: c for c, k in variants.items()}
    todo = [
        (k, c)
        for (k, c), there in zip(by_key.items(), store.contains(list(by_key)), strict=True)
        if not there
    ]
    with tqdm(total=len(todo), desc="captions", unit="caption", disable=not progress) as bar:
        try:
            for start in range(0, len(todo), TEXT_BATCH):
                chunk = todo[start : start + TEXT_BATCH]
                out = encoder.encode([c for _, c in chunk])
                for j, (key, caption) in enumerate(chunk):
                    shards.add(key, {"caption": caption}, {name: t[j] for name, t in out.items()})
                report.text_encoded += len(chunk)
                bar.update(len(chunk))
        finally:
            shards.finish()
            report.shards += shards.written
