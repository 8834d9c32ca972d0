"""fastdiff: a fast, correct data path for diffusion-model training.

A Rust core (``fastdiff._fastdiff``) scans a folder of images, groups them into aspect-ratio buckets and
decodes, resizes, crops and flips whole batches in native threads with the GIL released;
:class:`DataLoader` hands those batches to torch without copying. Each option is defined once, in
:mod:`fastdiff.options`; the shapes of batches, reports and stats are in :mod:`fastdiff.types`.

The torch-facing names load on first use (PEP 562), so that ``import fastdiff`` and the ``fastdiff``
command start without importing torch: a command can then refuse at once when an extra is missing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastdiff._fastdiff import (
    CacheMissError,
    CorruptCacheError,
    DecodeError,
    FastdiffError,
    ImageTooSmallError,
    InternalError,
    __version__,
)

if TYPE_CHECKING:
    from fastdiff.dataset import Subset, load_config, load_datasets
    from fastdiff.group import DatasetGroup
    from fastdiff.loader import DataLoader
    from fastdiff.types import Batch, LoadStats, Report

#: Public name -> the module that defines it, imported when the name is first read.
_LAZY = {
    "Batch": "fastdiff.types",
    "DataLoader": "fastdiff.loader",
    "DatasetGroup": "fastdiff.group",
    "LoadStats": "fastdiff.types",
    "Report": "fastdiff.types",
    "Subset": "fastdiff.dataset",
    "load_config": "fastdiff.dataset",
    "load_datasets": "fastdiff.dataset",
}

__all__ = [
    "Batch",
    "CacheMissError",
    "CorruptCacheError",
    "DataLoader",
    "DatasetGroup",
    "DecodeError",
    "FastdiffError",
    "ImageTooSmallError",
    "InternalError",
    "LoadStats",
    "Report",
    "Subset",
    "__version__",
    "load_config",
    "load_datasets",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
