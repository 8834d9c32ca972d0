"""Parquet files in the HF datasets layout converted to WebDataset tar shards (fastdiff.parquet): the members
hold the stored bytes and captions, rows without an image are listed, conversion happens once, and a loader
over parquet files gives the pixels of the image files."""

from __future__ import annotations

import tarfile
from pathlib import Path

import fastdiff
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import copy_with_captions, smallest_images
from fastdiff.parquet import parquet_to_shard


def _members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def _hf_table(images: list[Path]) -> pa.Table:
    """What ``datasets`` writes for an ``Image`` feature plus a ``text`` column, with one null image."""
    cells = [{"bytes": p.read_bytes(), "path": p.name} for p in images] + [None]
    texts = [p.with_suffix(".txt").read_text() for p in images] + ["orphan caption"]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table({"image": pa.array(cells, type=image_type), "text": pa.array(texts)})


def test_hf_layout_becomes_members_with_the_stored_bytes(wallpapers: Path, tmp_path: Path) -> None:
    images = smallest_images(wallpapers, 5)
    source = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(_hf_table(images), source, row_group_size=2)  # several row groups
    shard = parquet_to_shard(source, tmp_path / "spool")
    assert (shard.rows, shard.images, shard.missing, shard.converted) == (6, 5, (5,), True)
    members = _members(shard.path)
    expected: dict[str, bytes] = {}
    for row, image in enumerate(images):
        ext = {".jpeg": "jpg"}.get(image.suffix.lower(), image.suffix.lower().lstrip("."))
        expected[f"{row:08d}.{ext}"] = image.read_bytes()
        expected[f"{row:08d}.txt"] = image.with_suffix(".txt").read_bytes()
    assert members == expected

    again = parquet_to_shard(source, tmp_path / "spool")
    assert again == type(shard)(shard.path, 6, 5, (5,), converted=False)


def test_plain_binary_column_and_no_captions(wallpapers: Path, tmp_path: Path) -> None:
    images = smallest_images(wallpapers, 2)
    source = tmp_path / "data.parquet"
    pq.write_table(pa.table({"jpg": pa.array([p.read_bytes() for p in images], type=pa.binary())}), source)
    shard = parquet_to_shard(source, tmp_path, image_column="jpg", caption_column=None)
    assert shard.images == 2 and not any(name.endswith(".txt") for name in _members(shard.path))


def test_columns_are_checked(tmp_path: Path) -> None:
    source = tmp_path / "data.parquet"
    pq.write_table(pa.table({"image": pa.array([1, 2]), "caption": pa.array(["a", "b"])}), source)
    with pytest.raises(ValueError, match=r"data.parquet: no column 'text' \(columns: image, caption\)"):
        parquet_to_shard(source, tmp_path)
    with pytest.raises(ValueError, match="holds int64, not image bytes"):
        parquet_to_shard(source, tmp_path, caption_column="caption")


def test_a_loader_over_parquet_gives_the_pixels_of_the_files(
    wallpapers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = smallest_images(wallpapers, 5)
    data = copy_with_captions(images, tmp_path / "data")
    for i, image in enumerate(images):  # unique captions: the key to match samples by
        (data / f"{image.stem}.txt").write_text(f"caption {i}")
    table = _hf_table([data / p.name for p in images])
    pq.write_table(table.slice(0, 3), tmp_path / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(3), tmp_path / "train-00001-of-00002.parquet")
    opts = dict(resolution=128, bucket_step=32, batch_size=1, num_threads=1)

    def by_caption(loader: fastdiff.DataLoader) -> dict[str, bytes]:
        return {b["captions"][0]: b["pixel_values"][0].numpy().tobytes() for b in loader}

    monkeypatch.setenv("FASTDIFF_SPOOL", str(tmp_path / "spool"))
    pattern = str(tmp_path / "train-{00000..00001}-of-00002.parquet")
    with pytest.warns(
        UserWarning, match=r"train-00001-of-00002.parquet: 1 of 3 rows have no image bytes .*rows 2\)"
    ):
        shards = fastdiff.DataLoader(pattern, **opts)  # type: ignore[arg-type]
    folder = fastdiff.DataLoader(data, **opts)  # type: ignore[arg-type]
    # The null image row is no member: 5 images; its caption is a caption file without an image.
    assert shards.report["loaded"] == folder.report["loaded"] == 5
    assert by_caption(shards) == by_caption(folder)
