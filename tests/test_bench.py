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
from fastdiff import cli
from fastdiff.bench import common, sweep, throughput

N_IMAGES = 6
RESOLUTION = 256


@pytest.fixture
def small_set(wallpapers: Path, tmp_path: Path) -> Path:
    """The 6 smallest wallpaper files (WebP and JPEG, 256-400 px) with their captions, in their own folder."""
    images = sorted(common.list_images(wallpapers), key=lambda p: (p.stat().st_size, p.name))[:N_IMAGES]
    dest = tmp_path / "small"
    dest.mkdir()
    for image in images:
        shutil.copy(image, dest / image.name)
        shutil.copy(image.with_suffix(".txt"), dest / f"{image.stem}.txt")
    return dest


def check(t: common.Throughput, images: int) -> None:
    assert t.images == images
    assert t.seconds > 0
    assert math.isfinite(t.images_per_second)
    assert t.images_per_second > 0
    assert t.cpu_seconds is not None  # Linux: /proc is there
    assert t.cpu_seconds >= 0


def test_measure_fastdiff_counts_every_image(small_set: Path) -> None:
    t = throughput.measure_fastdiff(small_set, resolution=RESOLUTION, batch_size=4, epochs=2, warmup_epochs=1)
    check(t, 2 * N_IMAGES)


@pytest.mark.parametrize("draft", [False, True])
def test_measure_torchvision_counts_every_image(small_set: Path, draft: bool) -> None:
    t = throughput.measure_torchvision(
        small_set, resolution=RESOLUTION, batch_size=4, draft=draft, epochs=2, warmup_epochs=1
    )
    check(t, 2 * N_IMAGES)


