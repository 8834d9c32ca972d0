"""A coarse-to-fine resolution curriculum: :meth:`fastdiff.DataLoader.at_resolution` re-buckets the scan
(equal to a fresh loader, reading no file), and ``resolution_schedule`` switches stages at epoch
boundaries and resumes mid-schedule exactly (tiny from-scratch model, CPU fp32)."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import fastdiff
import pytest
import torch
from conftest import copy_with_captions, smallest_images
from fastdiff.training.config import TrainConfig
from fastdiff.training.curriculum import parse_schedule
from fastdiff.training.run import train


@pytest.fixture(scope="module")
def images(wallpapers: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_with_captions(smallest_images(wallpapers, 6), tmp_path_factory.mktemp("curriculum"))


def epoch(loader: fastdiff.DataLoader, n: int) -> list[tuple[list[str], torch.Tensor]]:
    loader.set_epoch(n)
    return [(b["paths"], b["pixel_values"].clone()) for b in loader]


def test_at_resolution_equals_a_fresh_loader_and_reads_no_file(images: Path, tmp_path: Path) -> None:
    data = copy_with_captions(sorted(p for p in images.iterdir() if p.suffix != ".txt"), tmp_path / "d")
    options = {"batch_size": 2, "bucket_step": 16, "crop": "random", "flip_prob": 0.5, "num_threads": 1}
    base = fastdiff.DataLoader(data, resolution=32, **options)
    fresh = fastdiff.DataLoader(data, resolution=64, **options)
    coarse = base.at_resolution(64)
    assert coarse.buckets == fresh.buckets != base.buckets
    assert len(coarse) == len(fresh)
    got, want = epoch(coarse, 1), epoch(fresh, 1)
    assert [p for p, _ in got] == [p for p, _ in want]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want, strict=True))
    assert coarse.state_dict() == fresh.state_dict()
    assert coarse.report == fresh.report
    # The scan is shared: with the folder gone, another resolution is still built (and equals a fresh one).
    fresh96 = fastdiff.DataLoader(data, resolution=96, **options)
    shutil.rmtree(data)
    again = base.at_resolution(96)
    assert (again.buckets, len(again), again.captions) == (fresh96.buckets, len(fresh96), fresh96.captions)
    assert again.state_dict() == fresh96.state_dict()
    with pytest.raises(ValueError, match="resolution"):
        base.at_resolution(0)
    # A state saved at one resolution resumes only a loader at that resolution.
    with pytest.raises(ValueError, match="resolution=96"):
        base.load_state_dict(again.state_dict())


def test_parse_schedule(images: Path) -> None:
    data = images
    assert parse_schedule("256:2000,512") == [(256, 2000), (512, None)]
    assert parse_schedule("512") == [(512, None)]
    assert parse_schedule("128:10, 256:20, 512") == [(128, 10), (256, 20), (512, None)]
    for bad in ("256:2000", "256,512", "256:20,512:10,1024", "0:5,512", "256:x,512", ""):
        with pytest.raises(ValueError, match="resolution_schedule"):
            parse_schedule(bad)
    with pytest.raises(ValueError, match="resolution_schedule"):
        TrainConfig(data=Path("d"), output=Path("o"), resolution_schedule="256:0,512")
    cfg = TrainConfig(data=Path("d"), output=Path("o"), resolution_schedule="32:2,64", device="cpu")
    with pytest.raises(ValueError, match="resolution_schedule needs"):
        train(cfg, loader=fastdiff.DataLoader(data))


@pytest.mark.usefixtures("one_torch_thread")
def test_curriculum_switches_at_epoch_boundaries_and_resumes_mid_schedule(
    images: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first_stage = len(fastdiff.DataLoader(images, resolution=32, batch_size=2, bucket_step=16))
    second_stage = len(fastdiff.DataLoader(images, resolution=48, batch_size=2, bucket_step=16))
    assert first_stage >= 3 and second_stage >= 3
    switch = first_stage  # the first epoch boundary at or after step 2: the end of epoch 0
    cfg = TrainConfig(
        data=images,
        output=tmp_path / "full",
        resolution=32,
        resolution_schedule="32:2,48",
        batch_size=2,
        max_steps=switch + second_stage + 1,
        checkpoint_every=1,
        unet_channels=(16, 32),
        crop="random",
        flip_prob=0.5,
        num_threads=1,
        device="cpu",
    )
    with caplog.at_level(logging.INFO, logger="fastdiff.train"):
        full = train(cfg)
    changes = [r.getMessage() for r in caplog.records if "resolution schedule" in r.getMessage()]
    assert changes == [f"resolution schedule: step {switch}, epoch 1: resolution 32 -> 48 (stage 2 of 2)"]

    def loader_state(step: int) -> dict[str, object]:
        return dict(json.loads((tmp_path / "full" / f"checkpoint-{step}" / "loader.json").read_text()))

    assert loader_state(switch - 1)["resolution_stage"] == 0
    # Saved at the end of epoch 0: the state is epoch 1 at its start, still in stage 0 (the switch is made
    # when epoch 1 starts, with the steps done then).
    assert (loader_state(switch)["resolution_stage"], loader_state(switch)["epoch"]) == (0, 1)
    inside = switch + 2  # mid-epoch in stage 2
    assert (loader_state(inside)["resolution_stage"], loader_state(inside)["batches_consumed"]) == (1, 2)
    # At step 2 the threshold is reached mid-epoch: the resumed run too finishes epoch 0 at 32 px.
    assert loader_state(2)["batches_consumed"] == 2
    for at in (2, switch, inside):
        resumed = train(
            replace(cfg, output=tmp_path / f"from-{at}", resume=tmp_path / "full" / f"checkpoint-{at}")
        )
        assert resumed.first_step == at + 1
        assert resumed.losses == full.losses[at:]  # bitwise
