"""The metadata of a :class:`fastdiff.training.config.TrainConfig` field: its ``--help`` group, help
text, flag spellings, choices and bounds (:func:`setting`, :func:`loader_setting`), and the check of a
value against them (:func:`check_field`). :mod:`fastdiff.training.config` defines the fields with these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, Field, field
from typing import Any

from fastdiff.options import LOADER

#: ``fastdiff train --help`` sections: every field names one of these as its ``group``.
GROUPS = {
    "data": "the images and captions, and how the loader batches them",
    "model": "what is trained: a Stable Diffusion or flow-matching DiT pipeline (--model), else the tiny "
    "from-scratch model",
    "optimisation": "objective, optimizer, schedule and the non-finite guard",
    "precision": "dtypes, memory, device and threads",
    "checkpoints": "where the run writes, saving and resuming",
    "logging": "validation loss and preview grids (loss.csv and loss.png are always written)",
}
#: Prefix of the help of the settings that only the tiny from-scratch model uses.
FROM_SCRATCH = "From scratch only: "
#: Prefix of the help of the settings that only flow-matching DiT pipelines use.
FLOW_ONLY = "Flow-matching DiT only: "


def setting(
    default: Any = MISSING,
    *,
    group: str,
    help: str,
    flags: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    from_scratch: bool = False,
    min: float | None = None,
    gt: float | None = None,
    max: float | None = None,
    lt: float | None = None,
    parse: Callable[[str], object] | None = None,
) -> Any:
    """A :class:`TrainConfig` field with its documentation and CLI shape as metadata.

    Args:
        default: The value when neither a flag nor the TOML file sets it; ``MISSING``: required.
        group: Key of :data:`GROUPS`: the ``--help`` section.
        help: What it does, in plain text: the flag's help and the attribute's doc.
        flags: Extra flag spellings beside ``--field-name`` (``("--steps",)``).
        choices: The allowed values (``None`` is allowed too when the default is ``None``).
        from_scratch: Only the tiny from-scratch model uses it: setting it with ``model`` is an error
            (its help gets the :data:`FROM_SCRATCH` prefix).
        min: Inclusive lower bound (``None`` passes when the default is ``None``).
        gt: Exclusive lower bound.
        max: Inclusive upper bound.
        lt: Exclusive upper bound.
        parse: For a text field, the function that reads it (raising ``ValueError`` naming the field).

    Returns:
        A ``dataclasses.field``.
    """
    if group not in GROUPS:
        raise ValueError(f"group must be one of {tuple(GROUPS)}, got {group!r}")
    if from_scratch:
        help = FROM_SCRATCH + help
    metadata = {
        "group": group,
        "help": help,
        "flags": flags,
        "choices": choices,
        "from_scratch": from_scratch,
        "min": min,
        "gt": gt,
        "max": max,
        "lt": lt,
        "parse": parse,
    }
    return field(default=default, metadata=metadata)


def loader_setting(name: str, *, default_doc: str) -> Any:
    """A ``data`` :class:`TrainConfig` field for the loader option ``name`` of :mod:`fastdiff.options`.

    The field defaults to ``None``: the dataset config's value, else a default of the training run,
    which ``default_doc`` tells. Its bounds (``minimum``/``maximum``) and choices (a ``Literal``'s
    values) are the schema's, its help the schema's one-line doc (plain text), then ``default_doc``.

    Args:
        name: A key of :data:`fastdiff.options.LOADER`.
        default_doc: What ``None`` means in a training run (``"Default: 64 from scratch; ..."``).

    Returns:
        A ``dataclasses.field``, as :func:`setting`.

    Raises:
        KeyError: ``name`` is not a loader option.
    """
    option = LOADER[name]
    unit = f" Unit: {option.unit}." if option.unit else ""
    return setting(
        None,
        group="data",
        help=f"{option.doc.replace('``', '')}{unit} {default_doc}",
        choices=option.allowed or None,
        min=option.minimum,
        max=option.maximum,
    )


def check_field(f: Field[Any], value: Any) -> None:
    """Raise ``ValueError`` naming ``f`` when ``value`` breaks its metadata's choices, bounds or parse."""
    m = f.metadata
    optional = f.default is None
    if value is None and optional:
        return
    if m["parse"] is not None:
        m["parse"](value)
    if m["choices"] is not None and value not in m["choices"]:
        allowed = (*m["choices"], None) if optional else m["choices"]
        hint = " (fp16 makes SD's VAE overflow to NaN)" if f.name == "vae_dtype" else ""
        raise ValueError(f"{f.name} must be one of {allowed}{hint}, got {value!r}")
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    low, above, high, below = m["min"], m["gt"], m["max"], m["lt"]
    broken = (
        (low is not None and value < low)
        or (above is not None and value <= above)
        or (high is not None and value > high)
        or (below is not None and value >= below)
    )
    if broken:
        start = f"[{low}" if low is not None else f"({above}" if above is not None else "(-inf"
        if high is not None:
            rule = f"in {start}, {high}]"
        elif below is not None:
            rule = f"in {start}, {below})"
        else:
            rule = f">= {low}" if low is not None else f"> {above}"
        raise ValueError(f"{f.name} must be {rule}{' or None' if optional else ''}, got {value}")
