"""WebDataset tar shards as a source: ``fastdiff shard`` / ``fastdiff index``, the same samples as the folder,
captions from .txt and .json, bad members and truncated shards reported, stale indexes, brace patterns,
resume."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import fastdiff
import pytest
import torch
from conftest import copy_with_captions, smallest_images
from fastdiff.cli import main
from fastdiff.shard import parse_size, write_shards
from fastdiff.sources import expand_braces, expand_shards

OPTS = dict(resolution=128, bucket_step=32, batch_size=2, crop="random", flip_prob=0.5, seed=5, num_threads=2)


@pytest.fixture(scope="module")
def folder(wallpapers: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """9 real wallpapers with captions, 3 of them in nested folders (names keep their relative path)."""
    root = copy_with_captions(smallest_images(wallpapers, 9), tmp_path_factory.mktemp("shards") / "folder")
    nested = root / "sub" / "dir"
    nested.mkdir(parents=True)
    for image in sorted(p for p in root.iterdir() if p.is_file() and p.suffix != ".txt")[:3]:
        image.rename(nested / image.name)
        image.with_suffix(".txt").rename(nested / f"{image.stem}.txt")
    return root


def relative(path: str, base: Path | None = None) -> str:
    """A batch path relative to its folder, or to its shard for ``<shard>.tar/<member>``."""
    if ".tar/" in path:
        return path.split(".tar/", 1)[1]
    assert base is not None
    return Path(path).relative_to(base).as_posix()


def epoch_samples(loader: fastdiff.DataLoader, base: Path | None = None) -> list[tuple]:
    """Every sample of one epoch: (relative file, caption, crop_top_left, original_size, pixel bytes)."""
    out = []
    for b in loader:
        for i, path in enumerate(b["paths"]):
            pixels = b["pixel_values"][i].contiguous().numpy().tobytes()
            out.append(
                (
                    relative(path, base),
                    b["captions"][i],
                    b["crop_top_lefts"][i],
                    b["original_sizes"][i],
                    pixels,
                )
            )
    return out


def test_shards_give_the_folders_samples_bitwise_at_two_shard_sizes(folder: Path, tmp_path: Path) -> None:
    folder_loader = fastdiff.DataLoader(folder, **OPTS)
    epochs = [epoch_samples(folder_loader, folder) for _ in range(2)]
    assert any(s[2] != (0, 0) for s in epochs[0])  # random crops really drawn
    assert sum(1 for s in epochs[0] if s[0].startswith("sub/dir/")) == 3
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    for size, n_shards in ((10 * total, 1), (total // 4, None)):
        out = tmp_path / f"s{size}"
        assert main(["shard", str(folder), str(out), "--shard-size", str(size)]) == 0
        shards = sorted(out.glob("shard-*.tar"))
        assert (n_shards is None and len(shards) >= 4) or len(shards) == n_shards
        assert all(Path(f"{s}.index.json").is_file() for s in shards)
        pattern = str(out / f"shard-{{000000..{len(shards) - 1:06d}}}.tar")
        loader = fastdiff.DataLoader(pattern, **OPTS)
        assert len(loader) == len(folder_loader)
        got = [epoch_samples(loader) for _ in range(2)]
        # The same (file, caption, crop, size, pixels) per epoch, in the same order: the schedule is a
        # pure function of the names and headers, not of where the bytes live.
        assert got == epochs
        report = loader.report
        assert (report["found"], report["loaded"], report["skipped"]) == (9, 9, [])
        assert report["passed_over"]["caption_files"] == 9
        assert report["root"] == str(out)
        assert report["warnings"] == []


def test_captions_from_txt_and_json_and_bad_members_are_reported(folder: Path, tmp_path: Path) -> None:
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".txt")
    shard = tmp_path / "mixed.tar"
    with tarfile.open(shard, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add(f"a{images[0].suffix}", images[0].read_bytes())
        add("a.txt", b"caption from txt\n")
        add(f"b{images[1].suffix}", images[1].read_bytes())
        add("b.json", json.dumps({"caption": "caption from json", "url": "x"}).encode())
        add(f"c{images[2].suffix}", images[2].read_bytes())
        add("c.json", json.dumps({"text": "from the text field"}).encode())
        add(f"d{images[3].suffix}", images[3].read_bytes()[:12])  # corrupt: header cut short
        add(f"e{images[4].suffix}", images[4].read_bytes())
        add("e.cls", b"7")  # neither image nor caption: passed over
    loader = fastdiff.DataLoader(shard, resolution=128, bucket_step=32, batch_size=1, shuffle=False)
    assert sorted(loader.captions) == ["", "caption from json", "caption from txt", "from the text field"]
    r = loader.report
    assert (r["found"], r["loaded"]) == (5, 4)
    assert [(s["path"], s["code"]) for s in r["skipped"]] == [(f"{shard}/d{images[3].suffix}", "decode")]
    assert f"mixed.tar/d{images[3].suffix}" in r["skipped"][0]["message"]
    assert r["passed_over"] == {"caption_files": 3, "other_files": 1, "hidden": 0}
    assert len(list(loader)) == 4


def test_truncated_shard_is_a_skip_and_the_epoch_keeps_its_length(folder: Path, tmp_path: Path) -> None:
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    summary = write_shards(folder, tmp_path / "out", shard_size=total // 3, index=False)
    shards = [str(s) for s in summary.shards]
    whole = fastdiff.DataLoader(shards, **OPTS)
    last = Path(shards[-1])
    with tarfile.open(last) as tar:
        members = [m for m in tar.getmembers() if not m.name.endswith(".txt")]
    cut = members[-1]
    os.truncate(last, cut.offset_data + cut.size // 2)  # inside the last image member
    loader = fastdiff.DataLoader(shards, **OPTS)
    r = loader.report
    assert r["found"] == r["loaded"] + len(r["skipped"])
    assert [s["path"] for s in r["skipped"]] == [str(last)]
    assert cut.name in r["skipped"][0]["message"] and "truncated" in r["skipped"][0]["message"]
    assert r["loaded"] == 8
    assert len(loader) <= len(whole)
    batches = list(loader)
    assert len(batches) == len(loader)  # every planned batch is yielded, none short
    assert all(len(b["paths"]) == len(b["captions"]) for b in batches)


def test_index_round_trip_and_stale_index_warns(folder: Path, tmp_path: Path) -> None:
    summary = write_shards(folder, tmp_path / "out", shard_size=10**9)
    (shard,) = summary.shards
    index = json.loads(Path(f"{shard}.index.json").read_text())
    assert index["fastdiff_shard_index"] == 1 and index["size"] == shard.stat().st_size
    with tarfile.open(shard) as tar:
        offsets = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
    assert len(index["members"]) == 9
    for m in index["members"]:
        assert offsets[m["name"]] == (m["offset"], m["length"])
        caption = (folder / m["name"]).with_suffix(".txt").read_text().strip()
        assert m["caption"] == caption
    # The index alone suffices: overwrite one image's header bytes (same size, same mtime) and the scan
    # still finds it with its header; the damage shows only when its bytes are read, as a skip naming
    # shard and member, and the epoch keeps its length.
    st = shard.stat()
    bad = index["members"][4]
    with open(shard, "r+b") as f:
        f.seek(bad["offset"])
        f.write(b"\0" * 64)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    loader = fastdiff.DataLoader(str(shard), **OPTS)
    assert (loader.report["loaded"], loader.report["skipped"]) == (9, [])
    n = len(loader)
    assert len(list(loader)) == n
    (skip,) = loader.report["skipped"]
    assert (skip["path"], skip["code"]) == (f"{shard}/{bad['name']}", "decode")
    # A changed mtime makes the index stale: a warning, and the headers are read (the bad one found).
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.warns(UserWarning, match="stale"):
        stale = fastdiff.DataLoader(str(shard), **OPTS)
    assert stale.report["loaded"] == 8
    assert stale.report["skipped"][0]["path"] == f"{shard}/{bad['name']}"
    assert "index.json" in stale.report["warnings"][0]
    # `fastdiff index` rebuilds it.
    assert main(["index", str(shard)]) == 0
    rebuilt = json.loads(Path(f"{shard}.index.json").read_text())
    assert len(rebuilt["members"]) == 8 and [b["name"] for b in rebuilt["bad_members"]] == [bad["name"]]


def test_resume_mid_epoch_on_shards_equals_uninterrupted(folder: Path, tmp_path: Path) -> None:
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    shards = [str(s) for s in write_shards(folder, tmp_path / "out", shard_size=total // 3).shards]
    whole = fastdiff.DataLoader(shards, **OPTS)
    epoch0 = epoch_samples(whole)
    first = fastdiff.DataLoader(shards, **OPTS)
    it = iter(first)
    head = [next(it) for _ in range(2)]
    state = first.state_dict()
    resumed = fastdiff.DataLoader(shards, **OPTS)
    resumed.load_state_dict(state)
    rest = epoch_samples(resumed)
    assert sum(len(b["paths"]) for b in head) + len(rest) == len(epoch0)
    assert rest == epoch0[len(epoch0) - len(rest) :]


def test_subset_accepts_shards_and_refuses_metadata(folder: Path, tmp_path: Path) -> None:
    shards = [str(s) for s in write_shards(folder, tmp_path / "out").shards]
    loader = fastdiff.DataLoader(
        subsets=[fastdiff.Subset(shards, num_repeats=2)], resolution=128, bucket_step=32
    )
    assert loader.report["samples"] == 18
    with pytest.raises(ValueError, match="metadata_file cannot caption tar shards"):
        fastdiff.Subset(shards[0], metadata_file=str(folder / "x.jsonl")).native()
    with pytest.raises(ValueError, match=r"is not a \.tar or \.parquet shard"):
        fastdiff.DataLoader([shards[0], str(folder)])


def test_brace_expansion() -> None:
    assert expand_braces("data/shard-{0000..0003}.tar") == [f"data/shard-{i:04d}.tar" for i in range(4)]
    assert expand_braces("s-{8..11}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("s-{2..0}") == ["s-2", "s-1", "s-0"]
    assert expand_braces("{a,b}/x-{0..1}.tar") == ["a/x-0.tar", "a/x-1.tar", "b/x-0.tar", "b/x-1.tar"]
    assert expand_braces("{a,b{1,2}}.tar") == ["a.tar", "b1.tar", "b2.tar"]
    assert expand_braces("plain{x}.tar") == ["plain{x}.tar"]
    assert expand_braces("open{0..2.tar") == ["open{0..2.tar"]
    assert expand_shards(["a.tar", "b-{0..1}.tar"]) == ["a.tar", "b-0.tar", "b-1.tar"]
    with pytest.raises(ValueError, match=r"not a \.tar or \.parquet shard"):
        expand_shards("data/{a,b.tar}")
    with pytest.raises(ValueError, match="no shards"):
        expand_shards([])
    assert (parse_size("1GB"), parse_size("64MiB"), parse_size("4096")) == (10**9, 64 << 20, 4096)
    with pytest.raises(ValueError, match="shard-size"):
        parse_size("big")


def test_scan_command_on_shards(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = [str(s) for s in write_shards(folder, tmp_path / "out", shard_size=10**6).shards]
    assert main(["scan", *shards, "--resolution", "128", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["found"], report["loaded"]) == (9, 9)
    assert torch.tensor(report["batches_per_epoch"]) > 0


def test_ranks_split_shards_as_they_split_the_folder(folder: Path, tmp_path: Path) -> None:
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    shards = [str(s) for s in write_shards(folder, tmp_path / "out", shard_size=total // 3).shards]
    per_rank = []
    for rank in (0, 1):
        opts = {**OPTS, "rank": rank, "world_size": 2}
        from_folder = epoch_samples(fastdiff.DataLoader(folder, **opts), folder)
        # The sample-level split (the shard-level one is tests/test_shard_ranks.py's).
        from_shards = epoch_samples(fastdiff.DataLoader(shards, shard_split="sample", **opts))
        assert from_shards == from_folder
        per_rank.append({s[0] for s in from_shards})
    assert (
        per_rank[0]
        and per_rank[1]
        and per_rank[0] | per_rank[1]
        == {relative(str(p), folder) for p in folder.rglob("*") if p.is_file() and p.suffix != ".txt"}
    )
