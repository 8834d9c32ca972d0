"""Remote shards fetched into the spool (fastdiff.remote) from a real S3-compatible server on loopback (moto's
server mode) behind a proxy that fails or stalls chosen objects: bytes equal, spool reuse and invalidation,
retries, timeouts that never hang, permanent errors not retried, bounded concurrency; ``memory://``; and a
loader over ``s3://`` shards equal to the local shards, an unreadable shard left out with a warning and a
report entry (or raised with ``on_error="raise"``)."""

from __future__ import annotations

import os
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import fastdiff
import fsspec
import pytest
from conftest import copy_with_captions, smallest_images
from fastdiff import cli
from fastdiff.remote import FetchPolicy, fetch_shards, is_remote
from s3_server import S3, s3_server

FAST = FetchPolicy(concurrency=2, timeout=2.0, retries=2, backoff=0.05, block_size=64 << 10)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture
def bucket(s3: S3) -> str:
    faults = s3.faults
    faults.release.set()  # GETs an earlier test stalled end now
    deadline = time.monotonic() + 10
    while faults.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert faults.in_flight == 0
    faults.release = threading.Event()
    faults.fail_first.clear()
    faults.stall.clear()
    faults.max_in_flight = 0
    name = f"shards-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=name)
    return name


def _upload(s3: S3, bucket: str, objects: dict[str, bytes]) -> list[str]:
    client = s3.client()
    for key, data in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    return [f"s3://{bucket}/{key}" for key in objects]


def _blobs(n: int, size: int) -> dict[str, bytes]:
    return {f"train/shard-{i:04d}.tar": os.urandom(size) for i in range(n)}


def test_is_remote() -> None:
    assert is_remote("s3://b/shard.tar") and is_remote("memory://x/y.tar") and is_remote("gs://b/k")
    assert not is_remote("file:///data/shard.tar") and not is_remote("data/shard.tar")
    assert not is_remote("/abs/path/a://b")


def test_fetched_bytes_equal_and_the_spool_is_reused_until_the_object_changes(
    s3: S3, bucket: str, tmp_path: Path
) -> None:
    blobs = _blobs(3, 300_000)
    urls = _upload(s3, bucket, blobs)
    first = fetch_shards(urls, tmp_path, storage_options=s3.storage_options, policy=FAST)
    assert first.failed == [] and list(first.paths) == urls
    for url, data in zip(urls, blobs.values(), strict=True):
        assert first.paths[url].read_bytes() == data
    assert first.bytes_fetched == 3 * 300_000
    # Ranged reads of about the block size (s3fs's read-ahead doubles a block), not one whole-object GET.
    assert s3.faults.gets[f"/{bucket}/train/shard-0000.tar"] >= 2

    again = fetch_shards(urls, tmp_path, storage_options=s3.storage_options, policy=FAST)
    assert again.bytes_fetched == 0 and again.paths == first.paths

    changed = os.urandom(200_000)
    s3.client().put_object(Bucket=bucket, Key="train/shard-0001.tar", Body=changed)
    third = fetch_shards(urls, tmp_path, storage_options=s3.storage_options, policy=FAST)
    assert third.bytes_fetched == 200_000
    assert third.paths[urls[1]].read_bytes() == changed
    assert not [p for p in tmp_path.iterdir() if ".part-" in p.name]


def test_500s_are_retried_then_reported(s3: S3, bucket: str, tmp_path: Path) -> None:
    blobs = _blobs(2, 100_000)
    urls = _upload(s3, bucket, blobs)
    s3.faults.fail_first["shard-0000"] = 2  # cured by the second retry
    s3.faults.fail_first["shard-0001"] = 100  # never cured
    result = fetch_shards(urls, tmp_path, storage_options=s3.storage_options, policy=FAST)
    assert list(result.paths) == [urls[0]]
    assert result.paths[urls[0]].read_bytes() == blobs["train/shard-0000.tar"]
    [failure] = result.failed
    assert failure.url == urls[1] and failure.attempts == 1 + FAST.retries
    assert "injected" in failure.reason  # the server's own message


def test_a_stalled_server_times_out_instead_of_hanging(s3: S3, bucket: str, tmp_path: Path) -> None:
    urls = _upload(s3, bucket, _blobs(2, 50_000))
    s3.faults.stall.add("shard-0001")
    policy = FetchPolicy(concurrency=2, timeout=1.0, retries=1, backoff=0.05)
    start = time.monotonic()
    result = fetch_shards(urls, tmp_path, storage_options=s3.storage_options, policy=policy)
    elapsed = time.monotonic() - start
    assert list(result.paths) == [urls[0]]
    [failure] = result.failed
    assert failure.url == urls[1] and failure.attempts == 2
    assert "TimeoutError" in failure.reason
    # Two attempts of 1 s without data, the backoff and the watchdog's polling: a few seconds, not a hang.
    assert elapsed < 8, elapsed


