"""Coverage (issue 15): ``min_bucket_fill`` merges small buckets within ``max_extra_crop``, and the report
and ``fastdiff scan`` say how many images an epoch trains. Counts on header-only sets are exact (worked
by hand in the comments); the pixels of a moved image are checked against Pillow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import fastdiff
import numpy as np
import pytest
import torch
from conftest import write_header_png
from fastdiff import cli
from PIL import Image
from reference import mean_abs_diff, reference_sample

# Resolution 512 with 16-pixel steps has 65 buckets, sorted by aspect, neighbours at most 0.077 apart
# in log-aspect (7.4% extra crop, below the default 10%).
GRID = {"resolution": 512, "bucket_step": 16}


def bucket_list(tmp_path: Path) -> list[tuple[int, int]]:
    """The 65 candidate buckets (h, w) of GRID, read from a loader of one header-only image."""
    one = tmp_path / "one"
    one.mkdir()
    write_header_png(one / "x.png", 512, 512)
    buckets = fastdiff.DataLoader(one, **GRID).buckets
    assert len(buckets) == 65
    return buckets


def issue_shaped(tmp_path: Path, buckets: list[tuple[int, int]]) -> Path:
    """84 header-only images over 42 aspect buckets, two per bucket: twice the size of buckets 11..52."""
    root = tmp_path / "issue"
    root.mkdir()
    for j in range(42):
        h, w = buckets[11 + j]
        for k in range(2):
            write_header_png(root / f"i{2 * j + k:03d}.png", 2 * w, 2 * h)
    return root


def test_issue_shaped_set_is_fully_trained_with_min_bucket_fill(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    buckets = bucket_list(tmp_path)
    root = issue_shaped(tmp_path, buckets)
    # Unmerged with drop_last: no bucket fills a batch of 4, nothing is trained.
    plain = fastdiff.DataLoader(root, batch_size=4, drop_last=True, **GRID)
    r = plain.report
    assert (r["loaded"], len(r["images_per_bucket"]), len(r["small_buckets"])) == (84, 42, 42)
    assert (r["images_trained"], len(plain)) == (0, 0)
    assert r["bucket_merges"]["images_moved"] == 0
    # Without drop_last all are trained, in 42 half batches.
    short = fastdiff.DataLoader(root, batch_size=4, **GRID)
    assert (short.report["images_trained"], len(short)) == (84, 42)

    for drop_last in (True, False):
        loader = fastdiff.DataLoader(root, batch_size=4, drop_last=drop_last, min_bucket_fill=4, **GRID)
        r = loader.report
        m = r["bucket_merges"]
        # Fewest samples first, ties to the earlier bucket, a small target preferred: bucket 11 + 2k
        # moves into its neighbour 12 + 2k, 21 full buckets.
        assert m["moves"] == [(buckets[11 + 2 * k], buckets[12 + 2 * k], 2) for k in range(21)]
        assert (m["images_moved"], m["samples_moved"]) == (42, 42)
        errors = [
            math.log(buckets[12 + 2 * k][1] / buckets[12 + 2 * k][0])
            - math.log(buckets[11 + 2 * k][1] / buckets[11 + 2 * k][0])
            for k in range(21)
        ]
        assert m["max_aspect_error"] == pytest.approx(max(errors), abs=1e-12)
        assert m["mean_aspect_error"] == pytest.approx(sum(errors) / 21, abs=1e-12)
        assert m["max_extra_crop"] == pytest.approx(1 - math.exp(-max(errors)), abs=1e-12)
        assert m["max_extra_crop"] <= 0.10
        assert (r["images_trained"], r["subsets"][0]["images_trained"], len(loader)) == (84, 84, 21)
        assert r["small_buckets"] == []
        state = loader.state_dict()
        assert state["options"]["min_bucket_fill"] == 4
        assert state["dataset_digest"] != plain.state_dict()["dataset_digest"]
        # A state of the merged plan does not resume an unmerged loader (its batches differ).
        unmerged = fastdiff.DataLoader(root, batch_size=4, drop_last=drop_last, **GRID)
        with pytest.raises(ValueError, match="min_bucket_fill"):
            unmerged.load_state_dict(state)
        fastdiff.DataLoader(
            root, batch_size=4, drop_last=drop_last, min_bucket_fill=4, **GRID
        ).load_state_dict(state)

    flags = ["--resolution", "512", "--bucket-step", "16", "--batch-size", "4", "--drop-last"]
    assert cli.main(["scan", str(root), *flags]) == 0
    assert "images trained per epoch: 0 of 84" in capsys.readouterr().out
    assert cli.main(["scan", str(root), *flags, "--min-bucket-fill", "4"]) == 0
    out = capsys.readouterr().out
    assert "images trained per epoch: 84 of 84" in out
    assert "bucket merges (min_bucket_fill): 42 images moved (42 samples)" in out
    h0, w0 = buckets[11]
    h1, w1 = buckets[12]
    assert f"  {h0}x{w0} -> {h1}x{w1}: 2" in out
    # No extra crop allowed: nothing moves, nothing trained.
    strict = ["--min-bucket-fill", "4", "--max-extra-crop", "0", "--json"]
    assert cli.main(["scan", str(root), *flags, *strict]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["bucket_merges"]["images_moved"], report["images_trained"]) == (0, 0)


def test_images_trained_per_subset_counts_repeats_and_drops(tmp_path: Path) -> None:
    buckets = bucket_list(tmp_path)
    root = issue_shaped(tmp_path, buckets)
    # Two images x 2 repeats in the tallest bucket (4 samples: a full batch, not merged), one image
    # alone in the widest (no bucket within 10% has samples: it stays, and drop_last leaves it out).
    tall, wide = tmp_path / "tall", tmp_path / "wide"
    tall.mkdir()
    wide.mkdir()
    h, w = buckets[0]
    for k in range(2):
        write_header_png(tall / f"t{k}.png", w, h)
    h, w = buckets[64]
    write_header_png(wide / "w.png", w, h)
    subsets = [fastdiff.Subset(root), fastdiff.Subset(tall, num_repeats=2), fastdiff.Subset(wide)]
    loader = fastdiff.DataLoader(subsets=subsets, batch_size=4, drop_last=True, min_bucket_fill=4, **GRID)
    r = loader.report
    assert [(s["images_trained"], s["images"]) for s in r["subsets"]] == [(84, 84), (2, 2), (0, 1)]
    assert (r["images_trained"], r["loaded"], len(loader)) == (86, 87, 22)
    assert r["small_buckets"] == [(buckets[64], 1)]
    assert r["bucket_merges"]["images_moved"] == 42


def test_a_moved_image_gets_its_new_buckets_size_crop_and_conditioning(tmp_path: Path) -> None:
    # Three 512x512 images (bucket 512x512) and one 528x496 (its own bucket 496x528, ln(33/31) = 0.0625
    # from square: 6.1% extra crop). min_bucket_fill=4 moves it into 512x512.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:496, 0:528]
    smooth = np.stack([xx * 255 // 527, yy * 255 // 495, (xx + yy) * 255 // 1022], axis=-1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "moved.png")
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(tmp_path / f"sq{k}.png")
    own = fastdiff.DataLoader(tmp_path, batch_size=4, **GRID)
    assert sorted(own.report["images_per_bucket"]) == [((496, 528), 1), ((512, 512), 3)]
    loader = fastdiff.DataLoader(tmp_path, batch_size=4, min_bucket_fill=4, dtype=torch.uint8, **GRID)
    assert loader.report["bucket_merges"]["moves"] == [((496, 528), (512, 512), 1)]
    extra = loader.report["bucket_merges"]["max_extra_crop"]
    assert extra == pytest.approx(1 - 31 / 33, abs=1e-12)
    (batch,) = list(loader)
    assert tuple(batch["pixel_values"].shape) == (4, 3, 512, 512)
    i = [Path(p).name for p in batch["paths"]].index("moved.png")
    assert batch["original_sizes"][i] == (496, 528)
    assert batch["target_sizes"][i] == (512, 512)
    # Cover resize of 528x496 for 512x512: s = 512/496, resized 545x512, centre crop left (545-512)//2.
    assert batch["crop_top_lefts"][i] == (0, 16)
    got = batch["pixel_values"][i].numpy()
    ref = reference_sample(tmp_path / "moved.png", (512, 512), (0, 16))
    assert mean_abs_diff(got, ref) <= 0.6
    assert mean_abs_diff(got, ref[:, :, ::-1]) > 0.6


def test_merge_options_are_checked() -> None:
    with pytest.raises(ValueError, match="min_bucket_fill must be at least 1"):
        fastdiff.DataLoader(".", min_bucket_fill=0)
    with pytest.raises(ValueError, match=r"max_extra_crop must be in \[0, 1\]"):
        fastdiff.DataLoader(".", max_extra_crop=1.5)


def test_train_flags_and_dataset_config_set_min_bucket_fill_and_max_extra_crop(tmp_path: Path) -> None:
    import argparse

    from fastdiff.training.flags import add_train_arguments, config_from_args
    from fastdiff.training.setup import make_loader, with_dataset_options

    root = issue_shaped(tmp_path, bucket_list(tmp_path))
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    common = ["--data", str(root), "--output", str(tmp_path / "out"), "--batch-size", "4"]
    common += ["--resolution", "512", "--bucket-step", "16"]

    def merges(argv: list[str]) -> dict:
        config = with_dataset_options(config_from_args(parser.parse_args([*common, *argv])))
        report = make_loader(config).report
        return {"trained": report["images_trained"], **report["bucket_merges"]}

    def loader(**options: float) -> dict:
        report = fastdiff.DataLoader(root, batch_size=4, min_bucket_fill=4, **options, **GRID).report
        return {"trained": report["images_trained"], **report["bucket_merges"]}

    direct, tight = loader(), loader(max_extra_crop=0.02)
    # A 2% allowance moves fewer images (neighbouring buckets are up to 7.4% apart).
    assert direct["images_moved"] == 42 and 0 < tight["images_moved"] < 42
    assert merges(["--min-bucket-fill", "4"]) == direct
    assert merges(["--min-bucket-fill", "4", "--max-extra-crop", "0.02"]) == tight
    assert merges([])["images_moved"] == 0
    # From a dataset config's [general], the flag still winning.
    toml = tmp_path / "dataset.toml"
    toml.write_text(
        f"[general]\nmin_bucket_fill = 4\nmax_extra_crop = 0.02\n[[datasets]]\n"
        f"[[datasets.subsets]]\nimage_dir = '{root}'\n"
    )
    common[1] = str(toml)
    assert merges([]) == tight
    assert merges(["--max-extra-crop", "0.1"]) == direct
    with pytest.raises(SystemExit):
        parser.parse_args([*common, "--min-bucket-fill", "x"])
    with pytest.raises(ValueError, match="min_bucket_fill must be >= 1"):
        config_from_args(parser.parse_args([*common, "--min-bucket-fill", "0"]))
