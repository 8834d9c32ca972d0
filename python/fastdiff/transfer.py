"""Batch memory for :class:`fastdiff.DataLoader`: the native batch buffers as torch tensors without a copy,
and from host to device memory (``device=``) pinned host buffers for the native iterator and the per-batch
copy. The copy-ahead on a side stream is the loader's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

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


def batch_tensor(values: Any, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A batch buffer as a torch tensor of ``dtype`` and ``shape``, without a copy: a numpy array viewing
    pool memory (half types as uint16 bit patterns, viewed as ``dtype``), or the 1-D uint8 tensor from
    ``buffer_factory`` that the batch was written into (cut to the batch's bytes and viewed)."""
    if isinstance(values, torch.Tensor):
        nbytes = math.prod(shape) * dtype.itemsize
        return values[:nbytes].view(dtype).view(*shape)
    tensor = torch.from_numpy(values)
    return tensor.view(dtype) if dtype in (torch.float16, torch.bfloat16) else tensor
