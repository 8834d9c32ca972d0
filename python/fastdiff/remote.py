"""Remote shards: copied through fsspec into a local spool before the scan; bounded, timed out, retried.

The Rust core reads local files only (a ``pread`` of each member's byte range), so a shard at an fsspec URL
(``s3://`` through s3fs, ``gs://``, ``https://``, ``memory://``, …) is fetched once into the spool and read
from there by every epoch and every later run, as long as the remote object's size and ETag (or modification
time) are unchanged. Processes of one machine (the ranks of a node) share the spool: a per-shard file lock
makes one of them fetch while the others wait and then find it there.

Fetching never hangs: at most :attr:`FetchPolicy.concurrency` shards are fetched at once, each read in
``block_size`` ranged reads (the read-ahead); an attempt that receives no byte for
:attr:`FetchPolicy.timeout` seconds is abandoned; a failed attempt is retried after an exponential backoff
(``backoff · 2^k`` seconds before retry ``k``), unless the error is permanent (a missing object, no
permission). A shard that still cannot be read is returned in :attr:`Spooled.failed` with the reason: the
caller reports and skips it, or raises (``on_error="raise"``).

A bottom layer: imports nothing from fastdiff.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["FetchFailure", "FetchPolicy", "Spooled", "default_spool_dir", "fetch_shards", "is_remote"]

#: Keys of ``fs.info()`` that change with an object's content (s3fs, gcsfs, local, memory), best first.
_VERSION_KEYS = ("ETag", "etag", "LastModified", "mtime", "last_modified", "created")

#: Errors that retrying cannot cure: the object is not there, or we may not read it.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """How remote shards are fetched.

    Attributes:
        concurrency: Shards fetched at once (threads), >= 1. Default 4.
        timeout: Seconds an attempt may go without receiving a byte (the object's metadata request
            included) before it is abandoned, > 0. Default 60.
        retries: Attempts after the first for a transient error (a timeout, a 5xx, a reset connection),
            >= 0. Default 3.
        backoff: Seconds before the first retry, doubled before each next one, >= 0. Default 1.
        block_size: Bytes per ranged read, the read-ahead of one shard, >= 1. Default 8 MiB.
    """

    concurrency: int = 4
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0
    block_size: int = 8 << 20

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive (seconds), got {self.timeout}")
        if self.retries < 0:
            raise ValueError(f"retries must be at least 0, got {self.retries}")
        if self.backoff < 0:
            raise ValueError(f"backoff must be at least 0 (seconds), got {self.backoff}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1 (bytes), got {self.block_size}")


@dataclasses.dataclass(frozen=True)
class FetchFailure:
    """A remote shard that could not be fetched.

    Attributes:
        url: The shard's URL as given.
        reason: The last error, as ``"TypeName: message"``.
        attempts: Attempts made (1 + retries used).
    """

    url: str
    reason: str
    attempts: int


@dataclasses.dataclass(frozen=True)
class Spooled:
    """Result of :func:`fetch_shards`.

    Attributes:
        paths: Local path of each fetched URL, keyed by the URL as given, in the order given.
        failed: The URLs that could not be fetched, in the order given.
        bytes_fetched: Bytes received from remote storage by this call (0 when everything was spooled
            already).
    """

    paths: dict[str, Path]
    failed: list[FetchFailure]
    bytes_fetched: int


def is_remote(spec: str) -> bool:
    """Whether ``spec`` is an fsspec URL other than ``file://`` (which is read in place)."""
    protocol, sep, _ = spec.partition("://")
    return bool(sep) and protocol != "file" and "/" not in protocol


