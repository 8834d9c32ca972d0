"""Shards at ``s3://`` over loopback vs the same shards on local disk: one epoch each, interleaved rounds.

    python benches/remote_shards.py ~/.cache/fastdiff/corpus/photos --resolution 512 --rounds 3

Packs DIR into indexed tar shards (``fastdiff.shard.write_shards``) in a temporary folder, starts moto's
S3-compatible server on 127.0.0.1 (``moto[server]``, the tests' server), uploads the shards and their
indexes, then per round times, from the constructor to the end of one epoch:

- ``local``: ``DataLoader(local shards)``;
- ``s3 cold``: ``DataLoader("s3://bench/shard-{...}.tar")`` with an empty spool (``$FASTDIFF_SPOOL``), so
  the time includes fetching every shard (4 at a time, 8 MiB ranged reads);
- ``s3 warm``: the same with the spool of the cold run (the shards' size and ETag unchanged: no bytes
  fetched), as every epoch after the first and every later run.

Prints the median images/s of each and the ratios to ``local`` (issue 13's target: ``s3://`` over
loopback >= 0.8x), and the fetch alone (``fastdiff.sources.local_shards`` into an empty spool) against
the server's ceiling: every object read with boto3 ``get_object`` by 4 threads into memory.
Not part of the test run; needs a quiet machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import fastdiff
import fsspec
from fastdiff.shard import parse_size, write_shards
from fastdiff.sources import expand_shards, local_shards
from moto.server import ThreadedMotoServer


def epoch_rate(source: str | list[str], opts: dict[str, object]) -> float:
    """Images/s from the constructor (scan, and any fetch) to the end of one epoch."""
    start = time.perf_counter()
    loader = fastdiff.DataLoader(source, **opts)
    n = sum(len(b["paths"]) for b in loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--shard-size", default="32MB")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    opts: dict[str, object] = dict(
        resolution=args.resolution, batch_size=args.batch_size, crop="random", flip_prob=0.5
    )
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    fsspec.config.conf["s3"] = {
        "key": "bench",
        "secret": "bench",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    )
    try:
        with tempfile.TemporaryDirectory(dir=args.folder.parent) as tmp:
            shards = write_shards(args.folder, Path(tmp) / "shards", parse_size(args.shard_size)).shards
            client.create_bucket(Bucket="bench")
            for shard in shards:
                for path in (shard, Path(f"{shard}.index.json")):
                    client.upload_file(str(path), "bench", path.name)
            size = sum(s.stat().st_size for s in shards)  # the index sidecars are a few kB
            print(f"{len(shards)} shards, {size / 1e6:.0f} MB, on {endpoint}")
            url = f"s3://bench/shard-{{000000..{len(shards) - 1:06d}}}.tar"
            local = [str(s) for s in shards]
            spool = Path(tmp) / "spool"
            os.environ["FASTDIFF_SPOOL"] = str(spool)
            epoch_rate(local, opts)  # warm-up: page cache, threads
            rates: dict[str, list[float]] = {"local": [], "s3 cold": [], "s3 warm": []}
            fetch: dict[str, list[float]] = {"fastdiff fetch": [], "boto3 get_object x4": []}
            keys = [s.name for s in shards] + [f"{s.name}.index.json" for s in shards]
            for _ in range(args.rounds):
                rates["local"].append(epoch_rate(local, opts))
                shutil.rmtree(spool, ignore_errors=True)
                rates["s3 cold"].append(epoch_rate(url, opts))
                rates["s3 warm"].append(epoch_rate(url, opts))
                shutil.rmtree(spool, ignore_errors=True)
                start = time.perf_counter()
                local_shards(expand_shards(url), index_suffix=".index.json")
                fetch["fastdiff fetch"].append(time.perf_counter() - start)
                start = time.perf_counter()
                with ThreadPoolExecutor(4) as pool:
                    list(pool.map(lambda k: client.get_object(Bucket="bench", Key=k)["Body"].read(), keys))
                fetch["boto3 get_object x4"].append(time.perf_counter() - start)
    finally:
        server.stop()
    median = {name: statistics.median(r) for name, r in rates.items()}
    for name, m in median.items():
        print(f"{name}: {m:.1f} img/s (median of {args.rounds}), {m / median['local']:.3f} of local")
    for name, times in fetch.items():
        t = statistics.median(times)
        print(f"{name}: {t:.2f} s, {size / 1e6 / t:.0f} MB/s (median of {args.rounds})")


if __name__ == "__main__":
    main()
