#!/usr/bin/env python3
"""The real-image corpora that the tests and benches run on, fetched and derived by the project itself.

Each corpus is a flat folder of images, every image with a caption file of the same stem (``.txt``):

- ``wallpapers``: the desktop wallpapers Debian ships (:data:`WALLPAPER_PACKAGES`, fetched with
  ``apt-get download`` and unpacked with ``dpkg-deb -x``; nothing is installed). About 140 images of
  256-5640 px, ~200 MB: JPEG (RGB and grayscale), PNG (RGB, RGBA, gray+alpha) and WebP. Each file is
  named ``NNN_<theme>_<file stem>`` after the folder it came from.
- ``photos``: JPEG crops of the wallpapers, 0.6-2.5 MP, aspect 1:2 to 2:1, quality 85/90/95, about 15 %
  progressive and 20 % with 4:4:4 chroma (the rest 4:2:0): a typical fine-tuning set.
- ``large``: 4032x3024 phone-style JPEGs (about 30 % portrait, 3024x4032); every fourth one (index
  3, 7, 11, ...) is stored rotated with EXIF Orientation 3, 6 or 8, so that turning it upright as the tag
  says gives back the crop. Any ``--n`` of 4 or more therefore holds rotated photos.

The derived kinds are a pure function of (source folder, kind, n, seed): image ``i`` draws all its
parameters from its own generator, seeded with ``(kind, seed, i)``.

A corpus folder is complete when it holds a ``.complete`` marker: the image count, then the recipe it
was made by (the packages; or the kind, n, seed, generator version and a digest of the source folder's
listing). A complete folder made by another recipe (another ``--n``, an older generator, other
wallpapers, or a marker from before recipes were written) is rebuilt, never reused. It is built in a
hidden sibling folder and renamed into place, under an exclusive lock on a hidden sibling ``.lock`` file:
two processes that start at once build it once, and nobody ever sees half a corpus.

Usage, from the repository root (each command does nothing when DEST is complete by the same recipe)::

    python scripts/corpus.py wallpapers DEST                   # needs apt-get and dpkg-deb
    python scripts/corpus.py photos SRC DEST --n 1000 [--seed 0]  # needs Pillow
    python scripts/corpus.py large SRC DEST --n 200 [--seed 0]

``tests/conftest.py`` imports it (pytest puts ``scripts/`` on the path). It must not import fastdiff: it
makes the inputs that fastdiff is tested on, and Pillow is the independent reference.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from PIL import Image

#: Debian packages whose images make the ``wallpapers`` corpus (all of them in Debian 12 and Ubuntu 24.04).
WALLPAPER_PACKAGES = (
    "gnome-backgrounds",
    "plasma-workspace-wallpapers",
    "ukui-wallpapers",
    "lomiri-wallpapers",
    "mate-backgrounds",
    "sway-backgrounds",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MARKER = ".complete"
#: Bumped whenever :func:`plan`, :func:`render` or the JPEG settings change what a derived image holds, so
#: that caches made by an older generator are rebuilt.
GENERATOR_VERSION = 2
Kind = Literal["photos", "large"]
#: Shortest side (px) a wallpaper needs to be cropped from: crops of at least half of it stay sharp.
MIN_SOURCE_SIDE: dict[Kind, int] = {"photos": 1000, "large": 1500}
#: EXIF Orientation -> the transpose that stores an upright image so that the tag turns it back
#: (Orientation 6 means "rotate 90 degrees clockwise to view", so the pixels are kept turned anticlockwise).
STORED_ROTATION = {3: "ROTATE_180", 6: "ROTATE_90", 8: "ROTATE_270"}


class CorpusError(RuntimeError):
    """A corpus cannot be made: no apt-get, a failed download, no usable source, a foreign folder at DEST."""


def cache_dir() -> Path:
    """Where corpora are cached between runs: ``$FASTDIFF_CACHE``, else ``~/.cache/fastdiff/corpus``."""
    return Path(os.environ.get("FASTDIFF_CACHE") or Path.home() / ".cache" / "fastdiff" / "corpus")


def image_files(folder: Path) -> list[Path]:
    """The images directly in ``folder`` (by suffix, hidden files excluded), sorted by name."""
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def wallpapers(dest: Path) -> Path:
    """Fetch the ``wallpapers`` corpus into ``dest`` unless it is complete there by the same recipe.

    Returns:
        ``dest``.

    Raises:
        CorpusError: apt-get or dpkg-deb is missing, the download fails even after one ``apt-get update``,
            or ``dest`` is a non-empty folder without a ``.complete`` marker.
    """
    recipe = "wallpapers packages=" + ",".join(WALLPAPER_PACKAGES)
    return _build_once(Path(dest), _fetch_wallpapers, recipe)


def derived(src: Path, dest: Path, kind: Kind, n: int, seed: int = 0) -> Path:
    """Make ``n`` images of ``kind`` (``photos`` or ``large``) from the wallpapers in ``src`` into ``dest``.

    Returns:
        ``dest``, which then holds ``n`` JPEGs with their captions.

    Raises:
        CorpusError: ``src`` has no image with a short side of at least :data:`MIN_SOURCE_SIDE` px, or
            ``dest`` is a non-empty folder without a ``.complete`` marker.
        ValueError: ``n`` < 1.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    src = Path(src)
    # The source's listing (names and byte sizes) stands for its content: the wallpapers never change
    # in place, they are replaced by a rebuild.
    listing = "\n".join(f"{p.name} {p.stat().st_size}" for p in image_files(src))
    digest = hashlib.sha256(listing.encode()).hexdigest()[:16]
    recipe = f"{kind} n={n} seed={seed} generator={GENERATOR_VERSION} source={digest}"
    return _build_once(Path(dest), lambda out: _derive(src, out, kind, n, seed), recipe)


