"""Shared fixtures: the real-image corpora, made once per machine by scripts/corpus.py and cached outside
the checkout (``$FASTDIFF_CACHE``, else ``~/.cache/fastdiff/corpus``)."""

from __future__ import annotations

import shutil
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import corpus  # scripts/corpus.py: pyproject's [tool.pytest.ini_options] puts scripts/ on the path
import pytest
import torch

if TYPE_CHECKING:
    from fastdiff.training.config import TrainConfig

CACHE = corpus.cache_dir()


def _made(make: Callable[[], Path]) -> Path:
    """``make()``, with a corpus that cannot be made here failing the test in one line, not a traceback."""
    try:
        return make()
    except corpus.CorpusError as e:
        pytest.fail(f"cannot make the test corpus: {e}", pytrace=False)


@pytest.fixture(scope="session")
def wallpapers() -> Path:
    """~140 real wallpapers (JPEG, PNG, RGBA, grayscale, WebP) with .txt captions (Debian packages)."""
    return _made(lambda: corpus.wallpapers(CACHE / "wallpapers"))


@pytest.fixture(scope="session")
def large_photos(wallpapers: Path) -> Path:
    """16 phone-style JPEGs of 12 MP (4032x3024), 4 of them stored rotated with EXIF orientation 3/6/8."""
    return _made(lambda: corpus.derived(wallpapers, CACHE / "large16", "large", 16))


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: faster on the 2-core CI machine, and the same reduction order every run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smallest_images(wallpapers: Path, n: int) -> list[Path]:
    """The ``n`` smallest wallpaper files (by bytes, then name); each has a ``.txt`` caption beside it."""
    return sorted(
        (p for p in wallpapers.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")),
        key=lambda p: (p.stat().st_size, p.name),
    )[:n]


def copy_with_captions(images: list[Path], dest: Path) -> Path:
    """Copy ``images`` and their ``.txt`` captions into ``dest`` (created); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for image in images:
        shutil.copy(image, dest / image.name)
        shutil.copy(image.with_suffix(".txt"), dest / f"{image.stem}.txt")
    return dest


def tiny_run(model: Path, data: Path, output: Path, **settings: object) -> TrainConfig:
    """The settings of a few CPU steps on a tiny local pipeline: resolution 32 with 8-pixel bucket steps,
    batches of 2, no checkpoints, one loader thread; ``settings`` set or override any others."""
    from fastdiff.training.config import TrainConfig

    base: dict[str, object] = {
        "resolution": 32,
        "bucket_step": 8,
        "batch_size": 2,
        "checkpoint_every": 0,
        "num_threads": 1,
        "device": "cpu",
    }
    return TrainConfig(data=data, output=output, model=model, **{**base, **settings})  # type: ignore[arg-type]


def write_header_png(path: Path, width: int, height: int) -> Path:
    """A ``width`` x ``height`` PNG that is only its signature and IHDR chunk: ``DataLoader`` scans it
    (it reads headers only) but cannot decode it, so bucketing, planning and reports can be tested on any
    shapes without pixels. Returns ``path``."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    crc = struct.pack(">I", zlib.crc32(ihdr))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + crc)
    return path
