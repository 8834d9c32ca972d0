"""Datasets: TOML config with subsets and repeats, regularisation flag, metadata.jsonl captions, tag
operations, rank sharding in one process, and the report per subset."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import fastdiff
import numpy as np
import pytest
import torch
from fastdiff import cli
from PIL import Image

SMALL = dict(resolution=64, bucket_step=16, num_threads=2)


def make_images(folder: Path, sizes: list[tuple[int, int]], captions: list[str] | None = None) -> list[Path]:
    """Noise PNGs of the given (w, h) sizes, with ``.txt`` captions when given."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(sizes))
    out = []
    for i, (w, h) in enumerate(sizes):
        p = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        if captions is not None:
            p.with_suffix(".txt").write_text(captions[i])
        out.append(p)
    return out


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_toml_subsets_repeats_reg_flag_and_tag_shuffle(tmp_path: Path) -> None:
    make_images(tmp_path / "sks", [(64, 64)] * 3, [f"sks dog, tag{i}a, tag{i}b, tag{i}c" for i in range(3)])
    make_images(tmp_path / "reg", [(64, 64)] * 2 + [(96, 48)], ["a dog"] * 3)
    config = write_toml(
        tmp_path / "dataset.toml",
        """
[general]
shuffle_caption = true
keep_tokens = 1
bucket_reso_steps = 16

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = "sks"
  num_repeats = 3

  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  shuffle_caption = false
  weight = 0.25
""",
    )
    loader = fastdiff.DataLoader.from_config(config, seed=1, num_threads=2)
    report = loader.report
    assert report["samples"] == 3 * 3 + 3
    assert [(s["images"], s["num_repeats"], s["is_reg"]) for s in report["subsets"]] == [
        (3, 3, False),
        (3, 1, True),
    ]
    assert sorted(report["subsets"][1]["images_per_bucket"]) == [((48, 80), 1), ((64, 64), 2)]
    # 11 square samples -> 6 batches of 2 (one short); the 96x48 image's bucket (48x80) holds 1 < batch_size.
    assert report["small_buckets"] == [((48, 80), 1)]
    assert len(loader) == 6 + 1
    counts: collections.Counter[str] = collections.Counter()
    orders = set()
    for batch in loader:
        assert batch["loss_weights"].dtype == torch.float32
        for path, caption, reg, weight in zip(
            batch["paths"],
            batch["captions"],
            batch["is_reg"].tolist(),
            batch["loss_weights"].tolist(),
            strict=True,
        ):
            counts[Path(path).parent.name + "/" + Path(path).name] += 1
            assert reg == (Path(path).parent.name == "reg")
            assert weight == (0.25 if reg else 1.0)
            if reg:
                assert caption == "a dog"
            else:
                tags = caption.split(", ")
                assert tags[0] == "sks dog" and len(tags) == 4
                i = Path(path).stem[-1]
                assert sorted(tags[1:]) == [f"tag{i}a", f"tag{i}b", f"tag{i}c"]
                orders.add(tuple(tags[1:]))
    assert all(counts[f"sks/img{i:02d}.png"] == 3 for i in range(3))
    assert all(counts[f"reg/img{i:02d}.png"] == 1 for i in range(3))
    assert len(orders) > 3  # the repeats of one image get different tag orders


