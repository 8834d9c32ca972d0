"""The loader options, each defined once: name, type, default, allowed values, unit, docs, TOML key, alias.

Everything else on the Python side derives from :data:`LOADER_OPTIONS` and :data:`SUBSET_OPTIONS`: the
checks in :class:`fastdiff.DataLoader` and :meth:`fastdiff.Subset.native`, the keys each table of a
dataset TOML accepts (``fastdiff.dataset``), the ``fastdiff scan`` flags, what a loader's ``state_dict``
records, and (rendered by :mod:`fastdiff.docs`) the ``Args`` sections of the ``DataLoader`` and
``Subset`` docstrings and the README's options table. The ``DataLoader`` signature and the ``Subset``
fields spell the names, types and defaults out again for users and type checkers;
``tests/test_options.py`` holds them equal to the schema.
(The Rust core has its own single definition, ``LoaderOptions``, and checks everything again.)

A bottom layer: imports nothing from fastdiff but :mod:`fastdiff.types` and :mod:`fastdiff.option` (what
an option record is; its names are re-exported here).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from fastdiff.kohya import KOHYA_KEYS
from fastdiff.option import (
    ALL_TABLES,
    DATASET_TABLES,
    SUBSET_TABLE,
    KohyaKey,
    Option,
    Table,
    loader_option,
    saved,
    subset_override,
)
from fastdiff.subset_options import AFTER_OVERRIDES, BEFORE_OVERRIDES
from fastdiff.types import Crop, Device, Filter, OnError, OnMiss, Remainder, ShardSplit, Tokenizer

__all__ = [
    "ALL_TABLES",
    "DATASET_TABLES",
    "KOHYA_KEYS",
    "LOADER",
    "LOADER_OPTIONS",
    "SUBSET",
    "SUBSET_OPTIONS",
    "SUBSET_TABLE",
    "KohyaKey",
    "Option",
    "Table",
    "saved",
]


CROP = loader_option(
    "crop",
    Crop,
    "center",
    "Where the bucket-sized window is cut from the image resized to cover its bucket.",
    toml=DATASET_TABLES,
)
FLIP_PROB = loader_option(
    "flip_prob",
    float,
    0.0,
    "Probability of a horizontal flip per sample.",
    minimum=0,
    maximum=1,
    toml=DATASET_TABLES,
)

#: The options of :class:`fastdiff.DataLoader`, in the order of its signature (after ``root`` and
#: ``subsets``, which say where the data is).
LOADER_OPTIONS: tuple[Option, ...] = (
    loader_option(
        "resolution",
        int,
        512,
        "Training resolution: bucket areas are at most ``resolution²``.",
        details="At least ``bucket_step``; one that is not a multiple of ``bucket_step`` warns "
        "(``UserWarning``): the square bucket is then ``resolution`` rounded down to a multiple of "
        "``bucket_step``.",
        unit="px",
        minimum=1,
        bits=32,
        toml=DATASET_TABLES,
        scan=True,
    ),
    loader_option(
        "batch_size",
        int,
        1,
        "Images per batch.",
        unit="images",
        minimum=1,
        bits=64,
        # A resumed loader may change it (elastic resume): the state records it per segment.
        state="never",
        toml=DATASET_TABLES,
        scan=True,
    ),
    loader_option(
        "bucket_step",
        int,
        64,
        "Bucket sides are multiples of this (64 for SD/SDXL latents).",
        unit="px",
        minimum=1,
        bits=32,
        toml=DATASET_TABLES,
        alias="bucket_reso_steps",
        scan=True,
    ),
    loader_option(
        "min_bucket_side",
        int | None,
        None,
        "Smallest bucket side.",
        details="At most ``resolution`` rounded down to a multiple of ``bucket_step``.",
        default_doc="``resolution // 2``",
        unit="px",
        minimum=1,
        bits=32,
        toml=DATASET_TABLES,
        alias="min_bucket_reso",
        scan=True,
    ),
    loader_option(
        "max_bucket_side",
        int | None,
        None,
        "Largest bucket side.",
        details="At least ``resolution``.",
        default_doc="``2 * resolution``",
        unit="px",
        minimum=1,
        bits=32,
        toml=DATASET_TABLES,
        alias="max_bucket_reso",
        scan=True,
    ),
    loader_option(
        "no_upscale",
        bool,
        False,
        "Never enlarge an image (kohya-ss sd-scripts ``bucket_no_upscale``).",
        details="An image that covers its usual bucket keeps it (a 3072×3000 photo at resolution 1024 "
        "gets 1024×1024); a smaller one gets the largest ``bucket_step``-aligned bucket it covers: its "
        "size scaled down to area ``resolution²`` if larger, each side rounded down to a multiple of "
        "``bucket_step`` and capped at ``max_bucket_side`` (such buckets may be below "
        "``min_bucket_side`` and join ``DataLoader.buckets``). An image narrower or shorter than "
        '``bucket_step`` fits no bucket: it is skipped with code ``"too_small"`` (with '
        '``on_error="raise"``, ``fastdiff.ImageTooSmallError`` at construction). Off, every image is resized '
        "to cover its bucket, enlarging small ones.",
        toml=DATASET_TABLES,
        alias="bucket_no_upscale",
        scan=True,
        state="unless_default",
    ),
    loader_option(
        "min_bucket_fill",
        int | None,
        None,
        "Merge buckets holding fewer than this many samples into the nearest bucket in log-aspect, "
        "when the extra crop stays within ``max_extra_crop``.",
        details="A bucket's count is its samples per epoch over all ranks (images times their subset's "
        "``num_repeats``): to fill whole global batches use ``batch_size * world_size``. Greedy and "
        "deterministic (``merge_small_buckets`` in ``rust/core/src/bucket.rs``): repeatedly the "
        "bucket with the fewest samples below the fill (ties: the earlier bucket in "
        "``DataLoader.buckets``) moves all its images into the nearest bucket by "
        "``|ln(w/h) - ln(w'/h')|`` that each of them may move to, preferring one still below the fill "
        "(two small buckets fill each other), ties to the earlier bucket; with ``no_upscale`` only into "
        "buckets no larger than the image. A bucket with nowhere to go stays as it is "
        '(``report["small_buckets"]``). Moved images get the new bucket\'s size, crop, '
        '``crop_top_lefts`` and ``target_sizes`` like its own images; ``report["bucket_merges"]`` '
        "says how many moved and their mean and max aspect error.",
        default_doc="no merging",
        unit="samples",
        minimum=1,
        bits=64,
        toml=DATASET_TABLES,
        scan=True,
        state="unless_default",
    ),
    loader_option(
        "max_extra_crop",
        float,
        0.10,
        "Largest extra crop ``min_bucket_fill`` may give an image, as a share of its area.",
        details="An image of aspect ``a = w/h`` resized to cover a bucket of aspect ``b`` keeps "
        "``min(a, b) / max(a, b)`` of its area, so the bucket crops ``c(b) = 1 - exp(-|ln a - ln b|)`` "
        "away (before rounding to whole pixels). Moving it from its own bucket ``b0`` to ``b1`` is "
        "allowed when ``c(b1) - c(b0) <= max_extra_crop``, measured against its own bucket however "
        "often it moved: at 0.10 a square image may go to 10:9 but not to 5:4.",
        minimum=0,
        maximum=1,
        toml=DATASET_TABLES,
        scan=True,
        state="unless_default",
    ),
    CROP,
    FLIP_PROB,
    loader_option(
        "crop_variants",
        int | None,
        None,
        "With a random crop: the number of seeded crops each image has; each sample uses one, drawn per "
        "epoch.",
        details="Crop ``v`` of an image lies at offsets drawn from ``(seed, v, image)``, and a sample of "
        "epoch ``e`` uses crop ``v = floor(K * u(seed, e, sample))``, so an image shows at most ``K`` "
        "crops over all epochs (flips stay a per-epoch draw). A latent cache holds every image's ``K`` "
        "crops (both flip states when flips are on), so caching random crops needs it: the crops are "
        "frozen into the cache. Without it (``None``) every epoch draws a new crop. A centre crop is one "
        "crop whatever ``K``.",
        default_doc="a new crop per sample and epoch",
        unit="crops",
        minimum=1,
        bits=32,
        toml=DATASET_TABLES,
        state="unless_default",
        scan=True,
    ),
    loader_option(
        "text_variants",
        int | None,
        None,
        "The number of seeded results the subsets' caption operations (``caption_per_line`` choice, "
        "wildcards, tag shuffle, tag dropout) have per image; each sample uses one, drawn per epoch.",
        details="Variant ``t`` of an image's caption is keyed by ``(seed, t, image)``, and a sample of "
        "epoch ``e`` uses ``t = floor(K * u(seed, e, sample))``, so a text-embedding cache can hold "
        "all ``K``. Whole-caption dropout (``caption_dropout_rate``, ``caption_dropout_every_n_epochs``) "
        'stays a per-epoch draw giving ``""`` (one shared cache entry). Without it (``None``) every epoch '
        "applies the operations anew.",
        default_doc="new caption operations per sample and epoch",
        unit="captions",
        minimum=1,
        bits=32,
        toml=DATASET_TABLES,
        state="unless_default",
        scan=True,
    ),
    loader_option(
        "shuffle",
        bool,
        True,
        "Shuffle images within buckets and the order of batches, per epoch.",
        toml=DATASET_TABLES,
    ),
    loader_option(
        "seed",
        int,
        0,
        "Seed of every random choice (shuffles, crops, flips, caption operations).",
        minimum=0,
        bits=64,
        toml=DATASET_TABLES,
    ),
    loader_option(
        "drop_last",
        bool,
        False,
        "Drop each bucket's last batch when it is smaller than ``batch_size``.",
        details='Its samples are not trained that epoch: ``report["images_trained"]`` counts what is.',
        toml=DATASET_TABLES,
        scan=True,
    ),
    loader_option(
        "num_threads",
        int | None,
        None,
        "Worker threads decoding the batches.",
        default_doc="every core this process may run on",
        unit="threads",
        minimum=1,
        bits=64,
        state="never",
    ),
    loader_option(
        "prefetch",
        int | None,
        None,
        "Batches in flight (being decoded or ready) ahead of the consumer.",
        details="Bounds memory: each holds ``B·3·H·W`` values.",
        default_doc="enough to keep every thread busy plus one batch ready, "
        "``max(2, ceil(num_threads / batch_size) + 1)``",
        unit="batches",
        minimum=1,
        bits=64,
        state="never",
    ),
    loader_option(
        "dtype",
        torch.dtype,
        torch.float32,
        "Element type of ``pixel_values``.",
        details="Float dtypes are scaled to ``[-1, 1]`` (``x / 127.5 - 1``, as torchvision ``ToTensor`` + "
        "``Normalize([0.5], [0.5])``); ``torch.uint8`` is left as 0–255.",
        choices=(torch.float32, torch.float16, torch.bfloat16, torch.uint8),
    ),
    loader_option(
        "pin_memory",
        bool,
        False,
        "Write each batch straight into page-locked (pinned) host memory from torch's pinned-memory "
        "allocator.",
        details='Then ``pixel_values.to("cuda", non_blocking=True)`` copies asynchronously (as '
        "``torch.utils.data.DataLoader(pin_memory=True)``, without its extra copy). Without CUDA it "
        "warns and is ignored, as torch's DataLoader does. Otherwise batches live in recycled memory: "
        "when the last tensor viewing a batch is freed, its buffer is reused for a later batch (no "
        "allocation or zero-fill per batch).",
        state="never",
        native=False,
    ),
    loader_option(
        "caption_extensions",
        Sequence[str],
        (".txt", ".caption"),
        "Caption file extensions tried in order, each with its leading dot.",
    ),
    loader_option(
        "background",
        tuple[int, int, int],
        (255, 255, 255),
        "Colour that transparent pixels are composited onto.",
        unit="R, G, B",
        minimum=0,
        maximum=255,
    ),
    loader_option(
        "on_error",
        OnError,
        "skip",
        "What a file that cannot be loaded does while iterating.",
        details='``"skip"`` records it in ``DataLoader.report`` and loads a stand-in in its place: '
        "another sample of the same bucket, drawn with the seed (up to 7 draws), else (a sample alone "
        "in its bucket, or a bucket of broken files) the next sample of the dataset that loads, cropped "
        "to this bucket. So batches keep their size, ``len(loader)`` stays exact and ranks stay in "
        'step, unless no file of the dataset loads. ``"raise"`` raises ``fastdiff.DecodeError`` '
        "naming the file.",
        toml=DATASET_TABLES,
        state="never",
    ),
    loader_option("filter", Filter, "lanczos3", "Resampling filter of the resize.", toml=DATASET_TABLES),
    loader_option(
        "max_pixels",
        int,
        178_956_970,
        "Decompression-bomb guard: an image whose header declares more pixels (``width * height``) is "
        "refused before any pixel memory is allocated.",
        details='It is skipped with code ``"too_large"`` and a message giving its size (or raises '
        '``fastdiff.DecodeError`` with ``on_error="raise"``). The default is Pillow\'s '
        "``Image.MAX_IMAGE_PIXELS``.",
        unit="pixels",
        minimum=1,
        bits=64,
        toml=DATASET_TABLES,
        scan=True,
    ),
    loader_option(
        "rank",
        int | None,
        None,
        "This process's rank among ``world_size``.",
        default_doc="``torch.distributed.get_rank()`` when initialised, else 0",
        minimum=0,
        bits=64,
        state="never",
    ),
    loader_option(
        "world_size",
        int | None,
        None,
        "Number of ranks; each takes its slice of every global batch of ``batch_size * world_size``.",
        default_doc="``torch.distributed.get_world_size()`` when initialised, else 1",
        minimum=1,
        bits=64,
        # A resumed loader may change it (elastic resume): the state records it per segment.
        state="never",
    ),
    loader_option(
        "remainder",
        Remainder,
        "pad",
        "How a bucket's short last global batch is split across ranks.",
        details='``"pad"`` repeats some of its samples so each rank gets ``ceil(n / world_size)``, '
        '``"drop"`` leaves out ``n % world_size`` of them (and the batch, if it has fewer than '
        "``world_size``).",
        toml=DATASET_TABLES,
    ),
    loader_option(
        "shard_split",
        ShardSplit,
        "auto",
        "How several ranks split tar shards.",
        details='``"auto"``: whole shards per rank (each rank opens only its own shards and reads only '
        "its samples' byte ranges) when every shard has a current index (``fastdiff index``) and at "
        "least ``world_size`` shards hold images, else the sample-level split with a warning saying "
        'why; ``"sample"``: always the sample-level split (every rank reads every shard). README '
        '"Sharded and remote datasets".',
        toml=DATASET_TABLES,
        # The state records the split actually used (key "shard_level" of its options).
        state="never",
    ),
    loader_option(
        "cache",
        str | os.PathLike[str] | None,
        None,
        "A cache folder made by ``fastdiff cache``: each batch also gets the cached tensors of its "
        "samples (``latents``, ``latents_std``, ``prompt_embeds``, ``pooled_prompt_embeds``) and their "
        "``latent_keys`` / ``text_keys``.",
        details="Entries are keyed by each file's content hash and everything that changes its pixels or "
        "caption, so the batches are those of the uncached run (same order, crops, captions, SDXL sizes, "
        "resume and rank split). Per batch of ``B`` samples of bucket ``(H, W)``: ``latents`` and "
        "``latents_std`` ``[B, C, H / f, W / f]``, ``prompt_embeds`` ``[B, L, D]`` and SDXL's "
        "``pooled_prompt_embeds`` ``[B, P]``, each present when the cache has that half, in its dtype "
        "(``torch.bfloat16``, ``torch.float16`` or ``torch.float32``), with ``C``, ``f``, ``L``, ``D``, "
        "``P`` as its manifest says (4, 8, 77, 768 or 2048, 1280 for SD 1.x and SDXL). At construction "
        "every image's bytes are hashed and every shard's header is read: a truncated or unparsable shard "
        "is not served (its entries are missing). A random crop needs ``crop_variants`` and caption "
        "operations beyond dropout need ``text_variants`` (else ``ValueError``). A sample whose entry is "
        "missing: see ``on_miss``. An entry whose checksum does not match is a "
        "``fastdiff.CorruptCacheError`` naming the shard and key (skipped as ``corrupt`` with a stand-in "
        'under ``on_error="skip"``); an image the builder could not encode fails as it would uncached. '
        "A folder without ``fastdiff-cache.json`` is a ``FileNotFoundError``, an unreadable manifest a "
        "``fastdiff.CorruptCacheError``.",
        state="never",
        scan=True,
    ),
    loader_option(
        "pixels",
        bool | None,
        None,
        "Decode ``pixel_values`` too; without them a cached batch reads no image file.",
        default_doc="``True`` without a ``cache``, ``False`` with one",
        state="never",
    ),
    loader_option(
        "validation_split",
        float,
        0.0,
        "Share in ``[0, 1)`` of the images held out for validation: this loader never yields them "
        "(with ``validation=True`` it yields only them).",
        details="An image is held out when a uniform draw keyed by (``seed``, a 64-bit FNV-1a hash of its "
        "path relative to its subset's folder) is below the share, so the same images are held out on "
        "every run, rank and resume, adding images never moves others in or out, and about that share "
        "of each subset is held out (exactly so only on average). Held-out images are taken out right "
        'after the scan and counted in ``report["held_out"]`` (``loaded + held_out + len(skipped) == '
        "found``). A subset left with no image is a ``ValueError``.",
        minimum=0.0,
        maximum=1.0,
        toml=DATASET_TABLES,
        scan=True,
        state="unless_default",
    ),
    loader_option(
        "validation",
        bool,
        False,
        "Yield the images ``validation_split`` holds out instead of the others: the validation loader.",
        details="Needs ``validation_split > 0`` (else ``ValueError``); build it with the training "
        "loader's ``seed`` and ``validation_split`` (and ``shuffle=False`` for a fixed order).",
        state="unless_default",
    ),
    loader_option(
        "mask_from_alpha",
        bool,
        False,
        'Each image\'s alpha channel (before compositing) becomes its loss mask ``batch["masks"]``: '
        "opaque = 1 = trained, transparent = 0.",
        details="The mask takes the target's crop window, flip and resize (box filter: the area average "
        'when downscaling, values ``v / 255`` in [0, 1]); ``batch["masks"]`` is float32 ``[B, 1, H, W]`` '
        'and ``batch["masks_latent"]`` float32 ``[B, 1, H / f, W / f]``, its mean over ``f``×``f`` '
        "blocks (``f`` = ``vae_scale_factor``). An image without alpha (every JPEG) gets an all-ones "
        "mask. Not with ``mask_dir`` (``ValueError``). With a mask, ``fastdiff train`` trains the masked "
        'loss (``fastdiff.training.objective.weighted_mse``). README "Masks and control images".',
        scan=True,
        state="unless_default",
        toml=DATASET_TABLES,
        alias="alpha_mask",
    ),
    loader_option(
        "mask_dir",
        str | os.PathLike[str] | None,
        None,
        "A folder of mask files, one per image at the image's relative path and stem (``a/b.jpg`` -> "
        '``mask_dir/a/b.png``), giving ``batch["masks"]`` as ``mask_from_alpha`` does: 255 = 1 = trained.',
        details='Any image format; read as grayscale (a colour file by Pillow\'s ``convert("L")`` '
        "luminance, alpha composited onto black). A mask of another size than its image is mapped "
        "proportionally (as if resized to the image's size first). An image without its mask is "
        "skipped as ``missing_mask`` (``require_pairs``: ``FileNotFoundError``); a mask no image pairs "
        'with is a warning ``orphan_mask`` in ``report["warnings"]``; both name the file one character '
        "apart when there is one.",
        scan=True,
        state="never",
        toml=DATASET_TABLES,
    ),
    loader_option(
        "control_dir",
        str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
        None,
        "A folder of control (conditioning) images paired with the images like ``mask_dir``, or a list "
        'of such folders: ``batch["control_pixel_values"]``.',
        details="Each control image takes the target's crop window, flip, resize filter, dtype and "
        "normalisation: ``[B, 3, H, W]`` like ``pixel_values`` for one folder, ``[B, K, 3, H, W]`` for a "
        "list of ``K`` (in the list's order). A control image of another size than its image is mapped "
        "proportionally (as if resized to the image's size first). Unpaired files: as for ``mask_dir``, "
        "codes ``missing_control`` and ``orphan_control``.",
        scan=True,
        state="never",
        toml=DATASET_TABLES,
    ),
    loader_option(
        "require_pairs",
        bool,
        False,
        "An image without its mask or control file is an error (``FileNotFoundError`` naming it) instead "
        "of a skip in the report.",
        details='With ``on_error="raise"`` too. Without it the image is skipped (``missing_mask`` / '
        "``missing_control``) and ``loaded + len(skipped) == found`` still holds.",
        scan=True,
        state="unless_default",
        toml=DATASET_TABLES,
    ),
    loader_option(
        "vae_scale_factor",
        int,
        8,
        'The VAE\'s downscale: ``batch["masks_latent"]`` is the mask averaged over blocks of this side.',
        details="8 for SD 1.x, SDXL, SD3 and FLUX.1. Must divide ``bucket_step`` when there is a mask "
        "(``ValueError``).",
        unit="px",
        minimum=1,
        bits=32,
        state="unless_default",
        toml=DATASET_TABLES,
    ),
    loader_option(
        "device",
        Device | None,
        None,
        'Where each batch\'s tensors arrive (``accelerator.device``, ``"cuda"``, a ``torch.device``).',
        details="On a CUDA device batches are written into pinned memory and copied on a side CUDA "
        "stream one batch ahead, so the copy of batch ``k + 1`` overlaps the step on batch ``k``; the "
        "consumer's stream waits on the copy's event before the batch is handed out, and the pinned "
        "buffer is held until the copy has finished. A CUDA device without CUDA warns (``UserWarning``) "
        "and batches stay on the CPU, as ``pin_memory`` does; other devices get a plain ``.to(device)``. "
        "Lists (``captions``, sizes, paths) stay Python lists.",
        default_doc="host memory",
        state="never",
        native=False,
    ),
    loader_option(
        "tokenizer",
        Tokenizer | None,
        None,
        'A ``transformers`` tokenizer: each batch also gets ``batch["input_ids"]``, its ``captions`` '
        "tokenized as the diffusers training scripts do.",
        details='``tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", '
        'truncation=True, return_tensors="pt").input_ids``: ``[B, model_max_length]`` int64.',
        state="never",
        native=False,
    ),
    loader_option(
        "tokenizers",
        Sequence[Tokenizer] | None,
        None,
        'Several tokenizers (SDXL\'s two): ``batch["input_ids"]`` from the first, ``input_ids_2``, '
        "``input_ids_3``, ... from the others, each as ``tokenizer`` does.",
        details="Give ``tokenizer`` or ``tokenizers``, not both (``ValueError``).",
        state="never",
        native=False,
    ),
    loader_option(
        "on_miss",
        OnMiss,
        "error",
        "Entries this loader's samples need and ``cache`` lacks: a miss when a sample needs one "
        '(``"error"``), or encoded with ``model`` at construction (``"encode"``).',
        details='``"error"``: nothing at construction; a sample whose entry is missing fails with '
        '``fastdiff.CacheMissError`` naming the file and what changed (under ``on_error="skip"`` it is '
        'skipped as ``cache_miss`` with a stand-in). ``"encode"``: construction first encodes the '
        "missing entries into ``cache`` with ``model`` (the build ``fastdiff cache --model MODEL`` runs "
        "with these options: both halves, each in the dtype the cache has for it, else the dtype the "
        "VAE weights are stored in; the encoders run on CUDA when available, else the CPU, and are "
        "freed before serving), then serves; it loads the VAE and the text encoders even when nothing is "
        "missing. Needs ``cache`` and ``model`` (else ``ValueError``).",
        state="never",
        native=False,
    ),
    loader_option(
        "model",
        str | os.PathLike[str] | None,
        None,
        "Local diffusers pipeline folder whose VAE and text encoders encode what ``cache`` lacks "
        '(``on_miss="encode"``).',
        details='Only with ``on_miss="encode"`` (else ``ValueError``). A folder with ``model_index.json``, '
        "``vae/``, ``text_encoder/`` and ``tokenizer/`` (SDXL: also ``text_encoder_2/``, "
        "``tokenizer_2/``); nothing is downloaded. A different VAE or text encoder than the cache was "
        "built with changes that half's salt: all its entries are then missing and re-encoded.",
        state="never",
        native=False,
    ),
)

#: The fields of :class:`fastdiff.Subset`, in order.
SUBSET_OPTIONS: tuple[Option, ...] = (
    *BEFORE_OVERRIDES,
    subset_override(FLIP_PROB, "Flip probability of this subset's samples."),
    subset_override(CROP, "Crop of this subset's samples."),
    *AFTER_OVERRIDES,
)


#: Each option by name.
LOADER: dict[str, Option] = {o.name: o for o in LOADER_OPTIONS}
SUBSET: dict[str, Option] = {o.name: o for o in SUBSET_OPTIONS}
