"""Type stubs of the private native module (hand-written; the public API is ``fastdiff.DataLoader``)."""

from collections.abc import Callable, Iterator, Sequence
from os import PathLike
from typing import Any, Literal, final

import numpy as np
import torch
from typing_extensions import Buffer, Self

__all__ = [
    "IMAGE_EXTENSIONS",
    "SHARD_INDEX_SUFFIX",
    "BatchMemory",
    "CacheMissError",
    "CacheStore",
    "CorruptCacheError",
    "DecodeError",
    "FastdiffError",
    "ImageTooSmallError",
    "InternalError",
    "NativeEpochIter",
    "NativeLoader",
    "NativeSubset",
    "ShardWriter",
    "__version__",
    "cache_gc",
    "content_hash",
    "latent_key",
    "scan_files",
    "text_key",
    "write_shard_index",
]

#: The image file extensions the scan accepts (any letter case), each with its dot.
IMAGE_EXTENSIONS: list[str]
#: What a tar shard's sidecar index adds to the shard's file name (``shard-000000.tar.index.json``).
SHARD_INDEX_SUFFIX: str
__version__: str

class FastdiffError(Exception):
    """Base class of every error fastdiff raises itself."""

class DecodeError(FastdiffError):
    """An image file could not be read as an image: corrupt, truncated, unsupported, over
    ``max_pixels``, or changed since the scan. The message names the file and the cause."""

class ImageTooSmallError(FastdiffError):
    """With ``no_upscale``, an image is narrower or shorter than one bucket step, so no bucket fits it
    without enlarging it. Raised with ``on_error="raise"``; otherwise the file is skipped with code
    ``"too_small"``. The file itself is fine (not a :class:`DecodeError`); the message names it and
    its size."""

class InternalError(FastdiffError):
    """fastdiff itself failed, not the file or the arguments: a panic caught while loading a file
    (a bug: please report the message, which names the file it met), a broken internal invariant,
    or an epoch iterator used in a forked child of the process that started it (iterate the loader
    again in the child instead).

    Allocations the machine refuses (a batch buffer, a JPEG decoder handle) are :class:`MemoryError`,
    not this.
    """

class CacheMissError(FastdiffError, LookupError):
    """The cache holds no entry a sample needs: it was not built for this sample, or the file (its
    content hash) or an option that changes the pixels or the caption changed since it was built.
    The message names the file and what changed. Rebuild with ``fastdiff cache``."""

class CorruptCacheError(FastdiffError):
    """A cache file is damaged: a truncated or unparsable shard or manifest, or an entry whose
    checksum does not match (its bytes changed on disk). The message names the file and, for an
    entry, its key. Rerunning ``fastdiff cache`` re-encodes what a corrupt shard held;
    ``fastdiff cache --gc`` deletes it."""

_Batch = tuple[
    # [B, 3, H, W]: uint8, float32, or uint16 bit patterns of float16/bfloat16, viewing recycled memory
    # (freed to the pool with the last view); or the buffer_factory's 1-D uint8 tensor; None without
    # pixels.
    np.ndarray | torch.Tensor | None,
    list[str],  # captions
    list[tuple[int, int]],  # original_sizes (h, w)
    list[tuple[int, int]],  # crop_top_lefts (top, left)
    list[tuple[int, int]],  # target_sizes (h, w)
    list[str],  # paths
    list[bool],  # is_reg
    list[int],  # subsets: each sample's subset index
]
# With a cache or for the cache build: _Batch followed by the cached tensors (name, dtype name, array
# [B, ...]; half types as uint16 bit patterns), latent_keys and text_keys (32 hex digits or None) and
# each sample's latent provenance JSON.
_CachedBatch = tuple[
    np.ndarray | torch.Tensor | None,
    list[str],
    list[tuple[int, int]],
    list[tuple[int, int]],
    list[tuple[int, int]],
    list[str],
    list[bool],
    list[int],
    list[tuple[str, str, np.ndarray]],
    list[str | None],
    list[str | None],
    list[str],
]

@final
class NativeSubset:
    """One folder of a dataset with its options (see ``fastdiff.Subset``).

    Raises:
        ValueError: an option is out of range (the message names the folder and the option).
    """

    def __new__(
        cls,
        root: str,
        *,
        shards: list[str] = ...,
        unreadable_shards: list[tuple[str, str]] = ...,
        pending_shards: list[str] = ...,
        num_repeats: int = 1,
        is_reg: bool = False,
        caption_extensions: list[str] | None = None,
        captions: dict[str, str] | None = None,
        caption_per_line: bool = False,
        caption_dropout_rate: float = 0.0,
        keep_tokens: int = 0,
        shuffle_caption: bool = False,
        caption_tag_dropout_rate: float = 0.0,
        caption_separator: str = ",",
        flip_prob: float | None = None,
        crop: str | None = None,
        class_tokens: str | None = None,
        caption_dropout_every_n_epochs: int = 0,
        caption_prefix: str | None = None,
        caption_suffix: str | None = None,
        keep_tokens_separator: str | None = None,
        secondary_separator: str | None = None,
        enable_wildcard: bool = False,
    ) -> Self: ...

