"""``fastdiff.DataLoader``: bucketed image batches from the Rust core as torch tensors (the torch glue).

This module only validates arguments, converts them for the native loader and wraps each batch's
numpy array with :func:`torch.from_numpy` (no copy). It must not decode, resize or shuffle anything
itself: that all happens in ``rust/core``.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch

from fastdiff import _fastdiff
from fastdiff.dataset import Subset, load_config
from fastdiff.docs import with_args
from fastdiff.options import LOADER, LOADER_OPTIONS, saved
from fastdiff.sources import fetch_pending
from fastdiff.transfer import batch_tensor, pinned_buffer, to_device
from fastdiff.types import (
    Batch,
    Crop,
    Device,
    Filter,
    ImageQuality,
    LoadStats,
    OnError,
    OnMiss,
    Remainder,
    Report,
    ShardSplit,
    Tokenizer,
)

#: A batch being copied to the device: the host batch (held until the copy is done), the device batch,
#: the event recorded after its copy, and the loader position once it is handed out.
_Pending = tuple[Batch, Batch, torch.cuda.Event, tuple[int, int] | None]


def _available_cores() -> int:
    """Cores this process may run on (respects CPU affinity / cgroup-pinned sets)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class DataLoader:
    """Iterable of aspect-bucketed training batches decoded by fastdiff's Rust core.

    At construction the folder is scanned (headers only, in parallel): every ``.jpg .jpeg .jfif .png
    .webp .bmp .dib .tif .tiff .gif .jxl`` file in any letter case, recursively, and any other file whose
    first bytes are an image's, hidden files and ``._*`` stubs left out (``.avif .heic .heif`` files are
    found too, and skipped as ``unsupported``; the files passed over are counted in
    ``report["passed_over"]``); each
    image is paired with the caption in a sibling file of the same stem (first of ``caption_extensions``
    found; none gives ``""``), or, when the folder holds an HF imagefolder ``metadata.jsonl``, with its
    caption (see :class:`fastdiff.Subset`). Each image goes to the aspect-ratio bucket nearest in log aspect
    ratio to its upright (EXIF-applied) size; buckets follow kohya-ss sd-scripts / NovelAI: sides are
    multiples of ``bucket_step`` within ``[min_bucket_side, max_bucket_side]`` and area ≤ ``resolution²``.

    Iterating runs one epoch: worker threads decode (JPEG via libjpeg-turbo with DCT downscaling when
    the bucket is much smaller), apply EXIF orientation, composite alpha onto ``background``, resize to
    cover the bucket, crop as ``crop`` says, flip horizontally with probability ``flip_prob`` and
    write the batch into one contiguous buffer. Batches come out in the sampler's
    order whatever ``num_threads`` is; all randomness is a pure function of ``(seed, epoch, image)``.

    Each batch is a :class:`fastdiff.types.Batch` dict (its docstring gives every key's shape, dtype
    and unit): ``pixel_values`` ``[B, 3, H, W]``, ``captions``, the SDXL micro-conditioning
    ``original_sizes``, ``crop_top_lefts`` and ``target_sizes``, ``paths``, ``is_reg`` and
    ``loss_weights``; with a ``cache``, its tensors ``latents``/``latents_std`` ``[B, C, H / f, W / f]``
    and ``prompt_embeds`` ``[B, L, D]`` (+ SDXL's, SD3's and FLUX.1's ``pooled_prompt_embeds`` ``[B, P]``,
    Z-Image's ``prompt_attention_mask`` ``[B, L]``) in the cache's dtype (``C``, ``f``, ``L``, ``D``,
    ``P`` as its manifest says: 4, 8, 77 and the encoders' widths for SD/SDXL; 16 channels for the
    DiTs), ``latent_keys`` and ``text_keys``, and ``pixel_values`` only with ``pixels=True``; the views
    ``masks``, ``masks_latent``, ``control_pixel_values`` (``mask_from_alpha``, ``mask_dir``, ``control_dir``)

    Epochs: each ``iter(loader)`` runs the epoch set by :meth:`set_epoch` (call it every epoch, as with
    ``DistributedSampler``); without a call, successive iterations use epochs 0, 1, 2, …

    Resuming (torchdata ``StatefulDataLoader`` protocol): :meth:`state_dict` captures the epoch and the
    global batches consumed of it; :meth:`load_state_dict` on a loader built the same way makes the next
    iteration yield exactly the rest of that epoch, as an uninterrupted run would have. Elastic resume:
    the loader resuming may have another ``batch_size`` or ``world_size`` (a checkpoint of 4 ranks
    resumed on 2 or 3); the rest of the epoch is then every sample no consumed global batch held,
    planned anew with the new geometry, each once but for the ``remainder``/``drop_last`` policy at
    each bucket's last global batch (see :meth:`load_state_dict`).

    Several ranks (``torchrun``): each rank takes its slice of every global batch of ``batch_size *
    world_size`` samples (all ranks run ``len(loader)`` steps on the same bucket, disjoint samples; a short
    one split as ``remainder`` says, dropped with ``drop_last``); indexed tar shards go whole to ranks
    instead (``shard_split``: each rank opens only its own shards, ``report["io"]`` counts the reads).
    ``report["small_buckets"]`` lists buckets with less than one global batch.

    Args:
        root: Folder of images (searched recursively), or WebDataset tar shards: a ``.tar`` path, a brace
            pattern (``"data/shard-{0000..0099}.tar"``) or a list of them (README "Sharded and remote
            datasets"); the same as ``subsets=[Subset(root)]``.
        subsets: The dataset as :class:`fastdiff.Subset` folders with their own repeats and caption
            handling (instead of ``root``); see also :meth:`from_config`.
        (the options: see fastdiff.options)

    Raises:
        ValueError: An argument has the wrong type or is out of range (the message names it), or
            ``root`` is not a folder holding images.
        fastdiff.DecodeError: With ``on_error="raise"``, a file that cannot be read as an image (at
            construction for what the header scan finds, else while iterating).
        fastdiff.ImageTooSmallError: With ``on_error="raise"`` and ``no_upscale``, an image smaller than
            one ``bucket_step``.
        MemoryError: The allocator refused a batch's buffer (a ``batch_size``/``resolution`` too large
            for this machine).
        fastdiff.InternalError: A bug in fastdiff (a panic while loading a sample), or an epoch
            iterated in a forked child.
        FileNotFoundError: ``cache`` has no ``fastdiff-cache.json`` (not built; ``on_miss="error"``).
        fastdiff.CacheMissError: With ``on_error="raise"``, while iterating, a sample whose cache
            entry is missing (the message names the file and what changed).
        fastdiff.CorruptCacheError: With ``on_error="raise"``, while iterating, a cache entry whose
            checksum does not match (the message names the shard and key).
        OSError: With ``on_miss="encode"``, ``model`` cannot be read or ``cache`` written; a
            ``model`` that is not a diffusers pipeline folder is a ``FileNotFoundError`` or
            ``ValueError``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        *,
        subsets: Sequence[Subset] | None = None,
        resolution: int = 512,
        batch_size: int = 1,
        bucket_step: int = 64,
        min_bucket_side: int | None = None,
        max_bucket_side: int | None = None,
        no_upscale: bool = False,
        min_bucket_fill: int | None = None,
        max_extra_crop: float = 0.10,
        crop: Crop = "center",
        flip_prob: float = 0.0,
        crop_variants: int | None = None,
        text_variants: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_threads: int | None = None,
        prefetch: int | None = None,
        dtype: torch.dtype = torch.float32,
        pin_memory: bool = False,
        caption_extensions: Sequence[str] = (".txt", ".caption"),
        background: tuple[int, int, int] = (255, 255, 255),
        on_error: OnError = "skip",
        filter: Filter = "lanczos3",
        max_pixels: int = 178_956_970,
        rank: int | None = None,
        world_size: int | None = None,
        remainder: Remainder = "pad",
        shard_split: ShardSplit = "auto",
        cache: str | os.PathLike[str] | None = None,
        pixels: bool | None = None,
        validation_split: float = 0.0,
        validation: bool = False,
        mask_from_alpha: bool = False,
        mask_dir: str | os.PathLike[str] | None = None,
        control_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        require_pairs: bool = False,
        vae_scale_factor: int = 8,
        device: Device | None = None,
        tokenizer: Tokenizer | None = None,
        tokenizers: Sequence[Tokenizer] | None = None,
        on_miss: OnMiss = "error",
        model: str | os.PathLike[str] | None = None,
    ) -> None:
        # The signature spells the options out for users and type checkers; their checks, what the
        # state records and the native arguments all come from the schema (fastdiff.options).
        arguments = locals()
        values = {o.name: arguments[o.name] for o in LOADER_OPTIONS}
        for o in LOADER_OPTIONS:
            problem = o.problem(values[o.name])
            if problem is not None:
                raise ValueError(problem)
        if resolution % bucket_step:
            square = resolution // bucket_step * bucket_step
            warnings.warn(
                f"resolution {resolution} is not a multiple of bucket_step {bucket_step}: "
                f"the square bucket is {square}x{square}",
                UserWarning,
                stacklevel=2,
            )
        if root is not None and subsets is None:
            subsets = [Subset(root)]
        elif root is not None or subsets is None:
            raise ValueError("give exactly one of root and subsets")
        subsets = list(subsets)
        if not subsets:
            raise ValueError("subsets must hold at least one Subset")
        if tokenizer is not None and tokenizers is not None:
            raise ValueError("give tokenizer or tokenizers, not both")
        self.tokenizers: list[Tokenizer] = [tokenizer] if tokenizer is not None else list(tokenizers or [])
        self.device = None if device is None else torch.device(device)
        if self.device is not None and self.device.type == "cuda":
            if torch.cuda.is_available():
                pin_memory = True
            else:
                warnings.warn(
                    f"device={device!r} but CUDA is not available: batches stay on the CPU",
                    UserWarning,
                    stacklevel=2,
                )
                self.device = None
        elif self.device is not None and self.device.type == "cpu":
            self.device = None
        if pin_memory and not torch.cuda.is_available():
            warnings.warn(
                "pin_memory=True but CUDA is not available: batches are not pinned",
                UserWarning,
                stacklevel=2,
            )
            pin_memory = False
        threads = num_threads or _available_cores()
        rank, world_size = _distributed_defaults(rank, world_size)
        # Remote shards with indexes: only the indexes now, then the shards this rank reads (its own).
        later = world_size > 1 and shard_split == "auto" and cache is None
        pending: dict[str, str] | None = {} if later else None
        natives = [s.native(pending) for s in subsets]  # checks each subset's options
        values.update(
            num_threads=threads,
            prefetch=max(2, -(-threads // batch_size) + 1) if prefetch is None else prefetch,
            rank=rank,
            world_size=world_size,
            pin_memory=pin_memory,
            pixels=cache is None if pixels is None else pixels,
        )
        if not values["pixels"] and cache is None:
            raise ValueError("pixels=False needs a cache: without one there is nothing to load but pixels")
        if on_miss == "encode" and (cache is None or model is None):
            raise ValueError(
                'on_miss="encode" needs cache= (the folder to fill) and model= (the pipeline whose VAE and '
                f"text encoders encode it), got cache={cache!r}, model={model!r}"
            )
        if model is not None and on_miss != "encode":
            raise ValueError(f'model= is used only by on_miss="encode", got on_miss={on_miss!r}')
        self.dtype = dtype
        self.pin_memory = pin_memory
        self.cache = None if cache is None else os.fspath(cache)
        self._loss_weights = [float(s.loss_weight) for s in subsets]
        self.root = subsets[0].root()
        self.rank, self.world_size = rank, world_size
        self.batch_size = batch_size
        self._epoch = 0
        # Batches of epoch `_epoch` to skip on the next iteration (set by load_state_dict), after the
        # stretches `_resume_done` of it consumed with other geometries (batch_size, world_size,
        # global batches), whose rest has `_resume_total` batches on this rank.
        self._resume_batch = 0
        self._resume_done: list[tuple[int, int, int]] = []
        self._resume_total: int | None = None
        # `_resume_done` and the plan length of the iteration in progress (or last started).
        self._iter_done: list[tuple[int, int, int]] = []
        self._iter_total = 0
        # (epoch, plan position) of the iteration in progress; None when none is.
        self._position: tuple[int, int] | None = None
        # The native iterator of the iteration running or last run, for stats(); held only while its
        # generator runs, then replaced by its final figures.
        self._stats_source: _fastdiff.NativeEpochIter | None = None
        self._last_stats: LoadStats | None = None
        # What must match for a saved state to apply here (the options whose schema entry says so).
        self._state_options: dict[str, Any] = {
            **saved(LOADER_OPTIONS, values),
            "subsets": [s.options() for s in subsets],
        }
        if cache is not None and model is not None:
            # on_miss="encode": the build `fastdiff cache` runs, its plan's loader the same samples as float
            # pixels in [-1, 1] for the VAE (imported here: it brings the training side's model loading,
            # which `import fastdiff` must not).
            from fastdiff.cache.build import build_from_model

            plan = {**values, "pixels": True, "dtype": torch.float32, "pin_memory": False}
            plan.update(on_miss="error", model=None)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            build_from_model(
                Path(cache), partial(DataLoader, subsets=subsets, **plan), Path(model), device=device
            )
        self._bucket_options = {k: values[k] for k in ("bucket_step", "min_bucket_side", "max_bucket_side")}
        self._native = _fastdiff.NativeLoader(
            natives,
            **{o.name: o.native_value(values[o.name]) for o in LOADER_OPTIONS if o.native},
        )
        report = self._native.report()
        if report["own_shards"] is not None:  # its plans differ from the sample-level split's
            self._state_options["shard_level"] = True
        if pending:
            fetch_pending(pending, report["own_shards"], _fastdiff.SHARD_INDEX_SUFFIX, on_error=on_error)
        for warning in report["warnings"]:
            warnings.warn(warning, UserWarning, stacklevel=2)

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

    def at_resolution(self, resolution: int) -> DataLoader:
        """This loader's images at another ``resolution`` (bucket area ≤ ``resolution²``), every other
        option kept: buckets, samples and plan are built anew from this loader's scan, as a new loader of
        the same data would build them, without reading any image file (a coarse-to-fine curriculum
        re-buckets between epochs this way). The new loader starts at epoch 0; its state records its
        ``resolution``, so only a loader at that resolution resumes from it.

        Raises:
            ValueError: ``resolution`` is out of range, or (``no_upscale``) leaves no image of a subset.
        """
        problem = LOADER["resolution"].problem(resolution)
        if problem is not None:
            raise ValueError(problem)
        other = copy.copy(self)
        other._native = self._native.rebucket(resolution=resolution, **self._bucket_options)
        other._state_options = {**copy.deepcopy(self._state_options), "resolution": resolution}
        other._epoch = other._resume_batch = other._iter_total = 0
        other._resume_done, other._resume_total, other._iter_done, other._position = [], None, [], None
        other._stats_source = other._last_stats = None
        return other

    def __len__(self) -> int:
        """Batches (steps) per epoch of this rank: exact, the same for every epoch and rank; repeats count."""
        return self._native.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` (≥ 0) for the next iteration: it keys the shuffle, crops and flips."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self._epoch:
            self._resume_batch, self._resume_done, self._resume_total = 0, [], None
        self._epoch, self._position = epoch, None

    def state_dict(self) -> dict[str, Any]:
        """Where the loader is, to resume from after a restart (save it with the model checkpoint).

        Returns:
            A dict of plain values: ``epoch`` and ``batches_consumed`` (the next iteration resumes there;
            at the end of an epoch this is the next epoch and 0); ``segments``, the global sample
            cursor: the stretches of the epoch consumed so far, each ``{"batch_size", "world_size",
            "batches"}`` (global batches of ``batch_size * world_size`` samples; the last is this
            loader's, with ``batches_consumed``; earlier ones exist after an elastic resume);
            ``num_batches``, ``rank``, ``world_size``, ``dataset_digest`` (16 hex digits over relative
            paths and headers) and ``options`` (every option that changes the batches; not
            ``batch_size``, ``world_size`` or rank, which the segments record, nor ``num_threads``,
            ``prefetch`` or ``on_error``).
        """
        if self._position is not None:
            (epoch, consumed), done, total = self._position, self._iter_done, self._iter_total
        else:
            epoch, consumed, done = self._epoch, self._resume_batch, self._resume_done
            total = len(self) if self._resume_total is None else self._resume_total
        if consumed >= total:
            epoch, consumed, done = epoch + 1, 0, []
        segments = [{"batch_size": b, "world_size": w, "batches": k} for b, w, k in done]
        segments.append({"batch_size": self.batch_size, "world_size": self.world_size, "batches": consumed})
        return {
            "epoch": epoch,
            "batches_consumed": consumed,
            "segments": segments,
            "num_batches": len(self),
            "rank": self.rank,
            "world_size": self.world_size,
            "dataset_digest": self._native.dataset_digest,
            "options": copy.deepcopy(self._state_options),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a loader over the same data and options).

        The next iteration runs the saved epoch from its first unconsumed batch; a following
        :meth:`set_epoch` with the same epoch keeps that, another epoch starts it from the beginning. A
        state from another rank of the same run is fine (all ranks are at the same step).

        Elastic resume: when this loader's ``batch_size`` or ``world_size`` differs from the state's
        last segment, the rest of the epoch is planned anew (``plan_rest`` in
        ``rust/core/src/sampler.rs``): the samples of every consumed global batch are removed from
        their buckets' shuffled order, and the remaining ones are cut into global batches of this
        loader's ``batch_size * world_size`` in a new seeded batch order. So each remaining sample
        appears exactly once, except at each bucket's last global batch, where this loader's policy
        applies as in any epoch: ``remainder="pad"`` repeats up to ``world_size - 1`` of its samples,
        ``remainder="drop"`` leaves out ``n % world_size`` of them, ``drop_last`` the whole short batch.
        Samples the saving run's geometry would have dropped or padded are in the remaining set, not
        lost. The resumed epoch then has :attr:`batches_left` batches instead of ``len(self)``; the
        next epochs are planned as usual.

        Raises:
            ValueError: A key is missing, the dataset or an option (named; ``shard_level``: the split) differ,
                the segments do not fit the epoch, or the geometry changed under shard-level assignment.
        """
        missing = {"epoch", "batches_consumed", "dataset_digest", "options"} - set(state)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        options = dict(state["options"])
        if "segments" in state:
            segments = [
                (int(g["batch_size"]), int(g["world_size"]), int(g["batches"])) for g in state["segments"]
            ]
        else:  # a state saved before segments: its options held the geometry
            geometry = (int(options.pop("batch_size", 1)), int(options.pop("world_size", 1)))
            segments = [(*geometry, int(state["batches_consumed"]))]
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
        epoch = int(state["epoch"])
        if epoch < 0 or not segments or any(min(g) < 0 or min(g[:2]) < 1 for g in segments):
            raise ValueError(f"state_dict has epoch={epoch}, segments={segments}")
        *done, (batch_size, world_size, consumed) = segments
        if (batch_size, world_size) != (self.batch_size, self.world_size):
            # Another geometry: its stretch is done (unless it consumed nothing), the rest is planned anew.
            done, consumed = done + [(batch_size, world_size, consumed)] * (consumed > 0), 0
        total = self._native.rest_batches(epoch, done) if done else len(self)
        if consumed > total:
            raise ValueError(f"state_dict has epoch={epoch}, batches_consumed={consumed} (of {total})")
        self._epoch, self._resume_batch, self._position = epoch, consumed, None
        self._resume_done, self._resume_total = done, (total if done else None)

    @property
    def batches_left(self) -> int:
        """Batches the next iteration yields: ``len(self)`` less those consumed of a resumed epoch (its
        rest after an elastic resume may hold more or fewer than ``len(self)``)."""
        total = len(self) if self._resume_total is None else self._resume_total
        return total - self._resume_batch

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

    def measure_quality(self) -> list[ImageQuality]:
        """Decode every image the scan accepted, small (JPEG by DCT scaling to >= 64 px a side) on the
        loader's threads with the GIL released, and measure it (``fastdiff scan --quality``;
        ``fastdiff.quality`` decides the flags): one :class:`fastdiff.types.ImageQuality` per image, in
        path order. An image that cannot be decoded gets its error instead of measures (it is not
        added to :attr:`report`).
        """
        return [
            ImageQuality(
                path=path,
                subset=subset,
                bucket=bucket,
                size=size,
                caption_found=found,
                measures=measures,
                error=error,
            )
            for path, subset, bucket, size, found, measures, error in self._native.quality()
        ]

    @property
    def report(self) -> Report:
        """What the scan and the loading so far found: a :class:`fastdiff.types.Report` (its docstring
        gives every key): ``found``, ``loaded``, ``held_out`` (by ``validation_split``), ``skipped``
        (path, code, message; ``loaded + held_out + len(skipped) == found`` always), formats, sizes,
        images per bucket, samples, small buckets, ``images_trained`` per epoch, ``bucket_merges``
        (``min_bucket_fill``) and the same per subset. Files failing while decoding are added as they
        are met."""
        return cast(Report, self._native.report())

    def stats(self) -> LoadStats | None:
        """Where the time of the epoch in progress (or else the last one) went; ``None`` before any.

        Always measured (a few clock reads per image). A :class:`fastdiff.types.LoadStats` (its
        docstring gives every key): counts of samples, failures, batches and threads, the workers'
        seconds per stage (summed over threads), their idle time, the consumer's wait for batches
        (``queue_wait_s``: near ``wall_s``, the loader starves the training step) and the wall time.
        """
        if self._stats_source is not None:
            return cast(LoadStats, self._stats_source.stats())
        return None if self._last_stats is None else self._last_stats.copy()

    def __iter__(self) -> Iterator[Batch]:
        epoch, start, done = self._epoch, self._resume_batch, self._resume_done
        self._iter_done, self._iter_total = done, self.batches_left + start
        self._epoch, self._resume_batch, self._resume_done, self._resume_total = epoch + 1, 0, [], None
        self._position = (epoch, start)
        factory = pinned_buffer if self.pin_memory else None
        batches = self._batches(self._native.iter_epoch(epoch, start, factory, done), epoch)
        if self.device is None:
            return batches
        if self.device.type == "cuda":
            return self._on_cuda(batches, self.device)
        return (to_device(b, self.device) for b in batches)

    def iter_build(
        self, start_batch: int = 0, missing_only: bool = False, rank_share: bool = False
    ) -> Iterator[Batch]:
        """The pixel batches a cache of this loader must encode (for ``fastdiff cache``).

        Every distinct (image, crop variant, flip state) once, whatever the rank: per bucket in
        :attr:`buckets` order, its images in path order, each image's ``crop_variants`` crops (one for a
        centre crop; variants landing on the same crop once), unflipped then flipped as ``flip_prob``
        allows; ``batch_size`` per batch, in a fixed order, so ``start_batch`` resumes it. Batches are
        as :meth:`__iter__`'s with ``pixel_values``, ``latent_keys`` (with a cache) and
        ``latent_provenance`` (per sample the JSON the builder stores with the entry); ``captions`` are
        the images' captions as read. A file that fails is left out of its batch (no stand-in) and added
        to :attr:`report`; with ``on_error="raise"`` it raises.

        With ``missing_only``, only the samples the cache lacks (those :meth:`build_latent_keys` gives
        as not cached), in the same order: on a complete cache no batch, and no image is read or
        decoded. That plan is fixed by the cache as this loader opened it.

        With ``rank_share``, only this loader's rank's share of that plan: its batches ``rank``,
        ``rank + world_size``, … (``fastdiff cache`` under torchrun: the ranks together encode the plan
        once); ``start_batch`` then counts batches of the share.

        Raises:
            ValueError: A random crop without ``crop_variants`` (its crops change every epoch).
        """
        return self._batches(self._native.iter_build(start_batch, missing_only, rank_share), None)

    def build_latent_keys(self) -> list[tuple[str | None, bool]]:
        """Per sample of the full :meth:`iter_build` plan, in its order, without decoding anything:
        ``(latent key, cached)``. The key is 32 hex digits, or ``None`` without a cache or a latent half
        or for a file that could not be read; ``cached`` is whether the cache, as this loader opened it,
        needs nothing encoded for it: the store serves the key (not from a corrupt shard) or the image's
        content hash is in the manifest's ``failed``.

        Raises:
            ValueError: As :meth:`iter_build`.
        """
        return self._native.build_latent_keys()

    def caption_variants(self) -> list[tuple[str, str | None]]:
        """Every caption a sample can get, each once, sorted, with its text key (32 hex digits; ``None``
        without a cache whose manifest has text): each image's ``text_variants`` caption variants (its
        caption as read without caption operations), plus ``""`` when a subset has caption dropout.

        Raises:
            ValueError: A subset shuffles or drops tags or picks caption lines without ``text_variants``.
        """
        return self._native.caption_variants()

    @property
    def content_hashes(self) -> list[str | None]:
        """With a cache, each image's content hash (32 hex digits: blake3 of its bytes at construction) in
        path order (``None`` for a file that could not be read); without one, all ``None``."""
        return self._native.content_hashes

    def _batches(self, it: _fastdiff.NativeEpochIter, epoch: int | None) -> Iterator[Batch]:
        weights = self._loss_weights
        total = self._iter_total
        self._stats_source = it
        try:
            for (
                pixels,
                captions,
                original_sizes,
                crop_top_lefts,
                target_sizes,
                paths,
                is_reg,
                subsets,
                *more,
            ) in it:
                # With a cache (or for the build) the native batch carries 4 more items.
                extra: list[Any] = more or [[], [], [], []]
                tensors, latent_keys, text_keys, provenance = extra
                if epoch is not None:
                    # Plan position after this batch (batches whose samples all failed are skipped over).
                    self._position = (epoch, total - len(it))
                batch: dict[str, Any] = {}
                if pixels is not None:
                    (h, w), b = target_sizes[0], len(captions)
                    batch["pixel_values"] = batch_tensor(pixels, self.dtype, (b, 3, h, w))
                for name, dtype, values in cast(list[tuple[str, str, Any]], tensors):
                    batch[name] = batch_tensor(values, getattr(torch, dtype), values.shape)
                batch.update(
                    captions=captions,
                    original_sizes=original_sizes,
                    crop_top_lefts=crop_top_lefts,
                    target_sizes=target_sizes,
                    paths=paths,
                    is_reg=torch.tensor(is_reg, dtype=torch.bool),
                    loss_weights=torch.tensor([weights[s] for s in subsets], dtype=torch.float32),
                )
                if self.cache is not None:
                    batch.update(latent_keys=latent_keys, text_keys=text_keys)
                if epoch is None:
                    batch["latent_provenance"] = provenance
                for i, tokenizer in enumerate(self.tokenizers):
                    batch["input_ids" if i == 0 else f"input_ids_{i + 1}"] = _input_ids(tokenizer, captions)
                yield cast(Batch, batch)
            if epoch is not None:
                self._position = None
        finally:
            it.close()
            if self._stats_source is it:
                self._last_stats, self._stats_source = cast(LoadStats, it.stats()), None

    def _on_cuda(self, batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
        """``batches`` (in pinned host memory) on the CUDA ``device``, each copied one batch ahead.

        Batch ``k + 1`` is copied on a side stream (``non_blocking``) before batch ``k`` is handed out, so
        the copy overlaps the consumer's work on ``k``. Before a batch is handed out the consumer's current
        stream waits on the event recorded after its copy, and its tensors are marked as used on that stream
        (``record_stream``) so the caching allocator does not reuse them early; the host batch is referenced
        until then, so its pinned buffer lives until the copy has completed. The position
        :meth:`state_dict` reports is that of the batch last handed out, not of the one copied ahead.
        """
        stream = torch.cuda.Stream(device)

        def start(host: Batch) -> _Pending:
            # The device memory comes from the side stream's pool and the source is pinned memory the
            # host allocator keeps until the copy is done: nothing to wait for before copying.
            with torch.cuda.stream(stream):
                moved = to_device(host, device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            return host, moved, done, self._position

        def finish(pending: _Pending) -> Batch:
            _host, moved, done, position = pending
            self._position = position
            current = torch.cuda.current_stream(device)
            current.wait_event(done)
            for value in moved.values():
                if isinstance(value, torch.Tensor):
                    value.record_stream(current)
            return moved

        ahead: _Pending | None = None
        try:
            for host in batches:
                nxt = start(host)
                if ahead is not None:
                    yield finish(ahead)
                ahead = nxt
            if ahead is not None:
                yield finish(ahead)
                self._position = None
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()


DataLoader.__doc__ = with_args(DataLoader.__doc__, LOADER_OPTIONS)


def _input_ids(tokenizer: Tokenizer, captions: list[str]) -> torch.Tensor:
    """``captions`` as ``[B, model_max_length]`` int64 token ids, as diffusers' ``train_text_to_image``
    scripts tokenize them (padded to and truncated at ``model_max_length``)."""
    ids = tokenizer(
        captions,
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return cast(torch.Tensor, ids)


def _distributed_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``rank``/``world_size`` as given, else from an initialised ``torch.distributed``, else 0 of 1."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    return (0 if rank is None else rank), (1 if world_size is None else world_size)
