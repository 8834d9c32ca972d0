"""Writing entries into a cache folder's shards: the native ``ShardWriter`` (atomic: a shard appears
whole, fsynced and renamed, or not at all), a new shard every :data:`SHARD_ENTRIES` entries or
:data:`SHARD_BYTES` bytes, so a killed build loses at most one shard's worth of work."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import torch

from fastdiff import _fastdiff
from fastdiff.cache.encoders import TORCH_DTYPES
from fastdiff.cache.manifest import StorageDtype

#: Entries per shard before it is finished (a kill loses at most this many).
SHARD_ENTRIES = 256
#: Bytes of tensor data per shard before it is finished (the issue's bound: <= 1 GiB per shard).
SHARD_BYTES = 1 << 30


class Shards:
    """Entries of one kind written through native ``ShardWriter``\\ s, rotating shards.

    Args:
        cache: An existing cache folder.
        kind: ``"latents"`` or ``"text"``.
        dtype: The storage dtype (the manifest half's ``dtype``).

    Attributes:
        written: The shard files finished so far.
        seconds: Wall time spent in :meth:`add` and :meth:`finish` so far (converting the tensors to
            the storage dtype on the CPU, copying them into the writer, writing and fsyncing shards).
    """

    def __init__(self, cache: Path, kind: Literal["latents", "text"], dtype: StorageDtype) -> None:
        self.cache, self.kind, self.dtype = cache, kind, dtype
        self.torch_dtype = TORCH_DTYPES[dtype]
        self.writer: _fastdiff.ShardWriter | None = None
        self.written: list[Path] = []
        self.seconds = 0.0

    def add(self, key: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Add entry ``key``: ``meta`` its provenance (JSON object; the writer adds the checksum),
        ``tensors`` its tensors (per-entry shapes, any float dtype and device), stored in ``dtype``.

        Raises:
            ValueError: As ``ShardWriter.add`` (a key repeated within a shard, a bad meta).
            OSError: A finished shard could not be written.
        """
        start = time.perf_counter()
        if self.writer is None:
            self.writer = _fastdiff.ShardWriter(self.cache, self.kind)
        parts: list[tuple[str, StorageDtype, tuple[int, ...], Any]] = []  # Any: a numpy buffer
        for name, tensor in tensors.items():
            data = tensor.detach().to("cpu", self.torch_dtype).contiguous()
            parts.append((name, self.dtype, tuple(data.shape), data.view(torch.uint8).numpy()))
        self.writer.add(key, json.dumps(meta), parts)
        self.seconds += time.perf_counter() - start
        if len(self.writer) >= SHARD_ENTRIES or self.writer.nbytes >= SHARD_BYTES:
            self.finish()

    def finish(self) -> None:
        """Finish the open shard (if any): its entries are in the cache from now on."""
        if self.writer is not None:
            start = time.perf_counter()
            self.written.append(Path(self.writer.finish()))
            self.writer = None
            self.seconds += time.perf_counter() - start