@final
class NativeLoader:
    """A scanned, bucketed dataset and its loading options (see ``fastdiff.DataLoader``).

    Raises:
        ValueError: an option is out of range (the message names it), or a folder holds no usable
            image.
        DecodeError, ImageTooSmallError, OSError: with ``on_error="raise"``, the first file the scan
            had to skip, by its reason (unreadable as an image; too small under ``no_upscale``;
            not readable).
    """

    def __new__(
        cls,
        subsets: list[NativeSubset],
        *,
        resolution: int,
        batch_size: int,
        bucket_step: int,
        min_bucket_side: int | None,
        max_bucket_side: int | None,
        crop: str,
        flip_prob: float,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        num_threads: int,
        prefetch: int,
        dtype: str,
        filter: str,
        caption_extensions: list[str],
        background: tuple[int, int, int],
        on_error: str,
        max_pixels: int,
        rank: int = 0,
        world_size: int = 1,
        remainder: str = "pad",
        no_upscale: bool = False,
        crop_variants: int | None = None,
        text_variants: int | None = None,
        cache: str | None = None,
        pixels: bool = True,
        min_bucket_fill: int | None = None,
        max_extra_crop: float = 0.1,
        validation_split: float = 0.0,
        validation: bool = False,
        shard_split: str = "auto",
        mask_from_alpha: bool = False,
        mask_dir: str | None = None,
        control_dir: list[str] | None = None,
        require_pairs: bool = False,
        vae_scale_factor: int = 8,
    ) -> Self: ...
    @property
    def num_batches(self) -> int: ...
    @property
    def buckets(self) -> list[tuple[int, int]]: ...
    def rebucket(
        self, *, resolution: int, bucket_step: int, min_bucket_side: int | None, max_bucket_side: int | None
    ) -> NativeLoader:
        """The same scanned images with other bucket options, every other option kept; reads no image file.

        Raises:
            ValueError: an option is out of range, or no image is left (e.g. all too small under
                ``no_upscale``).
        """

    @property
    def dataset_digest(self) -> str:
        """Fingerprint of the scanned dataset (relative paths, headers, subset options): 16 hex digits."""
    @property
    def captions(self) -> list[str]:
        """Caption of each accepted image, in path order, before the caption operations ("" if none)."""
    @property
    def content_hashes(self) -> list[str | None]:
        """Each accepted image's content hash (32 hex digits) with a cache; None otherwise."""
    def caption_variants(self) -> list[tuple[str, str | None]]:
        """Every caption a sample can get, sorted, with its text key (hex) when the cache has text."""
    def iter_build(
        self, start_batch: int = 0, missing_only: bool = False, rank_share: bool = False
    ) -> NativeEpochIter:
        """The cache build's pixel batches: every distinct (image, crop variant, flip state) once."""
    def quality(
        self,
    ) -> list[
        tuple[
            str,
            int,
            tuple[int, int],
            tuple[int, int],
            bool,
            tuple[str, int, float, float, float] | None,
            tuple[str, str] | None,
        ]
    ]:
        """Per image: path, subset, bucket (h, w), upright size (w, h), caption found, measures or error."""
    def build_latent_keys(self) -> list[tuple[str | None, bool]]:
        """Per sample of the full build plan: (latent key hex or None, whether the cache has it)."""
    def report(self) -> dict[str, Any]: ...
    def rest_batches(self, epoch: int, done: Sequence[tuple[int, int, int]]) -> int:
        """Batches of this rank's rest of epoch ``epoch`` after the stretches ``done`` (as ``iter_epoch``)."""
    def iter_epoch(
        self,
        epoch: int,
        start_batch: int = 0,
        buffer_factory: Callable[[int], torch.Tensor] | None = None,
        done: Sequence[tuple[int, int, int]] = ...,
    ) -> NativeEpochIter:
        """Start one epoch's worker threads from batch ``start_batch`` on.

        ``done``: stretches of the epoch already consumed with other geometries, as ``(batch_size,
        world_size, global batches)`` (elastic resume); the plan is then the rest of the epoch and
        ``start_batch`` counts its batches. A ``done`` that does not fit the epoch is raised as a
        ``ValueError`` by ``__next__``.

        ``buffer_factory(nbytes)``, if given, is called once per batch in plan order and must return a
        contiguous 1-D ``torch.uint8`` CPU tensor (pinned or not) of at least ``nbytes`` bytes, 64-byte
        aligned (checked; anything else is a ``ValueError``), whose memory nothing else uses until the
        batch is dropped: a new tensor per call, never one handed out before (not checked: worker
        threads write into it). The batch is written into it and ``__next__`` returns that tensor
        (viewed by the caller as ``[B, 3, H, W]``) instead of a numpy array. An exception raised in
        it is re-raised by ``__next__`` as itself (``KeyboardInterrupt`` included).
        """

