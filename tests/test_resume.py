"""Determinism and resume on real images: thread-count invariance, mid-epoch resume, state checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import fastdiff
import pytest
import torch

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp"}


def smallest(wallpapers: Path, dest: Path, n: int) -> Path:
    """Copy the ``n`` smallest wallpapers (and their captions) into ``dest``."""
    dest.mkdir()
    files = sorted(
        (p for p in wallpapers.iterdir() if p.suffix.lower() in IMAGE_EXTS), key=lambda p: p.stat().st_size
    )
    for p in files[:n]:
        shutil.copy(p, dest / p.name)
        shutil.copy(p.with_suffix(".txt"), dest / p.with_suffix(".txt").name)
    return dest


OPTS = dict(resolution=128, bucket_step=32, batch_size=2, crop="random", flip_prob=0.5, seed=3)


def epoch_batches(loader: fastdiff.DataLoader, limit: int | None = None) -> list[tuple]:
    out = []
    for b in loader:
        out.append((b["paths"], b["crop_top_lefts"], b["pixel_values"]))
        if limit is not None and len(out) == limit:
            break
    return out


def assert_same(a: list[tuple], b: list[tuple]) -> None:
    assert [x[:2] for x in a] == [x[:2] for x in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x[2], y[2])


@pytest.fixture(scope="module")
def folder(wallpapers: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return smallest(wallpapers, tmp_path_factory.mktemp("resume") / "few", 9)


def test_batches_are_identical_for_1_2_4_threads(folder: Path) -> None:
    runs = [
        epoch_batches(fastdiff.DataLoader(folder, num_threads=t, prefetch=p, **OPTS))
        for t, p in ((1, 1), (2, 3), (4, 2))
    ]
    assert len(runs[0]) == 5  # 9 images in buckets of batch 2
    assert any(c != (0, 0) for _, crops, _ in runs[0] for c in crops)  # random crops really drawn
    assert_same(runs[0], runs[1])
    assert_same(runs[0], runs[2])


def test_mid_epoch_resume_yields_exactly_the_rest(folder: Path) -> None:
    whole = fastdiff.DataLoader(folder, num_threads=2, **OPTS)
    assert whole.state_dict()["epoch"] == 0 and whole.state_dict()["batches_consumed"] == 0
    epoch0, epoch1 = epoch_batches(whole), epoch_batches(whole)
    assert whole.state_dict()["epoch"] == 2 and whole.state_dict()["batches_consumed"] == 0

    first = fastdiff.DataLoader(folder, num_threads=1, **OPTS)
    head = epoch_batches(first, limit=3)
    state = first.state_dict()
    assert (state["epoch"], state["batches_consumed"], state["num_batches"]) == (0, 3, 5)
    assert_same(head, epoch0[:3])

    resumed = fastdiff.DataLoader(folder, num_threads=2, prefetch=4, **OPTS)  # threads do not matter
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # the DistributedSampler-style call for the saved epoch keeps the position
    assert_same(epoch_batches(resumed), epoch0[3:])
    assert_same(epoch_batches(resumed), epoch1)  # then the next epoch from its start

    # Saved after an epoch's last batch: resumes at the start of the next epoch.
    last = fastdiff.DataLoader(folder, **OPTS)
    epoch_batches(last, limit=5)
    assert (last.state_dict()["epoch"], last.state_dict()["batches_consumed"]) == (1, 0)
    # set_epoch to another epoch starts that epoch from its beginning.
    other = fastdiff.DataLoader(folder, **OPTS)
    other.load_state_dict(state)
    other.set_epoch(1)
    assert [x[0] for x in epoch_batches(other)] == [x[0] for x in epoch1]


def test_state_from_other_options_or_dataset_is_rejected(folder: Path, tmp_path: Path) -> None:
    state = fastdiff.DataLoader(folder, **OPTS).state_dict()
    # (batch_size and world_size may change: elastic resume, test_distributed.py.)
    for change, name in (
        ({"drop_last": True}, "drop_last"),
        ({"seed": 4}, "seed=3"),
        ({"flip_prob": 0.0}, "flip_prob"),
    ):
        with pytest.raises(ValueError, match=name):
            fastdiff.DataLoader(folder, **{**OPTS, **change}).load_state_dict(state)
    copy = shutil.copytree(folder, tmp_path / "copy")
    # The same files elsewhere are the same dataset ...
    fastdiff.DataLoader(copy, **OPTS).load_state_dict(state)
    # ... one file fewer is not.
    next(p for p in sorted(copy.iterdir()) if p.suffix.lower() in IMAGE_EXTS).unlink()
    with pytest.raises(ValueError, match="another dataset"):
        fastdiff.DataLoader(copy, **OPTS).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        fastdiff.DataLoader(folder, **OPTS).load_state_dict({"epoch": 1})
