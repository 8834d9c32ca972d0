"""Shared fixtures: the real-image corpora, made once per machine by scripts/corpus.py and cached outside
the checkout (``$FASTDIFF_CACHE``, else ``~/.cache/fastdiff/corpus``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import corpus  # scripts/corpus.py: pyproject's [tool.pytest.ini_options] puts scripts/ on the path
import pytest

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