@final
class BatchMemory:
    """Owner of a batch's pool memory (the numpy array's base); freeing it recycles the memory."""

@final
class NativeEpochIter(Iterator[_Batch | _CachedBatch]):
    def __iter__(self) -> NativeEpochIter: ...
    def __next__(self) -> _Batch | _CachedBatch:
        """The next batch; waits with the GIL released.

        Raises:
            DecodeError: with ``on_error="raise"``, a sample's file could not be decoded (or changed
                since the scan).
            OSError: with ``on_error="raise"``, a sample's file could not be read.
            MemoryError: the batch's memory could not be allocated.
            InternalError: a panic while loading a sample, or the epoch was started in another
                process (this is a forked child).
            ValueError: ``buffer_factory`` returned something other than enough contiguous bytes.
        """
    def __len__(self) -> int: ...
    def stats(self) -> dict[str, float]:
        """Where this epoch's time went so far (final once the iterator is exhausted or closed).

        Counts ``samples``, ``failed``, ``batches``, ``threads`` (ints); times in seconds: ``read_s``,
        ``probe_s``, ``decode_s``, ``resize_s``, ``write_s``, ``other_s`` (summed over worker threads,
        adding up to ``busy_s``), ``idle_s``, ``queue_wait_s``, ``wall_s``.
        """
    def close(self) -> None: ...

# The latent/text cache (rust/core/src/cache). Keys and content hashes are 32 lowercase hex chars
# (128-bit blake3); a key argument that is not 32 hex chars is a ValueError.

_CacheDtype = Literal["bf16", "f16", "f32"]

@final
class ShardWriter:
    """One shard of a cache folder being written: ``latents-<16 hex>.safetensors`` or
    ``text-<16 hex>.safetensors``, a genuine safetensors file with tensors ``<key>/<tensor>``.

    Entries are held in memory (``nbytes``) until :meth:`finish` writes ``.<name>.partial``, fsyncs
    it and renames it into place; :meth:`abort`, garbage collection of the writer or a killed process
    leave no shard (at most a ``.partial``, which readers ignore and :func:`cache_gc` deletes).

    Args:
        cache_dir: An existing cache folder.
        kind: ``"latents"`` or ``"text"``.

    Raises:
        ValueError: ``kind`` is neither.
        FileNotFoundError, OSError: ``cache_dir`` is not an existing folder.
    """

    def __new__(cls, cache_dir: str | PathLike[str], kind: Literal["latents", "text"]) -> Self: ...
    def add(
        self,
        key: str,
        meta: str,
        tensors: list[tuple[str, _CacheDtype, tuple[int, ...], Buffer]],
    ) -> None:
        """Add entry ``key`` (copied; the GIL is released while it is copied and checksummed).

        Args:
            key: The entry's key (:func:`latent_key` or :func:`text_key`).
            meta: Provenance, a JSON object: ``{"path", "bucket": [w, h], "crop": [left, top],
                "resized": [w, h], "flip"}`` for latents, ``{"caption"}`` for text. The writer adds
                ``"checksum"`` (blake3 of the entry's tensor bytes in name order, 32 hex).
            tensors: ``(name, dtype, shape, buffer)`` per tensor: ``buffer`` any C-contiguous object
                with the buffer protocol holding ``prod(shape)`` little-endian elements of ``dtype``
                (a numpy array, a ``memoryview``, or a CPU torch tensor as
                ``t.contiguous().view(torch.uint8).numpy()``; bf16 as its bit patterns).

        Raises:
            ValueError: a bad key or dtype, a buffer that is not C-contiguous or whose length does not
                match its shape, a repeated key or tensor name, a name with ``/``, no tensor, ``meta``
                not a JSON object or holding ``"checksum"``, or the writer is finished.
        """
    @property
    def nbytes(self) -> int:
        """Bytes of tensor data added so far (the memory held; the file adds its header)."""
    def __len__(self) -> int:
        """Entries added so far."""
    def finish(self) -> str:
        """Write the shard atomically (GIL released); returns its path. The writer is then spent.

        Raises:
            ValueError: no entry was added, the header would exceed safetensors' 100 MB, or the
                writer is already finished or aborted.
            OSError: the file could not be written (the ``.partial`` is removed).
        """
    def abort(self) -> None:
        """Discard the entries; no file is written."""