def default_spool_dir() -> Path:
    """``$FASTDIFF_SPOOL``, else ``$XDG_CACHE_HOME/fastdiff/spool``, else ``~/.cache/fastdiff/spool``."""
    if "FASTDIFF_SPOOL" in os.environ:
        return Path(os.environ["FASTDIFF_SPOOL"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "fastdiff" / "spool"


def fetch_shards(
    urls: Sequence[str],
    spool_dir: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    policy: FetchPolicy | None = None,
    optional_suffixes: Sequence[str] = (),
    sidecars_only: bool = False,
) -> Spooled:
    """Copy remote shards into ``spool_dir`` (those spooled already and unchanged are not fetched again).

    Args:
        urls: fsspec URLs (``s3://bucket/shard-0000.tar``, ``memory://…``); each is opened with
            ``fsspec.core.url_to_fs(url, **storage_options)``.
        spool_dir: Local folder of the copies (created); a shard's copy is
            ``spool_dir/<16 hex digits of its URL's SHA-256>-<its file name>``, with a ``.json`` record of
            the remote size and ETag/modification time beside it.
        storage_options: Keyword arguments of the filesystem (s3fs: ``key``, ``secret``,
            ``endpoint_url``, ``client_kwargs``, …).
        policy: Concurrency, timeout, retries and read-ahead (:class:`FetchPolicy`; default its defaults).
        optional_suffixes: Sidecars fetched with each shard when the remote storage has them
            (``URL + suffix``, e.g. the shard's index), copied beside the shard's copy under the same
            name + suffix; a missing sidecar is no failure.
        sidecars_only: Fetch only the sidecars now (the shards later, by another call): ``paths`` then
            names where each shard's copy goes, which need not exist yet.

    Returns:
        The local paths, the failures (never raised here) and the bytes fetched.

    Raises:
        ValueError: ``urls`` holds a local path or ``file://`` URL (not remote), or a URL twice.
        ImportError: The URL's protocol needs a package that is not installed (s3fs for ``s3://``).
        TypeError: ``storage_options`` holds an argument the filesystem does not take.
    """
    policy = policy or FetchPolicy()
    options = dict(storage_options or {})
    for url in urls:
        if not is_remote(url):
            raise ValueError(f"not a remote URL: {url!r} (local shards are read in place)")
    if len(set(urls)) != len(urls):
        raise ValueError("a shard URL is given twice")
    spool = Path(spool_dir)
    spool.mkdir(parents=True, exist_ok=True)
    received = [0]
    lock = threading.Lock()

    def count(n: int) -> None:
        with lock:
            received[0] += n

    def one(url: str) -> Path | FetchFailure:
        return _fetch_one(url, spool, options, policy, tuple(optional_suffixes), count, sidecars_only)

    with ThreadPoolExecutor(max_workers=policy.concurrency, thread_name_prefix="fastdiff-fetch") as pool:
        results = list(pool.map(one, urls))
    paths = {u: r for u, r in zip(urls, results, strict=True) if isinstance(r, Path)}
    failed = [r for r in results if isinstance(r, FetchFailure)]
    return Spooled(paths, failed, received[0])


def _local_name(url: str) -> str:
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return f"{digest}-{url.rstrip('/').rsplit('/', 1)[-1]}"


def _identity(info: Mapping[str, Any]) -> dict[str, Any]:
    """What says a remote object changed: its size and the first of ETag / modification time it has."""
    version = next(
        (
            str(info[k])
            for k in ("ETag", "etag", "LastModified", "mtime", "last_modified", "created")
            if k in info
        ),
        None,
    )
    return {"size": int(info["size"]), "version": version}


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fetch_one(
    url: str,
    spool: Path,
    options: dict[str, Any],
    policy: FetchPolicy,
    suffixes: tuple[str, ...],
    count: Any,
    sidecars_only: bool,
) -> Path | FetchFailure:
    import fsspec  # torch depends on fsspec; imported here so that local datasets never need it

    local = spool / _local_name(url)
    # Outside the retries: a filesystem that cannot be made (a package missing, a bad storage option) is
    # the caller's error, raised.
    fs, path = fsspec.core.url_to_fs(url, **options)
    attempts = 0
    with _flock(local.with_name(local.name + ".lock")):
        while True:
            attempts += 1
            try:
                if not sidecars_only:
                    _attempt(fs, path, local, policy, count)
                for suffix in suffixes:
                    _attempt(
                        fs, path + suffix, local.with_name(local.name + suffix), policy, count, optional=True
                    )
                return local
            except Exception as e:
                reason = f"{type(e).__name__}: {e}"
                if isinstance(e, _PERMANENT) or attempts > policy.retries:
                    return FetchFailure(url, reason, attempts)
            time.sleep(policy.backoff * 2 ** (attempts - 1))


def _attempt(
    fs: Any, path: str, local: Path, policy: FetchPolicy, count: Any, *, optional: bool = False
) -> None:
    """One try at making ``local`` a current copy of ``path``, in a thread watched for stalls."""
    last_progress = [time.monotonic()]
    outcome: list[BaseException | None] = []
    abandoned = threading.Event()

    def work() -> None:
        try:
            _copy_if_changed(fs, path, local, policy.block_size, last_progress, abandoned, count, optional)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    # A daemon thread: an abandoned attempt blocked in a read that never returns cannot hold the process.
    thread = threading.Thread(target=work, name="fastdiff-fetch-attempt", daemon=True)
    thread.start()
    while True:
        thread.join(min(1.0, policy.timeout / 4))
        if not thread.is_alive():
            break
        if time.monotonic() - last_progress[0] > policy.timeout:
            abandoned.set()
            raise TimeoutError(f"no data received for {policy.timeout:g} s")
    if outcome and outcome[0] is not None:
        raise outcome[0]


def _copy_if_changed(
    fs: Any,
    path: str,
    local: Path,
    block_size: int,
    last_progress: list[float],
    abandoned: threading.Event,
    count: Any,
    optional: bool,
) -> None:
    try:
        info = fs.info(path)
    except FileNotFoundError:
        if optional:
            local.unlink(missing_ok=True)
            return
        raise
    last_progress[0] = time.monotonic()
    identity = _identity(info)
    record = local.with_name(local.name + ".json")
    with contextlib.suppress(OSError, ValueError):
        if json.loads(record.read_text()) == identity and local.stat().st_size == identity["size"]:
            return
    # A unique partial name: an abandoned attempt that wakes up later writes only to its own file.
    part = local.with_name(f"{local.name}.part-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}")
    try:
        received = 0
        with fs.open(path, "rb", block_size=block_size) as src, open(part, "wb") as dst:
            while not abandoned.is_set():
                chunk = src.read(block_size)
                if not chunk:
                    break
                dst.write(chunk)
                received += len(chunk)
                count(len(chunk))
                last_progress[0] = time.monotonic()
        if abandoned.is_set():
            return
        if received != identity["size"]:
            raise OSError(
                f"read {received} bytes of {identity['size']} (the object changed or the read ended early)"
            )
        record.unlink(missing_ok=True)
        os.replace(part, local)
        record.write_text(json.dumps(identity))
    finally:
        part.unlink(missing_ok=True)