def test_a_missing_object_is_not_retried(s3: S3, bucket: str, tmp_path: Path) -> None:
    url = f"s3://{bucket}/train/missing.tar"
    result = fetch_shards([url], tmp_path, storage_options=s3.storage_options, policy=FAST)
    [failure] = result.failed
    assert failure.attempts == 1 and "FileNotFoundError" in failure.reason


def test_concurrency_is_bounded_and_optional_sidecars_fetched(s3: S3, bucket: str, tmp_path: Path) -> None:
    blobs = _blobs(6, 200_000)
    blobs["train/shard-0002.tar.index.json"] = b'{"members": []}'
    urls = _upload(s3, bucket, blobs)[:6]
    policy = FetchPolicy(concurrency=2, timeout=5.0, retries=0, block_size=32 << 10)
    result = fetch_shards(
        urls, tmp_path, storage_options=s3.storage_options, policy=policy, optional_suffixes=[".index.json"]
    )
    assert result.failed == [] and len(result.paths) == 6
    assert 1 <= s3.faults.max_in_flight <= 2
    index = result.paths[urls[2]].with_name(result.paths[urls[2]].name + ".index.json")
    assert index.read_bytes() == b'{"members": []}'
    assert not result.paths[urls[0]].with_name(result.paths[urls[0]].name + ".index.json").exists()


