"""Stability monitoring: gradient norm and learning rate in loss.csv, the loss-spike detector (on an
injected corrupted batch, and quiet on a normal run), skipping a spike's update, the loss by timestep."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_with_captions, smallest_images
from fastdiff.training.config import TrainConfig
from fastdiff.training.monitor import MAD_SCALE, MIN_HISTORY, LossByNoiseLevel, SpikeDetector
from fastdiff.training.protocols import BatchLoader
from fastdiff.training.run import train
from fastdiff.training.setup import make_loader
from fastdiff.types import Batch
from PIL import Image

STEPS = 24
SPIKE_AT = 20


@pytest.fixture(scope="module")
def images(wallpapers: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_with_captions(smallest_images(wallpapers, 8), tmp_path_factory.mktemp("images"))


def tiny(data: Path, output: Path, **overrides: object) -> TrainConfig:
    """A few seconds of the from-scratch model: resolution 32, batches of 2, a small UNet."""
    base = TrainConfig(
        data=data,
        output=output,
        resolution=32,
        bucket_step=16,
        batch_size=2,
        unet_channels=(16, 32),
        max_steps=STEPS,
        spike_window=MIN_HISTORY,
        checkpoint_every=0,
        num_threads=1,
        device="cpu",
    )
    return replace(base, **overrides)


class CorruptLoader:
    """Wraps a loader; the batch of step ``at`` (one batch per step) has its pixels times ``factor``
    (a broken image decoded to huge values, as a bad float TIFF or a wrongly scaled latent would)."""

    def __init__(self, inner: BatchLoader, at: int, factor: float = 1e3) -> None:
        self.inner, self.at, self.factor, self.count, self.samples = inner, at, factor, 0, 0
        self.paths: list[str] = []

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    # What checkpoints and resuming need: the wrapped loader's.
    @property
    def epoch(self) -> int:
        return int(self.inner.epoch)  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, object]:
        return dict(self.inner.state_dict())  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.inner.load_state_dict(state)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.inner:
            self.count += 1
            self.samples += len(batch["paths"])
            if self.count == self.at:
                self.paths = list(batch["paths"])
                batch = {**batch, "pixel_values": batch["pixel_values"] * self.factor}
            yield batch


def rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_detector_flags_only_losses_above_median_plus_k_scaled_mads() -> None:
    detector = SpikeDetector(k=6.0, window=MIN_HISTORY)
    for v in range(1, MIN_HISTORY):
        detector.add(float(v))
        assert detector.check(100, 1e9) is None  # fewer than MIN_HISTORY losses: no judgement
    detector.add(float(MIN_HISTORY))
    # Window 1..10: median 5.5, absolute deviations 0.5, 0.5, 1.5, ..., 4.5: MAD 2.5.
    threshold = 5.5 + 6.0 * MAD_SCALE * 2.5
    assert detector.check(11, threshold - 1e-6) is None
    spike = detector.check(11, threshold + 1e-6)
    assert spike is not None and (spike.median, spike.mad) == (5.5, 2.5)
    assert spike.threshold == pytest.approx(threshold)
    assert detector.check(11, -1e9) is None  # a drop is not a spike
    assert detector.check(11, math.nan) is None
    detector.add(11.0)  # the window rolls: 2..11
    rolled = detector.check(12, 1e9)
    assert rolled is not None and rolled.median == 6.5
    assert list(detector.history) == [float(v) for v in range(2, 12)]
    assert SpikeDetector(k=0, window=MIN_HISTORY).check(1, 1e9) is None


def test_loss_by_noise_level_bins_hand_values() -> None:
    levels = np.array([0.0, 0.05, 0.15, 0.95, 1.0, 0.5])
    losses = np.array([1.0, 3.0, 2.0, 0.5, 0.25, math.nan])
    binned = LossByNoiseLevel(bins=10)
    binned.add(levels[:3], losses[:3])
    binned.add(levels[3:], losses[3:])
    table = binned.rows()
    assert [r["count"] for r in table] == [2, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert table[0]["mean_loss"] == 2.0 and table[1]["mean_loss"] == 2.0 and table[9]["mean_loss"] == 0.375
    assert math.isnan(table[2]["mean_loss"])


@pytest.mark.usefixtures("one_torch_thread")
def test_injected_spike_is_flagged_with_its_batch_and_a_normal_run_has_none(
    images: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clean_config = tiny(images, tmp_path / "clean")
    counted = CorruptLoader(make_loader(clean_config), at=0)  # corrupts nothing: counts the samples
    clean = train(clean_config, loader=counted)
    assert clean.spike_steps == [] and clean.skipped_steps == 0  # no false positive
    assert (tmp_path / "clean" / "spikes.jsonl").read_text() == ""

    cfg = tiny(images, tmp_path / "spiked")
    corrupt = CorruptLoader(make_loader(cfg), SPIKE_AT)
    with caplog.at_level(logging.WARNING, logger="fastdiff.train"):
        spiked = train(cfg, loader=corrupt)
    assert spiked.spike_steps == [SPIKE_AT]
    assert spiked.skipped_steps == 0  # flagged, not skipped (no --skip-spikes)
    assert spiked.losses[: SPIKE_AT - 1] == clean.losses[: SPIKE_AT - 1]
    (record,) = [json.loads(line) for line in (tmp_path / "spiked" / "spikes.jsonl").read_text().splitlines()]
    assert record["step"] == SPIKE_AT and record["skipped"] is False
    assert record["paths"] == corrupt.paths and corrupt.paths
    assert record["loss"] == spiked.losses[SPIKE_AT - 1] > record["threshold"]
    window = clean.losses[SPIKE_AT - 1 - MIN_HISTORY : SPIKE_AT - 1]
    assert record["median"] == pytest.approx(float(np.median(window)))
    assert f"step {SPIKE_AT}: loss spike" in caplog.text and corrupt.paths[0] in caplog.text

    table = rows(tmp_path / "spiked" / "loss.csv")
    assert table[0] == ["step", "loss", "grad_norm", "lr"]
    norms = [float(r[2]) for r in table[1:]]
    assert len(norms) == STEPS and all(math.isfinite(n) and n > 0 for n in norms)
    # Before clipping (max_grad_norm 1): the first steps of a fresh model have larger gradients.
    assert max(norms) > spiked.config.max_grad_norm

    # Loss by timestep: every trained sample (steps x batch) in one of the noise-level bins.
    bins = rows(tmp_path / "clean" / "loss_by_timestep.csv")
    assert bins[0] == ["low", "high", "count", "mean_loss"]
    assert sum(int(r[2]) for r in bins[1:]) == counted.samples >= STEPS
    with Image.open(tmp_path / "clean" / "loss_by_timestep.png") as im:
        assert im.format == "PNG"


@pytest.mark.usefixtures("one_torch_thread")
def test_skip_spikes_leaves_the_weights_as_before_the_spike(images: Path, tmp_path: Path) -> None:
    before = train(tiny(images, tmp_path / "before", max_steps=SPIKE_AT - 1))
    cfg = tiny(images, tmp_path / "skipped", max_steps=SPIKE_AT, skip_spikes=True)
    skipped = train(cfg, loader=CorruptLoader(make_loader(cfg), SPIKE_AT))
    assert skipped.spike_steps == [SPIKE_AT] and skipped.skipped_steps == 1
    assert skipped.losses[:-1] == before.losses
    record = json.loads((tmp_path / "skipped" / "spikes.jsonl").read_text())
    assert record["skipped"] is True
    want, got = before.unet.state_dict(), skipped.unet.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    # Resumed from a checkpoint before the spike (the detector's window is in it): the same run.
    checkpointed = replace(cfg, output=tmp_path / "checkpointed", checkpoint_every=SPIKE_AT - 5)
    train(checkpointed, loader=CorruptLoader(make_loader(cfg), SPIKE_AT))
    resumed = train(
        replace(checkpointed, resume=tmp_path / "checkpointed" / f"checkpoint-{SPIKE_AT - 5}"),
        loader=CorruptLoader(make_loader(cfg), 5),  # the loader resumes after the checkpoint's batches
    )
    assert resumed.spike_steps == [SPIKE_AT] and resumed.losses == skipped.losses[SPIKE_AT - 5 :]
    assert all(torch.equal(want[k], resumed.unet.state_dict()[k]) for k in want)
    # Not skipped, the same batch moves the weights.
    kept = train(
        replace(cfg, output=tmp_path / "kept", skip_spikes=False),
        loader=CorruptLoader(make_loader(cfg), SPIKE_AT),
    )
    assert not all(torch.equal(want[k], kept.unet.state_dict()[k]) for k in want)


@pytest.mark.usefixtures("one_torch_thread")
def test_tensorboard_events_hold_the_logged_scalars_and_previews(images: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = ("a wallpaper", "a photo")
    cfg = tiny(images, tmp_path, max_steps=4, report_to="tensorboard", preview_every=2, preview_steps=2)
    cfg = replace(cfg, preview_prompts=prompts, preview_sizes=("32x32",))
    cfg = replace(cfg, validation_split=0.5, validate_every=2)
    result = train(cfg)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    expected = ("train/loss", "train/grad_norm", "train/lr", "train/skipped_steps", "train/data_wait_share")
    assert set(expected) | {"val/loss"} <= set(tags["scalars"])
    table = rows(tmp_path / "loss.csv")[1:]
    for column, tag in ((1, "train/loss"), (2, "train/grad_norm"), (3, "train/lr")):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(int(r[0]), pytest.approx(float(r[column]), rel=1e-5)) for r in table], tag
    assert [e.value for e in events.Scalars("train/skipped_steps")] == [0, 0, 0, 0]
    assert all(0 <= e.value <= 1 for e in events.Scalars("train/data_wait_share"))
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("val/loss")] == result.validation
    previews = events.Images("previews/32x32")
    assert [e.step for e in previews] == [2, 4]
    # A row per prompt, a column per preview seed, of 32x32 images.
    assert (previews[0].height, previews[0].width) == (len(prompts) * 32, 2 * 32)


@pytest.mark.usefixtures("one_torch_thread")
def test_wandb_offline_run_holds_the_scalars_and_previews_tensorboard_gets(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from wandb_records import history

    monkeypatch.setenv("WANDB_MODE", "offline")  # (the tracker forces offline mode anyway)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny(images, tmp_path, max_steps=4, report_to="tensorboard,wandb", preview_every=2, preview_steps=2)
    cfg = replace(cfg, preview_prompts=("a wallpaper",), preview_sizes=("32x32",))
    cfg = replace(cfg, validation_split=0.5, validate_every=2)
    result = train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    rows = history(runs[0])
    assert sorted(rows) == [1, 2, 3, 4]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = ("train/loss", "train/grad_norm", "train/lr", "train/skipped_steps", "train/data_wait_share")
    for tag in (*tags, "val/loss"):
        logged = {e.step: e.value for e in events.Scalars(tag)}
        assert logged and {s: rows[s][tag] for s in logged} == pytest.approx(logged, rel=1e-6), tag
    assert [rows[s]["val/loss"] for s in (2, 4)] == pytest.approx([v for _, v in result.validation])
    # The preview grids: wandb image files at the preview steps (1 prompt x 2 seeds of 32x32), the
    # pixels TensorBoard got (to the 8-bit rounding: TensorBoard truncates, wandb's tracker rounds).
    boards = {e.step: e for e in events.Images("previews/32x32")}
    assert sorted(boards) == [2, 4]
    for step in (1, 3):
        assert not any(k.startswith("previews/") for k in rows[step])
    for step, board in boards.items():
        row = rows[step]
        assert row["previews/32x32/_type"] == "image-file"
        assert (row["previews/32x32/height"], row["previews/32x32/width"]) == (32, 64)
        saved = np.asarray(Image.open(runs[0].parent / "files" / row["previews/32x32/path"]).convert("RGB"))
        shown = np.asarray(Image.open(io.BytesIO(board.encoded_image_string)).convert("RGB"))
        assert saved.shape == shown.shape == (32, 64, 3)
        assert np.abs(saved.astype(int) - shown.astype(int)).max() <= 1


@pytest.mark.parametrize("value", ["wandb,foo", "none,wandb", "tensorboard;wandb", ""])
def test_report_to_names_only_known_trackers(value: str, tmp_path: Path) -> None:
    message = "report_to must be none or a comma-separated list of tensorboard, wandb"
    with pytest.raises(ValueError, match=message):
        TrainConfig(data=tmp_path, output=tmp_path, report_to=value)
