"""Type stubs of the private native module (hand-written; the public API is ``fastdiff.DataLoader``)."""

from collections.abc import Callable, Iterator
from typing import Any, final

import numpy as np
import torch
from typing_extensions import Self

__all__ = [
    "BatchMemory",
    "DecodeError",
    "FastdiffError",
    "ImageTooSmallError",
    "InternalError",
    "NativeEpochIter",
    "NativeLoader",
    "NativeSubset",
    "__version__",
]

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
    # cached tensors (name, dtype name, array [B, ...]; half types as uint16 bit patterns)
    list[tuple[str, str, np.ndarray]],
    list[str | None],  # latent_keys (32 hex digits)
    list[str | None],  # text_keys
    list[str],  # latent provenance JSON per sample
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
    ) -> Self: ...
    @property
    def num_batches(self) -> int: ...
    @property
    def buckets(self) -> list[tuple[int, int]]: ...
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
    def iter_build(self, start_batch: int = 0) -> NativeEpochIter:
        """The cache build's pixel batches: every distinct (image, crop variant, flip state) once."""
    def report(self) -> dict[str, Any]: ...
    def iter_epoch(
        self,
        epoch: int,
        start_batch: int = 0,
        buffer_factory: Callable[[int], torch.Tensor] | None = None,
    ) -> NativeEpochIter:
        """Start one epoch's worker threads from batch ``start_batch`` on.

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
class NativeEpochIter(Iterator[_Batch]):
    def __iter__(self) -> NativeEpochIter: ...
    def __next__(self) -> _Batch:
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
