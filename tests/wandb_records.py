"""The records of a wandb offline run file (``run-ID.wandb``), parsed with wandb's own protobuf schema
(``wandb.proto.wandb_internal_pb2.Record``).

wandb writes the file in LevelDB's log format (as its former Python reader,
``wandb.sdk.internal.datastore.DataStore``, read it; that reader is gone from wandb 0.2x, whose Go
core writes the file): a 7-byte file header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of
chunks, each a 7-byte header (CRC-32 of type byte + data, little-endian length, type: 1 full, 2 first,
3 middle, 4 last) and its data; a block's last < 7 bytes are zero padding.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    """Every record of ``path`` in order, as ``wandb_internal_pb2.Record`` messages; checks the file
    header and each chunk's CRC."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    out, pending, pos = [], b"", HEADER.size
    while pos + CHUNK.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # padding at a block's end
            pos += left
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        if length == 0 and kind == 0:  # zeros: the rest of a block (or the unwritten end)
            pos += left
            continue
        chunk = data[pos + CHUNK.size : pos + CHUNK.size + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: bad CRC at {pos}"
        pos += CHUNK.size + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def history(path: Path) -> dict[int, dict[str, Any]]:
    """``{step: {key: value}}`` of the run's history records (``run.log``), the JSON values decoded;
    rows of one step merged."""
    import json

    rows: dict[int, dict[str, Any]] = {}
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
        step = int(record.history.step.num) if record.history.HasField("step") else int(items["_step"])
        rows.setdefault(step, {}).update(items)
    return rows