def test_memory_filesystem(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    data = os.urandom(10_000)
    with fs.open(f"/fastdiff-test-{uuid.uuid4().hex}/shard-0000.tar", "wb") as f:
        f.write(data)
    url = f"memory://{f.path}"
    result = fetch_shards([url], tmp_path, policy=FAST)
    assert result.paths[url].read_bytes() == data and result.bytes_fetched == len(data)


def test_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a remote URL"):
        fetch_shards(["data/shard.tar"], tmp_path)
    with pytest.raises(ValueError, match="twice"):
        fetch_shards(["s3://b/a.tar", "s3://b/a.tar"], tmp_path)
    with pytest.raises(ValueError, match="concurrency"):
        FetchPolicy(concurrency=0)


def _epoch(loader: fastdiff.DataLoader) -> list[tuple[str, tuple[int, int], bytes]]:
    """(caption, crop_top_left, pixel bytes) of every sample of one epoch, in order."""
    return [
        (b["captions"][i], b["crop_top_lefts"][i], b["pixel_values"][i].contiguous().numpy().tobytes())
        for b in loader
        for i in range(len(b["captions"]))
    ]


def _shards_on_s3(
    s3: S3, bucket: str, images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, list[Path]]:
    """``images`` with their captions in a folder packed one image per indexed shard by ``fastdiff shard``,
    uploaded under ``s3://bucket/train/``, and fsspec configured for the server; returns (the folder, the
    local shards)."""
    data = copy_with_captions(images, tmp_path / "data")
    out = tmp_path / "shards"
    assert cli.main(["shard", str(data), str(out), "--shard-size", "1"]) == 0
    shards = sorted(out.glob("shard-*.tar"))
    assert len(shards) == len(images)  # one image per shard
    client = s3.client()
    for p in sorted(out.iterdir()):
        client.put_object(Bucket=bucket, Key=f"train/{p.name}", Body=p.read_bytes())
    # The endpoint and keys as users give them to fsspec (its config, or FSSPEC_S3_* variables).
    options = {k: v for k, v in s3.storage_options.items() if k != "skip_instance_cache"}
    monkeypatch.setitem(fsspec.config.conf, "s3", options)
    return data, shards


def test_a_loader_over_s3_shards_equals_the_local_shards_and_leaves_out_an_unreadable_one(
    s3: S3, bucket: str, wallpapers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, shards = _shards_on_s3(s3, bucket, smallest_images(wallpapers, 6), tmp_path, monkeypatch)
    monkeypatch.setenv("FASTDIFF_SPOOL", str(tmp_path / "spool"))
    opts = dict(resolution=128, bucket_step=32, batch_size=2, crop="random", flip_prob=0.5, num_threads=1)
    url = f"s3://{bucket}/train/shard-{{000000..{len(shards) - 1:06d}}}.tar"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fetched indexes are current: no "stale index" warning
        remote = fastdiff.DataLoader(url, **opts)  # type: ignore[arg-type]
        # So two ranks split the remote shards by shard, as local ones: disjoint owned shards.
        owned = [
            fastdiff.DataLoader(url, rank=r, world_size=2, **opts).report["own_shards"]  # type: ignore[arg-type]
            for r in (0, 1)
        ]
    assert owned[0] and owned[1] and not set(owned[0]) & set(owned[1])
    assert len(owned[0]) + len(owned[1]) == len(shards)
    local = fastdiff.DataLoader([str(p) for p in shards], **opts)  # type: ignore[arg-type]
    assert len(remote) == len(local) and remote.report["loaded"] == 6
    assert _epoch(remote) == _epoch(local)
    assert all("/spool/remote/" in p for b in remote for p in b["paths"])

    s3.faults.fail_first[f"train/{shards[0].name}"] = 1000
    monkeypatch.setenv("FASTDIFF_SPOOL", str(tmp_path / "fresh-spool"))  # nothing spooled yet
    with pytest.warns(UserWarning, match=rf"shard s3://{bucket}/train/{shards[0].name} left out: .*injected"):
        partial = fastdiff.DataLoader(url, **opts)  # type: ignore[arg-type]
    assert partial.report["loaded"] == 6 - fastdiff.DataLoader(str(shards[0]), **opts).report["loaded"]
    # Also in the report, so that loaded + skipped = found: the shard named, with the reason.
    report = partial.report
    assert report["loaded"] + report["held_out"] + len(report["skipped"]) == report["found"]
    failed_url = f"s3://{bucket}/train/{shards[0].name}"
    assert [(s["path"], s["code"]) for s in report["skipped"]] == [(failed_url, "io")]
    assert (
        "shard left out" in report["skipped"][0]["message"] and "injected" in report["skipped"][0]["message"]
    )
    monkeypatch.setenv("FASTDIFF_SPOOL", str(tmp_path / "third-spool"))
    with (
        pytest.warns(UserWarning, match="left out"),
        pytest.raises(OSError, match=rf"{shards[0].name}.*injected"),
    ):
        fastdiff.DataLoader(url, on_error="raise", **opts)  # type: ignore[arg-type]


@pytest.mark.usefixtures("one_torch_thread")
def test_fastdiff_train_from_s3_shards_equals_training_from_the_local_shards(
    s3: S3, bucket: str, wallpapers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastdiff.training.config import TrainConfig
    from fastdiff.training.run import train

    _, shards = _shards_on_s3(s3, bucket, smallest_images(wallpapers, 6), tmp_path, monkeypatch)
    monkeypatch.setenv("FASTDIFF_SPOOL", str(tmp_path / "spool"))
    losses = []
    for name, image_dir in (
        ("s3", f"s3://{bucket}/train/shard-{{000000..000005}}.tar"),
        ("local", f"{shards[0].parent}/shard-{{000000..000005}}.tar"),
    ):
        config = tmp_path / f"{name}.toml"
        config.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{image_dir}"\n')
        run = TrainConfig(
            data=config,
            output=tmp_path / name,
            resolution=32,
            bucket_step=16,
            batch_size=2,
            crop="random",
            flip_prob=0.5,
            unet_channels=(16, 32),
            max_steps=4,
            num_threads=1,
            device="cpu",
        )
        losses.append(train(run).losses)
    assert losses[0] == losses[1] and len(losses[0]) == 4  # the same batches: bitwise the same run


def test_each_rank_fetches_only_its_own_remote_shards(
    s3: S3, bucket: str, wallpapers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, shards = _shards_on_s3(s3, bucket, smallest_images(wallpapers, 8), tmp_path, monkeypatch)
    opts = dict(resolution=128, bucket_step=32, batch_size=2, crop="random", flip_prob=0.5, num_threads=1)
    url = f"s3://{bucket}/train/shard-{{000000..000007}}.tar"
    owned: list[set[str]] = []
    members: set[str] = set()
    for rank in (0, 1):
        monkeypatch.setenv("FASTDIFF_SPOOL", str(tmp_path / f"machine-{rank}"))  # one spool per machine
        s3.faults.gets.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # indexes current, shard-level split: no warning
            remote = fastdiff.DataLoader(url, rank=rank, world_size=2, **opts)  # type: ignore[arg-type]
        own = {Path(p).name.split("-", 1)[1] for p in remote.report["own_shards"] or []}
        # The server saw GETs of every index but only of this rank's shards (a counting proxy).
        gets = {key.rsplit("/", 1)[1] for key in s3.faults.gets}
        assert {k for k in gets if k.endswith(".tar")} == own and own
        assert {k for k in gets if k.endswith(".index.json")} == {f"{s.name}.index.json" for s in shards}
        # Its batches read its own shards' members, decoded as the local shards' are.
        seen = [(p, c) for b in remote for p, c in zip(b["paths"], b["captions"], strict=True)]
        assert {Path(p.split(".tar/")[0]).name.split("-", 1)[1] + ".tar" for p, _ in seen} == own
        members.update(p.split(".tar/")[1] for p, _ in seen)
        owned.append(own)
    assert not owned[0] & owned[1] and owned[0] | owned[1] == {s.name for s in shards}
    assert members == {p.name for p in data.iterdir() if p.suffix != ".txt"}  # every image, on one rank
