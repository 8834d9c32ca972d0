"""Parquet files in the HF datasets layout converted to WebDataset tar shards (fastdiff.parquet): the members
hold the stored bytes and captions, rows without an image are listed, conversion happens once."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import smallest_images
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
