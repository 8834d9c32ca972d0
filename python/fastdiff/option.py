"""What one loader or subset option is: the :class:`Option` record (name, type, default, range, docs,
TOML tables, alias) and the checks and renderings that follow from it.

The options themselves are defined once, in :mod:`fastdiff.options`; this module only says what an
option record holds and does. A bottom layer: imports nothing from fastdiff.
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
            ``tuple[int, int, int]``, ``Sequence[str]``, a device (``str | torch.device``), a
            runtime-checkable ``Protocol`` (any object that has its attributes) or a ``Sequence`` of
            one; ``| None`` lets ``None`` through.
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
    def takes_path_list(self) -> bool:
        """Whether a path option also takes a list of paths (``image_dir``: tar shards)."""
        args = {a for a in _union_args(self.annotation) if a is not type(None)}
        return args == {str, os.PathLike[str], Sequence[str | os.PathLike[str]]}

    @property
    def kind(
        self,
    ) -> Literal[
        "int", "float", "bool", "str", "choice", "path", "ints", "strs", "device", "object", "objects"
    ]:
        """What the values are, read from the annotation."""
        args = [a for a in _union_args(self.annotation) if a is not type(None)]
        if set(args) == {str, os.PathLike[str]} or self.takes_path_list:
            return "path"
        if set(args) == {str, torch.device}:
            return "device"
        (core,) = args
        if self.choices or get_origin(core) is Literal:
            return "choice"
        if get_origin(core) is tuple:
            return "ints"
        if get_origin(core) is Sequence:
            return "objects" if _is_protocol(get_args(core)[0]) else "strs"
        if _is_protocol(core):
            return "object"
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
            if self.takes_path_list and isinstance(value, (list, tuple)):
                ok = bool(value) and all(isinstance(v, (str, os.PathLike)) for v in value)
                return None if ok else f"{name} must be a non-empty list of paths, got {value!r}"
            return None if ok else f"{name} must be a path (str or os.PathLike), got {value!r}"
        if kind == "device":
            if isinstance(value, torch.device):
                return None
            try:
                torch.device(value)
            except (RuntimeError, TypeError):
                example = '("cuda", "cuda:1", "cpu")'
                return f"{name} must be a torch.device or a device string {example}, got {value!r}"
            return None
        if kind in ("object", "objects"):
            protocol = _core(self.annotation)
            protocol = get_args(protocol)[0] if kind == "objects" else protocol
            what = f"a fastdiff.types.{protocol.__name__} (such as a transformers tokenizer)"
            if kind == "object":
                return None if isinstance(value, protocol) else f"{name} must be {what}, got {value!r}"
            items = _items(value)
            if items and all(isinstance(c, protocol) for c in items):
                return None
            return f"{name} must be a non-empty sequence, each {what}, got {value!r}"
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
        if kind == "path" and self.takes_path_list:
            # The native side takes a list (one path given alone is a list of one).
            return [os.fspath(v) for v in value] if isinstance(value, (list, tuple)) else [os.fspath(value)]
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


@dataclass(frozen=True)
class KohyaKey:
    """A key of kohya-ss sd-scripts' dataset config (``docs/config_README-en.md``) that is neither an
    option name nor an alias: read as fastdiff options, or refused.

    Attributes:
        key: The TOML key.
        toml_type: The Python type its TOML value must have.
        toml: The tables that accept it.
        doc: What fastdiff does with it (RST), the README's kohya table and, for a refused value, the
            error message: what to use instead.
        options: The fastdiff options it sets (empty: refused).
        accepted: For a refused key, the values accepted because they change nothing (kohya's
            defaults, such as ``color_aug = false``).
    """

    key: str
    toml_type: type
    toml: tuple[Table, ...]
    doc: str
    options: tuple[str, ...] = ()
    accepted: tuple[Any, ...] = ()

    @property
    def refused(self) -> bool:
        """Whether fastdiff refuses the key (values other than :attr:`accepted`)."""
        return not self.options


def _is_protocol(annotation: Any) -> bool:
    """Whether ``annotation`` is a ``typing.Protocol`` class that ``isinstance`` can check."""
    return isinstance(annotation, type) and bool(getattr(annotation, "_is_runtime_protocol", False))


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


def subset_override(option: Option, doc: str) -> Option:
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


def loader_option(name: str, annotation: Any, default: Any, doc: str, **facts: Any) -> Option:
    """A :class:`fastdiff.DataLoader` option (``facts``: the other fields of :class:`Option`)."""
    return Option(name, annotation, default, doc, "loader", **facts)


def subset_option(name: str, annotation: Any, default: Any, doc: str, **facts: Any) -> Option:
    """A :class:`fastdiff.Subset` option, in every TOML table unless ``facts`` say otherwise."""
    return Option(name, annotation, default, doc, "subset", **{"toml": ALL_TABLES, **facts})


def saved(options: Sequence[Option], values: Mapping[str, Any]) -> dict[str, Any]:
    """What a loader's ``state_dict`` records of ``values`` (option name → value, already checked)."""
    return {
        o.name: o.saved_value(values[o.name])
        for o in options
        if o.state == "always" or (o.state == "unless_default" and values[o.name] != o.default)
    }
