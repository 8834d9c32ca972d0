"""``fastdiff shard`` of a dataset TOML: every subset folder packed, a config of the shards written that
reads the same samples (files, captions from caption files and metadata, repeats, crops, pixels)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import fastdiff
import pytest
from conftest import smallest_images
from fastdiff.cli import main
from fastdiff.dataset import load_toml
from fastdiff.shard import write_dataset_shards

OPTS = dict(num_threads=2)


def named(path: str, data: Path) -> str:
    """``subset folder name/file`` for a folder path under ``data`` or a ``<folder>/shard-N.tar/<member>``."""
    if ".tar/" in path:
        shard, member = path.split(".tar/", 1)
        return f"{Path(shard).parent.name}/{member}"
    return Path(path).relative_to(data).as_posix()


def epoch(loader: fastdiff.DataLoader, data: Path) -> list[tuple]:
    return [
        (named(p, data), b["captions"][i], b["crop_top_lefts"][i], b["pixel_values"][i].numpy().tobytes())
        for b in loader
        for i, p in enumerate(b["paths"])
    ]


def test_shard_a_dataset_toml_reads_the_same_samples(wallpapers: Path, tmp_path: Path) -> None:
    images = smallest_images(wallpapers, 7)
    data = tmp_path / "data"
    dog, reg = data / "dog", data / "reg"
    dog.mkdir(parents=True)
    reg.mkdir()
    for image in images[:4]:  # captions in .caption files (the [general] default)
        shutil.copy(image, dog / image.name)
        (dog / f"{image.stem}.caption").write_text(f"sks dog, {image.stem}")
    rows = []
    for k, image in enumerate(images[4:]):  # captions in metadata.jsonl, one image with two, one with none
        shutil.copy(image, reg / image.name)
        (reg / f"{image.stem}.txt").write_text("a caption file the metadata overrides")
        if k < 2:
            text = [f"dog {k}", f"a dog {k}"] if k == 0 else f"dog {k}"
            rows.append({"file_name": image.name, "text": text})
    (reg / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = data / "dataset.toml"
    config.write_text(
        '[general]\ncaption_extension = ".caption"\nshuffle_caption = true\n\n'
        "[[datasets]]\nresolution = 128\nbucket_reso_steps = 32\nbatch_size = 2\n"
        'crop = "random"\nflip_prob = 0.5\nseed = 3\n\n'
        '[[datasets.subsets]]\nimage_dir = "dog"\nnum_repeats = 2\ncaption_prefix = "photo of "\n\n'
        '[[datasets.subsets]]\nimage_dir = "reg"\nis_reg = true\n'
    )
    out = tmp_path / "out"
    size = sum(p.stat().st_size for p in dog.iterdir()) // 2  # the dog folder takes several shards
    assert main(["shard", str(config), str(out), "--shard-size", str(size)]) == 0
    written = load_toml(out / "dataset.toml")
    dog_subset, reg_subset = written["datasets"][0]["subsets"]
    assert "caption_extension" not in written["general"]
    assert reg_subset["caption_extension"] == ".txt" and reg_subset["caption_per_line"] is True
    assert "metadata_file" not in reg_subset and dog_subset["num_repeats"] == 2
    assert len(list((out / "dog").glob("shard-*.tar"))) >= 2  # the brace pattern covers several shards
    before = fastdiff.DataLoader.from_config(config, **OPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the indexes are current: no "index ignored" warning
        after = fastdiff.DataLoader.from_config(out / "dataset.toml", **OPTS)
    assert len(after) == len(before)
    # Two epochs: the same files with the same captions (caption files, metadata, one per line, none),
    # repeats, crops, flips and pixels, in the same order.
    want = [epoch(before, data) for _ in range(2)]
    assert [epoch(after, out) for _ in range(2)] == want
    captions = {c for e in want for _, c, _, _ in e}
    assert any(c.startswith("photo of ") for c in captions) and {"dog 1"} <= captions
    assert captions & {"dog 0", "a dog 0"} and "a caption file the metadata overrides" not in captions
    assert after.report["found"] == before.report["found"]


def test_shard_refuses_a_toml_of_shards_and_caption_extensions(tmp_path: Path) -> None:
    config = tmp_path / "d.toml"
    config.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x/shard-000000.tar"\n')
    with pytest.raises(ValueError, match="already reads tar shards"):
        write_dataset_shards(config, tmp_path / "out")
    assert main(["shard", str(config), str(tmp_path / "o"), "--caption-extensions", ".txt"]) == 2
