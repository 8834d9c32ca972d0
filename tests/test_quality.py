"""``fastdiff scan --quality`` on real wallpapers with constructed problems: an exact copy, a resized and
recompressed copy, a tiny crop, a mostly transparent PNG, a grayscale copy, and missing, empty and long
captions are each flagged, and nothing else is (no false flags on the real images)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fastdiff
import pytest
from conftest import copy_with_captions, smallest_images
from fastdiff import cli
from fastdiff.quality import _near_groups, flags_by_path, quality_report
from PIL import Image


def _colour(path: Path) -> bool:
    """Whether Pillow sees a colour image: over 20 % of its thumbnail's pixels have channels 13+ apart."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((64, 64))
        pixels = list(im.getdata())
    return sum(max(p) - min(p) > 12 for p in pixels) > 0.2 * len(pixels)


@pytest.fixture(scope="module")
def dataset(wallpapers: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """12 real wallpapers (colour, distinct) and the constructed problems beside them."""
    sources = [
        p for p in smallest_images(wallpapers, 40) if p.suffix.lower() in (".jpg", ".jpeg") and _colour(p)
    ]
    sources = sources[:12]
    assert len(sources) >= 8
    data = copy_with_captions(sources, tmp_path_factory.mktemp("quality") / "data")
    a, b, c, d = (data / p.name for p in sources[:4])
    shutil.copy(a, data / "copy_of_a.jpg")
    (data / "copy_of_a.txt").write_text("a copy")
    with Image.open(b) as im:
        im.convert("RGB").resize((im.width * 4 // 5, im.height * 4 // 5)).save(
            data / "b_small.jpg", quality=80
        )
        (data / "b_small.txt").write_text("b again")
        im.convert("RGB").crop((0, 0, 64, 48)).save(data / "tiny.png")
        (data / "tiny.txt").write_text("a tiny crop")
    with Image.open(c) as im:
        im.convert("L").save(data / "c_gray.jpg", quality=95)
        (data / "c_gray.txt").write_text("gray")
        rgba = im.convert("RGBA").resize((320, 240))
        alpha = Image.new("L", rgba.size, 0)
        alpha.paste(255, (0, 0, 64, 240))  # 20 % opaque, 80 % transparent
        rgba.putalpha(alpha)
        rgba.save(data / "cutout.png")
        (data / "cutout.txt").write_text("a cut-out")
    (data / d.with_suffix(".txt").name).unlink()  # no caption
    (data / sources[4].with_suffix(".txt").name).write_text("  \n")  # empty
    (data / sources[5].with_suffix(".txt").name).write_text(" ".join(["word"] * 100))  # long
    return data, sources


def test_each_constructed_problem_is_flagged_and_nothing_else(dataset: tuple[Path, list[Path]]) -> None:
    data, sources = dataset
    loader = fastdiff.DataLoader(data, resolution=512, num_threads=2)
    report = quality_report(loader)
    name = {str(data / p.name): p.name for p in sources} | {str(p): p.name for p in data.iterdir()}
    flags = {name[p]: f for p, f in flags_by_path(report).items()}
    a, b, c, d, e, f = (p.name for p in sources[:6])
    assert report["exact_duplicates"] == [sorted([str(data / a), str(data / "copy_of_a.jpg")])]
    # The resized, recompressed copy and the grayscale copy (same luma, so the same dHash).
    near = sorted(
        [
            sorted([str(data / b), str(data / "b_small.jpg")]),
            sorted([str(data / c), str(data / "c_gray.jpg")]),
        ]
    )
    assert [g["paths"] for g in report["near_duplicates"]] == near
    assert all(g["max_distance"] <= 4 for g in report["near_duplicates"])
    assert [u["path"] for u in report["upscaled"]] == [str(data / "tiny.png")]
    assert report["upscaled"][0]["scale"] > 8
    [cutout] = report["transparent"]
    assert cutout["path"] == str(data / "cutout.png") and cutout["share"] == pytest.approx(0.8, abs=0.01)
    assert report["grayscale"] == [str(data / "c_gray.jpg")]
    assert report["captions_missing"] == [str(data / d)]
    assert report["captions_empty"] == [str(data / e)]
    assert report["captions_long"] == [{"path": str(data / f), "length": 100, "unit": "words"}]
    flagged = {"copy_of_a.jpg", a, b, "b_small.jpg", c, "c_gray.jpg", "tiny.png", "cutout.png", d, e, f}
    assert set(flags) == flagged, flags
    assert report["subsets"][0]["flagged"] == len(flagged) and report["errors"] == []


def test_the_cli_prints_json_and_draws_the_contact_sheet(
    dataset: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, _ = dataset
    sheet = tmp_path / "flagged.png"
    assert cli.main(["scan", str(data), "--quality", "--json", "--contact-sheet", str(sheet)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quality"]["images"] == out["loaded"]
    with Image.open(sheet) as im:
        assert im.width == 6 * 160 and im.height >= 2 * 160
    assert cli.main(["scan", str(data), "--quality"]) == 0
    text = capsys.readouterr().out
    assert "exact duplicates: 1 groups" in text and "captions long: 1" in text


def test_near_duplicate_groups_match_brute_force_leader_grouping() -> None:
    import random

    rng = random.Random(0)
    base = [rng.getrandbits(64) for _ in range(40)]
    # Each base hash with 1–8 random bits flipped: some within 6 bits, some not.
    hashes = base + [h ^ sum(1 << b for b in rng.sample(range(64), rng.randint(1, 8))) for h in base]
    brute: list[tuple[list[int], int]] = []
    grouped: set[int] = set()
    for i in range(len(hashes)):
        if i in grouped:
            continue
        members = [
            j
            for j in range(i + 1, len(hashes))
            if j not in grouped and (hashes[i] ^ hashes[j]).bit_count() <= 6
        ]
        if members:
            grouped.update([i, *members])
            brute.append(([i, *members], max((hashes[i] ^ hashes[j]).bit_count() for j in members)))
    assert _near_groups(hashes, 6) == brute
    assert len(brute) > 5
