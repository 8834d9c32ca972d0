"""Parquet datasets (the HF hub's layout: image bytes in one column, captions in another) as tar shards.

The Rust core reads a sample as one byte range of a local file; a parquet file's image bytes lie inside
column pages that are usually compressed, so each parquet file is converted once, one row group at a time
(never whole in memory), into a WebDataset tar shard: members ``KEY.EXT`` (the image bytes as stored) and
``KEY.txt`` (the caption), ``KEY`` the row's number in the file, 8 digits. The shard is kept in a spool
folder under a name that changes with the parquet file's path, size and modification time and the columns
used, so later runs reuse it. The image column holds bytes (``binary``) or, as HF ``datasets`` writes its
``Image`` feature, a struct with a ``bytes`` field (and a ``path`` field, whose extension names the member
when the bytes' first bytes do not tell the format).

A bottom layer: imports nothing from fastdiff.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

__all__ = ["ParquetShard", "parquet_to_shard"]

#: First bytes of the encoded formats, and the member extension each gets.
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "jpg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"WEBP", 8, "webp"),
    (b"GIF8", 0, "gif"),
    (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tif"),
    (b"MM\x00*", 0, "tif"),
    (b"\xff\x0a", 0, "jxl"),
    (b"\x00\x00\x00\x0cJXL ", 0, "jxl"),
)


@dataclasses.dataclass(frozen=True)
class ParquetShard:
    """Result of :func:`parquet_to_shard`.

    Attributes:
        path: The tar shard.
        rows: Rows in the parquet file.
        images: Image members written (rows with image bytes).
        missing: Row numbers whose image cell is null or empty (no member is written for them).
        converted: Whether this call wrote the shard (False: it was there already).
    """

    path: Path
    rows: int
    images: int
    missing: tuple[int, ...]
    converted: bool


def _extension(data: bytes, path: str | None) -> str:
    for magic, offset, ext in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return ext
    suffix = Path(path).suffix.lower().lstrip(".") if path else ""
    # Unknown bytes keep an image extension, so that the scan reports them as a skip (never passed over).
    return suffix if suffix.isalnum() and suffix else "jpg"


def parquet_to_shard(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    image_column: str = "image",
    caption_column: str | None = "text",
) -> ParquetShard:
    """Convert one local parquet file into a WebDataset tar shard in ``out_dir`` (once; later calls reuse it).

    Args:
        source: A local parquet file.
        out_dir: Folder of the shard (created); its name is ``<16 hex digits>-<source stem>.tar``, with a
            ``.json`` record of the rows without image bytes beside it.
        image_column: Column of encoded image bytes (``binary``, or a struct with a ``bytes`` field).
        caption_column: Column of captions (strings; null = no caption), or None for none.

    Returns:
        The shard, with the rows seen and the rows without image bytes.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: ``source`` has no column ``image_column`` (or ``caption_column``), or it holds
            neither bytes nor a struct with a ``bytes`` field; the message names the file and its columns.
        ImportError: pyarrow is not installed (``pip install 'fastdiff[remote]'``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = Path(source)
    st = source.stat()
    identity = f"{source.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{image_column}\0{caption_column}"
    out = Path(out_dir) / f"{hashlib.sha256(identity.encode()).hexdigest()[:16]}-{source.stem}.tar"
    file = pq.ParquetFile(source)
    schema = file.schema_arrow
    columns = [image_column] + ([caption_column] if caption_column else [])
    for column in columns:
        if column not in schema.names:
            raise ValueError(f"{source}: no column {column!r} (columns: {', '.join(schema.names)})")
    image_type = schema.field(image_column).type
    is_struct = pa.types.is_struct(image_type)
    if is_struct and image_type.get_field_index("bytes") < 0:
        raise ValueError(
            f"{source}: column {image_column!r} is a struct without a 'bytes' field ({image_type})"
        )
    if not is_struct and not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise ValueError(f"{source}: column {image_column!r} holds {image_type}, not image bytes")

    rows = file.metadata.num_rows
    record = out.with_name(out.name + ".json")
    with contextlib.suppress(OSError, ValueError, KeyError):
        if out.exists():
            known = tuple(int(r) for r in json.loads(record.read_text())["missing"])
            return ParquetShard(out, rows, rows - len(known), known, converted=False)

    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f"{out.name}.part-{os.getpid()}")
    missing: list[int] = []
    row = 0
    try:
        with tarfile.open(part, "w", format=tarfile.USTAR_FORMAT) as tar:
            for batch in file.iter_batches(columns=columns):
                captions = batch.column(1).to_pylist() if caption_column else [None] * batch.num_rows
                for (data, path), caption in zip(_cells(batch, is_struct), captions, strict=True):
                    if not data:
                        missing.append(row)
                    else:
                        key = f"{row:08d}"
                        _add(tar, f"{key}.{_extension(data, path)}", data)
                        if caption is not None:
                            _add(tar, f"{key}.txt", str(caption).encode())
                    row += 1
        os.replace(part, out)
        record.write_text(json.dumps({"rows": rows, "missing": missing}))
    finally:
        part.unlink(missing_ok=True)
    return ParquetShard(out, rows, rows - len(missing), tuple(missing), converted=True)


def _cells(batch: Any, is_struct: bool) -> list[tuple[bytes | None, str | None]]:
    """(image bytes, original path) of each row of a record batch's first column."""
    column = batch.column(0)
    if not is_struct:
        return [(b, None) for b in column.to_pylist()]
    data = column.field("bytes").to_pylist()
    index = column.type.get_field_index("path")
    paths = column.field("path").to_pylist() if index >= 0 else [None] * len(data)
    # A null struct cell hides its fields.
    valid = column.is_valid().to_pylist()
    return [(d if v else None, p if v else None) for d, p, v in zip(data, paths, valid, strict=True)]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))  # mtime 0, no owner: the same bytes for the same rows
