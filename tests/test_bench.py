"""The bench's measuring functions on a few real images: they run, count every image and give finite img/s.

Nothing here asserts a speed (the CI machine is shared and noisy); only that the numbers the bench
reports are well-formed and count the right images.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastdiff import bench

N_IMAGES = 6
RESOLUTION = 256


@pytest.fixture
def small_set(wallpapers: Path, tmp_path: Path) -> Path:
    """The 6 smallest wallpaper files (WebP and JPEG, 256-400 px) with their captions, in their own folder."""
    images = sorted(bench.list_images(wallpapers), key=lambda p: (p.stat().st_size, p.name))[:N_IMAGES]
    dest = tmp_path / "small"
    dest.mkdir()
    for image in images:
        shutil.copy(image, dest / image.name)
        shutil.copy(image.with_suffix(".txt"), dest / f"{image.stem}.txt")
    return dest


def check(t: bench.Throughput, images: int) -> None:
    assert t.images == images
    assert t.seconds > 0
    assert math.isfinite(t.images_per_second)
    assert t.images_per_second > 0
    assert t.cpu_seconds is not None  # Linux: /proc is there
    assert t.cpu_seconds >= 0


def test_measure_fastdiff_counts_every_image(small_set: Path) -> None:
    t = bench.measure_fastdiff(small_set, resolution=RESOLUTION, batch_size=4, epochs=2, warmup_epochs=1)
    check(t, 2 * N_IMAGES)


@pytest.mark.parametrize("draft", [False, True])
def test_measure_torchvision_counts_every_image(small_set: Path, draft: bool) -> None:
    t = bench.measure_torchvision(
        small_set, resolution=RESOLUTION, batch_size=4, draft=draft, epochs=2, warmup_epochs=1
    )
    check(t, 2 * N_IMAGES)


def test_bench_command_prints_table_and_writes_json(
    small_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = [str(small_set), "--resolution", str(RESOLUTION), "--batch-size", "2", "--rounds", "2"]
    assert bench.main([*argv, "--warmup", "0", "--limit", "4", "--json", str(out)]) == 0

    printed = capsys.readouterr().out
    assert bench.FASTDIFF in printed
    assert bench.TORCHVISION in printed
    result = json.loads(out.read_text())
    assert result["config"]["limit"] == 4
    assert set(result["results"]) == {bench.FASTDIFF, bench.TORCHVISION}
    for side in result["results"].values():
        assert side["images_per_epoch"] == [4]
        assert len(side["runs_images_per_s"]) == 2
        assert side["median_images_per_s"] > 0
        assert side["median_cpu_ms_per_image"] >= 0
    assert result["results"][bench.TORCHVISION]["ratio_to_baseline"] == 1.0
    assert result["machine"]["cpus"] >= 1


def test_process_tree_cpu_counts_worker_processes() -> None:
    # A child that burns 0.3 s of its own CPU time, then waits: its CPU must show in the tree's total.
    burn = (
        "import sys, time\n"
        "while time.process_time() < 0.3: pass\n"
        "print('done', flush=True)\n"
        "sys.stdin.read()\n"
    )
    before = bench.process_tree_cpu_seconds()
    child = subprocess.Popen(
        [sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "done\n"
        after = bench.process_tree_cpu_seconds()
    finally:
        child.communicate("")
    assert before is not None
    assert after is not None
    assert after - before >= 0.25


def test_list_images_matches_the_scan_rules(tmp_path: Path) -> None:
    for name in ["a.JPG", "sub/b.png", "c.jfif", ".hidden.jpg", "._d.jpg", ".dir/e.jpg", "f.txt", "g.gif"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert bench.list_images(tmp_path) == [tmp_path / "a.JPG", tmp_path / "c.jfif", tmp_path / "sub/b.png"]


def test_limited_root_keeps_the_first_images_and_their_captions(small_set: Path) -> None:
    first = bench.list_images(small_set)[:3]
    with bench.limited_root(small_set, 3) as root:
        assert [p.name for p in bench.list_images(root)] == [p.name for p in first]
        assert all(
            bench.read_caption(p) == bench.read_caption(q) != ""
            for p, q in zip(first, bench.list_images(root), strict=True)
        )
    assert not root.exists()
    with bench.limited_root(small_set, None) as root:
        assert root == small_set
    with pytest.raises(ValueError, match="limit"), bench.limited_root(small_set, 0):
        pass
