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
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from fastdiff import _fastdiff
from fastdiff.docs import with_args
from fastdiff.options import (
    ALL_TABLES,
    KOHYA_KEYS,
    LOADER,
    LOADER_OPTIONS,
    SUBSET,
    SUBSET_OPTIONS,
    Table,
    saved,
)
from fastdiff.remote import is_remote
from fastdiff.sources import expand_shards, is_shards, local_shards, shards_root
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


#: Options a TOML may also give in another form (kohya's ``resolution = [w, h]``).
_OTHER_FORMS: dict[str, type] = {"resolution": list}


def _table_keys(table: Table) -> dict[str, type | tuple[type, ...]]:
    keys: dict[str, type | tuple[type, ...]] = {}
    for o in (*LOADER_OPTIONS, *SUBSET_OPTIONS):
        if table in o.toml:
            want = _TOML_TYPES[o.kind]
            if o.name in _OTHER_FORMS:
                want = (*(want if isinstance(want, tuple) else (want,)), _OTHER_FORMS[o.name])
            for key in (o.name, o.alias):
                if key is not None:
                    keys[key] = want
    for k in KOHYA_KEYS:
        if table in k.toml:
            keys[k.key] = k.toml_type
    return keys


#: The keys each table of a dataset TOML accepts (kohya aliases included), with their value types.
TABLE_KEYS: dict[Table, dict[str, type | tuple[type, ...]]] = {t: _table_keys(t) for t in ALL_TABLES}
#: The :class:`fastdiff.DataLoader` arguments a TOML may set (in ``[general]`` / ``[[datasets]]``).
LOADER_KEYS = frozenset(o.name for o in LOADER_OPTIONS if o.toml)
#: Every alias a config table accepts, with the name it stands for.
ALIASES = {o.alias: o.name for o in (*LOADER_OPTIONS, *SUBSET_OPTIONS) if o.alias is not None}
#: The kohya-ss keys that are not option names or aliases, by key.
KOHYA = {k.key: k for k in KOHYA_KEYS}


