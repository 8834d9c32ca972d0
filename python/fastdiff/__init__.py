"""fastdiff: a fast, correct data path for diffusion-model training.

A Rust core (``fastdiff._fastdiff``) scans a folder of images, groups them into aspect-ratio buckets and
decodes, resizes, crops and flips whole batches in native threads with the GIL released;
:class:`DataLoader` hands those batches to torch without copying.
"""

from fastdiff._fastdiff import DecodeError, FastdiffError, ImageTooSmallError, InternalError, __version__
from fastdiff.dataset import Subset, load_config
from fastdiff.loader import DataLoader

__all__ = [
    "DataLoader",
    "DecodeError",
    "FastdiffError",
    "ImageTooSmallError",
    "InternalError",
    "Subset",
    "__version__",
    "load_config",
]
