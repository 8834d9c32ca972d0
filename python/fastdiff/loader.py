"""``fastdiff.DataLoader``: bucketed image batches from the Rust core as torch tensors (the torch glue).

This module only validates arguments, converts them for the native loader and wraps each batch's
numpy array with :func:`torch.from_numpy` (no copy). It must not decode, resize or shuffle anything
itself: that all happens in ``rust/core``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from fastdiff import _fastdiff

#: Pillow's ``Image.MAX_IMAGE_PIXELS``: larger images are refused before decoding (decompression bombs).
DEFAULT_MAX_PIXELS = 178_956_970

_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.uint8: "uint8",
}

Batch = dict[str, Any]


class DataLoader:
    """Iterable of aspect-bucketed training batches decoded by fastdiff's Rust core.

    At construction the folder is scanned (headers only, in parallel): every ``.jpg .jpeg .jfif .png
    .webp`` file in any letter case, recursively, hidden files and ``._*`` stubs ignored; each image is
    paired with the caption in a sibling file of the same stem (first of ``caption_extensions`` found;
    none gives ``""``). Each image goes to the aspect-ratio bucket nearest in log aspect ratio to its
    upright (EXIF-applied) size; buckets follow kohya-ss sd-scripts / NovelAI: sides are multiples of
    ``bucket_step`` within ``[min_bucket_side, max_bucket_side]`` and area ≤ ``resolution²``.

    Iterating runs one epoch: worker threads decode (JPEG via libjpeg-turbo with DCT downscaling when
    the bucket is much smaller), apply EXIF orientation, composite alpha onto ``background``, resize to
    cover the bucket, crop (``"center"`` or ``"random"``), flip horizontally with probability
    ``flip_prob`` and write the batch into one contiguous buffer. Batches come out in the sampler's
    order whatever ``num_threads`` is; all randomness is a pure function of ``(seed, epoch, image)``.

    Each batch is a dict:

    - ``pixel_values``: tensor ``[B, 3, H, W]`` of ``dtype``; float dtypes scaled to ``[-1, 1]``
      (``x / 127.5 - 1``, as torchvision ``ToTensor`` + ``Normalize([0.5], [0.5])``), ``torch.uint8``
      left as 0–255. ``H, W`` are the bucket's, constant within a batch.
    - ``captions``: ``list[str]``.
    - ``original_sizes``: ``list[tuple[int, int]]``, upright ``(h, w)`` of each file in pixels (SDXL).
    - ``crop_top_lefts``: ``list[tuple[int, int]]``, ``(top, left)`` of the crop in the resized image,
      measured from the right edge when the sample was flipped (as SDXL/kohya expect).
    - ``target_sizes``: ``list[tuple[int, int]]``, the bucket's ``(h, w)``.
    - ``paths``: ``list[str]``, the files.

    Epochs: each ``iter(loader)`` runs the epoch set by :meth:`set_epoch` (call it every epoch, as with
    ``DistributedSampler``); without a call, successive iterations use epochs 0, 1, 2, …

    Args:
        root: Folder of images (searched recursively).
        resolution: Training resolution in pixels; bucket areas are at most ``resolution²``.
        batch_size: Images per batch (≥ 1).
        bucket_step: Bucket sides are multiples of this, in pixels (64 for SD/SDXL latents).
        min_bucket_side: Smallest bucket side in pixels; default ``resolution // 2``.
        max_bucket_side: Largest bucket side in pixels; default ``2 * resolution``.
        crop: ``"center"`` or ``"random"``.
        flip_prob: Probability in ``[0, 1]`` of a horizontal flip per sample.
        shuffle: Shuffle images within buckets and the order of batches, per epoch.
        seed: Seed of every random choice.
        drop_last: Drop each bucket's last batch when it is smaller than ``batch_size``.
        num_threads: Worker threads; ``None`` uses every core.
        prefetch: Batches decoded ahead of the consumer (≥ 1); bounds memory.
        dtype: ``torch.float32``, ``torch.float16``, ``torch.bfloat16`` or ``torch.uint8``.
        caption_extensions: Caption file extensions tried in order, each with its leading dot.
        background: RGB colour (0–255) that transparent pixels are composited onto.
        on_error: ``"skip"`` records an undecodable file in :attr:`report` and goes on; ``"raise"``
            raises :class:`fastdiff.DecodeError` naming the file.
        filter: Resize filter: ``"lanczos3"`` (default), ``"catmullrom"``, ``"bilinear"``, ``"box"``
            or ``"nearest"``.
        max_pixels: Images with more pixels than this are refused before decoding.

    Raises:
        ValueError: An argument is out of range (the message names it), or ``root`` is not a folder
            holding images.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        resolution: int = 512,
        batch_size: int = 1,
        bucket_step: int = 64,
        min_bucket_side: int | None = None,
        max_bucket_side: int | None = None,
        crop: str = "center",
        flip_prob: float = 0.0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_threads: int | None = None,
        prefetch: int = 2,
        dtype: torch.dtype = torch.float32,
        caption_extensions: Sequence[str] = (".txt", ".caption"),
        background: tuple[int, int, int] = (255, 255, 255),
        on_error: str = "skip",
        filter: str = "lanczos3",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
        if isinstance(caption_extensions, str):
            raise ValueError("caption_extensions must be a sequence of extensions, not one string")
        self.dtype = dtype
        self.root = os.fspath(root)
        self._epoch = 0
        self._native = _fastdiff.NativeLoader(
            self.root,
            resolution=resolution,
            batch_size=batch_size,
            bucket_step=bucket_step,
            min_bucket_side=min_bucket_side,
            max_bucket_side=max_bucket_side,
            crop=crop,
            flip_prob=flip_prob,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            num_threads=num_threads or 0,
            prefetch=prefetch,
            dtype=_DTYPES[dtype],
            filter=filter,
            caption_extensions=list(caption_extensions),
            background=tuple(background),
            on_error=on_error,
            max_pixels=max_pixels,
        )

    def __len__(self) -> int:
        """Batches per epoch (exact; every epoch has the same number)."""
        return self._native.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` (≥ 0) for the next iteration: it keys the shuffle, crops and flips."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch = epoch

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will run."""
        return self._epoch

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """Candidate buckets as ``(h, w)`` in pixels, sorted by aspect ratio."""
        return self._native.buckets

    @property
    def report(self) -> dict[str, Any]:
        """What the scan and the loading so far found.

        Keys: ``root``; ``found`` (image files found), ``loaded`` and ``skipped`` (a list of dicts with
        ``path``, ``code`` and ``message``; ``loaded + len(skipped) == found`` always, and files that
        fail while decoding are added as they are met); ``formats`` (count per format);
        ``min_size``/``max_size`` (upright ``(h, w)`` by area); ``captions_missing``;
        ``captions_fallback_encoding`` (caption files that were not valid UTF-8/UTF-16 and were read as
        Windows-1252); ``images_per_bucket`` (list of ``((h, w), count)``).
        """
        return self._native.report()

    def __iter__(self) -> Iterator[Batch]:
        epoch = self._epoch
        self._epoch = epoch + 1
        return self._batches(self._native.iter_epoch(epoch))

    def _batches(self, it: _fastdiff.NativeEpochIter) -> Iterator[Batch]:
        view = self.dtype if self.dtype in (torch.float16, torch.bfloat16) else None
        try:
            for pixels, captions, original_sizes, crop_top_lefts, target_sizes, paths in it:
                pixel_values = torch.from_numpy(pixels)
                if view is not None:
                    pixel_values = pixel_values.view(view)
                yield {
                    "pixel_values": pixel_values,
                    "captions": captions,
                    "original_sizes": original_sizes,
                    "crop_top_lefts": crop_top_lefts,
                    "target_sizes": target_sizes,
                    "paths": paths,
                }
        finally:
            it.close()
