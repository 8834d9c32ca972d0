"""The options of :class:`fastdiff.Subset` of its own (one folder's repeats, captions, weight, ...), each
defined once; :mod:`fastdiff.options` puts them together with the two loader options a subset may override
(``flip_prob``, ``crop``) into ``SUBSET_OPTIONS`` (see there).

A bottom layer: imports nothing from fastdiff but :mod:`fastdiff.types` and :mod:`fastdiff.option`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from fastdiff.option import SUBSET_TABLE, Option, subset_option

#: The subset-only options before the overrides, in the order of the ``Subset`` fields.
BEFORE_OVERRIDES: tuple[Option, ...] = (
    subset_option(
        "image_dir",
        str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        dataclasses.MISSING,
        "Folder of images, searched recursively; or WebDataset tar shards: a ``.tar`` path, a brace "
        "pattern of them (``data/shard-{0000..0099}.tar``) or a list of those.",
        details="In TOML, relative to the file's folder. Shards: see the README section \"Sharded and "
        'remote datasets".',
        toml=SUBSET_TABLE,
        state="never",
        native=False,
    ),
    subset_option(
        "num_repeats",
        int,
        1,
        "Times each image appears per epoch.",
        details="Each repeat is its own sample with its own crop, flip and caption draw, and counts in "
        "``len(loader)``.",
        minimum=1,
        bits=64,
    ),
    subset_option(
        "is_reg",
        bool,
        False,
        "Regularisation (class) images for DreamBooth prior preservation.",
        details='Their samples have ``batch["is_reg"]`` set.',
    ),
    subset_option(
        "loss_weight",
        float,
        1.0,
        "Weight of this subset's samples in the training loss.",
        details='Yielded per sample as ``batch["loss_weights"]``; the training loop (``fastdiff train``) '
        "multiplies each sample's loss by it. On a regularisation subset it is DreamBooth's "
        "``prior_loss_weight`` (Ruiz et al. 2023; kohya-ss ``prior_loss_weight``).",
        minimum=0,
        alias="weight",
        native=False,
    ),
    subset_option(
        "caption_extension",
        str | None,
        None,
        'Caption file extension with its dot (``".txt"``).',
        details="Ignored when captions come from a metadata file.",
        default_doc="the loader's ``caption_extensions``",
        native=False,
    ),
    subset_option(
        "keep_tokens",
        int,
        0,
        "Tags at the start of the caption that never move or drop out.",
        unit="tags",
        minimum=0,
        bits=64,
    ),
    subset_option(
        "shuffle_caption",
        bool,
        False,
        "Shuffle the tags after the first ``keep_tokens``, per sample and epoch.",
    ),
    subset_option(
        "caption_dropout_rate",
        float,
        0.0,
        'Probability that a sample\'s caption is ``""``.',
        minimum=0,
        maximum=1,
    ),
    subset_option(
        "caption_tag_dropout_rate",
        float,
        0.0,
        "Probability that each tag after the first ``keep_tokens`` is left out.",
        minimum=0,
        maximum=1,
    ),
    subset_option(
        "caption_separator",
        str,
        ",",
        "What separates tags; they are re-joined with it plus a space.",
    ),
    subset_option(
        "caption_per_line",
        bool,
        False,
        "Each non-empty line of a caption is a variant; one is used per sample and epoch.",
        details="Set automatically when ``metadata.jsonl`` gives a list of captions for an image.",
        native=False,
    ),
)

#: The subset-only options after the overrides.
AFTER_OVERRIDES: tuple[Option, ...] = (
    subset_option(
        "metadata_file",
        str | os.PathLike[str] | None,
        None,
        "Metadata file giving the captions: an HF imagefolder ``.jsonl``, or kohya-ss sd-scripts' "
        "``.json`` (any other name).",
        details="``.jsonl``: one JSON object per line with ``file_name`` (relative to the file's folder, "
        "which must lie inside ``image_dir``) and ``caption_column`` (a string, or a list of strings = "
        "several captions). Otherwise kohya's format (``finetune/merge_captions_to_metadata.py``): one "
        'object ``{"<image>": {"caption": ..., "tags": ...}}`` whose keys are image paths or paths '
        "without the extension, absolute or relative to ``image_dir`` (and inside it); the caption is "
        "``caption + caption_separator + tags`` (either may be missing), with ``enable_wildcard`` the "
        "tags added to each line. Images the file does not list have no caption (``class_tokens``).",
        default_doc="``image_dir/metadata.jsonl`` if it exists, else caption files",
        state="never",
        native=False,
    ),
    subset_option(
        "caption_column",
        str,
        "text",
        "Column holding the caption: of a ``.jsonl`` metadata file, or of ``.parquet`` shards.",
        native=False,
    ),
    subset_option(
        "image_column",
        str,
        "image",
        "Column of ``.parquet`` shards holding the encoded image: bytes, or as HF ``datasets`` stores "
        "its ``Image`` feature, a struct with a ``bytes`` field.",
        native=False,
    ),
    subset_option(
        "class_tokens",
        str | None,
        None,
        "The caption of an image that has none (no caption file, no metadata entry): kohya-ss "
        'DreamBooth ``class_tokens`` (``"sks dog"``).',
        details="Caption operations apply to it as to any caption; ``report['captions_missing']`` still "
        "counts such images.",
        default_doc="the empty caption",
        toml=SUBSET_TABLE,
        state="unless_default",
    ),
    subset_option(
        "caption_prefix",
        str | None,
        None,
        "Put before every caption, with a space, before the other caption operations (so shuffles and "
        "dropout include it; kohya-ss ``caption_prefix``).",
        state="unless_default",
    ),
    subset_option(
        "caption_suffix",
        str | None,
        None,
        "Put after every caption, with a space, before the other caption operations (kohya-ss "
        "``caption_suffix``).",
        state="unless_default",
    ),
    subset_option(
        "keep_tokens_separator",
        str | None,
        None,
        "Marks the fixed parts of a caption for the tag shuffle and tag dropout: in ``a, b ||| c, d "
        '||| e`` with ``"|||"``, ``a, b`` and ``e`` stay in place; replaces ``keep_tokens`` in a '
        "caption that contains it.",
        details="As in kohya-ss sd-scripts it acts only with ``shuffle_caption`` or "
        "``caption_tag_dropout_rate``; otherwise it stays in the caption.",
        state="unless_default",
    ),
    subset_option(
        "secondary_separator",
        str | None,
        None,
        "Joins several tags into one for the tag shuffle and tag dropout (``sky;;;cloud`` with "
        '``";;;"``), then is replaced by ``caption_separator`` (``sky,cloud``).',
        state="unless_default",
    ),
    subset_option(
        "enable_wildcard",
        bool,
        False,
        "Use one random line of a multi-line caption and replace each ``{a|b|c}`` by one of its "
        "options (``{{`` and ``}}`` are literal braces).",
        details="Drawn per sample and epoch (or among ``text_variants``), as the other caption operations.",
        state="unless_default",
    ),
    subset_option(
        "caption_dropout_every_n_epochs",
        int,
        0,
        'Every caption is ``""`` in every ``n``-th epoch (counting epochs from 1, as kohya-ss does: '
        "with 0-based ``epoch``, when ``(epoch + 1) % n == 0``); 0 = never.",
        unit="epochs",
        minimum=0,
        bits=64,
        state="unless_default",
    ),
)