def test_scan_command_shows_repeats_and_buckets_per_subset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_images(tmp_path / "a", [(64, 64)] * 3)
    make_images(tmp_path / "b", [(96, 48)])
    config = write_toml(
        tmp_path / "d.toml",
        "[general]\nresolution = 64\nbucket_step = 16\nbatch_size = 2\n[[datasets]]\n"
        "[[datasets.subsets]]\nimage_dir = 'a'\nnum_repeats = 5\n"
        "[[datasets.subsets]]\nimage_dir = 'b'\nis_reg = true\n",
    )
    assert cli.main(["scan", str(config)]) == 0
    out = capsys.readouterr().out
    assert "batches per epoch: 9" in out  # 15 square samples -> 8 batches, 1 wide -> 1
    assert "samples per epoch (repeats counted): 16" in out
    assert f"subset {tmp_path / 'a'} (train, x5): 3 images (64x64: 3)" in out
    assert f"subset {tmp_path / 'b'} (reg, x1): 1 images (48x80: 1)" in out
    assert "buckets smaller than one batch" in out and "   48 x 80    1" in out
    assert out.startswith("subsets: 2 (listed below)\n")
    # A flag given on the command line wins over the config's value.
    assert cli.main(["scan", str(config), "--batch-size", "4"]) == 0
    assert "batches per epoch: 5" in capsys.readouterr().out  # 15 square -> 4 batches, 1 wide -> 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[general]\nresolutoin = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\n",
            r"\[general\]: unknown key 'resolutoin'",
        ),
        (
            "[[datasets]]\nflip = 0.5\n[[datasets.subsets]]\nimage_dir='a'\n",
            r"\[\[datasets\]\]: unknown key 'flip'",
        ),
        (
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\nrepeats = 2\n",
            r"\[\[datasets.subsets\]\] #1: unknown key 'repeats'",
        ),
        (
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\nnum_repeats = '2'\n",
            "'num_repeats' has the wrong type",
        ),
        ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n", "'image_dir' is required"),
        ("[[datasets]]\n[[datasets]]\n", r"\[\[datasets\]\] #1: has no \[\[datasets.subsets"),
        ("[general]\nbatch_size = 2\n", "no \\[\\[datasets\\]\\] table"),
        ("[dataset]\n", "'dataset'"),
        ("[[datasets]]\n", "no \\[\\[datasets.subsets"),
        ("[[datasets]\n", "invalid TOML"),
        (
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\nweight = 2\nloss_weight = 2\n",
            "one of 'weight' and 'loss_weight'",
        ),
        (
            "[general]\nbucket_step = 64\nbucket_reso_steps = 32\n[[datasets]]\n[[datasets.subsets]]\n"
            "image_dir='a'\n",
            r"\[general\]: give one of 'bucket_reso_steps' and 'bucket_step'",
        ),
    ],
)
def test_toml_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fastdiff.load_config(write_toml(tmp_path / "bad.toml", text))


def test_a_subset_value_overrides_a_default_given_under_an_alias(tmp_path: Path) -> None:
    kwargs, subsets = fastdiff.load_config(
        {
            "general": {"weight": 0.5, "bucket_reso_steps": 32},
            "datasets": [
                {"bucket_step": 16, "subsets": [{"image_dir": "a", "loss_weight": 2.0}, {"image_dir": "b"}]}
            ],
        }
    )
    assert kwargs["bucket_step"] == 16
    assert [s.loss_weight for s in subsets] == [2.0, 0.5]


def test_dict_config_and_out_of_range_subset_option(tmp_path: Path) -> None:
    make_images(tmp_path / "a", [(64, 64)] * 2)
    cfg = {"datasets": [{"subsets": [{"image_dir": str(tmp_path / "a"), "caption_dropout_rate": 1.5}]}]}
    with pytest.raises(ValueError, match="caption_dropout_rate"):
        fastdiff.DataLoader.from_config(cfg, **SMALL)
    with pytest.raises(ValueError, match="loss_weight must be a finite number >= 0, got -1"):
        fastdiff.DataLoader(subsets=[fastdiff.Subset(tmp_path / "a", loss_weight=-1)], **SMALL)
    with pytest.raises(ValueError, match="exactly one of root and subsets"):
        fastdiff.DataLoader(tmp_path / "a", subsets=[fastdiff.Subset(tmp_path / "a")])


