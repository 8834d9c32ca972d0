"""Shared fixtures: the real-image corpora, fetched once per machine and cached outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: The workplace's shared folder (corpus scripts), beside the checkout unless FASTDIFF_SHARED says otherwise.
SHARED = Path(os.environ.get("FASTDIFF_SHARED", REPO.parent / "shared"))
#: Where fetched and derived corpora are cached between runs.
CACHE = Path(os.environ.get("FASTDIFF_CACHE", Path.home() / ".cache" / "fastdiff" / "corpus"))


def _corpus_script(name: str) -> Path:
    script = SHARED / "corpus" / name
    if not script.exists():
        pytest.fail(f"{script} is missing: set FASTDIFF_SHARED to the folder holding corpus/{name}")
    return script


@pytest.fixture(scope="session")
def wallpapers() -> Path:
    """~140 real wallpapers (JPEG, PNG, RGBA, grayscale, WebP) with .txt captions (Debian packages)."""
    dest = CACHE / "wallpapers"
    subprocess.run(["bash", str(_corpus_script("fetch_wallpapers.sh")), str(dest)], check=True)
    return dest


@pytest.fixture(scope="session")
def large_photos(wallpapers: Path) -> Path:
    """12 MP phone-style JPEGs (4032x3024), a quarter stored rotated with EXIF orientation 3/6/8."""
    dest = CACHE / "large16"
    if not (dest / ".complete").exists():
        script = _corpus_script("make_photos.py")
        subprocess.run(
            [sys.executable, str(script), str(wallpapers), str(dest), "--kind", "large", "--n", "16"],
            check=True,
        )
        (dest / ".complete").write_text("16\n")
    return dest
