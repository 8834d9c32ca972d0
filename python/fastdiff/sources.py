"""Dataset sources other than a folder, made local for the Rust core: remote shards fetched into the spool
(:mod:`fastdiff.remote`), parquet files converted to tar shards (:mod:`fastdiff.parquet`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastdiff.parquet import ParquetShard, parquet_to_shard
from fastdiff.remote import FetchFailure, FetchPolicy, default_spool_dir, fetch_shards, is_remote


@dataclasses.dataclass(frozen=True)
class LocalShards:
    """Result of :func:`local_shards`.

    Attributes:
        paths: The local tar shards, in the order given, without the ones that failed.
        failed: Shards that could not be fetched or converted, with the reason.
        parquet: The conversion of each parquet source (rows, rows without image bytes), by source as given.
        bytes_fetched: Bytes received from remote storage.
    """

    paths: list[Path]
    failed: list[FetchFailure]
    parquet: dict[str, ParquetShard]
    bytes_fetched: int


def local_shards(
    shards: Sequence[str],
    *,
    spool_dir: str | os.PathLike[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    policy: FetchPolicy | None = None,
    image_column: str = "image",
    caption_column: str | None = "text",
    index_suffix: str | None = None,
) -> LocalShards:
    """Local tar shards for ``shards``: local ``.tar`` paths as they are (``file://`` stripped), remote
    ones fetched into ``spool_dir/remote``, ``.parquet`` files (local or fetched) converted into
    ``spool_dir/parquet``.

    Args:
        shards: Local paths or fsspec URLs of ``.tar`` (WebDataset) or ``.parquet`` files, expanded.
        spool_dir: Where fetched and converted shards are kept (:func:`fastdiff.remote.default_spool_dir`
            when ``None``).
        storage_options: The fsspec filesystem's arguments (s3fs: ``key``, ``secret``, ``endpoint_url``…).
        policy: Fetch concurrency, timeout and retries (:class:`fastdiff.remote.FetchPolicy`).
        image_column: Parquet column of the image bytes.
        caption_column: Parquet column of the captions (``None``: no captions).
        index_suffix: The shard index sidecar's suffix, fetched with each remote tar shard when present.

    Returns:
        The local shards, the failures and the parquet conversions.

    Raises:
        ValueError: A parquet file lacks the columns (as :func:`fastdiff.parquet.parquet_to_shard`).
        ImportError: s3fs or pyarrow is needed and not installed (``pip install 'fastdiff[remote]'``).
    """
    spool = Path(spool_dir) if spool_dir is not None else default_spool_dir()
    remote = [s for s in shards if is_remote(s)]
    fetched = (
        fetch_shards(
            remote,
            spool / "remote",
            storage_options=storage_options,
            policy=policy,
            optional_suffixes=[index_suffix] if index_suffix else [],
        )
        if remote
        else None
    )
    failed = list(fetched.failed) if fetched else []
    paths: list[Path] = []
    parquet: dict[str, ParquetShard] = {}
    for spec in shards:
        if fetched is not None and spec in fetched.paths:
            local = fetched.paths[spec]
        elif is_remote(spec):
            continue  # in failed
        else:
            local = Path(spec.removeprefix("file://"))
        if spec.lower().endswith(".parquet"):
            try:
                parquet[spec] = parquet_to_shard(
                    local, spool / "parquet", image_column=image_column, caption_column=caption_column
                )
            except ValueError:
                raise
            except Exception as e:  # pyarrow's ArrowInvalid for a damaged file, OSError
                failed.append(FetchFailure(spec, f"{type(e).__name__}: {e}", 1))
                continue
            local = parquet[spec].path
        paths.append(local)
    return LocalShards(paths, failed, parquet, fetched.bytes_fetched if fetched else 0)
