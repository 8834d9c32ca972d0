"""Docs rendered from the option schema (:mod:`fastdiff.options`): docstring ``Args:`` entries and the
README's options table, so that no option is described anywhere by hand but in the schema.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Sequence

from fastdiff.options import ALL_TABLES, KOHYA_KEYS, LOADER_OPTIONS, SUBSET_OPTIONS, KohyaKey, Option

#: The line of a docstring's ``Args:`` section that :func:`with_args` replaces by the options' entries.
ARGS_MARKER = "(the options: see fastdiff.options)"


def with_args(doc: str | None, options: Sequence[Option]) -> str | None:
    """``doc`` with its :data:`ARGS_MARKER` line replaced by the ``Args:`` entries of ``options``.

    Under ``python -OO`` (docstrings stripped; a dataclass then makes up its own) ``doc`` is returned
    as it is.

    Raises:
        ValueError: ``doc`` has no marker line.
    """
    if doc is None or sys.flags.optimize >= 2:
        return doc
    for line in doc.splitlines():
        if line.strip() == ARGS_MARKER:
            indent = line[: len(line) - len(line.lstrip())]
            return doc.replace(line, args_doc(options, indent), 1)
    raise ValueError(f"the docstring has no {ARGS_MARKER!r} line")


def args_doc(options: Sequence[Option], indent: str) -> str:
    """Google-style ``Args:`` entries of ``options`` (for a docstring), each line prefixed by ``indent``."""
    lines = []
    for o in options:
        facts = [f"Default: {o.default_text}."]
        if o.allowed_text:
            facts.append(f"Allowed: {o.allowed_text}.")
        if o.unit:
            facts.append(f"Unit: {o.unit}.")
        text = " ".join(part for part in (o.doc, o.details, *facts) if part)
        wrapped = textwrap.wrap(
            f"{o.name}: {text}", width=110 - len(indent), subsequent_indent="    ", break_on_hyphens=False
        )
        lines += [indent + line for line in wrapped]
    return "\n".join(lines)


def markdown_table() -> str:
    """The README's tables of every option, rendered from the schema (markdown)."""

    def md(rst: str) -> str:
        return rst.replace("``", "`").replace("|", "\\|")

    def toml(o: Option) -> str:
        return toml_tables(o.toml) + (f"; kohya: `{o.alias}`" if o.alias else "")

    header = (
        "| Option | Default | Allowed | Unit | TOML tables | `scan` flag | What it does |\n"
        "|---|---|---|---|---|---|---|"
    )
    parts = []
    for title, options in (
        ("`fastdiff.DataLoader(...)` arguments (the same keys in a dataset TOML)", LOADER_OPTIONS),
        (
            "`fastdiff.Subset(...)` fields (TOML: any = in a subset, or in `[general]` / `[[datasets]]` as "
            "every subset's default)",
            SUBSET_OPTIONS,
        ),
    ):
        rows = [
            f"| `{o.name}` | {md(o.default_text)} | {md(o.allowed_text)} | {o.unit} | {md(toml(o))} "
            f"| {f'`{o.flag}`' if o.scan else ''} | {md(o.doc)} |"
            for o in options
        ]
        parts.append(f"{title}:\n\n{header}\n" + "\n".join(rows))
    kohya = [f"| `{k.key}` | {toml_tables(k.toml)} | {_sets(k)} | {md(k.doc)} |" for k in KOHYA_KEYS]
    parts.append(
        "The other keys of kohya-ss sd-scripts' `docs/config_README-en.md` (TOML only; "
        "`resolution = [w, w]` is `resolution = w`):\n\n"
        "| Key | TOML tables | Sets | What fastdiff does |\n|---|---|---|---|\n" + "\n".join(kohya)
    )
    return "\n\n".join(parts)


def toml_tables(tables: Sequence[str]) -> str:
    """The README's TOML-tables cell: ``any`` for all three tables, else each named."""
    return "any" if tuple(tables) == ALL_TABLES else ", ".join(f"`{t}`" for t in tables)


def _sets(k: KohyaKey) -> str:
    """The options a kohya key sets, or ``refused`` with the values it accepts."""
    if not k.refused:
        return ", ".join(f"`{o}`" for o in k.options)
    accepted = ", ".join(f"`{str(v).lower() if isinstance(v, bool) else repr(v)}`" for v in k.accepted)
    return "refused" + (f" unless {accepted}" if accepted else "")
