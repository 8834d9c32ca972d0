"""Dataset descriptions: subsets, a kohya-style TOML config and HF imagefolder ``metadata.jsonl`` captions.

This module validates what the user wrote and turns it into typed arguments for the native loader
(``fastdiff._fastdiff.NativeSubset``). It reads only small text files (the config and metadata); it
must not touch images: scanning, sampling and the caption operations happen in ``rust/core``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fastdiff import _fastdiff

METADATA_NAME = "metadata.jsonl"

#: Keys of ``[general]`` / ``[[datasets]]`` that are :class:`fastdiff.DataLoader` arguments. The kohya
#: names of the bucket options are accepted as aliases (``bucket_reso_steps`` ...).
LOADER_KEYS: dict[str, type | tuple[type, ...]] = {
    "resolution": int,
    "batch_size": int,
    "bucket_step": int,
    "min_bucket_side": int,
    "max_bucket_side": int,
    "crop": str,
    "flip_prob": (int, float),
    "shuffle": bool,
    "seed": int,
    "drop_last": bool,
    "remainder": str,
    "filter": str,
    "on_error": str,
    "max_pixels": int,
    "no_upscale": bool,
}
KOHYA_ALIASES = {
    "bucket_reso_steps": "bucket_step",
    "min_bucket_reso": "min_bucket_side",
    "max_bucket_reso": "max_bucket_side",
    "bucket_no_upscale": "no_upscale",
}


@dataclass(frozen=True)
class Subset:
    """One folder of a dataset and how its samples are made (kohya-ss sd-scripts subset semantics).

    Args:
        image_dir: Folder of images, searched recursively.
        num_repeats: Times each image appears per epoch (≥ 1); each repeat is its own sample with its
            own crop, flip and caption draw, and counts in ``len(loader)``.
        is_reg: Regularisation (class) images for DreamBooth prior preservation; their samples have
            ``batch["is_reg"]`` set.
        loss_weight: Weight (≥ 0) of this subset's samples in the training loss, yielded per sample as
            ``batch["loss_weights"]``; :func:`fastdiff.train.train` multiplies each sample's loss by
            it (given a loader built from the dataset config). On a
            regularisation subset it is DreamBooth's ``prior_loss_weight`` (Ruiz et al. 2023; kohya-ss
            ``prior_loss_weight``). TOML also accepts ``weight``.
        caption_extension: Caption file extension with its dot (``".txt"``); ``None`` = the loader's
            ``caption_extensions``. Ignored when captions come from a metadata file.
        keep_tokens: Tags at the start of the caption that never move or drop out.
        shuffle_caption: Shuffle the comma-separated tags after the first ``keep_tokens`` per sample.
        caption_dropout_rate: Probability in ``[0, 1]`` that a sample's caption is ``""``.
        caption_tag_dropout_rate: Probability in ``[0, 1]`` that each free tag is left out.
        caption_separator: What separates tags (default ``","``); tags are re-joined with it plus a space.
        caption_per_line: Each non-empty line of a caption is a variant; one is used per sample and epoch.
            Set automatically when ``metadata.jsonl`` gives a list of captions for an image.
        flip_prob: Flip probability for this subset; ``None`` = the loader's.
        crop: ``"center"`` or ``"random"`` for this subset; ``None`` = the loader's.
        metadata_file: HF imagefolder ``metadata.jsonl`` giving the captions: one JSON object per line with
            ``file_name`` (relative to the file's folder, which must lie inside ``image_dir``) and
            ``caption_column`` (a string, or a list of strings = several captions). ``None`` uses
            ``image_dir/metadata.jsonl`` if it exists, else caption files.
        caption_column: Metadata column holding the caption (default ``"text"``).

    All randomness (variant choice, dropout, tag shuffle) is a pure function of (seed, epoch, sample).
    """

    image_dir: str | os.PathLike[str]
    num_repeats: int = 1
    is_reg: bool = False
    loss_weight: float = 1.0
    caption_extension: str | None = None
    keep_tokens: int = 0
    shuffle_caption: bool = False
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_separator: str = ","
    caption_per_line: bool = False
    flip_prob: float | None = None
    crop: str | None = None
    metadata_file: str | os.PathLike[str] | None = None
    caption_column: str = "text"

    def options(self) -> dict[str, Any]:
        """Every option except the paths, for comparing loader states (JSON-compatible values)."""
        # Folders are left out so that a dataset moved elsewhere still matches (the digest covers files).
        paths = ("image_dir", "metadata_file")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in paths}

    def native(self) -> _fastdiff.NativeSubset:
        """The native subset: metadata read and checked, options validated by the core.

        Raises:
            ValueError: An option is out of range, or the metadata file is malformed or misnamed.
            FileNotFoundError: The metadata file or a file it references does not exist.
        """
        root = os.path.normpath(os.fspath(self.image_dir))
        for name in ("num_repeats", "keep_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{root}: {name} must be an int >= 0, got {value!r}")
        if not (math.isfinite(self.loss_weight) and self.loss_weight >= 0):
            raise ValueError(f"{root}: loss_weight must be a finite number >= 0, got {self.loss_weight}")
        metadata = _find_metadata(root, self.metadata_file)
        captions = None
        per_line = self.caption_per_line
        if metadata is not None:
            captions, several = read_metadata(metadata, root, self.caption_column)
            per_line = per_line or several
        return _fastdiff.NativeSubset(
            root,
            num_repeats=self.num_repeats,
            is_reg=self.is_reg,
            caption_extensions=None if self.caption_extension is None else [self.caption_extension],
            captions=captions,
            caption_per_line=per_line,
            caption_dropout_rate=float(self.caption_dropout_rate),
            keep_tokens=self.keep_tokens,
            shuffle_caption=self.shuffle_caption,
            caption_tag_dropout_rate=float(self.caption_tag_dropout_rate),
            caption_separator=self.caption_separator,
            flip_prob=None if self.flip_prob is None else float(self.flip_prob),
            crop=self.crop,
        )


SUBSET_KEYS: dict[str, type | tuple[type, ...]] = {
    "image_dir": str,
    "num_repeats": int,
    "is_reg": bool,
    "loss_weight": (int, float),
    "weight": (int, float),  # alias of loss_weight
    "caption_extension": str,
    "keep_tokens": int,
    "shuffle_caption": bool,
    "caption_dropout_rate": (int, float),
    "caption_tag_dropout_rate": (int, float),
    "caption_separator": str,
    "caption_per_line": bool,
    "flip_prob": (int, float),
    "crop": str,
    "metadata_file": str,
    "caption_column": str,
}


def _find_metadata(root: str, given: str | os.PathLike[str] | None) -> Path | None:
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"metadata_file {os.fspath(given)!r} does not exist")
        return path
    path = Path(root) / METADATA_NAME
    if path.is_file():
        return path
    if Path(root).is_dir():
        for p in sorted(Path(root).iterdir()):
            stem = p.name.lower()
            if p.is_file() and stem.startswith("metadata.") and stem != METADATA_NAME:
                raise ValueError(
                    f"{p}: an HF imagefolder metadata file must be named exactly {METADATA_NAME!r} "
                    "(JSON Lines: one object per line with file_name and a caption column); rename it or "
                    "pass metadata_file="
                )
    return None


def read_metadata(path: Path, root: str, column: str = "text") -> tuple[dict[str, str], bool]:
    """Captions from an HF imagefolder ``metadata.jsonl``.

    Args:
        path: The JSON Lines file.
        root: The subset folder; every referenced image must lie inside it.
        column: Key of the caption in each object.

    Returns:
        (captions, several): captions by image path (``root``-prefixed, normalised, as the scan finds
        them), several captions of one image joined by newlines; whether any image had several.

    Raises:
        ValueError: A line is not a JSON object with a string ``file_name`` and a string or list-of-strings
            ``column``, an image is listed twice, or a path leaves ``root`` (message: ``file:line``).
        FileNotFoundError: A referenced image does not exist (message: ``file:line`` and the path).
    """
    base = os.path.normpath(path.parent)
    captions: dict[str, str] = {}
    several = False
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise ValueError(f"{where}: each line must be a JSON object with a string 'file_name'")
        if column not in row:
            raise ValueError(f"{where}: no caption column {column!r} (keys: {sorted(row)})")
        text = row[column]
        if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            several = several or len(text) > 1
            text = "\n".join(" ".join(t.split("\n")) for t in text)
        elif not isinstance(text, str):
            raise ValueError(f"{where}: {column!r} must be a string or a list of strings, got {text!r}")
        image = os.path.normpath(os.path.join(base, row["file_name"]))
        if os.path.commonpath([os.path.abspath(image), os.path.abspath(root)]) != os.path.abspath(root):
            raise ValueError(f"{where}: file_name {row['file_name']!r} lies outside the subset folder {root}")
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{where}: file_name {row['file_name']!r} does not exist ({image})")
        if image in captions:
            raise ValueError(f"{where}: file_name {row['file_name']!r} is listed twice")
        captions[image] = text
    return captions, several


def _load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised only on Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ImportError(
                "reading a TOML dataset config on Python 3.10 needs the 'tomli' package "
                "(pip install tomli), or pass the config as a dict"
            ) from None
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from None


def _check(table: Mapping[str, Any], allowed: Mapping[str, Any], where: str) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
        want = allowed[key]
        # bool is an int in Python; a flag given for a number (or the reverse) is still a mistake.
        if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
            raise ValueError(f"{where}: {key!r} has the wrong type ({type(value).__name__}: {value!r})")


#: Every alias a config table accepts, with the name it stands for.
ALIASES = {**KOHYA_ALIASES, "weight": "loss_weight"}


def _canonical(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``table`` with aliases renamed to the names they stand for (both in one table: an error)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = ALIASES.get(key, key)
        if name in out:
            alias = key if key != name else next(a for a, n in ALIASES.items() if n == name and a in table)
            raise ValueError(f"{where}: give one of {alias!r} and {name!r}, not both")
        out[name] = value
    return out


def load_config(config: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[dict[str, Any], list[Subset]]:
    """Read and validate a dataset config (a TOML file path, or the same structure as a dict).

    Layout (kohya-ss sd-scripts style)::

        [general]                      # optional: loader options and subset defaults
        resolution = 512
        batch_size = 4
        shuffle_caption = true

        [[datasets]]                   # exactly one dataset per loader
        resolution = 1024              # loader options here override [general]

          [[datasets.subsets]]         # one or more
          image_dir = "img/sks_dog"    # relative paths are relative to the TOML file's folder
          num_repeats = 10
          keep_tokens = 1

          [[datasets.subsets]]
          image_dir = "reg/dog"
          is_reg = true

    Loader options (``[general]`` / ``[[datasets]]``): ``resolution batch_size bucket_step
    min_bucket_side max_bucket_side crop flip_prob shuffle seed drop_last remainder filter on_error
    max_pixels no_upscale`` (kohya's ``bucket_reso_steps min_bucket_reso max_bucket_reso
    bucket_no_upscale`` as aliases). Subset
    options (in a subset, or in ``[general]`` / ``[[datasets]]`` as defaults): the fields of
    :class:`Subset`.

    Returns:
        (loader keyword arguments, subsets).

    Raises:
        ValueError: Unknown key (named, with its table), wrong type, no or several datasets, no subsets, a
            subset without ``image_dir``, or invalid TOML.
        ImportError: A TOML file on Python 3.10 without the ``tomli`` package.
    """
    if isinstance(config, Mapping):
        data, source, base = dict(config), "config", Path.cwd()
    else:
        path = Path(config)
        data, source, base = _load_toml(path), os.fspath(path), path.parent
    _check(data, {"general": dict, "datasets": list}, source)
    loader_keys = {**LOADER_KEYS, **{alias: LOADER_KEYS[name] for alias, name in KOHYA_ALIASES.items()}}
    defaults_keys = {**loader_keys, **{k: v for k, v in SUBSET_KEYS.items() if k != "image_dir"}}
    general = data.get("general", {})
    _check(general, defaults_keys, f"{source} [general]")
    datasets = data.get("datasets", [])
    if len(datasets) != 1:
        raise ValueError(
            f"{source}: exactly one [[datasets]] table is needed per loader, got {len(datasets)}"
        )
    dataset = datasets[0]
    if not isinstance(dataset, dict):
        raise ValueError(f"{source}: [[datasets]] must be a table")
    _check(dataset, {**defaults_keys, "subsets": list}, f"{source} [[datasets]]")
    # Aliases are resolved per table, so a subset's `loss_weight` overrides a `weight` default.
    merged = {
        **_canonical(general, f"{source} [general]"),
        **_canonical({k: v for k, v in dataset.items() if k != "subsets"}, f"{source} [[datasets]]"),
    }
    loader = {k: v for k, v in merged.items() if k in LOADER_KEYS}
    subset_defaults = {k: v for k, v in merged.items() if k in SUBSET_KEYS and k not in LOADER_KEYS}
    raw_subsets = dataset.get("subsets", [])
    if not raw_subsets:
        raise ValueError(f"{source}: [[datasets]] has no [[datasets.subsets]]")
    subsets = []
    for i, raw in enumerate(raw_subsets):
        where = f"{source} [[datasets.subsets]] #{i + 1}"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: must be a table")
        _check(raw, SUBSET_KEYS, where)
        if "image_dir" not in raw:
            raise ValueError(f"{where}: 'image_dir' is required")
        entry = {**subset_defaults, **_canonical(raw, where)}
        for key in ("image_dir", "metadata_file"):
            if key in entry:
                entry[key] = os.fspath(base / entry[key])
        subsets.append(Subset(**entry))
    return loader, subsets