@dataclass(frozen=True)
class Subset:
    """One folder of a dataset and how its samples are made (kohya-ss sd-scripts subset semantics).

    Args:
        (the options: see fastdiff.options)

    All randomness (variant choice, dropout, wildcards, tag shuffle) is a pure function of (seed,
    epoch, sample). The caption operations run in the order of kohya-ss sd-scripts'
    ``BaseDataset.process_caption`` (``library/train_util.py``): ``caption_prefix`` / ``caption_suffix``;
    whole-caption dropout (``caption_dropout_rate``, ``caption_dropout_every_n_epochs``); one line
    (``caption_per_line`` or ``enable_wildcard``); the ``{a|b}`` wildcards (``enable_wildcard``); the
    tag shuffle with ``keep_tokens`` / ``keep_tokens_separator`` (``shuffle_caption``); tag dropout
    (``caption_tag_dropout_rate``); ``secondary_separator`` replaced by ``caption_separator``. (Rust:
    ``fastdiff_core::caption::CaptionOptions::apply_keyed``, which lists where fastdiff differs.)
    """

    image_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
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
    image_column: str = "image"
    class_tokens: str | None = None
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_dropout_every_n_epochs: int = 0

    def options(self) -> dict[str, Any]:
        """The options a loader's ``state_dict`` records (JSON-compatible values)."""
        # Folders are left out so that a dataset moved elsewhere still matches (the digest covers files).
        return saved(SUBSET_OPTIONS, {o.name: getattr(self, o.name) for o in SUBSET_OPTIONS})

    def source(self, pending: dict[str, str] | None = None) -> tuple[str, list[str], list[tuple[str, str]]]:
        """``(root, shards, unreadable)``: the folder and no shards, or for shards (``image_dir`` a
        ``.tar`` or ``.parquet`` path or fsspec URL, a brace pattern of them, or a list:
        :func:`fastdiff.sources.expand_shards`) the folder holding them and the local tar shards
        (:func:`fastdiff.sources.local_shards`: remote ones fetched into the spool, ``$FASTDIFF_SPOOL``
        or ``~/.cache/fastdiff/spool``, parquet ones converted there). A shard that cannot be fetched
        or converted is left out with a ``UserWarning`` naming it and the reason, and returned in
        ``unreadable`` as ``(shard as given, reason)``: the loader reports it in ``report["skipped"]``
        (code ``io``), or raises with ``on_error="raise"``.

        With ``pending`` (a dict), remote tar shards that have an index are not fetched yet, only their
        indexes: each such shard's copy path (in the returned shards) is added to ``pending`` with its
        URL, for :func:`fastdiff.sources.fetch_pending` once the loader knows which shards its rank reads.

        Raises:
            ValueError: A pattern or list names something that is neither a ``.tar`` nor a ``.parquet``
                file, no shard could be read, or a parquet file lacks ``image_column``/``caption_column``.
        """
        if not is_shards(self.image_dir):
            return os.path.normpath(os.fspath(cast("str | os.PathLike[str]", self.image_dir))), [], []
        given = [s if is_remote(s) else os.path.normpath(s) for s in expand_shards(self.image_dir)]
        local = local_shards(
            given,
            caption_column=self.caption_column,
            image_column=self.image_column,
            index_suffix=_fastdiff.SHARD_INDEX_SUFFIX,
            fetch_later=pending is not None,
        )
        if pending is not None:
            pending.update({os.fspath(p): u for p, u in local.pending.items()})
        for failure in local.failed:
            warnings.warn(
                f"shard {failure.url} left out: {failure.reason} (after {failure.attempts} attempts)",
                stacklevel=3,
            )
        for spec, converted in local.parquet.items():
            if converted.missing:
                rows = ", ".join(map(str, converted.missing[:10])) + (
                    ", ..." if len(converted.missing) > 10 else ""
                )
                warnings.warn(
                    f"{spec}: {len(converted.missing)} of {converted.rows} rows have no image bytes and are "
                    f"left out (rows {rows})",
                    stacklevel=3,
                )
        if not local.paths:
            raise ValueError(f"none of the {len(given)} shards could be read (warnings name each)")
        unreadable = [(f.url, f"{f.reason} (after {f.attempts} attempts)") for f in local.failed]
        return self.root(), [os.fspath(p) for p in local.paths], unreadable

    def root(self) -> str:
        """The name the subset goes by in reports: its folder, or the folder (or URL prefix) of its shards.

        Raises:
            ValueError: As :meth:`source`'s patterns.
        """
        if not is_shards(self.image_dir):
            return os.path.normpath(os.fspath(cast("str | os.PathLike[str]", self.image_dir)))
        given = expand_shards(self.image_dir)
        if any(map(is_remote, given)):
            return given[0].rsplit("/", 1)[0]  # the first shard's "folder" (URLs have no common path)
        return shards_root([os.path.normpath(s) for s in given])

    def native(self, pending: dict[str, str] | None = None) -> _fastdiff.NativeSubset:
        """The native subset: options checked, metadata read and checked; ``pending`` as :meth:`source`'s
        (the native subset then scans those shards from their indexes alone).

        Raises:
            ValueError: An option has the wrong type or is out of range (the message names the folder
                and the option), or the metadata file is malformed or misnamed.
            FileNotFoundError: The metadata file or a file it references does not exist.
        """
        problem = SUBSET["image_dir"].problem(self.image_dir)
        if problem is not None:
            raise ValueError(problem)
        later: dict[str, str] = {}
        root, shards, unreadable = self.source(None if pending is None else later)
        values = {o.name: getattr(self, o.name) for o in SUBSET_OPTIONS}
        for o in SUBSET_OPTIONS:
            problem = o.problem(values[o.name])
            if problem is not None:
                raise ValueError(f"{root}: {problem}")
        if shards:
            if self.metadata_file is not None:
                raise ValueError(
                    f"{root}: metadata_file cannot caption tar shards (its file_name keys name files of a "
                    "folder); put each caption in the shard as KEY.txt or KEY.json"
                )
            if pending is not None:
                pending.update(later)
            return _fastdiff.NativeSubset(
                root,
                shards=shards,
                unreadable_shards=unreadable,
                pending_shards=list(later),
                caption_extensions=None if self.caption_extension is None else [self.caption_extension],
                caption_per_line=bool(self.caption_per_line),
                **{o.name: o.native_value(values[o.name]) for o in SUBSET_OPTIONS if o.native},
            )
        captions, per_line = self.metadata_captions()
        return _fastdiff.NativeSubset(
            root,
            caption_extensions=None if self.caption_extension is None else [self.caption_extension],
            captions=captions,
            caption_per_line=bool(per_line),
            **{o.name: o.native_value(values[o.name]) for o in SUBSET_OPTIONS if o.native},
        )

    def metadata_captions(self) -> tuple[dict[str, str] | None, bool]:
        """The captions of a folder subset's metadata file (``metadata_file``, else ``metadata.jsonl`` in
        the folder), and whether its captions are read one per line (``caption_per_line``, or an image
        with several captions in the ``.jsonl``).

        Returns:
            (captions by image path as the scan finds them (``image_dir``-prefixed, normalised), or
            ``None`` when there is no metadata file and caption files give the captions; per line).

        Raises:
            ValueError: The metadata file is malformed or misnamed.
            FileNotFoundError: The metadata file or a file it references does not exist.
        """
        root = self.root()
        metadata = _find_metadata(root, self.metadata_file)
        if metadata is not None and metadata.suffix.lower() == ".jsonl":
            captions, several = read_metadata(metadata, root, self.caption_column)
            return captions, self.caption_per_line or several
        if metadata is not None:
            return read_kohya_metadata(metadata, root, self.caption_separator, self.enable_wildcard), (
                self.caption_per_line
            )
        return None, self.caption_per_line


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


