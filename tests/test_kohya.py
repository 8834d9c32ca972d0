"""kohya-ss sd-scripts dataset configs: the two examples of its docs/config_README-en.md verbatim, each
documented key against hand-computed results, the refused keys, kohya's metadata JSON, and several
[[datasets]] interleaved (order, determinism, exact resume)."""

# ruff: noqa: E501 (the second example's comments are kept verbatim, long lines included)

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fastdiff
import numpy as np
import pytest
import torch
from fastdiff import cli
from PIL import Image

# The first example of kohya-ss sd-scripts docs/config_README-en.md, verbatim.
FIRST_EXAMPLE = r"""
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'C:\hoge'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = 'C:\fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'C:\reg'
  class_tokens = 'human'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = 'C:\piyo'
  metadata_file = 'C:\piyo\piyo_md.json'
  # This subset uses keep_tokens = 1 (the value of [general])
"""

# Its "Example of configuration file: secondary_separator, wildcard notation, keep_tokens_separator,
# etc.", verbatim but for the image folder ("/path/to/image_dir" there), which the test makes.
SECOND_EXAMPLE = """
[general]
flip_aug = true
color_aug = false
resolution = [1024, 1024]

[[datasets]]
batch_size = 6
enable_bucket = true
bucket_no_upscale = true
caption_extension = ".txt"
keep_tokens_separator= "|||"
shuffle_caption = true
caption_tag_dropout_rate = 0.1
secondary_separator = ";;;" # subset 側に書くこともできます / can be written in the subset side
enable_wildcard = true # 同上 / same as above

  [[datasets.subsets]]
  image_dir = "/path/to/image_dir"
  num_repeats = 1

  # ||| の前後はカンマは不要です（自動的に追加されます） / No comma is required before and after ||| (it is added automatically)
  caption_prefix = "1girl, hatsune miku, vocaloid |||"

  # ||| の後はシャッフル、drop されず残ります / After |||, it is not shuffled or dropped and remains
  # 単純に文字列として連結されるので、カンマなどは自分で入れる必要があります / It is simply concatenated as a string, so you need to put commas yourself
  caption_suffix = ", anime screencap ||| masterpiece, rating: general"
"""

TRAIN = ["--max-steps", "3", "--device", "cpu", "--unet-channels", "16", "32", "--num-threads", "1"]
TRAIN += ["--checkpoint-every", "0"]


