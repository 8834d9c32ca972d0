"""The loader options, each defined once: name, type, default, allowed values, unit, docs, TOML key, alias.

Everything else on the Python side derives from :data:`LOADER_OPTIONS` and :data:`SUBSET_OPTIONS`: the
checks in :class:`fastdiff.DataLoader` and :meth:`fastdiff.Subset.native`, the keys each table of a
dataset TOML accepts (``fastdiff.dataset``), the ``fastdiff scan`` flags, what a loader's ``state_dict``
records, and (rendered by :mod:`fastdiff.docs`) the ``Args`` sections of the ``DataLoader`` and
``Subset`` docstrings and the README's options table. The ``DataLoader`` signature and the ``Subset``
fields spell the names, types and defaults out again for users and type checkers;
``tests/test_options.py`` holds them equal to the schema.
(The Rust core has its own single definition, ``LoaderOptions``, and checks everything again.)

A bottom layer: imports nothing from fastdiff but :mod:`fastdiff.types`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import numpy as np
import torch

from fastdiff.types import Crop, Filter, OnError, Remainder

#: The tables of a dataset TOML (kohya-ss sd-scripts layout; see :func:`fastdiff.load_config`).
Table = Literal["[general]", "[[datasets]]", "[[datasets.subsets]]"]
#: Loader options may be set in the dataset-wide tables.
DATASET_TABLES: tuple[Table, ...] = ("[general]", "[[datasets]]")
#: Subset options may be set per subset, or in the dataset-wide tables as defaults of every subset.
ALL_TABLES: tuple[Table, ...] = (*DATASET_TABLES, "[[datasets.subsets]]")
SUBSET_TABLE: tuple[Table, ...] = ("[[datasets.subsets]]",)


@dataclass(frozen=True)
class Option:
    """One option of :class:`fastdiff.DataLoader` or :class:`fastdiff.Subset`.

    Attributes:
        name: The keyword argument / field name, also the TOML key.
        annotation: The Python type of its values, as the signature spells it; the checks follow from
            it: ``int``, ``float``, ``bool``, ``str``, a ``Literal`` (or ``choices``), a path,
            ``tuple[int, int, int]``, ``Sequence[str]``; ``| None`` lets ``None`` through.
        default: The default value (``dataclasses.MISSING``: required).
        doc: One-line description: the README table, ``--help`` and the start of the docstring entry.
        scope: ``"loader"`` (a ``DataLoader`` argument) or ``"subset"`` (a ``Subset`` field).
        details: The rest of the docstring entry (semantics, interactions with other options).
        default_doc: What a ``None`` default means (``"resolution // 2"``).
        unit: Unit of the values (``"px"``).
        minimum: Smallest allowed value of a number (each element of an int tuple).
        maximum: Largest allowed value of a number (each element of an int tuple).
        bits: An int must be below ``2**bits`` (the native unsigned type's width).
        choices: The allowed values when the annotation is not a ``Literal`` (``torch.dtype``).
        toml: The dataset TOML tables that accept it as a key (empty: not a TOML key).
        alias: Its kohya-ss sd-scripts name, accepted as a TOML key instead.
        scan: Whether ``fastdiff scan`` takes it as a flag (``--max-bucket-side``).
        state: Whether a loader's ``state_dict`` records it (a resumed loader must match): ``"always"``,
            ``"unless_default"`` (an option newer than saved states: recorded only when changed, so
            older states still load) or ``"never"`` (it does not change the batches).
        native: Whether it is passed, under its own name, to the native constructor.
    """

    name: str
    annotation: Any
    default: Any
    doc: str
    scope: Literal["loader", "subset"]
    details: str = ""
    default_doc: str = ""
    unit: str = ""
    minimum: float | None = None
    maximum: float | None = None
    bits: int | None = None
    choices: tuple[Any, ...] = ()
    toml: tuple[Table, ...] = ()
    alias: str | None = None
    scan: bool = False
    state: Literal["always", "unless_default", "never"] = "always"
    native: bool = True

    @property
    def nullable(self) -> bool:
        """Whether ``None`` is allowed."""
        return type(None) in _union_args(self.annotation)

    @property
    def kind(self) -> Literal["int", "float", "bool", "str", "choice", "path", "ints", "strs"]:
        """What the values are, read from the annotation."""
        args = [a for a in _union_args(self.annotation) if a is not type(None)]
        if set(args) == {str, os.PathLike[str]}:
            return "path"
        (core,) = args
        if self.choices or get_origin(core) is Literal:
            return "choice"
        if get_origin(core) is tuple:
            return "ints"
        if get_origin(core) is Sequence:
            return "strs"
        simple: dict[Any, Literal["int", "float", "bool", "str"]] = {
            int: "int",
            float: "float",
            bool: "bool",
            str: "str",
        }
        return simple[core]

    @property
    def allowed(self) -> tuple[Any, ...]:
        """The allowed values of a choice option (empty for the others)."""
        if self.choices:
            return self.choices
        literals = [get_args(a) for a in _union_args(self.annotation) if get_origin(a) is Literal]
        return literals[0] if literals else ()

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not a valid value of this option (a message naming it), or ``None`` if it is.

        Numbers may be any ``numbers.Integral`` / ``numbers.Real`` (numpy scalars too), never a bool;
        a flag may be a bool or ``numpy.bool_``.
        """
        if value is None and self.nullable:
            return None
        name, kind = self.name, self.kind
        if kind == "int":
            low = 0 if self.minimum is None else int(self.minimum)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                wrong = f"{name} must be an int, got {value!r}"
            elif value < low:
                below = "must not be negative" if value < 0 <= low else f"must be at least {low}"
                wrong = f"{name} {below}, got {value}"
            elif self.bits is not None and value >= 2**self.bits:
                return f"{name} must be < 2**{self.bits}, got {value}"
            else:
                return None
            # A subset's message gives the whole accepted range in one phrase, the loader's says which
            # bound was crossed: both wordings predate the schema, and users' matches rely on them.
            return f"{name} must be an int >= {low}, got {value!r}" if self.scope == "subset" else wrong
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                return f"{name} must be a number, got {value!r}"
            bottom = -math.inf if self.minimum is None else self.minimum
            top = math.inf if self.maximum is None else self.maximum
            if math.isfinite(value) and bottom <= float(value) <= top:
                return None
            if self.maximum is None:
                return f"{name} must be a finite number >= {_number(bottom)}, got {value}"
            return f"{name} must be in [{_number(bottom)}, {_number(top)}], got {value}"
        if kind == "bool":
            return None if isinstance(value, (bool, np.bool_)) else f"{name} must be a bool, got {value!r}"
        if kind == "str":
            return None if isinstance(value, str) else f"{name} must be a string, got {value!r}"
        if kind == "path":
            ok = isinstance(value, (str, os.PathLike))
            return None if ok else f"{name} must be a path (str or os.PathLike), got {value!r}"
        if kind == "choice":
            if any(_same(value, c) for c in self.allowed):
                return None
            return f"{name} must be one of {', '.join(_show(c) for c in self.allowed)}, got {value!r}"
        if kind == "ints":
            size = len(get_args(_core(self.annotation)))
            items = _items(value)
            ok = (
                items is not None
                and len(items) == size
                and all(
                    isinstance(c, numbers.Integral)
                    and not isinstance(c, bool)
                    and self.minimum is not None
                    and self.maximum is not None
                    and self.minimum <= int(c) <= self.maximum
                    for c in items
                )
            )
            if ok:
                return None
            within = f"{_number(self.minimum)}..{_number(self.maximum)}"
            unit = f" ({self.unit})" if self.unit else ""
            count = {3: "three"}.get(size, str(size))  # "three ints in 0..255": the message users know
            return f"{name} must be {count} ints in {within}{unit}, got {value!r}"
        if isinstance(value, str):
            return f"{name} must be a sequence of strings, not one string"
        items = _items(value)
        if items is not None and all(isinstance(c, str) for c in items):
            return None
        return f"{name} must be a sequence of strings, got {value!r}"

    def native_value(self, value: Any) -> Any:
        """``value`` (already checked) as the native module takes it: plain ints, floats and strings,
        a ``torch.dtype`` by name, ``Sequence[str]`` as a list, an int tuple as a tuple of ints."""
        if value is None:
            return None
        kind = self.kind
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            return bool(value)
        if kind == "path":
            return os.fspath(value)
        if kind == "ints":
            return tuple(int(c) for c in value)
        if kind == "strs":
            return [str(c) for c in value]
        if isinstance(value, torch.dtype):
            return str(value).removeprefix("torch.")
        return value

    def saved_value(self, value: Any) -> Any:
        """``value`` as a loader's ``state_dict`` records it: JSON-compatible (tuples as lists)."""
        plain = self.native_value(value)
        return list(plain) if isinstance(plain, tuple) else plain

    @property
    def flag(self) -> str:
        """Its ``fastdiff scan`` flag: ``--max-bucket-side``."""
        return "--" + self.name.replace("_", "-")

    @property
    def default_text(self) -> str:
        """The default as the docs show it (RST inline code)."""
        if self.default is dataclasses.MISSING:
            return "required"
        if self.default is None and self.default_doc:
            return self.default_doc
        return f"``{_show(self.default)}``"

    @property
    def allowed_text(self) -> str:
        """The allowed values as the docs show them (RST inline code); ``""`` when any value of the
        type is (bools, strings, paths)."""
        kind = self.kind
        if kind == "choice":
            return ", ".join(f"``{_show(c)}``" for c in self.allowed)
        if kind == "int":
            low = f"≥ {_number(self.minimum or 0)}"
            return low if self.bits is None else f"{low}, < 2^{self.bits}"
        if kind == "float":
            if self.maximum is None:
                return f"finite, ≥ {_number(self.minimum or 0)}"
            return f"[{_number(self.minimum or 0)}, {_number(self.maximum)}]"
        if kind == "ints":
            return f"{_number(self.minimum or 0)}–{_number(self.maximum or 0)} each"
        return ""


def _union_args(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _core(annotation: Any) -> Any:
    (core,) = (a for a in _union_args(annotation) if a is not type(None))
    return core


def _items(value: Any) -> list[Any] | None:
    """The elements of a sequence value (a list, tuple, numpy array...); ``None`` for a non-iterable
    or a string."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return None
    return list(value)


def _same(value: Any, choice: Any) -> bool:
    # `value == choice` alone would let True stand for 1, or a torch.dtype compare with a string.
    return type(value) is type(choice) and value == choice


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 100_000:
        return f"{value:_}"
    return repr(value)


def _number(x: float | None) -> str:
    return f"{x:g}" if x is not None else ""


def _override(option: Option, doc: str) -> Option:
    """The :class:`fastdiff.Subset` field that overrides a loader option for one subset (``None`` =
    the loader's value)."""
    return dataclasses.replace(
        option,
        annotation=option.annotation | None,
        default=None,
        doc=doc,
        scope="subset",
        details="",
        default_doc="the loader's",
        toml=SUBSET_TABLE,
        alias=None,
        scan=False,
    )


def _loader(name: str, annotation: Any, default: Any, doc: str, **facts: Any) -> Option:
    return Option(name, annotation, default, doc, "loader", **facts)


def _subset(name: str, annotation: Any, default: Any, doc: str, **facts: Any) -> Option:
    return Option(name, annotation, default, doc, "subset", **{"toml": ALL_TABLES, **facts})


CROP = _loader(
    "crop",
    Crop,
    "center",
    "Where the bucket-sized window is cut from the image resized to cover its bucket.",
    toml=DATASET_TABLES,
)
FLIP_PROB = _loader(
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
    _loader(
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
    _loader(
        "batch_size",
        int,
        1,
        "Images per batch.",
        unit="images",
        minimum=1,
        bits=64,
        toml=DATASET_TABLES,
        scan=True,
    ),
    _loader(
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
    _loader(
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
    _loader(
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
    _loader(
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
    CROP,
    FLIP_PROB,
    _loader(
        "shuffle",
        bool,
        True,
        "Shuffle images within buckets and the order of batches, per epoch.",
        toml=DATASET_TABLES,
    ),
    _loader(
        "seed",
        int,
        0,
        "Seed of every random choice (shuffles, crops, flips, caption operations).",
        minimum=0,
        bits=64,
        toml=DATASET_TABLES,
    ),
    _loader(
        "drop_last",
        bool,
        False,
        "Drop each bucket's last batch when it is smaller than ``batch_size``.",
        toml=DATASET_TABLES,
    ),
    _loader(
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
    _loader(
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
    _loader(
        "dtype",
        torch.dtype,
        torch.float32,
        "Element type of ``pixel_values``.",
        details="Float dtypes are scaled to ``[-1, 1]`` (``x / 127.5 - 1``, as torchvision ``ToTensor`` + "
        "``Normalize([0.5], [0.5])``); ``torch.uint8`` is left as 0–255.",
        choices=(torch.float32, torch.float16, torch.bfloat16, torch.uint8),
    ),
    _loader(
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
    _loader(
        "caption_extensions",
        Sequence[str],
        (".txt", ".caption"),
        "Caption file extensions tried in order, each with its leading dot.",
    ),
    _loader(
        "background",
        tuple[int, int, int],
        (255, 255, 255),
        "Colour that transparent pixels are composited onto.",
        unit="R, G, B",
        minimum=0,
        maximum=255,
    ),
    _loader(
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
    _loader("filter", Filter, "lanczos3", "Resampling filter of the resize.", toml=DATASET_TABLES),
    _loader(
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
    _loader(
        "rank",
        int | None,
        None,
        "This process's rank among ``world_size``.",
        default_doc="``torch.distributed.get_rank()`` when initialised, else 0",
        minimum=0,
        bits=64,
        state="never",
    ),
    _loader(
        "world_size",
        int | None,
        None,
        "Number of ranks; each takes its slice of every global batch of ``batch_size * world_size``.",
        default_doc="``torch.distributed.get_world_size()`` when initialised, else 1",
        minimum=1,
        bits=64,
    ),
    _loader(
        "remainder",
        Remainder,
        "pad",
        "How a bucket's short last global batch is split across ranks.",
        details='``"pad"`` repeats some of its samples so each rank gets ``ceil(n / world_size)``, '
        '``"drop"`` leaves out ``n % world_size`` of them (and the batch, if it has fewer than '
        "``world_size``).",
        toml=DATASET_TABLES,
    ),
)

#: The fields of :class:`fastdiff.Subset`, in order.
SUBSET_OPTIONS: tuple[Option, ...] = (
    _subset(
        "image_dir",
        str | os.PathLike[str],
        dataclasses.MISSING,
        "Folder of images, searched recursively.",
        details="In TOML, relative to the file's folder.",
        toml=SUBSET_TABLE,
        state="never",
        native=False,
    ),
    _subset(
        "num_repeats",
        int,
        1,
        "Times each image appears per epoch.",
        details="Each repeat is its own sample with its own crop, flip and caption draw, and counts in "
        "``len(loader)``.",
        minimum=1,
        bits=64,
    ),
    _subset(
        "is_reg",
        bool,
        False,
        "Regularisation (class) images for DreamBooth prior preservation.",
        details='Their samples have ``batch["is_reg"]`` set.',
    ),
    _subset(
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
    _subset(
        "caption_extension",
        str | None,
        None,
        'Caption file extension with its dot (``".txt"``).',
        details="Ignored when captions come from a metadata file.",
        default_doc="the loader's ``caption_extensions``",
        native=False,
    ),
    _subset(
        "keep_tokens",
        int,
        0,
        "Tags at the start of the caption that never move or drop out.",
        unit="tags",
        minimum=0,
        bits=64,
    ),
    _subset(
        "shuffle_caption",
        bool,
        False,
        "Shuffle the tags after the first ``keep_tokens``, per sample and epoch.",
    ),
    _subset(
        "caption_dropout_rate",
        float,
        0.0,
        'Probability that a sample\'s caption is ``""``.',
        minimum=0,
        maximum=1,
    ),
    _subset(
        "caption_tag_dropout_rate",
        float,
        0.0,
        "Probability that each tag after the first ``keep_tokens`` is left out.",
        minimum=0,
        maximum=1,
    ),
    _subset(
        "caption_separator",
        str,
        ",",
        "What separates tags; they are re-joined with it plus a space.",
    ),
    _subset(
        "caption_per_line",
        bool,
        False,
        "Each non-empty line of a caption is a variant; one is used per sample and epoch.",
        details="Set automatically when ``metadata.jsonl`` gives a list of captions for an image.",
        native=False,
    ),
    _override(FLIP_PROB, "Flip probability of this subset's samples."),
    _override(CROP, "Crop of this subset's samples."),
    _subset(
        "metadata_file",
        str | os.PathLike[str] | None,
        None,
        "HF imagefolder ``metadata.jsonl`` giving the captions.",
        details="One JSON object per line with ``file_name`` (relative to the file's folder, which must "
        "lie inside ``image_dir``) and ``caption_column`` (a string, or a list of strings = several "
        "captions).",
        default_doc="``image_dir/metadata.jsonl`` if it exists, else caption files",
        state="never",
        native=False,
    ),
    _subset(
        "caption_column",
        str,
        "text",
        "Metadata column holding the caption.",
        native=False,
    ),
)


#: Each option by name.
LOADER: dict[str, Option] = {o.name: o for o in LOADER_OPTIONS}
SUBSET: dict[str, Option] = {o.name: o for o in SUBSET_OPTIONS}


def saved(options: Sequence[Option], values: Mapping[str, Any]) -> dict[str, Any]:
    """What a loader's ``state_dict`` records of ``values`` (option name → value, already checked)."""
    return {
        o.name: o.saved_value(values[o.name])
        for o in options
        if o.state == "always" or (o.state == "unless_default" and values[o.name] != o.default)
    }
