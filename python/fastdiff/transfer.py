"""Batches from host to device memory for :class:`fastdiff.DataLoader` (``device=``): pinned host buffers
for the native iterator, and the per-batch copy. The copy-ahead on a side stream is the loader's.
"""

from __future__ import annotations

from typing import cast

import torch

from fastdiff.types import Batch


def to_device(batch: Batch, device: torch.device, non_blocking: bool = False) -> Batch:
    """``batch`` with each tensor moved to ``device`` (lists left as they are)."""
    moved = {
        k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
    return cast(Batch, moved)


def pinned_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` of pinned host memory for one batch (the native iterator's ``buffer_factory``).

    torch's caching host allocator recycles the block once the tensor is freed and every
    asynchronous copy from it has completed, so a batch still being copied is never overwritten.
    """
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
