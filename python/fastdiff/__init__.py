"""fastdiff: a fast, correct data path for diffusion-model training.

A Rust core (``fastdiff._fastdiff``) scans a folder of images, groups them into aspect-ratio buckets and
decodes, resizes, crops and flips whole batches in native threads with the GIL released;
:class:`DataLoader` hands those batches to torch without copying. Each option is defined once, in
:mod:`fastdiff.options`; the shapes of batches, reports and stats are in :mod:`fastdiff.types`.
"""

from fastdiff._fastdiff import DecodeError, FastdiffError, __version__
from fastdiff.dataset import Subset, load_config
from fastdiff.loader import DataLoader
from fastdiff.types import Batch, LoadStats, Report

__all__ = [
    "Batch",
    "DataLoader",
    "DecodeError",
    "FastdiffError",
    "LoadStats",
    "Report",
    "Subset",
    "__version__",
    "load_config",
]
