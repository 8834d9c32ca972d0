"""Shard-level rank assignment: 2 ranks over 8 indexed tar shards (in one process, and as 2 gloo processes
under torchrun) open disjoint shard sets, read exactly their samples' member byte ranges, step together,
cover the epoch, resume exactly; and the fallbacks to the sample-level split (shards without an index,
fewer shards than ranks) warn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import fastdiff
import pytest
from conftest import smallest_images
from fastdiff.cli import main

OPTS = dict(resolution=64, bucket_step=32, batch_size=2, seed=3, num_threads=2, crop="center")


@pytest.fixture(scope="module")
def shards(wallpapers: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """8 indexed shards of 15 real wallpapers with captions: two images per shard, one in the last."""
    images = smallest_images(wallpapers, 15)
    out = tmp_path_factory.mktemp("shard_ranks")
    paths = []
    for k in range(8):
        shard = out / f"shard-{k:06d}.tar"
        with tarfile.open(shard, "w") as tar:
            for image in images[2 * k : 2 * k + 2]:
                tar.add(image, arcname=image.name)
                tar.add(image.with_suffix(".txt"), arcname=f"{image.stem}.txt")
        paths.append(shard)
    assert main(["index", *map(str, paths)]) == 0
    return paths


def member_sizes(shards: list[Path]) -> dict[str, int]:
    """Each image member's size in bytes, by its batch path ``<shard>/<member>`` (read with tarfile)."""
    sizes = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if not m.name.endswith(".txt"):
                    sizes[f"{shard}/{m.name}"] = m.size
    return sizes


def epoch(loader: fastdiff.DataLoader) -> list[list[str]]:
    return [b["paths"] for b in loader]


def test_two_ranks_open_disjoint_shards_and_read_only_their_members(shards: list[Path]) -> None:
    pattern = str(shards[0].parent / "shard-{000000..000007}.tar")
    sizes = member_sizes(shards)
    loaders = [fastdiff.DataLoader(pattern, rank=r, world_size=2, **OPTS) for r in range(2)]
    owned = [set(ld.report["own_shards"] or []) for ld in loaders]
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == {str(s) for s in shards}
    # Greedy balance: 7 shards of 2 images and one of 1 give loads 8 and 7.
    assert sorted(sum(2 - (s.endswith("7.tar")) for s in o) for o in owned) == [7, 8]
    assert len(loaders[0]) == len(loaders[1])
    assert all(ld.report["warnings"] == [] and ld.report["io"] == [] for ld in loaders)
    plans = [epoch(ld) for ld in loaders]
    for ld, plan, own in zip(loaders, plans, owned, strict=True):
        assert len(plan) == len(ld)
        read = [p for batch in plan for p in batch]
        assert {p.rsplit("/", 1)[0] for p in read} == own  # only its own shards
        io = {e["shard"]: e for e in ld.report["io"]}
        assert set(io) == own  # opened nothing else, not even for the scan (indexes only)
        for shard in own:
            mine = [p for p in read if p.startswith(shard + "/")]
            assert io[shard]["opens"] == len(mine)
            # Exactly the members' byte ranges, each read once per time its sample is loaded.
            assert io[shard]["bytes"] == sum(sizes[p] for p in mine)
    # Every image of the epoch trained, each on the rank owning its shard (pad repeats some).
    seen = Counter(p for plan in plans for batch in plan for p in batch)
    assert set(seen) == set(sizes)
    assert all(ld.report["images_trained"] == 15 for ld in loaders)


def test_each_rank_plans_as_one_process_over_its_own_shards_then_pads(shards: list[Path]) -> None:
    # 3 shards of 2 images, batches of 1: one rank owns 4 images, the other 2.
    pattern, opts = [str(s) for s in shards[:3]], {**OPTS, "batch_size": 1}
    for remainder in ("pad", "drop"):
        loaders = [
            fastdiff.DataLoader(pattern, rank=r, world_size=2, remainder=remainder, **opts) for r in range(2)
        ]
        singles = [fastdiff.DataLoader(sorted(ld.report["own_shards"] or []), **opts) for ld in loaders]
        lengths = [len(s) for s in singles]
        assert sorted(lengths) == [2, 4]
        steps = max(lengths) if remainder == "pad" else min(lengths)
        assert [len(ld) for ld in loaders] == [steps, steps]
        for ld, single in zip(loaders, singles, strict=True):
            own = epoch(single)
            # The same buckets and shuffles as a single-process plan over the rank's pool; a shorter
            # plan starts again from its beginning ("pad"), a longer one loses its end ("drop").
            assert epoch(ld) == (own * 2)[:steps]
        if remainder == "drop":
            got = Counter(p for ld in loaders for batch in epoch(ld) for p in batch)
            assert max(got.values()) == 1
            assert loaders[0].report["images_trained"] == len(got)  # the union over ranks


