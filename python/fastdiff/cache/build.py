"""Building a cache: encode what a loader's build plan needs and the cache folder lacks, into shards.

:func:`build` holds the folder's ``.lock`` (``flock``, so two builders on one folder take turns instead
of interleaving manifests), writes the manifest with the halves being built (the loader keys its
samples by the manifest's salts, so it comes first), then walks ``loader.iter_build()`` — every
distinct (image, crop variant, flip) once, decoded by the Rust workers while the VAE encodes the
previous batch (the loader prefetches) — with ``missing_only``, so only the samples whose latent key
the store lacks are read and decoded at all (a rerun on a complete cache decodes nothing; the progress
bar's total is the count ``loader.build_latent_keys()`` gives as not cached), and the distinct
captions of ``loader.caption_variants()`` (plus ``""``, the dropped caption) the same way. Entries go
through the native ``ShardWriter``: a shard is finished (fsynced and renamed into place) every
:data:`SHARD_ENTRIES` entries or :data:`SHARD_BYTES` bytes, so a killed build loses at most one shard's
worth, and its rerun encodes only what is missing. Images that cannot be decoded are recorded in the
manifest's ``failed`` by content hash (a served sample of one is that failure).

Split across ranks (``split=True`` under torchrun: ``fastdiff cache`` and ``fastdiff train
--cache-build``), rank 0 holds the lock and writes the manifest, then every rank encodes its share:
the build plan's batches ``rank, rank + world_size, …`` (``iter_build(rank_share=True)``) and every
``world_size``-th missing caption, into shards of its own (their names are random); rank 0 records the
failures all ranks met, and every rank returns the summed report.

:func:`build_from_model` is the one way a model's encoders fill a cache: it loads only the VAE and/or
the text encoders, runs :func:`build` and frees them. ``fastdiff cache``, ``fastdiff train
--cache-build`` and ``fastdiff.DataLoader(..., on_miss="encode")`` all go through it. This module
takes its loader as a :class:`BuildPlan` (any object with a build plan, in practice a
``fastdiff.DataLoader``) instead of importing ``fastdiff.loader``, which calls it lazily.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch

from fastdiff import _fastdiff
from fastdiff.cache.encoders import LatentEncoder, TextEncoder, model_kind, stored_dtype
from fastdiff.cache.manifest import Manifest, StorageDtype, read_manifest, with_halves, write_manifest
from fastdiff.cache.shards import Shards
from fastdiff.training import distributed
from fastdiff.types import Batch, LoadStats, Report, SkippedFile

#: Captions encoded per text-encoder call.
TEXT_BATCH = 64
#: Name of the lock file in a cache folder.
LOCK = ".lock"


class BuildPlan(Protocol):
    """What :func:`build` reads of its loader: a ``fastdiff.DataLoader`` built with ``cache=`` the
    folder being built and ``pixels=True`` (see the methods of the same names there)."""

    @property
    def report(self) -> Report:
        """The scan's report, with the files that failed so far."""
        ...

    def stats(self) -> LoadStats | None:
        """The last iteration's counts (``samples``, ``failed``); ``None`` before any."""
        ...

    def iter_build(
        self, start_batch: int = 0, missing_only: bool = False, rank_share: bool = False
    ) -> Iterator[Batch]:
        """Every distinct (image, crop variant, flip) once, or with ``missing_only`` only those the
        cache lacks, or with ``rank_share`` this rank's batches of that plan, as float pixel batches
        with ``latent_keys`` and ``latent_provenance``."""
        ...

    def build_latent_keys(self) -> list[tuple[str | None, bool]]:
        """Per sample of the full build plan, without decoding: ``(latent key, cached)``."""
        ...

    def caption_variants(self) -> list[tuple[str, str | None]]:
        """Every final caption a sample can get, with its text key."""
        ...


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
        write_seconds: Of it, the time spent writing entries into shards (``Shards.seconds``; the
            rest is decoding, encoding and, where they overlap, waiting on the slower of the two).
    """

    latents_needed: int = 0
    latents_encoded: int = 0
    latents_decoded: int = 0
    text_needed: int = 0
    text_encoded: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    shards: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    write_seconds: float = 0.0
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


def build_from_model(
    cache: Path,
    make_loader: Callable[[], BuildPlan],
    model: Path,
    model_config: Path | None = None,
    *,
    device: torch.device,
    latents: bool = True,
    text: bool = True,
    dtype: StorageDtype | None = None,
    max_sequence_length: int | None = None,
    t5: bool = True,
    progress: bool = True,
    split: bool = False,
) -> BuildReport:
    """Load only the VAE (``latents``) and/or the text encoders (``text``) of ``model`` on ``device``,
    :func:`build` ``cache`` with them, and free them (CUDA's cached memory too) before returning.

    Args:
        cache: The cache folder (created if missing).
        make_loader: As :func:`build`.
        model: A local diffusers pipeline folder, or a single checkpoint file with ``model_config``.
        model_config: The pipeline folder of a single-file ``model``'s architecture, else ``None``.
        device: Where the encoders run (in float32).
        latents: Build the latents half.
        text: Build the text half.
        dtype: Storage dtype of both halves; ``None``: per half, the dtype the cache already has for
            it (so entries under its salt are reused), else
            :func:`~fastdiff.cache.encoders.stored_dtype` of the model.
        max_sequence_length: A DiT family's text tokens per caption (``None``: its default), as
            :meth:`~fastdiff.cache.encoders.TextEncoder.load`.
        t5: SD3: encode with T5 too, as :meth:`~fastdiff.cache.encoders.TextEncoder.load`.
        progress: Show progress bars.
        split: Share the work across torchrun's ranks, as :func:`build`.

    Returns:
        As :func:`build`.

    Raises:
        FileNotFoundError, ValueError: ``model`` is not a pipeline (as
            :func:`~fastdiff.training.sd_pipeline.load_component`), or as :func:`build`.
        OSError, fastdiff.FastdiffError: As :func:`build`.
    """
    manifest = read_manifest(cache)
    vae = (
        LatentEncoder.load(
            model, model_config, half_dtype(manifest, "latents", dtype, model, model_config), device
        )
        if latents
        else None
    )
    encoders = (
        TextEncoder.load(
            model,
            model_config,
            half_dtype(manifest, "text", dtype, model, model_config),
            device,
            max_sequence_length=max_sequence_length,
            t5=t5,
        )
        if text
        else None
    )
    try:
        return build(
            cache,
            make_loader,
            latents=vae,
            text=encoders,
            model=str(model),
            kind=model_kind(model, model_config),
            progress=progress,
            split=split,
        )
    finally:
        del vae, encoders
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def half_dtype(
    manifest: Manifest | None,
    half: Literal["latents", "text"],
    dtype: StorageDtype | None,
    model: Path,
    model_config: Path | None,
) -> StorageDtype:
    """The storage dtype of a half being built: ``dtype`` if given, else the manifest's for that half,
    else the dtype ``model``'s VAE weights are stored in."""
    if dtype is not None:
        return dtype
    if manifest is not None and half in manifest:
        return manifest[half]["dtype"]
    return stored_dtype(model, model_config)


def build(
    cache: Path,
    make_loader: Callable[[], BuildPlan],
    *,
    latents: LatentEncoder | None,
    text: TextEncoder | None,
    model: str,
    kind: str,
    progress: bool = True,
    split: bool = False,
) -> BuildReport:
    """Encode into ``cache`` every entry the loader's build plan needs that the cache lacks.

    Args:
        cache: The cache folder (created if missing).
        make_loader: Builds the loader (``cache=cache``, ``pixels=True``) once the manifest is written.
        latents: The VAE side, or ``None`` to leave the latents half as it is (``--no-latents``).
        text: The text side, or ``None`` (``--no-text``).
        model: The ``--model`` path, recorded in the manifest.
        kind: The model's kind (:func:`~fastdiff.cache.encoders.model_kind`: ``"sd"``, ``"sdxl"``,
            ``"sd3"``, ``"flux"``, ``"z_image"``).
        progress: Show tqdm bars (images/s and ETA; rank 0's share when split).
        split: Under torchrun (a process group of several ranks), share the work across the ranks;
            every rank must call this with the same arguments. Without a group it changes nothing.

    Returns:
        Counts, failures, shards written (all ranks' when split), and every live key.

    Raises:
        ValueError, OSError, fastdiff.FastdiffError: As the loader and the encoders.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    report = BuildReport()
    split = split and distributed.world_size() > 1
    rank, world_size = (distributed.rank(), distributed.world_size()) if split else (0, 1)
    main = rank == 0
    with locked(cache) if main else contextlib.nullcontext():
        if main:
            manifest = with_halves(
                read_manifest(cache),
                latents=None if latents is None else latents.spec,
                text=None if text is None else text.spec,
                model=model,
                kind=kind,
            )
            write_manifest(cache, manifest)
        if split:
            distributed.barrier()  # the manifest is written: the loaders key by its salts
        loader = make_loader()
        store = _fastdiff.CacheStore(cache)
        if latents is not None:
            shards = Shards(cache, "latents", latents.spec["dtype"])
            # A None key: a file that could not be read to hash it (in the report; not decodable).
            plan = [(k, cached) for k, cached in loader.build_latent_keys() if k is not None]
            report.live_latents = {k for k, _ in plan}
            total = -(-sum(not cached for _, cached in plan) // world_size)  # a share, about
            encoded: set[str] = set()
            desc = "latents" if world_size == 1 else f"latents (rank 0 of {world_size})"
            with tqdm(total=total, desc=desc, unit="img", disable=not (progress and main)) as bar:
                try:
                    for batch in loader.iter_build(missing_only=True, rank_share=split):
                        encode_latent_batch(batch, latents, encoded, shards, report)
                        bar.update(len(batch["latent_keys"]))
                        bar.set_postfix(encoded=report.latents_encoded, refresh=False)
                finally:
                    shards.finish()
                    report.shards += shards.written
                    report.write_seconds += shards.seconds
            stats = loader.stats()
            report.latents_decoded = 0 if stats is None else stats["samples"] + stats["failed"]
            report.latents_needed = len(report.live_latents)
            for skipped in loader.report["skipped"]:
                record_failure(skipped, report)
            if split:
                _merge_ranks(report)
            if main:
                manifest["failed"] = {**manifest.get("failed", {}), **report.failed}
                write_manifest(cache, manifest)
        if text is not None:
            encoded_before, shards_before = report.text_encoded, len(report.shards)
            text_shards = Shards(cache, "text", text.spec["dtype"])
            encode_captions(loader, text, store, text_shards, report, progress and main, (rank, world_size))
            if split:
                mine = report.text_encoded - encoded_before, report.shards[shards_before:]
                theirs = distributed.gather(mine)
                report.text_encoded = encoded_before + sum(n for n, _ in theirs)
                report.shards = report.shards[:shards_before] + [p for _, paths in theirs for p in paths]
        if split:
            distributed.barrier()  # every rank's shards are in place before rank 0 lets go of the lock
    report.seconds = time.perf_counter() - start
    return report


def _merge_ranks(report: BuildReport) -> None:
    """Make ``report``'s latents counts, shards and failures every rank's (each rank's report held its
    share's; the live keys and ``latents_needed`` are the whole plan's on every rank already)."""
    ranks = distributed.gather(
        (report.latents_encoded, report.latents_decoded, report.shards, report.write_seconds, report.failed)
    )
    report.latents_encoded = sum(r[0] for r in ranks)
    report.latents_decoded = sum(r[1] for r in ranks)
    report.shards = [p for r in ranks for p in r[2]]
    report.write_seconds = max(r[3] for r in ranks)
    report.failed = {k: v for r in ranks for k, v in r[4].items()}


def encode_latent_batch(
    batch: Batch,
    encoder: LatentEncoder,
    encoded: set[str],
    shards: Shards,
    report: BuildReport,
) -> None:
    """Encode the samples of one ``missing_only`` build batch whose latent key this build has not
    encoded yet (two files with the same bytes in one bucket share a key).

    Args:
        batch: A batch of ``iter_build(missing_only=True)``: float ``pixel_values`` ``[B, 3, H, W]``
            in ``[-1, 1]``, ``latent_keys`` and ``latent_provenance``; only samples the cache lacks.
        encoder: The VAE side; its entries are ``[C, H / f, W / f]`` each.
        encoded: The latent keys this build has encoded so far; updated.
        shards: Where the new entries go.
        report: Updated: ``latents_encoded`` gets the count.

    Raises:
        ValueError, OSError: As :meth:`~fastdiff.cache.shards.Shards.add`.
    """
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
    loader: BuildPlan,
    encoder: TextEncoder,
    store: _fastdiff.CacheStore,
    shards: Shards,
    report: BuildReport,
    progress: bool,
    share: tuple[int, int] = (0, 1),
) -> None:
    """Encode the distinct final captions of the loader (and ``""``) that the store lacks, in
    calls of :data:`TEXT_BATCH` captions; each entry is the caption's tensors of the text spec's
    shapes (``[L, D]`` ``prompt_embeds``, + ``[P]`` ``pooled_prompt_embeds`` for SDXL, SD3 and
    FLUX.1). ``report`` gets ``live_text``, ``text_needed`` and ``text_encoded``. ``share`` =
    ``(rank, world_size)``: only every ``world_size``-th missing caption from the ``rank``-th (by key).

    Raises:
        ValueError: As ``loader.caption_variants()`` (caption operations without ``text_variants``),
            or :meth:`~fastdiff.cache.shards.Shards.add`.
        OSError: A shard could not be written.
    """
    from tqdm.auto import tqdm

    variants = {caption: key for caption, key in loader.caption_variants() if key is not None}
    # The loop's caption dropout conditions a dropped caption on "" (SD, DiTs): it is always needed.
    variants.setdefault("", _fastdiff.text_key("", encoder.spec["salt"]))
    report.live_text.update(variants.values())
    report.text_needed = len(report.live_text)
    by_key = {k: c for c, k in variants.items()}
    rank, world_size = share
    todo = [
        (k, c)
        for (k, c), there in zip(sorted(by_key.items()), store.contains(sorted(by_key)), strict=True)
        if not there
    ][rank::world_size]
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
            report.write_seconds += shards.seconds
