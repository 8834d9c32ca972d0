"""``--preview-sizes``: preview grids at several sizes, one PNG per size whose images are at their own
pixels, on the tiny SD path; by default the training set's most populated buckets (from scratch)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run
from fastdiff.training.config import TrainConfig, parse_sizes
from fastdiff.training.flags import add_train_arguments, config_from_args
from fastdiff.training.outputs import GRID_LABEL_WIDTH
from fastdiff.training.run import preview_sizes, train
from fastdiff.training.setup import make_loader
from PIL import Image
from test_resume import smallest
from tiny_sd import build_sd15

PROMPTS = ("a red house", "a blue lake")
SEEDS = 2  # loop.PREVIEW_SEEDS: a column per seed


def grid_cells(path: Path, width: int, height: int) -> list[np.ndarray]:
    """The images of a preview grid, row-major, checking the PNG is exactly a row per prompt and a
    column per seed of ``width`` x ``height`` images right of the caption column."""
    grid = Image.open(path)
    assert grid.size == (GRID_LABEL_WIDTH + SEEDS * width, len(PROMPTS) * height), path
    pixels = np.asarray(grid.convert("RGB"))
    left = GRID_LABEL_WIDTH
    return [
        pixels[r * height : (r + 1) * height, left + c * width : left + (c + 1) * width]
        for r in range(len(PROMPTS))
        for c in range(SEEDS)
    ]


def test_stable_diffusion_previews_at_each_given_size(wallpapers: Path, tmp_path: Path) -> None:
    model = build_sd15(tmp_path / "sd15")
    data = smallest(wallpapers, tmp_path / "data", 4)
    sizes = ("40x24,24x32",)  # one value holding two sizes, as `--preview-sizes 40x24,24x32` gives it
    cfg = tiny_run(model, data, tmp_path / "out", lora_rank=4, max_steps=1, preview_every=1, preview_steps=2)
    train(replace(cfg, preview_sizes=sizes, preview_prompts=PROMPTS))
    written = sorted(p.name for p in (tmp_path / "out" / "previews").iterdir())
    assert written == ["step-000001-24x32.png", "step-000001-40x24.png"]
    for width, height in ((40, 24), (24, 32)):
        cells = grid_cells(tmp_path / "out" / "previews" / f"step-000001-{width}x{height}.png", width, height)
        assert all(cell.std() > 0 for cell in cells)  # sampled images, not the white background
        assert not np.array_equal(cells[0], cells[1])  # two seeds, two images


def test_default_previews_are_the_most_populated_buckets(tmp_path: Path) -> None:
    # 3 wide, 2 square and 1 tall image: three buckets, the first two previewed.
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(96, 48)] * 3 + [(64, 64)] * 2 + [(48, 96)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"image {i}")
    cfg = TrainConfig(
        data=data,
        output=tmp_path / "out",
        resolution=32,
        bucket_step=16,
        batch_size=2,
        unet_channels=(16, 32),
        max_steps=1,
        checkpoint_every=0,
        num_threads=1,
        device="cpu",
        preview_every=1,
        preview_steps=2,
        preview_prompts=PROMPTS,
    )
    counts = make_loader(cfg).report["images_per_bucket"]
    assert sorted(n for _, n in counts) == [1, 2, 3]
    ranked = sorted(counts, key=lambda bucket: -bucket[1])
    expected = [(w, h) for (h, w), _ in ranked[:2]]
    assert expected[0][0] > expected[0][1] and expected[1][0] == expected[1][1]  # wide, then square
    train(cfg)
    written = sorted(p.name for p in (tmp_path / "out" / "previews").iterdir())
    assert written == sorted(f"step-000001-{w}x{h}.png" for w, h in expected)
    for w, h in expected:
        grid_cells(tmp_path / "out" / "previews" / f"step-000001-{w}x{h}.png", w, h)


def test_preview_sizes_are_parsed_from_flags_and_checked(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    base = ["--data", str(tmp_path), "--output", str(tmp_path / "o")]
    for flags in (["1024x1024,832x1216"], ["1024x1024", "832x1216"]):
        cfg = config_from_args(parser.parse_args([*base, "--preview-sizes", *flags]))
        assert parse_sizes(cfg.preview_sizes) == [(1024, 1024), (832, 1216)]
    for bad in ("1024", "1024x", "0x64", "64by64"):
        with pytest.raises(ValueError, match=f"preview_sizes: '{bad}' is not WIDTHxHEIGHT"):
            TrainConfig(data=tmp_path, output=tmp_path, preview_sizes=(bad,))
    cfg = TrainConfig(data=tmp_path, output=tmp_path, preview_sizes=("64x48,40x64",))
    with pytest.raises(ValueError, match="preview_sizes 40x64: width and height must be multiples of 16"):
        preview_sizes(cfg, [], 16)  # type: ignore[arg-type]
