"""Validation: the loader's seeded held-out split (checked against the documented hash by hand), and the
validation loss, bitwise equal across two runs and a resumed run, for the DDPM (from scratch, SD 1.x) and
flow-matching (SD3) paths."""

from __future__ import annotations

import csv
import math
from dataclasses import replace
from pathlib import Path

import fastdiff
import pytest
import torch
from conftest import copy_with_captions, smallest_images, tiny_run
from fastdiff.training.config import TrainConfig
from fastdiff.training.run import train
from fastdiff.training.setup import make_validation, with_dataset_options
from PIL import Image
from tiny_dit import SEQUENCE_TOKENS, build_sd3
from tiny_sd import build_sd15

SPLIT = 0.3
CPU = torch.device("cpu")
MASK = 2**64 - 1


def _mix(z: int) -> int:
    # SplitMix64's finaliser, as rust/core/src/rng.rs.
    z = (z + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def held_out(seed: int, split: float, relative: str) -> bool:
    """The documented rule, by hand: FNV-1a 64 of the relative path, keyed with (seed, epoch 0,
    stream 15) through SplitMix64, its top 53 bits as a double in [0, 1), below the split."""
    h = 0xCBF29CE484222325
    for byte in relative.encode():
        h = ((h ^ byte) * 0x100000001B3) & MASK
    key = _mix(_mix(_mix(_mix(seed) ^ 0) ^ 15) ^ h)
    return (key >> 11) * (1.0 / (1 << 53)) < split


@pytest.fixture(scope="module")
def images(wallpapers: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_with_captions(smallest_images(wallpapers, 12), tmp_path_factory.mktemp("images"))


def names(loader: fastdiff.DataLoader) -> set[str]:
    loader.set_epoch(0)
    return {Path(p).name for batch in loader for p in batch["paths"]}


def test_split_holds_out_the_hashed_images_and_the_training_loader_never_yields_them(
    images: Path, tmp_path: Path
) -> None:
    options = {"resolution": 64, "bucket_step": 16, "batch_size": 2, "num_threads": 1}
    train_loader = fastdiff.DataLoader(images, validation_split=SPLIT, **options)
    val_loader = fastdiff.DataLoader(
        images, validation_split=SPLIT, validation=True, shuffle=False, **options
    )
    files = {p.name for p in images.iterdir() if p.suffix != ".txt"}
    want = {n for n in files if held_out(0, SPLIT, n)}
    assert 0 < len(want) < len(files)
    for epoch in range(3):
        train_loader.set_epoch(epoch)
        assert not {Path(p).name for b in train_loader for p in b["paths"]} & want
    assert names(val_loader) == want
    assert names(train_loader) == files - want
    for loader, loaded in ((train_loader, len(files) - len(want)), (val_loader, len(want))):
        report = loader.report
        assert (report["found"], report["loaded"], report["held_out"]) == (
            len(files),
            loaded,
            len(files) - loaded,
        )
        assert report["loaded"] + report["held_out"] + len(report["skipped"]) == report["found"]
    # Adding an image moves no other one in or out.
    grown = copy_with_captions(sorted(p for p in images.iterdir() if p.suffix != ".txt"), tmp_path / "grown")
    Image.new("RGB", (300, 200), (10, 200, 30)).save(grown / "zz-new.png")
    more = names(fastdiff.DataLoader(grown, validation_split=SPLIT, validation=True, **options))
    assert more - {"zz-new.png"} == want
    with pytest.raises(ValueError, match="validation=True needs validation_split"):
        fastdiff.DataLoader(images, validation=True, **options)
    with pytest.raises(ValueError, match=r"validation_split must be in \[0, 1\)"):
        fastdiff.DataLoader(images, validation_split=1.0, **options)


def val_rows(output: Path) -> list[list[str]]:
    with (output / "val_loss.csv").open(newline="") as f:
        return list(csv.reader(f))


def check_reproducible(cfg: TrainConfig, tmp_path: Path, at: int) -> None:
    """Two runs give the same validation losses bit for bit, and so does one resumed at step ``at``."""
    first = train(replace(cfg, output=tmp_path / "first", checkpoint_every=at))
    second = train(replace(cfg, output=tmp_path / "second"))
    steps = [s for s, _ in first.validation]
    assert steps == list(range(cfg.validate_every, cfg.max_steps + 1, cfg.validate_every))
    assert all(math.isfinite(v) for _, v in first.validation)
    assert first.validation == second.validation  # exact
    assert len({v for _, v in first.validation}) == len(steps)  # the weights move it
    resumed = train(replace(cfg, output=tmp_path / "first", resume=tmp_path / "first" / f"checkpoint-{at}"))
    assert resumed.validation == [p for p in first.validation if p[0] > at]
    rows = val_rows(tmp_path / "first")
    assert rows[0] == ["step", "val_loss", "images"]
    assert [(int(r[0]), float(r[1])) for r in rows[1:]] == first.validation  # all digits written
    assert {int(r[2]) for r in rows[1:]} == {
        sum(held_out(0, SPLIT, p.name) for p in cfg.data.iterdir() if p.suffix != ".txt")
    }
    with Image.open(tmp_path / "first" / "loss.png") as im:
        assert im.format == "PNG"


@pytest.mark.usefixtures("one_torch_thread")
def test_from_scratch_validation_loss_is_bitwise_reproducible_and_resumes(
    images: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(
        data=images,
        output=tmp_path,
        resolution=32,
        bucket_step=16,
        batch_size=2,
        unet_channels=(16, 32),
        max_steps=6,
        validation_split=SPLIT,
        validate_every=2,
        crop="random",
        flip_prob=0.5,
        ema_decay=0.9,
        num_threads=1,
        device="cpu",
    )
    check_reproducible(cfg, tmp_path, at=4)


@pytest.mark.usefixtures("one_torch_thread")
def test_sd_and_flow_matching_validation_losses_are_bitwise_reproducible(
    images: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sd15 = build_sd15(tmp_path_factory.mktemp("sd15"))
    settings = {"max_steps": 4, "validation_split": SPLIT, "validate_every": 2, "learning_rate": 1e-3}
    check_reproducible(tiny_run(sd15, images, Path(), **settings), tmp_path_factory.mktemp("sd"), at=2)
    sd3 = build_sd3(tmp_path_factory.mktemp("sd3"))
    flow = tiny_run(sd3, images, Path(), max_sequence_length=SEQUENCE_TOKENS, **settings)
    check_reproducible(flow, tmp_path_factory.mktemp("flow"), at=2)


@pytest.mark.usefixtures("one_torch_thread")
def test_several_datasets_hold_out_their_own_images_and_validate_reproducibly(
    images: Path, tmp_path: Path
) -> None:
    split = 0.5
    files = sorted(p for p in images.iterdir() if p.suffix != ".txt")
    out = [p for p in files if held_out(0, split, p.name)]
    kept = [p for p in files if p not in out]
    parts = (out[:1] + kept[:4], out[1:] + kept[4:])  # each dataset holds out some of its images
    for name, part in zip("ab", parts, strict=True):
        copy_with_captions(part, tmp_path / name)
    want = [{p.name for p in part if held_out(0, split, p.name)} for part in parts]
    assert all(want)
    data = tmp_path / "data.toml"
    data.write_text(
        f"[general]\nresolution = 32\nbucket_reso_steps = 16\nvalidation_split = {split}\n\n"
        '[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "a"\n\n'
        '[[datasets]]\nbatch_size = 1\n[[datasets.subsets]]\nimage_dir = "b"\n'
    )
    cfg = TrainConfig(
        data=data,
        output=tmp_path,
        unet_channels=(16, 32),
        max_steps=6,
        validate_every=2,
        num_threads=1,
        device="cpu",
    )
    validation = make_validation(with_dataset_options(cfg))
    assert validation is not None
    assert [names(loader) for loader in validation.loaders] == want  # each dataset's own held-out images
    first = train(replace(cfg, output=tmp_path / "first", checkpoint_every=4))
    second = train(replace(cfg, output=tmp_path / "second"))
    assert [s for s, _ in first.validation] == [2, 4, 6] and first.validation == second.validation
    resumed = train(replace(cfg, output=tmp_path / "first", resume=tmp_path / "first" / "checkpoint-4"))
    assert resumed.validation == first.validation[2:]
    assert {int(r[2]) for r in val_rows(tmp_path / "first")[1:]} == {len(want[0]) + len(want[1])}
    no_split = tmp_path / "no_split.toml"
    no_split.write_text(data.read_text().replace(f"validation_split = {split}\n", ""))
    with pytest.raises(ValueError, match="sets no validation_split"):
        train(replace(cfg, data=no_split, output=tmp_path / "none"))


@pytest.mark.slow  # three tiny SD runs and three cache builds: ~25 s on 2 cores
def test_validation_loss_from_a_cache_equals_the_one_from_pixels(images: Path, tmp_path: Path) -> None:
    # --cache-build encodes the held-out images too (center crop, no flip); the validation loss then
    # reads their cached posterior (drawn with the same per-sample generator) and cached embeddings.
    sd15 = build_sd15(tmp_path / "sd15")
    settings = {"max_steps": 2, "validation_split": SPLIT, "validate_every": 1, "learning_rate": 1e-3}
    settings |= {"lora_rank": 4, "caption_dropout": 0.0, "crop": "center", "flip_prob": 0.0}
    pixels = train(tiny_run(sd15, images, tmp_path / "pixels", **settings))
    cached_run = tiny_run(
        sd15, images, tmp_path / "cached", cache=tmp_path / "cache", cache_build=True, **settings
    )
    cached = train(cached_run)
    again = train(replace(cached_run, output=tmp_path / "again"))
    assert [s for s, _ in cached.validation] == [s for s, _ in pixels.validation] == [1, 2]
    assert cached.validation == again.validation  # bitwise reproducible from the cache too
    held_out = {int(r[2]) for r in val_rows(tmp_path / "cached")[1:]}
    assert held_out == {int(r[2]) for r in val_rows(tmp_path / "pixels")[1:]} and held_out.pop() > 0
    # f32 cache entries: the same draws up to float rounding of the stored posterior.
    for (_, a), (_, b) in zip(cached.validation, pixels.validation, strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    # A cache of the training images alone (as built before held-out images were cached) lacks the
    # held-out ones: the run stops, naming the file.
    from fastdiff.cache.build import build_from_model
    from fastdiff.training.sd import with_model_defaults
    from fastdiff.training.setup import make_loader, with_dataset_options

    lacking = replace(
        cached_run, output=tmp_path / "lacking", cache=tmp_path / "train-only", cache_build=False
    )
    resolved = with_model_defaults(with_dataset_options(lacking))
    build_from_model(
        tmp_path / "train-only", lambda: make_loader(resolved, pixels=True), sd15, device=CPU, progress=False
    )
    with pytest.raises(ValueError, match=r"lacks 1 of the 1 held-out images' latents .* --cache-build"):
        train(lacking)
    # (Had the check missed one, the validation loader raises for it rather than leave it out.)
    loader = make_loader(resolved, validation=True)
    with pytest.raises(fastdiff.CacheMissError, match=r"not in the cache .* run fastdiff cache to encode it"):
        list(loader)
