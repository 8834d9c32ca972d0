"""Issue 4's mechanisms: fork safety, no thread leak across loader lifetimes, prompt Ctrl-C.

Every test bounds its own waits (a hang fails with a message instead of stalling the suite).
"""

from __future__ import annotations

import _thread
import gc
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fastdiff
import numpy as np
import pytest
import torch
from PIL import Image

SMALL = {"resolution": 64, "bucket_step": 16}


def threads() -> int:
    """Threads of this process right now (Linux: one entry per task)."""
    return len(os.listdir("/proc/self/task"))


def settle(baseline: int, timeout: float = 2.0) -> int:
    """Thread count once it is back to ``baseline`` (or after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while threads() > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
    return threads()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """12 small images of two shapes."""
    rng = np.random.default_rng(0)
    for i in range(12):
        size = (64, 64) if i % 2 else (96, 64)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    return tmp_path


def _child_loads(folder: str, inherited: fastdiff.DataLoader, running: Iterator, out: str) -> None:
    """In the forked child: a new loader and the parent's one must both run a whole epoch; the
    parent's epoch in progress (its workers are not in this process) must say so, not hang."""
    try:
        next(running)
        continued = "continued"
    except fastdiff.InternalError as e:
        continued = "refused" if "started in another process" in str(e) else repr(e)
    fresh = fastdiff.DataLoader(folder, batch_size=2, num_threads=2, **SMALL)
    n_fresh = sum(len(b["paths"]) for b in fresh)
    n_inherited = sum(len(b["paths"]) for b in inherited)
    Path(out).write_text(f"{n_fresh} {n_inherited} {continued}")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_while_iterating_does_not_hang_the_child(folder: Path, tmp_path: Path) -> None:
    loader = fastdiff.DataLoader(folder, batch_size=2, num_threads=2, prefetch=2, **SMALL)
    it = iter(loader)
    next(it)  # worker threads are running (and prefetching) in the parent when it forks
    out = tmp_path / "child.txt"
    child = multiprocessing.get_context("fork").Process(
        target=_child_loads, args=(str(folder), loader, it, str(out))
    )
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("the forked child hung creating or iterating a loader (rayon-after-fork style hang)")
    assert child.exitcode == 0
    assert out.read_text() == "12 12 refused"
    # The parent's own iteration is unaffected.
    assert sum(len(b["paths"]) for b in it) == 10


def test_100_loaders_destroyed_mid_epoch_leave_no_threads(folder: Path) -> None:
    warm = fastdiff.DataLoader(folder, num_threads=2, **SMALL)
    next(iter(warm))
    del warm
    gc.collect()
    baseline = threads()
    for i in range(100):
        loader = fastdiff.DataLoader(folder, batch_size=2, num_threads=3, prefetch=3, seed=i, **SMALL)
        it = iter(loader)
        next(it)  # mid-epoch: threads busy prefetching the next batches
        del it, loader
    gc.collect()
    assert settle(baseline) <= baseline, "worker threads outlived their loaders"


def test_keyboard_interrupt_while_waiting_stops_workers_within_a_second(tmp_path: Path) -> None:
    # Batches slow enough (16 decodes of 1 MP on one thread) that the main thread is waiting in next().
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    for i in range(48):
        Image.fromarray(np.roll(base, i, axis=1)).save(tmp_path / f"{i}.jpg", quality=80)
    loader = fastdiff.DataLoader(
        tmp_path, resolution=1024, batch_size=16, num_threads=1, prefetch=1, dtype=torch.uint8
    )
    baseline = threads()
    fired: list[float] = []

    def interrupt() -> None:
        fired.append(time.monotonic())
        _thread.interrupt_main()  # what Ctrl-C's SIGINT handler does

    timer = threading.Timer(0.15, interrupt)
    timer.start()
    batches = 0
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in loader:
                batches += 1
            pytest.fail("the epoch ended before the interrupt fired; make the batches slower")
    finally:
        timer.cancel()
    caught = time.monotonic()
    assert fired and caught - fired[0] < 1.0, f"KeyboardInterrupt took {caught - fired[0]:.2f}s"
    timer.join()
    assert settle(baseline, timeout=1.0) <= baseline, "worker threads still running after Ctrl-C"
    assert batches < len(loader)
    # The loader is still usable: a new epoch runs to the end.
    assert sum(len(b["paths"]) for b in loader) == 48