@final
class CacheStore:
    """A cache folder opened for reading: its manifest and every shard header (the GIL is released).

    Shards that are truncated or whose header does not parse are listed by :meth:`corrupt_shards`
    and none of their entries is served.

    Args:
        cache_dir: A folder holding ``fastdiff-cache.json``.

    Raises:
        FileNotFoundError: the folder has no manifest.
        CorruptCacheError: the manifest is not a ``fastdiff-cache-1`` manifest (the message names
            the field).
        OSError: the folder or a shard cannot be read.
    """

    def __new__(cls, cache_dir: str | PathLike[str]) -> Self: ...
    def contains(self, keys: list[str]) -> list[bool]:
        """Whether each key is served (in a shard that is not corrupt)."""
    def keys(self, kind: Literal["latents", "text"]) -> list[str]:
        """The served keys of ``kind``, sorted."""
    def corrupt_shards(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of each shard that is not served."""
    def salt(self, kind: Literal["latents", "text"]) -> str | None:
        """The salt (32 hex) of the manifest's ``kind`` half; None when the manifest lacks it."""
    def failed(self) -> list[tuple[str, str]]:
        """The manifest's ``failed``: ``(content hash, reason)`` per image the builder could not decode."""
    def provenance(self, key: str) -> str | None:
        """The entry's metadata JSON (its ``meta`` plus ``"checksum"``), or None when not served."""
    def read(self, key: str) -> dict[str, np.ndarray]:
        """Entry ``key``'s tensors, checksum verified: name -> array of its shape, float32, float16,
        or uint16 bit patterns for bf16 (``torch.from_numpy(a).view(torch.bfloat16)``).

        Raises:
            CacheMissError: the key is not served.
            CorruptCacheError: the entry's checksum does not match its bytes.
        """

def content_hash(data: bytes) -> str:
    """blake3 of a file's bytes, first 16 bytes as 32 hex: the content half of a latent key."""

def latent_key(
    content_hash: str,
    bucket: tuple[int, int],
    resized: tuple[int, int],
    crop: tuple[int, int],
    flip: bool,
    filter: str,
    background: tuple[int, int, int],
    salt: str,
) -> str:
    """The key of one latent entry (the Rust core's single definition).

    Args:
        content_hash: :func:`content_hash` of the image file.
        bucket: The bucket ``(w, h)`` in pixels.
        resized: The size ``(w, h)`` the image is resized to before cropping.
        crop: The crop's ``(left, top)`` in resized pixels, before any flip.
        flip: Whether the crop is mirrored.
        filter: The resize filter (``"lanczos3"``, ``"catmullrom"``, ``"bilinear"``, ``"box"``,
            ``"nearest"``; case-insensitive, hashed by its canonical name).
        background: The RGB (0..255 each) alpha is composited onto.
        salt: The manifest's latent salt.

    Raises:
        ValueError: a hash that is not 32 hex, an unknown filter.
        OverflowError: a size or channel out of range.
    """

def text_key(caption: str, salt: str) -> str:
    """The key of one text entry: the final caption (after caption ops; ``""`` when dropped) and the
    manifest's text salt.

    Raises:
        ValueError: ``salt`` is not 32 hex.
    """

def cache_gc(
    cache_dir: str | PathLike[str], live_latent_keys: list[str], live_text_keys: list[str]
) -> dict[str, int]:
    """Delete ``.partial`` files, corrupt shards and shards that serve no live key (a file is kept
    whole or deleted whole). Hold the folder's ``.lock`` meanwhile.

    Returns:
        ``partials``, ``corrupt``, ``orphans`` (files deleted of each sort), ``kept`` (shards) and
        ``bytes_freed``.

    Raises:
        ValueError: a key that is not 32 hex.
        OSError: the folder cannot be listed or a file cannot be deleted.
    """

def scan_files(
    root: str | PathLike[str], caption_extensions: list[str], num_threads: int = 0
) -> tuple[list[tuple[str, str | None]], list[str]]:
    """The image candidates of the folder ``root`` as the loader's scan finds them, sorted by path:
    ``(images, skipped)``, ``images`` as ``(path, caption or None)``, ``skipped`` the paths the scan
    could not use.

    Raises:
        ValueError: ``root`` is not a folder holding images, or a caption extension is malformed.
    """

def write_shard_index(
    shard: str | PathLike[str], caption_extensions: list[str], num_threads: int = 0
) -> tuple[str, int, int, str | None]:
    """Write the sidecar index ``<shard>.index.json`` of a tar shard (member offsets, lengths, headers,
    captions; the shard's size and mtime): ``(index path, image members, bad members, tar error or
    None)``.

    Raises:
        FileNotFoundError: the shard does not exist.
        OSError: the shard cannot be read or the index written.
        ValueError: a caption extension is malformed.
    """