# ---------------------------------------------------------------------------------------------------
# Building once, atomically.


def _made_by(dest: Path) -> tuple[int, str] | None:
    """The image count and recipe of a complete corpus at ``dest``; ``None`` when it is not complete.

    A marker from before recipes were written (empty, or the count alone) has the recipe ``""``.
    """
    marker = dest / MARKER
    if not marker.is_file():
        return None
    count, _, recipe = marker.read_text().strip().partition("\n")
    return (int(count) if count.isdigit() else len(image_files(dest))), recipe.strip()


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock`` (created if missing) for the ``with`` block."""
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to finish {lock.parent / lock.stem[1:]} ...", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock, also when the process dies


def _build_once(dest: Path, build: Callable[[Path], int], recipe: str) -> Path:
    """Run ``build(folder) -> image count`` into a fresh folder and rename it to ``dest``, once per recipe."""
    made = _made_by(dest)
    if made is not None and made[1] == recipe:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.parent / f".{dest.name}.lock"):
        made = _made_by(dest)  # another process may have finished it while we waited
        if made is not None and made[1] == recipe:
            return dest
        if made is None and dest.exists() and any(dest.iterdir()):
            raise CorpusError(
                f"{dest} exists but has no {MARKER} marker (an interrupted build by another tool?): "
                "remove it and run again"
            )
        if made is not None:
            recorded = made[1] or "unrecorded"
            print(f"{dest} was made by another recipe ({recorded}): rebuilding", file=sys.stderr)
        partial = dest.parent / f".{dest.name}.partial"
        stale = dest.parent / f".{dest.name}.stale"
        for leftover in (partial, stale):  # left behind by a build that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        partial.mkdir()
        try:
            count = build(partial)
            (partial / MARKER).write_text(f"{count}\n{recipe}\n")
            if made is not None:
                dest.replace(stale)
            partial.replace(dest)  # also replaces an empty folder at dest
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    return dest


# ---------------------------------------------------------------------------------------------------
# wallpapers: Debian's packages.


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _apt_download(folder: Path) -> None:
    """``apt-get download`` the wallpaper packages into ``folder``; one ``apt-get update`` on failure."""
    download = ["apt-get", "download", *WALLPAPER_PACKAGES]
    if _run(download, cwd=folder).returncode == 0:
        return
    # A fresh container has no package lists, an old one stale lists (a newer version replaced the one it
    # names): refresh them once. Updating needs root; `sudo -n` fails at once rather than asking.
    sudo = [] if os.geteuid() == 0 or shutil.which("sudo") is None else ["sudo", "-n"]
    update = _run([*sudo, "apt-get", "update", "-qq"])
    for leftover in folder.iterdir():
        leftover.unlink()
    retry = _run(download, cwd=folder)
    if retry.returncode != 0:
        raise CorpusError(
            f"`{' '.join(download)}` failed, also after `apt-get update` "
            f"(exit {update.returncode}{': ' + update.stderr.strip() if update.returncode else ''}): "
            + retry.stderr.strip()[-2000:]
        )


def _theme(path: Path) -> tuple[str, str]:
    """The theme and variant that a packaged wallpaper's folder says it belongs to.

    KDE themes are ``<Theme>/contents/images/WxH.ext`` (``images_dark/`` for the dark variant) with a
    ``<Theme>/contents/screenshot.ext`` preview; the other packages keep files in a folder per theme
    (``backgrounds/mate/nature/Aqua.jpg``).

    Returns:
        ``(theme, variant)``, the variant ``"dark"`` or ``""``.
    """
    parts = path.parts
    if "contents" in parts[:-1]:
        at = len(parts) - 1 - parts[::-1].index("contents")
        return parts[at - 1], "dark" if "images_dark" in parts[at + 1 : -1] else ""
    return path.parent.name, ""


def _caption_words(text: str) -> str:
    """``"MilkyWay_5120x2880-dark"`` -> ``"milky way dark"``: the words of a file or folder name."""
    text = re.sub(r"\d+x\d+", " ", text)
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", text)  # CamelCase theme names
    return " ".join(re.findall(r"[A-Za-z]+", text)).lower()


def _fetch_wallpapers(out: Path) -> int:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusError(
                f"{tool} not found: the wallpapers corpus is made from Debian packages (Debian/Ubuntu only); "
                f"elsewhere, copy a complete corpus folder into {out.parent} (FASTDIFF_CACHE moves it)"
            )
    # Beside `out`, so that moving the images into it is a rename on the same file system.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.debs.") as tmp:
        debs, tree = Path(tmp) / "debs", Path(tmp) / "tree"
        debs.mkdir()
        _apt_download(debs)
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
        # Regular files only: the packages also hold symlinks that repeat an image under other sizes.
        found = sorted(
            p
            for p in tree.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.is_symlink()
        )
        if not found:
            raise CorpusError(f"the packages {', '.join(WALLPAPER_PACKAGES)} hold no image")
        for i, path in enumerate(found):
            theme, variant = _theme(path)
            name = "_".join(part for part in (f"{i:03d}", theme, variant, path.stem) if part)
            stem = re.sub(r"[^A-Za-z0-9_-]", "_", name)
            shutil.move(path, out / f"{stem}{path.suffix.lower()}")
            words = _caption_words(f"{path.stem} {theme} {variant}")
            (out / f"{stem}.txt").write_text(f"a desktop wallpaper, {words}\n", encoding="utf-8")
    return len(found)


# ---------------------------------------------------------------------------------------------------
# photos and large: deterministic JPEGs cut from the wallpapers.


@dataclass(frozen=True)
class Plan:
    """Everything about one derived image, drawn before any pixel is touched.

    ``box`` is the crop in the source's pixels (left, top, right, bottom; floats: the resize samples
    sub-pixel boxes); ``size`` the upright output (width, height); ``orientation`` the EXIF tag (1: none).
    """

    index: int
    source: Path
    box: tuple[float, float, float, float]
    size: tuple[int, int]
    flip: bool
    quality: int
    progressive: bool
    subsampling: int  # Pillow's code: 0 = 4:4:4, 2 = 4:2:0
    orientation: int


def plan(kind: Kind, index: int, seed: int, sources: list[tuple[Path, tuple[int, int]]]) -> Plan:
    """Draw image ``index`` of a ``kind`` corpus from ``sources``: (path, (width, height)) pairs."""
    rng = random.Random(f"{kind}:{seed}:{index}")
    source, (sw, sh) = rng.choice(sources)
    if kind == "photos":
        aspect = 2 ** rng.uniform(-1.0, 1.0)
        area = rng.uniform(0.6e6, 2.5e6)
        w = round(math.sqrt(area * aspect))
        size = (w, round(area / w))
        orientation = 1
    else:
        size = (3024, 4032) if rng.random() < 0.3 else (4032, 3024)
        orientation = (3, 6, 8)[index // 4 % 3] if index % 4 == 3 else 1
    # The largest box of the output's aspect that fits, shrunk to 50-100 % and placed anywhere.
    aspect = size[0] / size[1]
    scale = rng.uniform(0.5, 1.0)
    bw = min(sw, sh * aspect) * scale
    bh = bw / aspect
    left, top = rng.uniform(0, sw - bw), rng.uniform(0, sh - bh)
    return Plan(
        index=index,
        source=source,
        box=(left, top, left + bw, top + bh),
        size=size,
        flip=rng.random() < 0.5,
        quality=rng.choice((85, 90, 95)),
        progressive=rng.random() < 0.15,
        subsampling=0 if rng.random() < 0.2 else 2,
        orientation=orientation,
    )


def _derive(src: Path, out: Path, kind: Kind, n: int, seed: int) -> int:
    # Imported here: fetching the wallpapers needs no Pillow (the system Python may lack it).
    from PIL import Image

    sources = []
    for path in image_files(src):
        with Image.open(path) as im:
            if min(im.size) >= MIN_SOURCE_SIDE[kind]:
                sources.append((path, im.size))
    if not sources:
        raise CorpusError(f"no image in {src} has a short side of at least {MIN_SOURCE_SIDE[kind]} px")
    by_source: dict[Path, list[Plan]] = defaultdict(list)
    for i in range(n):
        p = plan(kind, i, seed, sources)
        by_source[p.source].append(p)
    # One source at a time, each decoded once (they are up to 18 MP): the plans fix the order-free output.
    for source, plans in sorted(by_source.items()):
        with Image.open(source) as im:
            rgb = im.convert("RGB")
        caption = _derived_caption(source)
        for p in plans:
            stored = render(rgb, p)
            exif = b""  # Pillow writes no EXIF segment for empty bytes
            if p.orientation != 1:
                stored = stored.transpose(Image.Transpose[STORED_ROTATION[p.orientation]])
                tags = Image.Exif()
                tags[0x0112] = p.orientation
                exif = tags.tobytes()
            stem = out / f"img{p.index:05d}"
            stored.save(
                stem.with_suffix(".jpg"),
                quality=p.quality,
                progressive=p.progressive,
                subsampling=p.subsampling,
                exif=exif,
            )
            stem.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return n


def render(rgb: Image.Image, p: Plan) -> Image.Image:
    """The upright pixels of ``p`` from its decoded source (a Pillow RGB image): crop, resize, flip."""
    from PIL import Image

    out = rgb.resize(p.size, Image.Resampling.LANCZOS, box=p.box)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if p.flip else out


def _derived_caption(source: Path) -> str:
    """``a photo, <the words of the source wallpaper's caption>``."""
    caption = source.with_suffix(".txt")
    words = caption.read_text(encoding="utf-8").strip() if caption.exists() else ""
    words = words.split(", ", 1)[-1] if words else _caption_words(source.stem)
    return f"a photo, {words}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/corpus.py", description=__doc__.split("\n\n", 1)[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    w = sub.add_parser("wallpapers", help="Debian's desktop wallpapers (apt-get download)")
    w.add_argument("dest", type=Path)
    for kind, n, what in (("photos", 1000, "0.6-2.5 MP JPEG crops"), ("large", 200, "12 MP phone JPEGs")):
        d = sub.add_parser(kind, help=f"{what} of the wallpapers in SRC")
        d.add_argument("src", type=Path)
        d.add_argument("dest", type=Path)
        d.add_argument("--n", type=int, default=n, help=f"how many images (default {n})")
        d.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.kind == "wallpapers":
            dest = wallpapers(args.dest)
        else:
            dest = derived(args.src, args.dest, args.kind, args.n, args.seed)
    except (CorpusError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    made = _made_by(dest)
    print(f"{dest}: {made[0] if made else 0} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
