"""What every loader measurement shares: wall and CPU timing (:class:`Throughput`), the machine's
description, and the corpus as fastdiff's scan sees it (image listing, captions, a first-N subset).

This module measures; it must not change how a loader works.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import fastdiff

#: What fastdiff's scan picks up and decodes (compared lowercased); the baseline lists the same files.
#: The scan also finds ``.avif .heic .heif`` files, only to report them as ``unsupported`` skips, and
#: reads ``.jxl``, which the baseline cannot: both are left out here.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif")
#: Caption files tried in order, as fastdiff's default ``caption_extensions``.
CAPTION_EXTENSIONS = (".txt", ".caption")


@dataclass(frozen=True)
class Throughput:
    """One timed measurement: ``images`` delivered to the consumer in ``seconds`` of wall time.

    ``cpu_seconds``: CPU time (user + system) that this process and its descendants (worker
    processes) spent meanwhile, or ``None`` where ``/proc`` is not available. Unlike wall time it
    hardly moves when other work shares the machine.
    """

    images: int
    seconds: float
    cpu_seconds: float | None = None

    @property
    def images_per_second(self) -> float:
        """Throughput in images/s."""
        return self.images / self.seconds

    @property
    def cpu_ms_per_image(self) -> float | None:
        """CPU cost in CPU-milliseconds per image, all threads and worker processes together."""
        return None if self.cpu_seconds is None else 1000 * self.cpu_seconds / self.images


def process_tree_cpu_seconds() -> float | None:
    """CPU seconds (user + system) used so far by this process and every live descendant process.

    Read from ``/proc`` (Linux); ``None`` elsewhere. A descendant that exits between two readings
    takes its CPU time with it, so time only spans over which the worker processes stay alive.
    """
    if not Path("/proc/self/stat").exists():
        return None
    ticks = 0
    pending = [os.getpid()]
    while pending:
        pid = pending.pop()
        try:
            # Fields after the parenthesised command name: state is the 1st, utime the 12th, stime the 13th.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
            for task in Path(f"/proc/{pid}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # the process exited while being read: nothing of it is left to count
    return ticks / os.sysconf("SC_CLK_TCK")


def time_images(run: Callable[[], int]) -> Throughput:
    """Time ``run()``, which returns how many images it delivered, in wall and CPU seconds."""
    cpu0 = process_tree_cpu_seconds()
    t0 = time.perf_counter()
    images = run()
    seconds = time.perf_counter() - t0
    cpu1 = process_tree_cpu_seconds()
    return Throughput(images, seconds, None if cpu0 is None or cpu1 is None else cpu1 - cpu0)


def list_images(root: str | os.PathLike[str]) -> list[Path]:
    """The image files fastdiff's scan finds under ``root``, sorted.

    Recursive; extensions of :data:`IMAGE_EXTENSIONS` in any letter case; any file or folder whose name
    starts with ``.`` (hidden files, macOS ``._*`` stubs) is left out, as fastdiff does.
    """
    base = Path(root)
    found = []
    for path in base.rglob("*"):
        rel = path.relative_to(base)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            found.append(path)
    return sorted(found)


def read_caption(image: Path) -> str:
    """The caption paired with ``image``: the first sibling ``STEM{ext}`` of :data:`CAPTION_EXTENSIONS`."""
    for ext in CAPTION_EXTENSIONS:
        candidate = image.with_suffix(ext)
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8").strip()
    return ""


@contextlib.contextmanager
def limited_root(root: str | os.PathLike[str], limit: int | None) -> Iterator[Path]:
    """Yield a folder holding the first ``limit`` images of ``root`` (sorted) with their captions.

    ``limit=None`` yields ``root`` itself. Otherwise the files are hard-linked into a temporary folder
    (copied where linking is impossible, e.g. across file systems), removed on exit. Links rather than
    symlinks, so that every loader sees plain files.

    Raises:
        ValueError: ``limit`` is below 1 or ``root`` holds no images.
    """
    if limit is None:
        yield Path(root)
        return
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    images = list_images(root)[:limit]
    if not images:
        raise ValueError(f"no images in {root}")
    with tempfile.TemporaryDirectory(prefix="fastdiff-bench-") as tmp:
        for image in images:
            # Flatten nested folders into unique names; the stem keeps image and caption paired.
            stem = "__".join(image.relative_to(root).with_suffix("").parts)
            for src in [image] + [image.with_suffix(ext) for ext in CAPTION_EXTENSIONS]:
                if src.is_file():
                    _link_or_copy(src, Path(tmp, stem + src.suffix))
        yield Path(tmp)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def machine_info() -> dict[str, Any]:
    """What a bench result depends on: CPUs, CPU model, OS and library versions."""
    model = "unknown"
    with contextlib.suppress(FileNotFoundError):  # /proc/cpuinfo exists on Linux only
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(distribution: str) -> str | None:
        # Read from the installed metadata: the baseline's packages are optional (`dev` extra).
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "fastdiff": fastdiff.__version__,
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "pillow": version("pillow"),
    }


def describe(t: Throughput) -> str:
    """One log line's worth of a measurement: images, seconds, images/s, CPU ms/image."""
    cpu = "" if t.cpu_ms_per_image is None else f", {t.cpu_ms_per_image:6.1f} CPU ms/img"
    return f"{t.images:6d} images in {t.seconds:7.2f} s = {t.images_per_second:7.1f} img/s{cpu}"