def test_metadata_jsonl_captions_columns_variants_and_errors(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    paths = make_images(folder / "train", [(64, 64)] * 3)
    rows = [
        {"file_name": "train/img00.png", "text": "a red fox", "alt": "fox"},
        {"file_name": "train/img01.png", "text": ["first caption", "second caption"], "alt": "x"},
        {"file_name": "train/img02.png", "text": "third", "alt": "y"},
    ]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    paths[0].with_suffix(".txt").write_text("ignored: metadata wins")

    def captions(loader: fastdiff.DataLoader) -> dict[str, str]:
        return {Path(p).name: c for b in loader for p, c in zip(b["paths"], b["captions"], strict=True)}

    loader = fastdiff.DataLoader(folder, batch_size=3, seed=0, **SMALL)
    assert loader.report["captions_missing"] == 0
    seen_variants = set()
    for _ in range(8):
        got = captions(loader)
        assert got["img00.png"] == "a red fox" and got["img02.png"] == "third"
        seen_variants.add(got["img01.png"])
    assert seen_variants == {"first caption", "second caption"}  # one per epoch, both over epochs
    again = fastdiff.DataLoader(folder, batch_size=3, seed=0, **SMALL)
    first = fastdiff.DataLoader(folder, batch_size=3, seed=0, **SMALL)
    assert [captions(again) for _ in range(4)] == [captions(first) for _ in range(4)]  # seeded

    alt = fastdiff.DataLoader(subsets=[fastdiff.Subset(folder, caption_column="alt")], **SMALL)
    assert captions(alt) == {"img00.png": "fox", "img01.png": "x", "img02.png": "y"}
    with pytest.raises(ValueError, match=r"metadata\.jsonl:1: no caption column 'caption'"):
        fastdiff.DataLoader(subsets=[fastdiff.Subset(folder, caption_column="caption")], **SMALL)

    paths[2].unlink()
    with pytest.raises(
        FileNotFoundError, match=r"metadata\.jsonl:3: file_name 'train/img02.png' does not exist"
    ):
        fastdiff.DataLoader(folder, **SMALL)
    (folder / "metadata.jsonl").rename(folder / "metadata.json")
    with pytest.raises(ValueError, match=r"metadata\.json: .*named exactly 'metadata\.jsonl'"):
        fastdiff.DataLoader(folder, **SMALL)


def test_caption_dropout_and_tag_dropout_are_seeded(tmp_path: Path) -> None:
    make_images(tmp_path / "t", [(64, 64)] * 8, [f"keep{i}, a, b, c, d, e, f" for i in range(8)])

    def captions(**kw: float) -> list[list[str]]:
        sub = fastdiff.Subset(tmp_path / "t", keep_tokens=1, **kw)
        loader = fastdiff.DataLoader(subsets=[sub], batch_size=8, seed=2, **SMALL)
        return [sorted(c for b in loader for c in b["captions"]) for _ in range(3)]

    assert captions(caption_dropout_rate=1.0) == [[""] * 8] * 3
    dropped = captions(caption_tag_dropout_rate=0.5)
    assert dropped == captions(caption_tag_dropout_rate=0.5)
    tags = [c.split(", ") for epoch in dropped for c in epoch]
    assert all(t[0].startswith("keep") for t in tags)
    n_free = sum(len(t) - 1 for t in tags)
    assert 48 <= n_free <= 96  # 144 free tags at rate 0.5: 72 expected
    assert dropped[0] != dropped[1]  # another epoch, other draws


def test_ranks_in_one_process_step_together_on_disjoint_samples(tmp_path: Path) -> None:
    make_images(tmp_path / "r", [(64, 64)] * 7 + [(96, 48)] * 3)
    for remainder, total in (("drop", 8), ("pad", 12)):
        ranks = [
            fastdiff.DataLoader(
                tmp_path / "r", batch_size=2, rank=r, world_size=2, remainder=remainder, seed=4, **SMALL
            )
            for r in range(2)
        ]
        assert len(ranks[0]) == len(ranks[1])
        steps = [list(loader) for loader in ranks]
        paths = [[p for b in s for p in b["paths"]] for s in steps]
        for a, b in zip(*steps, strict=True):
            assert a["pixel_values"].shape == b["pixel_values"].shape
        assert len(paths[0]) + len(paths[1]) == total
        if remainder == "drop":
            assert not set(paths[0]) & set(paths[1])
            assert len(set(paths[0] + paths[1])) == 8  # 7 -> 6 and 3 -> 2 split evenly
        else:
            assert len(set(paths[0] + paths[1])) == 10
    with pytest.raises(ValueError, match="rank"):
        fastdiff.DataLoader(tmp_path / "r", rank=2, world_size=2, **SMALL)
    with pytest.raises(ValueError, match="rank"):
        fastdiff.DataLoader(tmp_path / "r", rank=-1, world_size=2, **SMALL)
    with pytest.raises(ValueError, match="remainder"):
        fastdiff.DataLoader(tmp_path / "r", world_size=2, rank=0, remainder="keep", **SMALL)
