"""Batch memory: recycled buffers never overwrite a batch still in use; pinned / caller-provided memory."""

from __future__ import annotations

import gc
from pathlib import Path

import fastdiff
import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 JPEGs of random noise in three aspect ratios (so three buckets), each with a caption."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for i in range(24):
        w, h = [(96, 96), (128, 64), (64, 128)][i % 3]
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(noise).save(root / f"{i:02}.jpg", quality=90)
        (root / f"{i:02}.txt").write_text(f"noise {i}")
    return root


def loader(folder: Path, **kw: object) -> fastdiff.DataLoader:
    opts: dict = {"resolution": 64, "bucket_step": 16, "batch_size": 2, "num_threads": 2, "shuffle": False}
    return fastdiff.DataLoader(folder, **(opts | kw))


def test_dropped_batches_reuse_a_few_buffers(folder: Path) -> None:
    dl = loader(folder, prefetch=2)
    addresses = set()
    for batch in dl:
        addresses.add(batch["pixel_values"].data_ptr())
        del batch
    assert len(dl) == 12
    # prefetch (2) being loaded + the one in hand + one waiting to be reused.
    assert len(addresses) <= 4, addresses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_batches_kept_by_the_caller_are_never_overwritten(folder: Path, dtype: torch.dtype) -> None:
    dl = loader(folder, dtype=dtype, prefetch=1)
    kept, copies, views = [], [], []
    for batch in dl:
        px = batch["pixel_values"]
        kept.append(px)
        copies.append(px.clone())
        # A view of a view: keeps the memory alive though the batch's own tensor is gone.
        views.append((px[0].clone(), px[0]))
    gc.collect()
    for a, b in zip(kept, copies, strict=True):
        assert torch.equal(a, b)
    # Only the views survive now: the memory they alias must still be theirs.
    del kept, batch, px
    gc.collect()
    for _ in loader(folder, dtype=dtype, prefetch=1):
        pass
    for copy, view in views:
        assert torch.equal(copy, view)


def test_buffer_factory_memory_gets_the_same_batches(folder: Path) -> None:
    dl = loader(folder, flip_prob=0.5, crop="random")
    reference = [b["pixel_values"].clone() for b in dl]
    requested: list[int] = []

    def factory(nbytes: int) -> torch.Tensor:
        requested.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    native = dl._native.iter_epoch(0, 0, factory)
    got = []
    for pixels, captions, _, _, target_sizes, _, _, _ in native:
        assert isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8
        (h, w), b = target_sizes[0], len(captions)
        got.append(pixels[: b * 3 * h * w * 4].view(torch.float32).view(b, 3, h, w))
    assert len(got) == len(reference) == len(requested)
    for a, b in zip(got, reference, strict=True):
        assert torch.equal(a, b)
        assert a.nbytes in requested


def test_buffer_factory_errors_reach_the_caller(folder: Path) -> None:
    dl = loader(folder)

    def no_memory(nbytes: int) -> torch.Tensor:
        raise RuntimeError(f"cannot pin {nbytes} bytes")

    with pytest.raises(RuntimeError, match=r"^cannot pin \d+ bytes$"):  # raised as itself
        next(dl._native.iter_epoch(0, 0, no_memory))

    def interrupted(nbytes: int) -> torch.Tensor:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        next(dl._native.iter_epoch(0, 0, interrupted))

    # Worker threads write through the pointer: anything but enough contiguous host bytes is refused.
    bad = {
        "too small": (lambda n: torch.empty(n // 2, dtype=torch.uint8), r"got \d+ bytes"),
        "numpy": (lambda n: np.empty(n, dtype=np.uint8), "got a ndarray"),
        "float32": (lambda n: torch.empty(n, dtype=torch.float32), "dtype torch.float32"),
        "2-D": (lambda n: torch.empty(1, n, dtype=torch.uint8), "2 dimensions"),
        "strided": (lambda n: torch.empty(2 * n, dtype=torch.uint8)[::2], "contiguous false"),
    }
    for factory, detail in bad.values():
        message = r"buffer_factory\(\d+\) must return a 1-D contiguous uint8 CPU torch.Tensor .*" + detail
        with pytest.raises(ValueError, match=message):
            next(dl._native.iter_epoch(0, 0, factory))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without CUDA")
def test_pin_memory_without_cuda_warns_and_loads_unpinned(folder: Path) -> None:
    with pytest.warns(UserWarning, match="CUDA is not available"):
        dl = loader(folder, pin_memory=True)
    assert not dl.pin_memory
    reference = [b["pixel_values"] for b in loader(folder)]
    assert all(torch.equal(a["pixel_values"], b) for a, b in zip(dl, reference, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pin_memory_fills_pinned_tensors_copied_asynchronously(folder: Path) -> None:
    reference = [b["pixel_values"].clone() for b in loader(folder)]
    dl = loader(folder, pin_memory=True)
    on_gpu = []
    for batch in dl:
        px = batch["pixel_values"]
        assert px.is_pinned()
        on_gpu.append(px.to("cuda", non_blocking=True))
    torch.cuda.synchronize()
    for a, b in zip(on_gpu, reference, strict=True):
        assert torch.equal(a.cpu(), b)
