"""``fastdiff.DataLoader``: bucketed image batches from the Rust core as torch tensors (the torch glue).

This module only validates arguments, converts them for the native loader and wraps each batch's
numpy array with :func:`torch.from_numpy` (no copy). It must not decode, resize or shuffle anything
itself: that all happens in ``rust/core``.
"""

from __future__ import annotations

import copy
import numbers
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from fastdiff import _fastdiff
from fastdiff.dataset import Subset, load_config

#: Pillow's ``Image.MAX_IMAGE_PIXELS``: larger images are refused before decoding (decompression bombs).
DEFAULT_MAX_PIXELS = 178_956_970

_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.uint8: "uint8",
}

Batch = dict[str, Any]


def _available_cores() -> int:
    """Cores this process may run on (respects CPU affinity / cgroup-pinned sets)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class DataLoader:
    """Iterable of aspect-bucketed training batches decoded by fastdiff's Rust core.

    At construction the folder is scanned (headers only, in parallel): every ``.jpg .jpeg .jfif .png
    .webp`` file in any letter case, recursively, hidden files and ``._*`` stubs ignored; each image is
    paired with the caption in a sibling file of the same stem (first of ``caption_extensions`` found;
    none gives ``""``), or, when the folder holds an HF imagefolder ``metadata.jsonl``, with its caption
    (see :class:`fastdiff.Subset`). Each image goes to the aspect-ratio bucket nearest in log aspect
    ratio to its upright (EXIF-applied) size; buckets follow kohya-ss sd-scripts / NovelAI: sides are
    multiples of ``bucket_step`` within ``[min_bucket_side, max_bucket_side]`` and area ≤ ``resolution²``.

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
    - ``is_reg``: bool tensor ``[B]``, whether each sample is a regularisation (class) image.
    - ``loss_weights``: float32 tensor ``[B]``, each sample's subset ``loss_weight`` (1.0 by default).

    Epochs: each ``iter(loader)`` runs the epoch set by :meth:`set_epoch` (call it every epoch, as with
    ``DistributedSampler``); without a call, successive iterations use epochs 0, 1, 2, …

    Resuming (torchdata ``StatefulDataLoader`` protocol): :meth:`state_dict` captures the epoch and the
    batches consumed of it; :meth:`load_state_dict` on a loader built the same way makes the next
    iteration yield exactly the rest of that epoch, as an uninterrupted run would have.

    Several ranks (``torchrun``): each rank takes its slice of every global batch of
    ``batch_size * world_size`` samples, so all ranks run ``len(loader)`` steps, use the same bucket at
    each step and see disjoint samples. A bucket's last global batch, when shorter, is split evenly:
    ``remainder="pad"`` repeats some of its samples so each rank gets ``ceil(n / world_size)``,
    ``"drop"`` leaves out ``n % world_size`` of them (and the batch, if it has fewer than ``world_size``).
    With ``drop_last`` every short global batch is dropped instead. ``report["small_buckets"]`` lists
    buckets with less than one global batch.

    Args:
        root: Folder of images (searched recursively); the same as ``subsets=[Subset(root)]``.
        subsets: The dataset as :class:`fastdiff.Subset` folders with their own repeats and caption
            handling (instead of ``root``); see also :meth:`from_config`.
        resolution: Training resolution in pixels; bucket areas are at most ``resolution²``. One that
            is not a multiple of ``bucket_step`` warns (``UserWarning``): the square bucket is then
            ``resolution`` rounded down to a multiple of ``bucket_step``.
        batch_size: Images per batch (≥ 1).
        bucket_step: Bucket sides are multiples of this, in pixels (64 for SD/SDXL latents).
        min_bucket_side: Smallest bucket side in pixels; default ``resolution // 2``.
        max_bucket_side: Largest bucket side in pixels; default ``2 * resolution``.
        no_upscale: Never enlarge an image (kohya-ss sd-scripts ``bucket_no_upscale``). An image that
            covers its usual bucket keeps it (a 3072×3000 photo at resolution 1024 gets 1024×1024);
            a smaller one gets the largest ``bucket_step``-aligned bucket it covers: its size scaled
            down to area ``resolution²`` if larger, each side rounded down to a multiple of
            ``bucket_step`` and capped at ``max_bucket_side`` (such buckets may be below
            ``min_bucket_side`` and join :attr:`buckets`). An image narrower or shorter than
            ``bucket_step`` fits no bucket: it is skipped with code ``"too_small"`` (with
            ``on_error="raise"``, :class:`fastdiff.DecodeError` at construction). Default ``False``:
            every image is resized to cover its bucket, enlarging small ones.
        crop: ``"center"`` or ``"random"``.
        flip_prob: Probability in ``[0, 1]`` of a horizontal flip per sample.
        shuffle: Shuffle images within buckets and the order of batches, per epoch.
        seed: Seed of every random choice.
        drop_last: Drop each bucket's last batch when it is smaller than ``batch_size``.
        num_threads: Worker threads; ``None`` uses every core.
        prefetch: Batches in flight (being decoded or ready) ahead of the consumer (≥ 1); bounds memory
            (each holds ``B·3·H·W`` values). Default: enough to keep every thread busy plus one batch
            ready, ``max(2, ceil(num_threads / batch_size) + 1)``.
        dtype: ``torch.float32``, ``torch.float16``, ``torch.bfloat16`` or ``torch.uint8``.
        pin_memory: Write each batch straight into page-locked (pinned) host memory taken from torch's
            pinned-memory allocator, so ``pixel_values.to("cuda", non_blocking=True)`` copies
            asynchronously (as ``torch.utils.data.DataLoader(pin_memory=True)``, without its extra
            copy). Without CUDA it warns and is ignored, as torch's DataLoader does. Otherwise batches
            live in recycled memory: when the last tensor viewing a batch is freed, its buffer is
            reused for a later batch (no allocation or zero-fill per batch).
        caption_extensions: Caption file extensions tried in order, each with its leading dot.
        background: RGB colour (0–255) that transparent pixels are composited onto.
        on_error: ``"skip"`` records an undecodable file in :attr:`report` and loads a stand-in in its
            place: another sample of the same bucket, drawn with the seed (up to 7 draws), else (a
            sample alone in its bucket, or a bucket of broken files) the next sample of the dataset
            that loads, cropped to this bucket. So batches keep their size, ``len(loader)`` stays
            exact and ranks stay in step, unless no file of the dataset loads. ``"raise"`` raises
            :class:`fastdiff.DecodeError` naming the file.
        filter: Resize filter: ``"lanczos3"`` (default), ``"catmullrom"``, ``"bilinear"``, ``"box"``
            or ``"nearest"``.
        max_pixels: Decompression-bomb guard (≥ 1): an image whose header declares more than this
            many pixels (``width * height``) is refused before any pixel memory is allocated, and
            skipped with code ``"too_large"`` and a message giving its size (or raises
            :class:`fastdiff.DecodeError` with ``on_error="raise"``). Default 178 956 970, Pillow's
            ``Image.MAX_IMAGE_PIXELS``.
        rank: This process's rank; default ``torch.distributed.get_rank()`` when initialised, else 0.
        world_size: Number of ranks; default ``torch.distributed.get_world_size()`` when initialised,
            else 1.
        remainder: ``"pad"`` or ``"drop"``: how a short global batch is split across ranks (above).

    Raises:
        ValueError: An argument is out of range (the message names it), or ``root`` is not a folder
            holding images.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        subsets: Sequence[Subset] | None = None,
        resolution: int = 512,
        batch_size: int = 1,
        bucket_step: int = 64,
        min_bucket_side: int | None = None,
        max_bucket_side: int | None = None,
        no_upscale: bool = False,
        crop: str = "center",
        flip_prob: float = 0.0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_threads: int | None = None,
        prefetch: int | None = None,
        dtype: torch.dtype = torch.float32,
        pin_memory: bool = False,
        caption_extensions: Sequence[str] = (".txt", ".caption"),
        background: tuple[int, int, int] = (255, 255, 255),
        on_error: str = "skip",
        filter: str = "lanczos3",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        rank: int | None = None,
        world_size: int | None = None,
        remainder: str = "pad",
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        unsigned = {
            "resolution": resolution,
            "batch_size": batch_size,
            "bucket_step": bucket_step,
            "min_bucket_side": min_bucket_side,
            "max_bucket_side": max_bucket_side,
            "seed": seed,
            "prefetch": prefetch,
            "max_pixels": max_pixels,
        }
        for name, value in unsigned.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        if seed >= 2**64:
            raise ValueError(f"seed must be < 2**64, got {seed}")
        if len(background) != 3 or not all(
            isinstance(c, numbers.Integral) and 0 <= c <= 255 for c in background
        ):
            raise ValueError(f"background must be three ints in 0..255 (R, G, B), got {background!r}")
        if bucket_step and resolution % bucket_step:
            square = resolution // bucket_step * bucket_step
            warnings.warn(
                f"resolution {resolution} is not a multiple of bucket_step {bucket_step}: "
                f"the square bucket is {square}x{square}",
                UserWarning,
                stacklevel=2,
            )
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
        if isinstance(caption_extensions, str):
            raise ValueError("caption_extensions must be a sequence of extensions, not one string")
        threads = num_threads or _available_cores()
        if prefetch is None:
            prefetch = max(2, -(-threads // max(batch_size, 1)) + 1)
        if (root is None) == (subsets is None):
            raise ValueError("give exactly one of root and subsets")
        subsets = [Subset(root)] if subsets is None else list(subsets)
        if not subsets:
            raise ValueError("subsets must hold at least one Subset")
        rank, world_size = _distributed_defaults(rank, world_size)
        if rank < 0 or world_size < 1:
            raise ValueError(
                f"rank must be >= 0 and world_size >= 1, got rank={rank}, world_size={world_size}"
            )
        if pin_memory and not torch.cuda.is_available():
            warnings.warn(
                "pin_memory=True but CUDA is not available: batches are not pinned",
                UserWarning,
                stacklevel=2,
            )
            pin_memory = False
        self.dtype = dtype
        self.pin_memory = pin_memory
        self._loss_weights = [float(s.loss_weight) for s in subsets]
        self.root = os.fspath(subsets[0].image_dir)
        self.rank, self.world_size = rank, world_size
        self._epoch = 0
        # Batches of epoch `_epoch` to skip on the next iteration (set by load_state_dict).
        self._resume_batch = 0
        # (epoch, plan position) of the iteration in progress; None when none is.
        self._position: tuple[int, int] | None = None
        # The native iterator of the iteration running or last run, for stats(); held only while its
        # generator runs, then replaced by its final figures.
        self._stats_source: _fastdiff.NativeEpochIter | None = None
        self._last_stats: dict[str, float] | None = None
        # What must match for a saved state to apply here (not threads, prefetch, rank or on_error).
        self._state_options: dict[str, Any] = {
            "resolution": resolution,
            "batch_size": batch_size,
            "bucket_step": bucket_step,
            "min_bucket_side": min_bucket_side,
            "max_bucket_side": max_bucket_side,
            "crop": crop,
            "flip_prob": flip_prob,
            "shuffle": shuffle,
            "seed": seed,
            "drop_last": drop_last,
            "dtype": _DTYPES[dtype],
            "caption_extensions": list(caption_extensions),
            "background": list(background),
            "filter": filter,
            "max_pixels": max_pixels,
            "world_size": world_size,
            "remainder": remainder,
            "subsets": [s.options() for s in subsets],
        }
        if no_upscale:
            # Only when set, so states saved before the option existed still load with the default.
            self._state_options["no_upscale"] = True
        self._native = _fastdiff.NativeLoader(
            [s.native() for s in subsets],
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
            num_threads=threads,
            prefetch=prefetch,
            dtype=_DTYPES[dtype],
            filter=filter,
            caption_extensions=list(caption_extensions),
            background=tuple(background),
            on_error=on_error,
            max_pixels=max_pixels,
            rank=rank,
            world_size=world_size,
            remainder=remainder,
            no_upscale=no_upscale,
        )

    @classmethod
    def from_config(cls, config: str | os.PathLike[str] | Mapping[str, Any], **overrides: Any) -> DataLoader:
        """A loader of the dataset described by a TOML file (or dict); see :func:`fastdiff.load_config`.

        Args:
            config: Path of the TOML file, or its content as a dict.
            **overrides: Further :class:`DataLoader` keyword arguments (``dtype``, ``num_threads``, ...);
                they win over the config's.

        Raises:
            ValueError: The config is invalid (the message names the key and table), or as the constructor.
        """
        kwargs, subsets = load_config(config)
        return cls(subsets=subsets, **{**kwargs, **overrides})

    def __len__(self) -> int:
        """Batches (steps) per epoch of this rank: exact, the same for every epoch and rank; repeats count."""
        return self._native.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` (≥ 0) for the next iteration: it keys the shuffle, crops and flips."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self._epoch:
            self._resume_batch = 0
        self._epoch, self._position = epoch, None

    def state_dict(self) -> dict[str, Any]:
        """Where the loader is, to resume from after a restart (save it with the model checkpoint).

        Returns:
            A dict of plain values: ``epoch`` and ``batches_consumed`` (the next iteration resumes there;
            at the end of an epoch this is the next epoch and 0), ``num_batches``, ``rank``,
            ``dataset_digest`` (16 hex digits over relative paths and headers) and ``options`` (every
            option that changes the batches; not ``num_threads``, ``prefetch``, ``on_error`` or rank).
        """
        epoch, consumed = self._position if self._position is not None else (self._epoch, self._resume_batch)
        if consumed >= len(self):
            epoch, consumed = epoch + 1, 0
        return {
            "epoch": epoch,
            "batches_consumed": consumed,
            "num_batches": len(self),
            "rank": self.rank,
            "dataset_digest": self._native.dataset_digest,
            "options": copy.deepcopy(self._state_options),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a loader over the same data and options).

        The next iteration runs the saved epoch from its first unconsumed batch; a following
        :meth:`set_epoch` with the same epoch keeps that, another epoch starts it from the beginning. A
        state from another rank of the same run is fine (all ranks are at the same step).

        Raises:
            ValueError: A key is missing, the dataset differs (digest), or an option differs (the message
                names the option with both values).
        """
        missing = {"epoch", "batches_consumed", "dataset_digest", "options"} - set(state)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        options = state["options"]
        for name in sorted(set(options) | set(self._state_options)):
            saved, here = options.get(name), self._state_options.get(name)
            if saved != here:
                raise ValueError(
                    f"state_dict was saved with {name}={saved!r}, this loader has {name}={here!r}"
                )
        if state["dataset_digest"] != self._native.dataset_digest:
            report = self.report
            raise ValueError(
                f"state_dict was saved for another dataset (digest {state['dataset_digest']}, this one "
                f"{self._native.dataset_digest}: {report['loaded']} images under {self.root}); the files "
                "or their sizes differ"
            )
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        if epoch < 0 or not 0 <= consumed <= len(self):
            raise ValueError(f"state_dict has epoch={epoch}, batches_consumed={consumed} (of {len(self)})")
        self._epoch, self._resume_batch, self._position = epoch, consumed, None

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will run."""
        return self._epoch

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """Candidate buckets as ``(h, w)`` in pixels, sorted by aspect ratio (with ``no_upscale``, also
        the images' own smaller buckets)."""
        return self._native.buckets

    @property
    def captions(self) -> list[str]:
        """The caption of each image the scan accepted, one string per image (repeats not counted), in
        path order: the text of its caption file or ``metadata.jsonl`` entry as decoded (BOM, UTF-16
        and Windows-1252 handled; ``\\r`` and surrounding whitespace stripped; a multi-caption entry
        joined by newlines), before the subsets' tag shuffle, tag dropout and caption dropout; ``""``
        for an image without one. For building a vocabulary or choosing preview prompts."""
        return self._native.captions

    @property
    def report(self) -> dict[str, Any]:
        """What the scan and the loading so far found.

        Keys: ``root``; ``found`` (image files found), ``loaded`` and ``skipped`` (a list of dicts with
        ``path``, ``code`` and ``message``; ``loaded + len(skipped) == found`` always, and files that
        fail while decoding are added as they are met); ``formats`` (count per format);
        ``min_size``/``max_size`` (upright ``(h, w)`` by area); ``captions_missing``;
        ``captions_fallback_encoding`` (caption files that were not valid UTF-8/UTF-16 and were read as
        Windows-1252); ``images_per_bucket`` (list of ``((h, w), count)``); ``samples`` (per epoch over
        all ranks: loaded images times their subset's ``num_repeats``); ``small_buckets`` (``((h, w),
        samples)`` of buckets with fewer samples than one global batch ``batch_size * world_size``: with
        ``drop_last`` they yield nothing, otherwise one short batch split by ``remainder``); ``subsets``
        (per subset: ``root``, ``is_reg``, ``num_repeats``, ``images``, ``images_per_bucket``).
        """
        return self._native.report()

    def stats(self) -> dict[str, float] | None:
        """Where the time of the epoch in progress (or else the last one) went; ``None`` before any.

        Always measured (a few clock reads per image). Counts: ``samples`` (images loaded; with the
        epoch run to the end, every image it yielded), ``failed``, ``batches`` (yielded), ``threads``.
        Times in **seconds**, the per-stage ones summed over worker threads, so two threads busy for
        one second count 2 s:

        - ``read_s`` (reading files), ``probe_s`` (header check), ``decode_s`` (decode incl. DCT
          scaling, EXIF rotation, alpha), ``resize_s`` (resampling), ``write_s`` (crop, flip,
          normalise and the CHW write into the batch), ``other_s`` (the rest); together ``busy_s``.
        - ``idle_s``: worker time with nothing to do (every started batch done or taken: raise
          ``prefetch`` if this is large while the consumer waits).
        - ``queue_wait_s``: time the consumer (the loop over this loader) waited for a batch; near
          ``wall_s`` means the training step is starved by the loader, near 0 that the loader keeps up.
        - ``wall_s``: from the start of the epoch to its end (or to now).

        Per image: ``1000 * decode_s / samples`` is decode's worker-milliseconds per image.
        """
        if self._stats_source is not None:
            return self._stats_source.stats()
        return None if self._last_stats is None else dict(self._last_stats)

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self._epoch, self._resume_batch
        self._epoch, self._resume_batch = epoch + 1, 0
        self._position = (epoch, start)
        factory = _pinned_buffer if self.pin_memory else None
        return self._batches(self._native.iter_epoch(epoch, start, factory), epoch)

    def _batches(self, it: _fastdiff.NativeEpochIter, epoch: int) -> Iterator[Batch]:
        view = self.dtype if self.dtype in (torch.float16, torch.bfloat16) else None
        weights = self._loss_weights
        total = len(self)
        self._stats_source = it
        try:
            for pixels, captions, original_sizes, crop_top_lefts, target_sizes, paths, is_reg, subsets in it:
                # Plan position after this batch (batches whose samples all failed are skipped over).
                self._position = (epoch, total - len(it))
                if isinstance(pixels, torch.Tensor):
                    # Written into a 1-D uint8 tensor from `_pinned_buffer`: view it as the batch.
                    (h, w), b = target_sizes[0], len(captions)
                    nbytes = b * 3 * h * w * self.dtype.itemsize
                    pixel_values = pixels[:nbytes].view(self.dtype).view(b, 3, h, w)
                else:
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
                    "is_reg": torch.tensor(is_reg, dtype=torch.bool),
                    "loss_weights": torch.tensor([weights[s] for s in subsets], dtype=torch.float32),
                }
            self._position = None
        finally:
            it.close()
            if self._stats_source is it:
                self._last_stats, self._stats_source = it.stats(), None


def _pinned_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` of pinned host memory for one batch (the native iterator's ``buffer_factory``).

    torch's caching host allocator recycles the block once the tensor is freed and every
    asynchronous copy from it has completed, so a batch still being copied is never overwritten.
    """
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _distributed_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``rank``/``world_size`` as given, else from an initialised ``torch.distributed``, else 0 of 1."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    return (0 if rank is None else rank), (1 if world_size is None else world_size)
