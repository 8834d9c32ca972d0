"""The shapes of what fastdiff hands out: batches, scan reports, load stats, and the option value types.

The lowest layer of the package: plain ``TypedDict`` and ``Literal`` definitions, importing nothing from
fastdiff, so every other module (and users' type annotations) can name them. At run time a batch, a
report or the stats are ordinary ``dict`` objects; these types only tell a type checker their keys.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, TypedDict, runtime_checkable

import torch

#: Where the bucket-sized window is cut from the resized image.
Crop = Literal["center", "random"]
#: What an unloadable file does while iterating: skipped (and reported) with a stand-in, or raised.
OnError = Literal["skip", "raise"]
#: Resampling filter of the resize.
Filter = Literal["lanczos3", "catmullrom", "bilinear", "box", "nearest"]
#: How a bucket's short last global batch is split across ranks.
Remainder = Literal["pad", "drop"]
#: How several ranks split tar shards: whole shards per rank when possible, or always samples.
ShardSplit = Literal["auto", "sample"]
#: Where batches' tensors go: a ``torch.device`` or its string (``"cuda"``, ``"cuda:1"``, ``"cpu"``).
Device = str | torch.device


@runtime_checkable
class Tokenizer(Protocol):
    """What the loader needs of a tokenizer (a ``transformers`` ``PreTrainedTokenizer``/``...Fast``):
    its ``model_max_length`` and a call taking a list of strings and keyword arguments."""

    model_max_length: int

    def __call__(self, text: list[str], **kwargs: Any) -> Any: ...


#: What a loader does about cache entries missing at construction: nothing (a sample without its
#: entry is a ``cache_miss`` failure), or encode them first with the given model.
OnMiss = Literal["error", "encode"]


class _BatchMeta(TypedDict):
    """The keys every :class:`Batch` has (see there)."""

    captions: list[str]
    original_sizes: list[tuple[int, int]]
    crop_top_lefts: list[tuple[int, int]]
    target_sizes: list[tuple[int, int]]
    paths: list[str]
    is_reg: torch.Tensor
    loss_weights: torch.Tensor


class Batch(_BatchMeta, total=False):
    """One batch of :class:`fastdiff.DataLoader`: ``B`` samples of one bucket ``(H, W)``.

    Keys (``pixel_values`` only when the loader decodes pixels; the cache keys only with ``cache``):
        pixel_values: ``[B, 3, H, W]`` tensor of the loader's ``dtype``: float dtypes scaled to
            ``[-1, 1]`` (``x / 127.5 - 1``), ``torch.uint8`` left as 0–255. Contiguous; pinned host
            memory with ``pin_memory=True``. Absent with ``pixels=False``.
        captions: ``B`` strings, after the subsets' caption operations (``""`` when dropped or absent).
        original_sizes: Upright ``(h, w)`` of each file, in pixels (SDXL micro-conditioning).
        crop_top_lefts: ``(top, left)`` of each crop in the resized image, in pixels, measured from the
            right edge when the sample was flipped (as SDXL and kohya-ss expect).
        target_sizes: The bucket's ``(h, w)``, in pixels, once per sample.
        paths: The files, as the scan found them.
        is_reg: ``[B]`` bool tensor: whether each sample is a regularisation (class) image.
        loss_weights: ``[B]`` float32 tensor: each sample's subset ``loss_weight`` (1.0 by default).
        latents: With a cache holding latents: ``[B, C, H / 8, W / 8]`` in the cache's dtype, the VAE
            posterior mean already shifted and scaled as the model expects (``(mean - shift) * scale``).
        latents_std: The posterior's std times the scale, same shape (draw ``latents + latents_std *
            randn_like(latents)`` per step as an uncached run draws from ``latent_dist``).
        prompt_embeds: With a cache holding text: ``[B, L, D]`` in the cache's dtype.
        pooled_prompt_embeds: ``[B, D]`` (SDXL, SD3, FLUX.1), when the cache holds them.
        prompt_attention_mask: ``[B, L]`` (Z-Image, whose ``prompt_embeds`` are zero-padded to ``L``):
            1 on each caption's tokens, 0 on the padding, in the cache's dtype.
        latent_keys: With a cache: each sample's latent entry key (32 hex digits; ``None`` without a
            latent half or for a file that could not be hashed).
        text_keys: With a cache: each sample's text entry key (``None`` without a text half).
        latent_provenance: Only from :meth:`fastdiff.DataLoader.iter_build`: per sample the JSON the
            cache builder stores with its latent entry (path, bucket, crop, resized size, flip).
        input_ids: With a ``tokenizer`` (or ``tokenizers``): ``[B, L]`` int64 tensor, ``captions``
            tokenized to ``L = model_max_length`` tokens, padded and truncated (the first tokenizer).
        input_ids_2: With two ``tokenizers`` (SDXL): the second tokenizer's ``[B, L2]``.
        masks: With ``mask_from_alpha`` or ``mask_dir``: ``[B, 1, H, W]`` float32 in ``[0, 1]`` (1 =
            trained), the mask through the sample's own crop window, flip and resize (box filter: the
            area average when downscaling; steps of 1/255).
        masks_latent: With a mask: ``[B, 1, H / f, W / f]`` float32, ``masks`` averaged over ``f``×``f``
            blocks (``f`` = ``vae_scale_factor``, default 8): the mask at the latents' resolution.
        control_pixel_values: With ``control_dir``: the control images through the sample's crop
            window, flip and resize, in ``pixel_values``' dtype and scaling: ``[B, 3, H, W]`` for one
            folder, ``[B, K, 3, H, W]`` for a list of ``K``.
    """

    pixel_values: torch.Tensor
    latents: torch.Tensor
    latents_std: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor
    latent_keys: list[str | None]
    text_keys: list[str | None]
    latent_provenance: list[str]
    input_ids: torch.Tensor
    input_ids_2: torch.Tensor
    masks: torch.Tensor
    masks_latent: torch.Tensor
    control_pixel_values: torch.Tensor


#: Why a file was skipped (``SkippedFile.code``), the strings of the core's ``SkipCode``: unreadable
#: (``io``), not a decodable image (``decode``), an image of a format this build does not decode, such
#: as AVIF or HEIF/HEIC (``unsupported``), header over ``max_pixels`` (``too_large``), under
#: one ``bucket_step`` with ``no_upscale`` (``too_small``), changed since the scan (``changed``), no
#: cache entry for it (``cache_miss``), a damaged cache file (``corrupt``), a bug caught while loading
#: it (``panic``), memory or a codec handle refused (``resource``), an internal failure (``internal``),
#: no mask file of its stem in ``mask_dir`` (``missing_mask``) or no control image in a ``control_dir``
#: (``missing_control``).
SkipCode = Literal[
    "io",
    "decode",
    "unsupported",
    "too_large",
    "too_small",
    "changed",
    "cache_miss",
    "corrupt",
    "panic",
    "resource",
    "internal",
    "missing_mask",
    "missing_control",
]


class SkippedFile(TypedDict):
    """A file the loader did not use.

    Keys:
        path: The file.
        code: Why, machine-readable: a :data:`SkipCode`.
        message: Why, for people; it names the file.
    """

    path: str
    code: SkipCode
    message: str


class ImageQuality(TypedDict):
    """One image's row of :meth:`fastdiff.DataLoader.measure_quality`.

    Keys:
        path: The file.
        subset: Index of its subset (the loader's order).
        bucket: Its bucket ``(h, w)`` in pixels.
        size: Its upright size ``(w, h)`` in pixels.
        caption_found: Whether it has a caption (file or metadata entry).
        measures: ``(content hash, dhash, transparent, coloured, detail)``: blake3 of the bytes (32 hex
            digits), the 64-bit difference hash, the transparent share of the area and the share of
            coloured opaque pixels, both in ``[0, 1]``, and the spread (std, levels) of the hash's 9×8
            luma cells (see ``fastdiff.quality``); ``None`` when it cannot be decoded.
        error: ``(code, message)`` when it cannot be decoded, else ``None``.
    """

    path: str
    subset: int
    bucket: tuple[int, int]
    size: tuple[int, int]
    caption_found: bool
    measures: tuple[str, int, float, float, float] | None
    error: tuple[str, str] | None


class SubsetReport(TypedDict):
    """What the scan found in one subset folder.

    Keys:
        root: The subset folder.
        is_reg: Whether it holds regularisation (class) images.
        num_repeats: Samples per image and epoch.
        images: Images accepted (repeats not counted).
        images_per_bucket: ``((h, w), images)`` for each bucket holding some of them.
        images_trained: Of ``images``, those an epoch trains (as :attr:`Report.images_trained`).
    """

    root: str
    is_reg: bool
    num_repeats: int
    images: int
    images_per_bucket: list[tuple[tuple[int, int], int]]
    images_trained: int


class BucketMerges(TypedDict):
    """What ``min_bucket_fill`` merged (:attr:`Report.bucket_merges`); zeros and ``[]`` without it.

    Keys:
        images_moved: Images moved out of their own bucket.
        samples_moved: Their samples (repeats counted).
        mean_aspect_error: Mean over the moved images of ``|ln(w/h) - ln(bw/bh)|`` at their new bucket
            (log-aspect; 0.1 is about a 10% aspect difference); 0 when none moved.
        max_aspect_error: The largest of those.
        mean_extra_crop: Mean extra share of the image area cropped away by the new bucket beyond what
            the image's own bucket crops (see ``max_extra_crop``).
        max_extra_crop: The largest; at most the ``max_extra_crop`` option.
        moves: ``((h, w) own bucket, (h, w) new bucket, images)`` per pair, in bucket order.
    """

    images_moved: int
    samples_moved: int
    mean_aspect_error: float
    max_aspect_error: float
    mean_extra_crop: float
    max_extra_crop: float
    moves: list[tuple[tuple[int, int], tuple[int, int], int]]


class ShardIo(TypedDict):
    """What the native workers read from one tar shard (:attr:`Report.io`).

    Keys:
        shard: The local shard file.
        opens: Times it was opened: one open and one positioned read (``pread``) per member read.
        bytes: Bytes read from it: the sum of the byte ranges of the members read (never a whole shard).
    """

    shard: str
    opens: int
    bytes: int


class PassedOver(TypedDict):
    """Files in the dataset folders that are not images (:attr:`Report.passed_over`).

    Keys:
        caption_files: Files ending in a caption extension (``.txt``, ``.caption``, or the subset's).
        other_files: Other files: no image extension and no image magic bytes.
        hidden: Hidden entries (name starting with ``.``) left out; a hidden folder counts once and
            is not entered.
    """

    caption_files: int
    other_files: int
    hidden: int


class Report(TypedDict):
    """What the scan and the loading so far found (:attr:`fastdiff.DataLoader.report`).

    Keys:
        root: The first subset's folder (for tar shards, the folder holding them).
        found: Image files found: by extension, or by their first bytes whatever their name.
        loaded: Files accepted; ``loaded + held_out + len(skipped) == found`` always.
        held_out: Images found but held out by ``validation_split``: the validation images in a
            training loader, the others in a ``validation=True`` loader (0 without a split).
        skipped: Files left out, with the reason; files failing while decoding are added as they are met.
        passed_over: The other files met, by kind (caption files, other files, hidden entries).
        formats: Files per format (``"jpeg"``, ``"png"``, ``"webp"``, ``"bmp"``, ``"tiff"``, ``"gif"``,
            ``"jxl"``).
        min_size: Upright ``(h, w)`` in pixels of the smallest accepted image, by area.
        max_size: The same of the largest.
        captions_missing: Accepted images without a caption.
        captions_fallback_encoding: Caption files that were not valid UTF-8/UTF-16 and were read as
            Windows-1252.
        images_per_bucket: ``((h, w), images)`` for each bucket holding some.
        samples: Samples per epoch over all ranks: accepted images times their subset's ``num_repeats``.
        small_buckets: ``((h, w), samples)`` of buckets with fewer samples than one global batch
            (``batch_size * world_size``): with ``drop_last`` they yield nothing, otherwise one short
            batch split by ``remainder``.
        images_trained: Of ``loaded``, the images epoch 0 trains: in at least one batch of some rank
            (``remainder="pad"`` repeats count once; samples ``drop_last`` or ``remainder="drop"`` leave
            out are not trained). The same every epoch unless a subset repeats its images and a bucket's
            last global batch is cut (which repeats are cut then varies).
        bucket_merges: What ``min_bucket_fill`` merged.
        subsets: Per subset, in order.
        warnings: Problems that lost no image, also raised as ``UserWarning`` at construction (a
            shard's stale index, ignored: its headers were read instead; why several ranks fell back
            to a sample-level split of tar shards).
        own_shards: With shard-level rank assignment, this rank's shards, sorted; else ``None``.
        io: What the workers read so far, per tar shard read from (sorted by path): opens and bytes,
            every epoch and the cache's content hashing counted.
    """

    root: str
    found: int
    loaded: int
    held_out: int
    skipped: list[SkippedFile]
    passed_over: PassedOver
    formats: dict[str, int]
    min_size: tuple[int, int]
    max_size: tuple[int, int]
    captions_missing: int
    captions_fallback_encoding: int
    images_per_bucket: list[tuple[tuple[int, int], int]]
    samples: int
    small_buckets: list[tuple[tuple[int, int], int]]
    images_trained: int
    bucket_merges: BucketMerges
    subsets: list[SubsetReport]
    warnings: list[str]
    own_shards: list[str] | None
    io: list[ShardIo]


class LoadStats(TypedDict):
    """Where the time of an epoch went (:meth:`fastdiff.DataLoader.stats`).

    Per-stage times are worker-thread **seconds** summed over threads (two threads busy for one second
    count 2 s); ``1000 * decode_s / samples`` is decode's worker-milliseconds per image.

    Keys:
        samples: Images loaded (with the epoch run to the end, every image it yielded).
        failed: Samples that failed to load (replaced by stand-ins or raised).
        batches: Batches yielded.
        threads: Worker threads.
        read_s: Reading files.
        probe_s: Header checks.
        decode_s: Decoding, with DCT scaling, EXIF rotation and alpha.
        resize_s: Resampling.
        write_s: Crop, flip, normalisation and the CHW write into the batch.
        other_s: The rest of the workers' busy time.
        busy_s: The sum of the six above.
        idle_s: Worker time with nothing to do (every started batch done or taken: raise ``prefetch``
            if this is large while the consumer waits).
        queue_wait_s: Time the consumer waited for a batch: near ``wall_s``, the training step is
            starved by the loader; near 0, the loader keeps up.
        wall_s: From the start of the epoch to its end (or to now).
    """

    samples: int
    failed: int
    batches: int
    threads: int
    read_s: float
    probe_s: float
    decode_s: float
    resize_s: float
    write_s: float
    other_s: float
    busy_s: float
    idle_s: float
    queue_wait_s: float
    wall_s: float