def test_bench_command_prints_table_and_writes_json(
    small_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "throughput.json"
    argv = [str(small_set), "--resolution", str(RESOLUTION), "--batch-size", "2", "--rounds", "2"]
    assert throughput.main([*argv, "--warmup", "0", "--limit", "4", "--json", str(out)]) == 0

    printed = capsys.readouterr().out
    assert throughput.FASTDIFF in printed
    assert throughput.TORCHVISION in printed
    result = json.loads(out.read_text())
    assert result["config"]["limit"] == 4
    assert set(result["results"]) == {throughput.FASTDIFF, throughput.TORCHVISION}
    for side in result["results"].values():
        assert side["images_per_epoch"] == [4]
        assert len(side["runs_images_per_s"]) == 2
        assert side["median_images_per_s"] > 0
        assert side["median_cpu_ms_per_image"] >= 0
    assert result["results"][throughput.TORCHVISION]["ratio_to_baseline"] == 1.0
    assert result["machine"]["cpus"] >= 1


def test_process_tree_cpu_counts_worker_processes() -> None:
    # A child that burns 0.3 s of its own CPU time, then waits: its CPU must show in the tree's total.
    burn = (
        "import sys, time\n"
        "while time.process_time() < 0.3: pass\n"
        "print('done', flush=True)\n"
        "sys.stdin.read()\n"
    )
    before = common.process_tree_cpu_seconds()
    child = subprocess.Popen(
        [sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "done\n"
        after = common.process_tree_cpu_seconds()
    finally:
        child.communicate("")
    assert before is not None
    assert after is not None
    assert after - before >= 0.25


def test_list_images_matches_the_scan_rules(tmp_path: Path) -> None:
    names = [
        "a.JPG",
        "sub/b.png",
        "c.jfif",
        ".hidden.jpg",
        "._d.jpg",
        ".dir/e.jpg",
        "f.txt",
        "g.gif",
        "h.avif",
    ]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    want = [tmp_path / "a.JPG", tmp_path / "c.jfif", tmp_path / "g.gif", tmp_path / "sub/b.png"]
    assert common.list_images(tmp_path) == want


def test_limited_root_keeps_the_first_images_and_their_captions(small_set: Path) -> None:
    first = common.list_images(small_set)[:3]
    with common.limited_root(small_set, 3) as root:
        assert [p.name for p in common.list_images(root)] == [p.name for p in first]
        assert all(
            common.read_caption(p) == common.read_caption(q) != ""
            for p, q in zip(first, common.list_images(root), strict=True)
        )
    assert not root.exists()
    with common.limited_root(small_set, None) as root:
        assert root == small_set
    with pytest.raises(ValueError, match="limit"), common.limited_root(small_set, 0):
        pass


def test_loader_stats_add_up_and_count_the_images(small_set: Path) -> None:
    from fastdiff import DataLoader

    loader = DataLoader(small_set, resolution=RESOLUTION, batch_size=2, num_threads=2, prefetch=2)
    assert loader.stats() is None
    images = sum(batch["pixel_values"].shape[0] for batch in loader)
    s = loader.stats()
    assert s is not None
    assert s["samples"] == images == N_IMAGES
    assert s["batches"] == len(loader)
    assert s["threads"] == 2
    assert s["failed"] == 0
    stages = [s[f"{name}_s"] for name in sweep.STAGES]
    assert all(math.isfinite(x) and x >= 0 for x in stages)
    assert s["decode_s"] > 0
    assert s["write_s"] > 0
    # The stages are the workers' time on samples; "other" is only what falls between them.
    assert sum(stages) == pytest.approx(s["busy_s"], rel=1e-6)
    assert s["other_s"] <= 0.2 * s["busy_s"]
    # Every worker is either busy or idle for the epoch (it starts a little after it and ends with it).
    assert s["busy_s"] + s["idle_s"] <= 2 * s["wall_s"] * 1.05 + 0.01
    assert 0 <= s["queue_wait_s"] <= s["wall_s"]

    # A second epoch has its own figures; an epoch in progress reports its figures so far.
    it = iter(loader)
    next(it)
    partial = loader.stats()
    assert partial is not None
    assert 0 < partial["batches"] == 1
    it.close()  # type: ignore[attr-defined]
    after = loader.stats()
    assert after is not None
    assert after["batches"] == 1


def test_sweep_writes_every_grid_point_a_plot_and_a_best_choice(
    small_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    argv = [str(small_set), "--sweep", "--resolution", str(RESOLUTION), "--batch-size", "2", "--rounds", "2"]
    argv += ["--warmup", "0", "--sweep-threads", "1,2", "--sweep-prefetch", "1,3", "--step-ms", "1"]
    assert throughput.main([*argv, "--json", str(out), "--plot", str(png)]) == 0

    captured = capsys.readouterr()
    assert captured.err.splitlines()[0] == (
        "fastdiff bench: note: `fastdiff tune DIR` is the new spelling of `--sweep`"
    )
    printed = captured.out
    assert "best: " in printed
    assert "-bound" in printed or "no single stage" in printed
    result = json.loads(out.read_text())
    grid = {(p["threads"], p["prefetch"]) for p in result["points"]}
    assert grid == {(1, 1), (1, 3), (2, 1), (2, 3)}
    for p in result["points"]:
        assert p["images"] == N_IMAGES
        assert len(p["runs_images_per_s"]) == 2
        assert p["median_images_per_s"] > 0
        assert set(p["worker_ms_per_image"]) == set(sweep.STAGES)
        assert all(v >= 0 for v in p["worker_ms_per_image"].values())
        assert 0 <= p["queue_wait_pct"] <= 100
        assert 0 <= p["worker_idle_pct"] <= 100
    best = result["best"]
    assert (best["threads"], best["prefetch"]) in grid
    assert best["median_images_per_s"] == max(p["median_images_per_s"] for p in result["points"])
    assert result["verdict"][0].startswith("best: ")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tune_runs_the_sweep_under_its_own_name(
    small_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tune.json"
    argv = ["tune", str(small_set), "--resolution", str(RESOLUTION), "--batch-size", "2", "--rounds", "1"]
    argv += ["--warmup", "0", "--threads", "1", "--prefetch", "1,2", "--json", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"fastdiff tune: {small_set}  {N_IMAGES} images")
    assert "best: " in captured.out
    assert "new spelling" not in captured.err
    result = json.loads(out.read_text())
    assert {(p["threads"], p["prefetch"]) for p in result["points"]} == {(1, 1), (1, 2)}
    assert result["config"]["limit"] == sweep.DEFAULT_LIMIT


def test_default_sweep_grid_covers_the_cores_and_one_more() -> None:
    assert sweep.default_threads(1) == [1, 2]
    assert sweep.default_threads(2) == [1, 2, 3]
    assert sweep.default_threads(16) == [1, 2, 4, 8, 16, 17]


def test_sweep_only_options_need_sweep(small_set: Path) -> None:
    assert throughput.main([str(small_set), "--plot", "x.png"]) == 2


def _point(threads: int, prefetch: int, ips: float, cpu: float, decode: float, wait: float) -> dict:
    ms = dict.fromkeys(sweep.STAGES, 0.0) | {"decode": decode, "resize": decode / 3}
    return {
        "threads": threads,
        "prefetch": prefetch,
        "median_images_per_s": ips,
        "median_cpu_ms_per_image": cpu,
        "worker_ms_per_image": ms,
        "worker_idle_pct": 1.0,
        "queue_wait_pct": wait,
    }


def test_explain_names_the_bound_contention_oversubscription_and_the_step() -> None:
    points = [
        _point(1, 1, 100, 5, 4, 2.5),
        _point(1, 2, 101, 5, 4, 1.0),
        _point(2, 1, 150, 5, 12, 0.5),
        _point(2, 2, 190, 5, 12, 0.5),
        _point(3, 2, 170, 5, 14, 0.5),
    ]
    best, lines = sweep.explain(points, cores=2, step_ms=30, load=4.0)
    assert (best["threads"], best["prefetch"]) == (2, 2)
    text = "\n".join(lines)
    assert lines[0].startswith("best: 2 threads, prefetch 2: 190.0 img/s")
    assert "suggested" not in text  # nothing else within 3%
    assert "decode-bound: 75% of worker time in decode (resize 25%)" in text
    assert "contention: at 2 threads, prefetch 2" in text
    assert "load average 4.0 on 2 cores" in text
    assert "oversubscription costs" in text
    assert "from 2 on" in text
    assert "1 thread, prefetch 2 already keeps queue wait at 1.0%" in text
