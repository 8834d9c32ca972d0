"""The keys of a kohya-ss sd-scripts dataset config that are not fastdiff option names or aliases, each
defined once: how it is read, or why it is refused (re-exported by :mod:`fastdiff.options`, the schema).

A bottom layer: imports nothing from fastdiff but :mod:`fastdiff.option`.
"""

from __future__ import annotations

from fastdiff.option import ALL_TABLES, DATASET_TABLES, KohyaKey

#: The keys of a kohya-ss sd-scripts dataset config that are not option names or aliases (every other key
#: its ``docs/config_README-en.md`` documents is an option or alias above): how each is read, or why it is
#: refused. In ``[general]`` / ``[[datasets]]`` they set the loader's options, in a subset the subset's.
KOHYA_KEYS: tuple[KohyaKey, ...] = (
    KohyaKey(
        "flip_aug",
        bool,
        ALL_TABLES,
        "``true``: ``flip_prob = 0.5`` (kohya flips half the samples), ``false``: ``flip_prob = 0``.",
        options=("flip_prob",),
    ),
    KohyaKey(
        "random_crop",
        bool,
        ALL_TABLES,
        '``true``: ``crop = "random"``, ``false``: ``crop = "center"``.',
        options=("crop",),
    ),
    KohyaKey(
        "enable_bucket",
        bool,
        DATASET_TABLES,
        "``false``: one fixed ``resolution × resolution`` size (``bucket_step``, ``min_bucket_side`` and "
        "``max_bucket_side`` all ``resolution``, ``no_upscale`` off, as kohya ignores the bucket keys "
        "then); each image is resized to cover it and cropped (kohya does not resize: it needs images "
        "at least that large). ``true``: buckets, fastdiff's default (kohya's is ``false``).",
        options=("bucket_step", "min_bucket_side", "max_bucket_side", "no_upscale"),
    ),
    KohyaKey(
        "color_aug",
        bool,
        ALL_TABLES,
        "fastdiff has no colour augmentation (kohya's random hue shift): remove the key or set it "
        "``false``; augment ``batch['pixel_values']`` in the training step instead.",
        accepted=(False,),
    ),
    KohyaKey(
        "face_crop_aug_range",
        list,
        ALL_TABLES,
        "fastdiff has no face-centred crop (kohya reads face boxes from the file names): remove the key; "
        '``random_crop = true`` (``crop = "random"``) is the nearest.',
    ),
    KohyaKey(
        "cache_info",
        bool,
        ALL_TABLES,
        "fastdiff reads every image header in parallel at start and writes no ``metadata_cache.json``: "
        "remove the key or set it ``false`` (to cache latents and text embeddings: ``fastdiff cache``).",
        accepted=(False,),
    ),
    KohyaKey(
        "resize_interpolation",
        str,
        ALL_TABLES,
        "fastdiff has one resampling filter per loader, for enlarging and shrinking alike: remove the key "
        'and set ``filter`` (``"lanczos3"``, ``"catmullrom"``, ``"bilinear"``, ``"box"``, '
        '``"nearest"``) in ``[general]`` or ``[[datasets]]``.',
    ),
)
