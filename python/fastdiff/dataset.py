"""Dataset descriptions: subsets, a kohya-style TOML config and HF imagefolder ``metadata.jsonl`` captions.

This module validates what the user wrote and turns it into typed arguments for the native loader
(``fastdiff._fastdiff.NativeSubset``). It reads only small text files (the config and metadata); it
must not touch images: scanning, sampling and the caption operations happen in ``rust/core``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastdiff import _fastdiff
from fastdiff.docs import with_args
from fastdiff.options import ALL_TABLES, LOADER_OPTIONS, SUBSET, SUBSET_OPTIONS, Table, saved
from fastdiff.types import Crop

METADATA_NAME = "metadata.jsonl"

#: The Python types a TOML value of each kind of option may have (bool is refused for numbers).
_TOML_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "float": (int, float),
    "bool": bool,
    "str": str,
    "choice": str,
    "path": str,
    "ints": list,
    "strs": list,
}


def _table_keys(table: Table) -> dict[str, type | tuple[type, ...]]:
    keys: dict[str, type | tuple[type, ...]] = {}
    for o in (*LOADER_OPTIONS, *SUBSET_OPTIONS):
        if table in o.toml:
            for key in (o.name, o.alias):
                if key is not None:
                    keys[key] = _TOML_TYPES[o.kind]
    return keys


#: The keys each table of a dataset TOML accepts (kohya aliases included), with their value types.
TABLE_KEYS: dict[Table, dict[str, type | tuple[type, ...]]] = {t: _table_keys(t) for t in ALL_TABLES}
#: The :class:`fastdiff.DataLoader` arguments a TOML may set (in ``[general]`` / ``[[datasets]]``).
LOADER_KEYS = frozenset(o.name for o in LOADER_OPTIONS if o.toml)
#: Every alias a config table accepts, with the name it stands for.
ALIASES = {o.alias: o.name for o in (*LOADER_OPTIONS, *SUBSET_OPTIONS) if o.alias is not None}


@dataclass(frozen=True)
class Subset:
    """One folder of a dataset and how its samples are made (kohya-ss sd-scripts subset semantics).

    Args:
        (the options: see fastdiff.options)

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
    crop: Crop | None = None
    metadata_file: str | os.PathLike[str] | None = None
    caption_column: str = "text"

    def options(self) -> dict[str, Any]:
        """The options a loader's ``state_dict`` records (JSON-compatible values)."""
        # Folders are left out so that a dataset moved elsewhere still matches (the digest covers files).
        return saved(SUBSET_OPTIONS, {o.name: getattr(self, o.name) for o in SUBSET_OPTIONS})

    def native(self) -> _fastdiff.NativeSubset:
        """The native subset: options checked, metadata read and checked.

        Raises:
            ValueError: An option has the wrong type or is out of range (the message names the folder
                and the option), or the metadata file is malformed or misnamed.
            FileNotFoundError: The metadata file or a file it references does not exist.
        """
        problem = SUBSET["image_dir"].problem(self.image_dir)
        if problem is not None:
            raise ValueError(problem)
        root = os.path.normpath(os.fspath(self.image_dir))
        values = {o.name: getattr(self, o.name) for o in SUBSET_OPTIONS}
        for o in SUBSET_OPTIONS:
            problem = o.problem(values[o.name])
            if problem is not None:
                raise ValueError(f"{root}: {problem}")
        metadata = _find_metadata(root, self.metadata_file)
        captions = None
        per_line = self.caption_per_line
        if metadata is not None:
            captions, several = read_metadata(metadata, root, self.caption_column)
            per_line = per_line or several
        return _fastdiff.NativeSubset(
            root,
            caption_extensions=None if self.caption_extension is None else [self.caption_extension],
            captions=captions,
            caption_per_line=bool(per_line),
            **{o.name: o.native_value(values[o.name]) for o in SUBSET_OPTIONS if o.native},
        )


Subset.__doc__ = with_args(Subset.__doc__, SUBSET_OPTIONS)


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

    Each table takes the keys :data:`TABLE_KEYS` lists, from the schema in :mod:`fastdiff.options`
    (the TOML column of the README's options table): loader options in ``[general]`` /
    ``[[datasets]]``; subset fields in a subset, most of them also there as defaults of every subset;
    kohya-ss names (``bucket_reso_steps`` ...) as aliases.

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
    general = data.get("general", {})
    _check(general, TABLE_KEYS["[general]"], f"{source} [general]")
    datasets = data.get("datasets", [])
    if len(datasets) != 1:
        raise ValueError(
            f"{source}: exactly one [[datasets]] table is needed per loader, got {len(datasets)}"
        )
    dataset = datasets[0]
    if not isinstance(dataset, dict):
        raise ValueError(f"{source}: [[datasets]] must be a table")
    _check(dataset, {**TABLE_KEYS["[[datasets]]"], "subsets": list}, f"{source} [[datasets]]")
    # Aliases are resolved per table, so a subset's `loss_weight` overrides a `weight` default.
    merged = {
        **_canonical(general, f"{source} [general]"),
        **_canonical({k: v for k, v in dataset.items() if k != "subsets"}, f"{source} [[datasets]]"),
    }
    loader = {k: v for k, v in merged.items() if k in LOADER_KEYS}
    subset_defaults = {k: v for k, v in merged.items() if k not in LOADER_KEYS}
    raw_subsets = dataset.get("subsets", [])
    if not raw_subsets:
        raise ValueError(f"{source}: [[datasets]] has no [[datasets.subsets]]")
    subsets = []
    for i, raw in enumerate(raw_subsets):
        where = f"{source} [[datasets.subsets]] #{i + 1}"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: must be a table")
        _check(raw, TABLE_KEYS["[[datasets.subsets]]"], where)
        for o in SUBSET_OPTIONS:
            if o.default is dataclasses.MISSING and o.name not in raw:
                raise ValueError(f"{where}: {o.name!r} is required")
        entry = {**subset_defaults, **_canonical(raw, where)}
        for o in SUBSET_OPTIONS:
            if o.kind == "path" and o.name in entry:
                entry[o.name] = os.fspath(base / entry[o.name])
        subsets.append(Subset(**entry))
    return loader, subsets