def read_kohya_metadata(
    path: Path, root: str, separator: str = ",", wildcard: bool = False
) -> dict[str, str]:
    """Captions from a kohya-ss sd-scripts metadata JSON (``finetune/merge_captions_to_metadata.py``).

    The file is one object ``{"<image key>": {"caption": str, "tags": str, ...}}``; other fields
    (``train_resolution``, ``image_size``...) are ignored. A key is an image path, absolute or relative to
    ``root``, with or without its extension (``merge_captions_to_metadata.py`` writes the file stem
    unless ``--full_path``); without one it names the image of that stem (any extension of
    ``fastdiff._fastdiff.IMAGE_EXTENSIONS``, any case). The caption is kohya's (``FineTuningDataset``):
    ``caption + separator + tags`` (only the one that is present or non-empty); with ``wildcard``
    (``enable_wildcard``) the tags, their newlines replaced by ``separator``, are added to each
    non-blank line of the caption instead.

    Args:
        path: The JSON file.
        root: The subset folder; every image must lie inside it.
        separator: The subset's ``caption_separator``.
        wildcard: The subset's ``enable_wildcard``.

    Returns:
        Captions by image path (``root``-prefixed, normalised, as the scan finds them).

    Raises:
        ValueError: The file is not a JSON object of objects whose ``caption`` / ``tags`` are strings, a
            key names no image or several, two keys name one image, or an image lies outside ``root``
            (the message names the file and the key).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON ({e}); a .jsonl file is read as HF imagefolder metadata"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a kohya metadata file is one JSON object keyed by image")
    extensions = {e.lower() for e in _fastdiff.IMAGE_EXTENSIONS}
    base = os.path.abspath(root)
    captions: dict[str, str] = {}
    for key, entry in data.items():
        where = f"{path}: {key!r}"
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(f), (str, type(None))) for f in ("caption", "tags")
        ):
            raise ValueError(f"{where}: each value must be an object whose 'caption' and 'tags' are strings")
        named = os.path.abspath(os.path.join(root, key))
        if os.path.commonpath([named, base]) != base:
            raise ValueError(f"{where}: the image lies outside the subset folder {root}")
        if os.path.isfile(named):
            found = [named]
        else:
            folder, stem = os.path.split(named)
            names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
            found = [
                os.path.join(folder, n)
                for n in names
                if os.path.splitext(n)[0] == stem and os.path.splitext(n)[1].lower() in extensions
            ]
        if len(found) != 1:
            what = (
                "no image"
                if not found
                else f"several images ({', '.join(os.path.basename(f) for f in found)})"
            )
            raise ValueError(f"{where}: names {what} in {os.path.dirname(named)}")
        image = os.path.normpath(os.path.join(root, os.path.relpath(found[0], base)))
        if image in captions:
            raise ValueError(f"{where}: names {image}, which another key names too")
        caption, tags = entry.get("caption") or "", entry.get("tags")
        if wildcard and tags is not None:
            tags = tags.replace("\n", separator)
            caption = "\n".join(f"{line}{separator}{tags}" for line in caption.split("\n") if line.strip())
        elif tags:
            caption = f"{caption}{separator}{tags}" if caption else tags
        captions[image] = caption
    return captions


def load_toml(path: Path) -> dict[str, Any]:
    """The tables of a TOML file, as ``tomllib`` reads them.

    Raises:
        ValueError: Invalid TOML (the message names the file).
        ImportError: Python 3.10 without the ``tomli`` package.
    """
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
    """``table`` with aliases renamed to the names they stand for and kohya's ``flip_aug`` /
    ``random_crop`` / ``resolution = [w, h]`` read as fastdiff options (a key and another that stands
    for the same option in one table: an error); refused kohya keys raise ``ValueError`` naming them
    and what to use instead."""
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in table.items():
        name, value = _kohya(key, value, where)
        if name is None:
            continue
        if name in out:
            first, second = (key, given[name]) if given[name] == name else (given[name], key)
            raise ValueError(f"{where}: give one of {first!r} and {second!r}, not both")
        out[name], given[name] = value, key
    return out


def _kohya(key: str, value: Any, where: str) -> tuple[str | None, Any]:
    """The option a TOML key sets and its value (``None``: the key changes nothing)."""
    if key == "resolution" and isinstance(value, list):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{where}: 'resolution' must be an int or a list [width, height], got {value!r}")
        if value[0] != value[1]:
            raise ValueError(
                f"{where}: resolution = {value!r}: fastdiff trains at square target areas "
                "(buckets of at most resolution² pixels, or with enable_bucket = false one "
                f"resolution × resolution size); give an int, such as {int((value[0] * value[1]) ** 0.5)}"
            )
        return "resolution", value[0]
    kohya = KOHYA.get(key)
    if kohya is None:
        return ALIASES.get(key, key), value
    if key == "flip_aug":
        return "flip_prob", 0.5 if value else 0.0
    if key == "random_crop":
        return "crop", "random" if value else "center"
    if key == "enable_bucket":
        return key, value
    if any(value == v and type(value) is type(v) for v in kohya.accepted):
        return None, value
    raise ValueError(f"{where}: {key} = {value!r} is not supported: {kohya.doc.replace('``', '`')}")


def _without_buckets(loader: dict[str, Any], where: str) -> dict[str, Any]:
    """The loader options of kohya's ``enable_bucket`` (popped from ``loader``): with ``false``, one
    fixed ``resolution × resolution`` bucket, whatever the bucket keys say."""
    if loader.pop("enable_bucket", True):
        return loader
    side = loader.get("resolution", LOADER["resolution"].default)
    if not isinstance(side, int) or side < 1:
        raise ValueError(f"{where}: resolution must be a positive int, got {side!r}")
    fixed = {"bucket_step": side, "min_bucket_side": side, "max_bucket_side": side, "no_upscale": False}
    return {**loader, **fixed}


def load_config(config: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[dict[str, Any], list[Subset]]:
    """Read and validate a dataset config of one dataset (a TOML file path, or the same structure as a dict).

    Layout (kohya-ss sd-scripts style)::

        [general]                      # optional: loader options and subset defaults
        resolution = 512
        batch_size = 4
        shuffle_caption = true

        [[datasets]]                   # one dataset per loader (several: load_datasets)
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
    kohya-ss names (``bucket_reso_steps`` ...) as aliases; the other keys kohya documents
    (:data:`fastdiff.options.KOHYA_KEYS`: ``flip_aug``, ``random_crop``, ``enable_bucket``; refused:
    ``color_aug`` ...) and ``resolution = [w, w]``.

    Returns:
        (loader keyword arguments, subsets).

    Raises:
        ValueError: As :func:`load_datasets`, or the config has several datasets.
        ImportError: A TOML file on Python 3.10 without the ``tomli`` package.
    """
    datasets = load_datasets(config)
    if len(datasets) != 1:
        raise ValueError(
            f"{_source(config)}: {len(datasets)} [[datasets]] tables: one loader reads one dataset; "
            "fastdiff.DatasetGroup.from_config reads several (fastdiff train does)"
        )
    return datasets[0]


def _source(config: str | os.PathLike[str] | Mapping[str, Any]) -> str:
    return "config" if isinstance(config, Mapping) else os.fspath(config)


def load_datasets(
    config: str | os.PathLike[str] | Mapping[str, Any],
) -> list[tuple[dict[str, Any], list[Subset]]]:
    """Read and validate a dataset config of one or more ``[[datasets]]`` (see :func:`load_config`).

    Returns:
        Per dataset, in order: (loader keyword arguments, subsets); ``[general]`` holds the defaults of
        every dataset.

    Raises:
        ValueError: Unknown key (named, with its table), wrong type, a refused kohya key (named, with
            what to use instead), no datasets, a dataset without subsets, a subset without
            ``image_dir``, or invalid TOML.
        ImportError: A TOML file on Python 3.10 without the ``tomli`` package.
    """
    source = _source(config)
    if isinstance(config, Mapping):
        data, base = dict(config), Path.cwd()
    else:
        path = Path(config)
        data, base = load_toml(path), path.parent
    _check(data, {"general": dict, "datasets": list}, source)
    general = data.get("general", {})
    _check(general, TABLE_KEYS["[general]"], f"{source} [general]")
    datasets = data.get("datasets", [])
    if not datasets:
        raise ValueError(f"{source}: no [[datasets]] table")
    out = []
    for n, dataset in enumerate(datasets):
        where = f"{source} [[datasets]]" + (f" #{n + 1}" if len(datasets) > 1 else "")
        if not isinstance(dataset, dict):
            raise ValueError(f"{where}: must be a table")
        out.append(_dataset(general, dataset, source, where, base))
    return out


def _dataset(
    general: Mapping[str, Any], dataset: Mapping[str, Any], source: str, where: str, base: Path
) -> tuple[dict[str, Any], list[Subset]]:
    _check(dataset, {**TABLE_KEYS["[[datasets]]"], "subsets": list}, where)
    # Aliases are resolved per table, so a subset's `loss_weight` overrides a `weight` default.
    merged = {
        **_canonical(general, f"{source} [general]"),
        **_canonical({k: v for k, v in dataset.items() if k != "subsets"}, where),
    }
    loader = {k: v for k, v in merged.items() if k in LOADER_KEYS or k == "enable_bucket"}
    loader = _without_buckets(loader, where)
    for o in LOADER_OPTIONS:
        # Loader paths (mask_dir, control_dir) are relative to the file's folder, as image_dir is.
        if o.kind == "path" and o.name in loader:
            loader[o.name] = _from_file(base, loader[o.name])
    subset_defaults = {k: v for k, v in merged.items() if k not in LOADER_KEYS and k != "enable_bucket"}
    raw_subsets = dataset.get("subsets", [])
    if not raw_subsets:
        raise ValueError(f"{where}: has no [[datasets.subsets]]")
    subsets = []
    for i, raw in enumerate(raw_subsets):
        at = f"{where} [[datasets.subsets]] #{i + 1}"
        if not isinstance(raw, dict):
            raise ValueError(f"{at}: must be a table")
        _check(raw, TABLE_KEYS["[[datasets.subsets]]"], at)
        for o in SUBSET_OPTIONS:
            if o.default is dataclasses.MISSING and o.name not in raw:
                raise ValueError(f"{at}: {o.name!r} is required")
        entry = {**subset_defaults, **_canonical(raw, at)}
        for o in SUBSET_OPTIONS:
            if o.kind == "path" and o.name in entry:
                entry[o.name] = _from_file(base, entry[o.name])
        subsets.append(Subset(**entry))
    return loader, subsets


def _from_file(base: Path, path: str) -> str:
    """A config's path taken relative to the config file's folder ``base``; a URL (``s3://…``,
    ``file://…``) as written."""
    return path if "://" in path else os.fspath(base / path)
