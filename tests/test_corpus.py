"""scripts/corpus.py, the maker of the test and bench corpora: determinism, EXIF semantics, build-once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import corpus
import numpy as np
import pytest
from PIL import Image, ImageOps


def synthetic_sources(folder: Path) -> Path:
    """Two captioned "wallpapers": a 1600x1200 one to crop from, and a 600x600 one too small to use."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:1200, 0:1600]
    big = np.stack([x * 255 // 1600, y * 255 // 1200, rng.integers(0, 256, (1200, 1600))], -1)
    Image.fromarray(big.astype(np.uint8)).save(folder / "000_nature_Big.png")
    Image.new("RGB", (600, 600), (200, 10, 10)).save(folder / "001_nature_Small.png")
    for stem, words in (("000_nature_Big", "big nature"), ("001_nature_Small", "small nature")):
        (folder / f"{stem}.txt").write_text(f"a desktop wallpaper, {words}\n")
    return folder


def test_photos_are_deterministic_and_within_the_documented_ranges(tmp_path: Path) -> None:
    src = synthetic_sources(tmp_path / "src")
    a = corpus.derived(src, tmp_path / "a", "photos", 8, seed=5)
    b = corpus.derived(src, tmp_path / "b", "photos", 8, seed=5)
    files = corpus.image_files(a)
    assert [p.name for p in files] == [f"img{i:05d}.jpg" for i in range(8)]
    count, recipe = (a / ".complete").read_text().splitlines()
    assert count == "8" and recipe.startswith(
        f"photos n=8 seed=5 generator={corpus.GENERATOR_VERSION} source="
    )
    for p in files:
        assert p.read_bytes() == (b / p.name).read_bytes()
        assert p.with_suffix(".txt").read_text() == "a photo, big nature\n"  # the small source is unused
        with Image.open(p) as im:
            w, h = im.size
            assert im.format == "JPEG" and im.mode == "RGB" and 0x0112 not in im.getexif()
        # Drawn as an area and an aspect, then rounded to whole pixels.
        assert 0.6e6 - (w + h) <= w * h <= 2.5e6 + (w + h) and 0.5 * 0.99 <= w / h <= 2.0 * 1.01
    other = corpus.derived(src, tmp_path / "c", "photos", 1, seed=6)
    assert (other / "img00000.jpg").read_bytes() != (a / "img00000.jpg").read_bytes()


def test_large_photos_turn_upright_to_the_crop_they_were_made_from(
    wallpapers: Path, large_photos: Path
) -> None:
    sources = []
    for path in corpus.image_files(wallpapers):
        with Image.open(path) as im:
            if min(im.size) >= corpus.MIN_SOURCE_SIDE["large"]:
                sources.append((path, im.size))
    orientations = []
    for path in corpus.image_files(large_photos):
        index = int(path.stem[3:])
        plan = corpus.plan("large", index, 0, sources)
        with Image.open(path) as im:
            orientations.append(im.getexif().get(0x0112, 1))
            assert orientations[-1] == plan.orientation
            if plan.orientation == 1:
                continue
            upright = ImageOps.exif_transpose(im)
        assert upright.size == plan.size
        with Image.open(plan.source) as src:
            want = corpus.render(src.convert("RGB"), plan)
        diff = np.abs(np.asarray(upright, np.int16) - np.asarray(want, np.int16)).mean()
        assert diff < 3.0, (path.name, diff)  # JPEG loss only; a wrong turn is tens of levels off
    assert orientations == [{3: 3, 7: 6, 11: 8}.get(i % 12, 1) for i in range(16)]


def test_concurrent_builds_of_one_corpus_build_it_once(tmp_path: Path) -> None:
    dest = tmp_path / "cache" / "kind"
    calls = []

    def build(out: Path) -> int:
        calls.append(out)
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        (out / "a.png").write_bytes(b"")
        return 1

    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(corpus._build_once(dest, build, "r1")))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [dest, dest] and len(calls) == 1
    assert (dest / ".complete").read_text() == "1\nr1\n" and (dest / "a.png").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == [".kind.lock", "kind"]  # no partial left


def test_a_failed_build_leaves_nothing_and_foreign_folders_are_not_touched(tmp_path: Path) -> None:
    dest = tmp_path / "kind"

    def broken(out: Path) -> int:
        (out / "half.png").write_bytes(b"")
        raise corpus.CorpusError("network down")

    with pytest.raises(corpus.CorpusError, match="network down"):
        corpus._build_once(dest, broken, "r1")
    assert not dest.exists() and not (tmp_path / ".kind.partial").exists()

    dest.mkdir()
    (dest / "mine.jpg").write_bytes(b"")
    with pytest.raises(corpus.CorpusError, match=r"no \.complete marker"):
        corpus._build_once(dest, broken, "r1")
    assert [p.name for p in dest.iterdir()] == ["mine.jpg"]


@pytest.mark.parametrize("marker", ["", "3\n", "3\nlarge n=3 seed=0 generator=1 source=x\n"])
def test_a_corpus_made_by_another_recipe_is_rebuilt_and_a_failed_rebuild_keeps_it(
    tmp_path: Path, marker: str
) -> None:
    # An older generator, another n, or a marker from before recipes were recorded: the cached images
    # may differ from what the tests expect of them, so they are never reused (CI once kept a stale set).
    dest = tmp_path / "kind"
    dest.mkdir()
    for i in range(3):
        (dest / f"old{i}.jpg").write_bytes(b"")
    (dest / ".complete").write_text(marker)

    def broken(out: Path) -> int:
        raise corpus.CorpusError("network down")

    with pytest.raises(corpus.CorpusError, match="network down"):
        corpus._build_once(dest, broken, "large n=3 seed=0 generator=2 source=x")
    assert sorted(p.name for p in dest.iterdir()) == [".complete", "old0.jpg", "old1.jpg", "old2.jpg"]

    def build(out: Path) -> int:
        (out / "new.jpg").write_bytes(b"")
        return 1

    corpus._build_once(dest, build, "large n=3 seed=0 generator=2 source=x")
    assert sorted(p.name for p in dest.iterdir()) == [".complete", "new.jpg"]
    assert (dest / ".complete").read_text() == "1\nlarge n=3 seed=0 generator=2 source=x\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".kind.lock", "kind"]  # no stale copy left
    # The same recipe again is reused as it is.
    corpus._build_once(dest, broken, "large n=3 seed=0 generator=2 source=x")


def test_the_derived_recipe_names_n_seed_and_the_source_listing(tmp_path: Path) -> None:
    src = synthetic_sources(tmp_path / "src")
    dest = corpus.derived(src, tmp_path / "photos", "photos", 2)
    first = (dest / "img00000.jpg").read_bytes()
    assert sorted(p.name for p in corpus.image_files(dest)) == ["img00000.jpg", "img00001.jpg"]
    corpus.derived(src, dest, "photos", 3)  # another n: rebuilt, not refused
    assert len(corpus.image_files(dest)) == 3 and (dest / "img00000.jpg").read_bytes() == first
    # A changed source folder (another wallpaper set) changes the recipe too.
    Image.new("RGB", (1200, 1000), (0, 90, 200)).save(src / "002_city_Blue.png")
    before = (dest / ".complete").read_text()
    corpus.derived(src, dest, "photos", 3)
    assert (dest / ".complete").read_text() != before


@pytest.mark.parametrize(
    ("path", "theme"),
    [
        ("usr/share/backgrounds/calla.png", ("backgrounds", "")),
        ("usr/share/backgrounds/mate/nature/Aqua.jpg", ("nature", "")),
        ("usr/share/wallpapers/MilkyWay/contents/images/5120x2880.png", ("MilkyWay", "")),
        ("usr/share/wallpapers/Kay/contents/images_dark/1080x1920.png", ("Kay", "dark")),
        ("usr/share/wallpapers/Altai/contents/screenshot.png", ("Altai", "")),
    ],
)
def test_wallpapers_are_named_after_their_theme_folder(path: str, theme: tuple[str, str]) -> None:
    assert corpus._theme(Path(path)) == theme
