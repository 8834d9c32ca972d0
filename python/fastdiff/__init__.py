"""fastdiff: a fast, correct data path for diffusion-model training.

A Rust core (``fastdiff._fastdiff``) scans a folder of images, groups them into aspect-ratio buckets and
decodes, resizes, crops and flips whole batches in native threads with the GIL released;
:class:`DataLoader` hands those batches to torch without copying.
"""

from fastdiff._fastdiff import DecodeError, FastdiffError, __version__
from fastdiff.loader import DataLoader

__all__ = ["DataLoader", "DecodeError", "FastdiffError", "__version__"]