def image(path: Path, w: int, h: int, caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(w * 7919 + h + len(path.name))
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def captions_by_name(loader: fastdiff.DataLoader | fastdiff.DatasetGroup) -> dict[str, str]:
    return {Path(p).name: c for b in loader for p, c in zip(b["paths"], b["captions"], strict=True)}


def first_example(tmp_path: Path) -> Path:
    """The folders the first example names (relative to the TOML, 'C:\\hoge' is one folder name here)."""
    image(tmp_path / "C:\\hoge" / "h0.png", 512, 512, "hoge girl, red hair, smile, sky")
    image(tmp_path / "C:\\hoge" / "h1.png", 512, 512)  # no caption file: class_tokens
    image(tmp_path / "C:\\fuga" / "f0.png", 512, 512, "fuga boy, cap, blue, grass, tree")
    image(tmp_path / "C:\\fuga" / "f1.png", 512, 512)
    image(tmp_path / "C:\\reg" / "r0.png", 512, 512)
    image(tmp_path / "C:\\piyo" / "p0.png", 768, 768)
    image(tmp_path / "C:\\piyo" / "p1.jpg", 768, 768)
    metadata = {
        "p0": {"caption": "a piyo bird", "tags": "yellow, small, cute"},  # a stem, as the script writes
        "p1.jpg": {"tags": "a piyo chick, round"},  # a file name, tags only
    }
    (tmp_path / "C:\\piyo\\piyo_md.json").write_text(json.dumps(metadata, indent=2))
    config = tmp_path / "kohya.toml"
    config.write_text(FIRST_EXAMPLE)
    return config


def test_first_example_loads_with_class_tokens_and_kohya_metadata_and_trains(tmp_path: Path) -> None:
    config = first_example(tmp_path)
    (db, db_subsets), (ft, ft_subsets) = fastdiff.load_datasets(config)
    assert (db["resolution"], db["batch_size"], ft["resolution"], ft["batch_size"]) == (512, 4, 768, 2)
    assert [s.keep_tokens for s in (*db_subsets, *ft_subsets)] == [2, 3, 1, 1]
    assert [s.class_tokens for s in db_subsets] == ["hoge girl", "fuga boy", "human"]
    assert [s.is_reg for s in db_subsets] == [False, False, True]
    assert all(s.shuffle_caption and s.caption_extension == ".txt" for s in (*db_subsets, *ft_subsets))

    group = fastdiff.DatasetGroup.from_config(config, num_threads=2)
    # 5 images at 512 in batches of 4: 2 batches; 2 images at 768 in one batch of 2.
    assert len(group) == 3 and [len(x) for x in group.loaders] == [2, 1]
    shapes = []
    got: dict[str, str] = {}
    for batch in group:
        shapes.append(tuple(batch["pixel_values"].shape))
        got.update(zip((Path(p).name for p in batch["paths"]), batch["captions"], strict=True))
    assert sorted(shapes) == [(1, 3, 512, 512), (2, 3, 768, 768), (4, 3, 512, 512)]
    assert (got["h1.png"], got["f1.png"], got["r0.png"]) == ("hoge girl", "fuga boy", "human")
    # keep_tokens 2 and 3 keep the first tags in place; the others are shuffled.
    assert got["h0.png"].startswith("hoge girl, red hair, ")
    assert got["f0.png"].startswith("fuga boy, cap, blue, ")
    # kohya's metadata caption: caption + caption_separator + tags (no space added), or the tags alone.
    p0 = got["p0.png"].split(", ")
    assert p0[0] == "a piyo bird" and sorted(p0[1:]) == ["cute", "small", "yellow"]
    p1 = got["p1.jpg"].split(", ")
    assert p1[0] == "a piyo chick" and p1[1:] == ["round"]

    # Training on two CPU cores at 512 and 768 px takes minutes a step: the same file, resolutions / 8.
    small = tmp_path / "small.toml"
    small.write_text(FIRST_EXAMPLE.replace("= 512", "= 64").replace("[768, 768]", "[128, 128]"))
    out = tmp_path / "out"
    assert cli.main(["train", "--data", str(small), "--output", str(out), *TRAIN]) == 0
    assert len((out / "loss.csv").read_text().splitlines()) == 4
    assert json.loads((out / "train_config.json").read_text())["resolution"] == 64  # the first dataset's


def test_second_example_keeps_kohya_caption_semantics_and_trains(tmp_path: Path) -> None:
    folder = tmp_path / "image_dir"
    image(folder / "a.png", 128, 64, "upper body, looking at viewer, sky;;;cloud;;;day, outdoors")
    image(folder / "b.png", 64, 128, "{simple|white} background, smile")
    image(folder / "c.png", 64, 64, "{{retro style}}, stage")
    config = tmp_path / "kohya.toml"
    config.write_text(SECOND_EXAMPLE.replace("/path/to/image_dir", folder.as_posix()))
    kwargs, (subset,) = fastdiff.load_config(config)
    assert kwargs == {"flip_prob": 0.5, "resolution": 1024, "batch_size": 6, "no_upscale": True}
    assert (subset.keep_tokens_separator, subset.secondary_separator, subset.enable_wildcard) == (
        "|||",
        ";;;",
        True,
    )
    loader = fastdiff.DataLoader.from_config(config, num_threads=2)
    # bucket_no_upscale: each small image keeps its own size (no enlarging to 1024).
    shapes = {tuple(b["pixel_values"].shape) for b in loader}
    assert shapes == {(1, 3, 64, 128), (1, 3, 128, 64), (1, 3, 64, 64)}
    head, tail = ["1girl", "hatsune miku", "vocaloid"], ["masterpiece", "rating: general"]
    free = {
        "a.png": {"upper body", "looking at viewer", "sky,cloud,day", "outdoors"},
        "b.png": {"simple background", "white background", "smile"},
        "c.png": {"{retro style}", "stage"},
    }
    seen: dict[str, set[str]] = {name: set() for name in free}
    for epoch in range(12):
        loader.set_epoch(epoch)
        for name, caption in captions_by_name(loader).items():
            tags = caption.split(", ")
            assert tags[:3] == head and tags[-2:] == tail, caption
            middle = tags[3:-2]
            assert set(middle) <= free[name] | {"anime screencap"}, caption
            seen[name].update(middle)
    # The wildcard takes each option over the epochs; doubled braces are literal ones.
    assert {"simple background", "white background"} <= seen["b.png"]
    assert "{retro style}" in seen["c.png"]
    assert not any("{simple" in t or ";;;" in t for tags in seen.values() for t in tags)

    out = tmp_path / "out"
    assert cli.main(["train", "--data", str(config), "--output", str(out), *TRAIN]) == 0
    assert len((out / "loss.csv").read_text().splitlines()) == 4


def one(subset: dict[str, object], **dataset: object) -> dict[str, object]:
    return {"datasets": [{**dataset, "subsets": [subset]}]}


def test_kohya_keys_become_fastdiff_options(tmp_path: Path) -> None:
    kwargs, (s,) = fastdiff.load_config(
        {
            "general": {"flip_aug": False, "random_crop": True, "resolution": [768, 768]},
            "datasets": [{"subsets": [{"image_dir": "a", "flip_aug": True, "random_crop": False}]}],
        }
    )
    assert (kwargs["flip_prob"], kwargs["crop"], kwargs["resolution"]) == (0.0, "random", 768)
    assert (s.flip_prob, s.crop) == (0.5, "center")
    kwargs, _ = fastdiff.load_config(
        one({"image_dir": "a"}, resolution=96, enable_bucket=False, bucket_reso_steps=32)
    )
    assert kwargs == {
        "resolution": 96,
        "bucket_step": 96,
        "min_bucket_side": 96,
        "max_bucket_side": 96,
        "no_upscale": False,
    }
    kwargs, _ = fastdiff.load_config(
        one({"image_dir": "a"}, enable_bucket=True, color_aug=False, cache_info=False)
    )
    assert kwargs == {}


def test_enable_bucket_false_gives_one_fixed_size(tmp_path: Path) -> None:
    for name, (w, h) in {"wide": (200, 60), "tall": (50, 160), "square": (64, 64)}.items():
        image(tmp_path / "d" / f"{name}.png", w, h)
    fixed = fastdiff.DataLoader.from_config(
        one({"image_dir": str(tmp_path / "d")}, resolution=[96, 96], enable_bucket=False, batch_size=3),
        num_threads=2,
    )
    assert fixed.buckets == [(96, 96)]
    (batch,) = list(fixed)
    assert batch["pixel_values"].shape == (3, 3, 96, 96)
    # Each image is resized to cover 96x96 and its centre cut out: 200x60 -> 320x96, left (320 - 96) / 2;
    # 50x160 -> 96x307, top (307 - 96) // 2; 64x64 -> 96x96.
    assert sorted(tuple(c) for c in batch["crop_top_lefts"]) == [(0, 0), (0, 112), (105, 0)]
    bucketed = fastdiff.DataLoader.from_config(
        one({"image_dir": str(tmp_path / "d")}, resolution=96, bucket_reso_steps=32), num_threads=2
    )
    assert len({tuple(b["pixel_values"].shape[2:]) for b in bucketed}) == 3


@pytest.mark.parametrize(
    ("table", "key", "value", "message"),
    [
        (
            "subset",
            "color_aug",
            True,
            r"color_aug = True is not supported: fastdiff has no colour .* instead",
        ),
        (
            "general",
            "face_crop_aug_range",
            [1.0, 3.0],
            r"face_crop_aug_range = \[1.0, 3.0\] .* `random_crop = true`",
        ),
        ("dataset", "cache_info", True, r"cache_info = True is not supported: .*fastdiff cache"),
        ("subset", "resize_interpolation", "area", r"resize_interpolation = 'area' .* set `filter`"),
        ("general", "resolution", [512, 768], r"resolution = \[512, 768\]: .* give an int, such as 627"),
        ("general", "resolution", [512], r"'resolution' must be an int or a list \[width, height\]"),
        ("subset", "enable_bucket", False, r"unknown key 'enable_bucket'"),
        ("general", "flip_aug", 1, r"'flip_aug' has the wrong type"),
    ],
)
def test_refused_keys_name_the_key_and_what_to_use(table: str, key: str, value: object, message: str) -> None:
    subset: dict[str, Any] = {"image_dir": "a"}
    dataset: dict[str, Any] = {"subsets": [subset]}
    general: dict[str, Any] = {}
    {"subset": subset, "dataset": dataset, "general": general}[table][key] = value
    with pytest.raises(ValueError, match=message):
        fastdiff.load_config({"general": general, "datasets": [dataset]})


def test_both_a_kohya_key_and_its_option_in_one_table_is_an_error() -> None:
    with pytest.raises(ValueError, match="give one of 'flip_aug' and 'flip_prob'"):
        fastdiff.load_config(one({"image_dir": "a", "flip_prob": 0.2, "flip_aug": True}))


def test_caption_operations_through_the_loader(tmp_path: Path) -> None:
    d = tmp_path / "d"
    image(d / "a.png", 64, 64, "sks, sky;;;cloud, {red|red} hat, {{x}}")
    image(d / "b.png", 64, 64)
    loader = fastdiff.DataLoader(
        subsets=[
            fastdiff.Subset(
                d,
                class_tokens="a photo of sks dog",
                caption_prefix="best,",
                caption_suffix=", end",
                secondary_separator=";;;",
                enable_wildcard=True,
            )
        ],
        resolution=64,
        batch_size=2,
        num_threads=2,
    )
    assert captions_by_name(loader) == {
        "a.png": "best, sks, sky,cloud, red hat, {x} , end",
        "b.png": "best, a photo of sks dog , end",
    }
    assert loader.report["captions_missing"] == 1
    every = fastdiff.DataLoader(
        subsets=[fastdiff.Subset(d, caption_dropout_every_n_epochs=2, class_tokens="dog")], resolution=64
    )
    by_epoch = [set(captions_by_name(every).values()) for _ in range(4)]
    # kohya counts epochs from 1: its 2nd and 4th, here epochs 1 and 3, drop every caption.
    assert by_epoch == [{"sks, sky;;;cloud, {red|red} hat, {{x}}", "dog"}, {""}] * 2
    fixed = fastdiff.DataLoader(
        subsets=[
            fastdiff.Subset(
                d, keep_tokens_separator="|||", caption_prefix="p |||", caption_tag_dropout_rate=1.0
            )
        ],
        resolution=64,
    )
    # Everything after the separator is free (there is no second one), and all free tags drop out.
    assert set(captions_by_name(fixed).values()) == {"p"}


def test_kohya_metadata_json(tmp_path: Path) -> None:
    d = tmp_path / "ft"
    image(d / "x.png", 64, 64, "ignored: metadata wins")
    image(d / "sub" / "y.webp", 64, 64)
    image(d / "z.png", 64, 64)
    md = tmp_path / "md.json"
    md.write_text(
        json.dumps(
            {
                "x": {"caption": "a cat\nthe cat", "tags": "pet, indoors", "train_resolution": [64, 64]},
                str(d / "sub" / "y.webp"): {"caption": "a dog"},
            }
        )
    )
    plain = fastdiff.DataLoader(subsets=[fastdiff.Subset(d, metadata_file=md)], resolution=64, batch_size=3)
    assert captions_by_name(plain) == {"x.png": "a cat\nthe cat,pet, indoors", "y.webp": "a dog", "z.png": ""}
    wild = fastdiff.DataLoader(
        subsets=[fastdiff.Subset(d, metadata_file=md, enable_wildcard=True, caption_separator=";")],
        resolution=64,
        batch_size=3,
    )
    lines = {captions_by_name(wild)["x.png"] for _ in range(16)}
    assert lines == {"a cat;pet, indoors", "the cat;pet, indoors"}  # tags added to each line
    for content, message in [
        ({"w": {"caption": "none"}}, r"'w': names no image"),
        ({"../x": {"caption": "out"}}, r"'\.\./x': the image lies outside the subset folder"),
        ({"x": {"caption": 3}}, r"'caption' and 'tags' are strings"),
        ({"x": {}, "x.png": {}}, r"names .*x\.png, which another key names too"),
        (["x"], "one JSON object keyed by image"),
    ]:
        md.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            fastdiff.DataLoader(subsets=[fastdiff.Subset(d, metadata_file=md)], resolution=64)
    image(d / "x.jpg", 64, 64)
    md.write_text(json.dumps({"x": {"caption": "two"}}))
    with pytest.raises(ValueError, match=r"'x': names several images \(x\.jpg, x\.png\)"):
        fastdiff.DataLoader(subsets=[fastdiff.Subset(d, metadata_file=md)], resolution=64)


def group_of(tmp_path: Path, **overrides: object) -> fastdiff.DatasetGroup:
    for i in range(5):
        image(tmp_path / "small" / f"s{i}.png", 32, 32, f"small {i}")
    for i in range(4):
        image(tmp_path / "big" / f"b{i}.png", 64, 64, f"big {i}")
    config = {
        "general": {"seed": 3, "bucket_step": 16},
        "datasets": [
            {"resolution": 32, "batch_size": 2, "subsets": [{"image_dir": str(tmp_path / "small")}]},
            {"resolution": 64, "batch_size": 1, "subsets": [{"image_dir": str(tmp_path / "big")}]},
        ],
    }
    return fastdiff.DatasetGroup.from_config(config, num_threads=2, **overrides)


def steps(group: fastdiff.DatasetGroup) -> list[tuple[int, list[str], torch.Tensor]]:
    return [(b["pixel_values"].shape[-1], b["paths"], b["pixel_values"]) for b in group]


def test_several_datasets_interleave_in_a_seeded_order(tmp_path: Path) -> None:
    group = group_of(tmp_path)
    assert [len(x) for x in group.loaders] == [3, 4] and len(group) == 7
    orders = [group.order(e) for e in range(6)]
    assert all(sorted(o) == [0, 0, 0, 1, 1, 1, 1] for o in orders)
    assert len({tuple(o) for o in orders}) > 1  # reshuffled per epoch
    # The order is kohya's uniform shuffle of all batches: numpy's permutation of the loader indices.
    seed_stream = np.random.default_rng([3, 2, 0x6B6F_6879_615F_6D69])
    assert orders[2] == list(seed_stream.permutation([0, 0, 0, 1, 1, 1, 1]))
    group.set_epoch(2)
    run = steps(group)
    assert [side for side, _, _ in run] == [32 if k == 0 else 64 for k in orders[2]]
    # Each dataset's own batches are those its loader alone gives, in its own order.
    alone = group_of(tmp_path).loaders[0]
    alone.set_epoch(2)
    assert [b["paths"] for b in alone] == [paths for side, paths, _ in run if side == 32]
    again = group_of(tmp_path)
    again.set_epoch(2)
    assert all(p == q and torch.equal(x, y) for (_, p, x), (_, q, y) in zip(run, steps(again), strict=True))
    in_order = group_of(tmp_path, shuffle=False)
    assert in_order.order(5) == [0, 0, 0, 1, 1, 1, 1]


def test_several_datasets_resume_mid_epoch_exactly(tmp_path: Path) -> None:
    group = group_of(tmp_path)
    group.set_epoch(1)
    full = steps(group)
    group.set_epoch(1)
    it = iter(group)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(group.state_dict()))
    assert (state["epoch"], state["batches_consumed"]) == (1, 4)
    fresh = group_of(tmp_path)
    fresh.load_state_dict(state)
    rest = steps(fresh)
    assert len(rest) == 3
    assert all(p == q and torch.equal(x, y) for (_, p, x), (_, q, y) in zip(rest, full[4:], strict=True))
    assert fresh.epoch == 2
    with pytest.raises(ValueError, match="state_dict was saved with seed=3, this group has seed=4"):
        group_of(tmp_path, seed=4).load_state_dict(state)


def test_run_flags_that_each_dataset_sets_are_refused_with_several(tmp_path: Path) -> None:
    from fastdiff.training.config import TrainConfig
    from fastdiff.training.setup import make_batches, with_dataset_options

    config = first_example(tmp_path)
    with pytest.raises(ValueError, match=r"2 \[\[datasets\]\], .*: set batch_size in the file's"):
        with_dataset_options(TrainConfig(data=config, output=tmp_path, batch_size=3))
    resolved = with_dataset_options(TrainConfig(data=config, output=tmp_path))
    assert (resolved.resolution, resolved.batch_size) == (512, 4)  # the first dataset's, for the log
    batches = make_batches(resolved)
    assert isinstance(batches, fastdiff.DatasetGroup)
    assert [x.batch_size for x in batches.loaders] == [4, 2]