def test_resume_mid_epoch_is_exact_and_another_geometry_is_refused(shards: list[Path]) -> None:
    pattern = [str(s) for s in shards]
    full = fastdiff.DataLoader(pattern, rank=1, world_size=2, **OPTS)
    uninterrupted = epoch(full)
    first = fastdiff.DataLoader(pattern, rank=1, world_size=2, **OPTS)
    it = iter(first)
    head = [next(it)["paths"] for _ in range(2)]
    state = first.state_dict()
    del it
    assert state["options"]["shard_level"] is True
    resumed = fastdiff.DataLoader(pattern, rank=1, world_size=2, **OPTS)
    resumed.load_state_dict(state)
    assert head + epoch(resumed) == uninterrupted
    smaller = fastdiff.DataLoader(pattern, rank=0, world_size=2, **{**OPTS, "batch_size": 1})
    with pytest.raises(ValueError, match='shard_split="sample"'):
        smaller.load_state_dict(state)
    one_rank = fastdiff.DataLoader(pattern, **OPTS)  # one rank: the sample-level plan
    with pytest.raises(ValueError, match="shard_level"):
        one_rank.load_state_dict(state)


def test_fallbacks_to_the_sample_level_split_warn(shards: list[Path], tmp_path: Path) -> None:
    pattern = [str(s) for s in shards]
    sample = fastdiff.DataLoader(pattern, rank=0, world_size=2, shard_split="sample", **OPTS)
    assert sample.report["own_shards"] is None and sample.report["warnings"] == []
    # A shard without its index: every shard would have to be opened to list it.
    bare = tmp_path / "shard-000009.tar"
    bare.write_bytes(shards[0].read_bytes())
    with pytest.warns(UserWarning, match="no current index .*`fastdiff index SHARDS`"):
        unindexed = fastdiff.DataLoader([*pattern, str(bare)], rank=0, world_size=2, **OPTS)
    assert unindexed.report["own_shards"] is None
    # Fewer shards than ranks.
    with pytest.warns(UserWarning, match="2 shards hold images for 3 ranks"):
        few = fastdiff.DataLoader(pattern[:2], rank=2, world_size=3, **OPTS)
    assert few.report["own_shards"] is None
    # The fallback is exactly the sample-level split.
    with pytest.warns(UserWarning, match="2 shards hold images for 3 ranks"):
        again = fastdiff.DataLoader(pattern[:2], rank=2, world_size=3, **OPTS)
    sample_level = fastdiff.DataLoader(pattern[:2], rank=2, world_size=3, shard_split="sample", **OPTS)
    assert epoch(again) == epoch(sample_level)


def test_torchrun_ranks_open_only_their_own_shards(shards: list[Path], tmp_path: Path) -> None:
    pattern = str(shards[0].parent / "shard-{000000..000007}.tar")
    out = tmp_path / "ranks.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    worker = Path(__file__).with_name("dist_worker.py")  # a tiny DDP model trained on the loader's batches
    proc = subprocess.run(
        [*cmd, str(worker), pattern, str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert ranks[0]["weight_sum"] == ranks[1]["weight_sum"]  # DDP stepped together on both ranks
    for remainder in ("pad", "drop"):
        runs = [r["runs"][remainder] for r in ranks]
        owned = [set(run["report"]["own_shards"]) for run in runs]
        assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == {str(s) for s in shards}
        for run, own in zip(runs, owned, strict=True):
            assert {e["shard"] for e in run["report"]["io"]} == own
            assert {p.rsplit("/", 1)[0] for step in run["steps"] for p in step["paths"]} == own
        assert runs[0]["len"] == runs[1]["len"]
    pad = Counter(p for r in ranks for step in r["runs"]["pad"]["steps"] for p in step["paths"])
    assert set(pad) == set(member_sizes(shards))  # two epochs of pad: every image trained
