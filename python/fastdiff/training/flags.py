"""The ``fastdiff train`` flags and ``--config`` TOML keys of :class:`~fastdiff.training.config.TrainConfig`,
made from its fields (one flag per field, in the field's ``--help`` group), and the config they give
back: flags win over the TOML file's keys, which win over the defaults.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Mapping
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any

from fastdiff.dataset import load_toml
from fastdiff.training.config import FIELD_TYPES, TrainConfig
from fastdiff.training.settings import GROUPS

#: Placeholders of the flags' values in ``--help``, by element type.
METAVARS: dict[type, str] = {int: "N", float: "X", Path: "PATH"}


def _flag_help(f: Field[Any]) -> str:
    help = f.metadata["help"]
    if f.default is not MISSING and f.default is not None and f.default != ():
        if isinstance(f.default, bool):
            shown = "on" if f.default else "off"
        elif isinstance(f.default, tuple):
            shown = " ".join(str(v) for v in f.default)
        else:
            shown = str(f.default)
        help += f" (default: {shown})"
    return help.replace("%", "%%")  # argparse %-formats help strings


def flag_name(name: str) -> str:
    """The ``fastdiff train`` flag of a field: ``max_steps`` → ``--max-steps``."""
    return "--" + name.replace("_", "-")


def add_train_arguments(parser: argparse.ArgumentParser, names: Collection[str] | None = None) -> None:
    """Add ``--config`` and one flag per :class:`TrainConfig` field, in the field's ``--help`` group.

    Types come from the annotations (``bool`` → ``--x/--no-x``; a tuple → one or more values), help,
    choices and extra spellings from the metadata. Every flag defaults to ``None`` here ("not
    given"): :func:`config_from_args` fills in the TOML file's value, else the field's default.

    Args:
        parser: The subcommand's parser.
        names: Only these fields' flags (``fastdiff cache`` takes the data, loader and model ones);
            ``None``: every field's.
    """
    parser.add_argument(
        "--config", type=Path, help="TOML file whose keys are these flags' names (flags given here win)"
    )
    chosen = [f for f in fields(TrainConfig) if names is None or f.name in names]
    shown = {f.metadata["group"] for f in chosen}
    groups = {name: parser.add_argument_group(name, text) for name, text in GROUPS.items() if name in shown}
    for f in chosen:
        kind, many = FIELD_TYPES[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "help": _flag_help(f)}
        if f.metadata["choices"] is not None:
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if kind is not str:
                kwargs["type"] = kind
                kwargs["metavar"] = METAVARS[kind]
            if many:
                kwargs["nargs"] = "+"
        groups[f.metadata["group"]].add_argument(flag_name(f.name), *f.metadata["flags"], **kwargs)


def read_train_toml(path: Path) -> dict[str, Any]:
    """The settings of a ``fastdiff train --config`` TOML file, as :class:`TrainConfig` field values.

    Keys are the flag names without ``--`` (``max-steps``; ``max_steps`` also works) at the top level;
    relative paths are taken relative to the TOML file's folder, as in dataset configs.

    Returns:
        ``{field name: value}`` of the keys present.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not valid TOML, or a key is not a flag (the message names it).
        ImportError: Python 3.10 without the ``tomli`` package.
    """
    raw = load_toml(Path(path))
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELD_TYPES:
            raise ValueError(f"{path}: unknown key {key!r} (keys are `fastdiff train` flag names)")
        if FIELD_TYPES[name][0] is Path and isinstance(value, str):
            value = Path(path).parent / value
        values[name] = value
    return values


def config_from_mapping(values: Mapping[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from field values as argparse or TOML give them (lists, strings for paths).

    Raises:
        ValueError: ``data`` or ``output`` is missing, or as :class:`TrainConfig`.
    """
    values = dict(values)
    for name in ("data", "output"):
        if values.get(name) is None:
            raise ValueError(f"{flag_name(name)} is required (as a flag or a key of --config)")
    for name, (kind, many) in FIELD_TYPES.items():
        value = values.get(name)
        if value is None:
            continue
        if many:
            values[name] = (value,) if isinstance(value, str | int) else tuple(value)
        elif kind is Path:
            values[name] = Path(value)
    return TrainConfig(**values)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``fastdiff train`` arguments: flags given win over the
    ``--config`` file's keys, which win over the defaults.

    Raises:
        ValueError: As :func:`read_train_toml` and :func:`config_from_mapping`.
    """
    given = {k: v for k, v in vars(args).items() if v is not None and k in FIELD_TYPES}
    from_file = read_train_toml(args.config) if getattr(args, "config", None) is not None else {}
    return config_from_mapping({**from_file, **given})
