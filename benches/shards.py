"""Tar shards vs the folder they were made from: images/s of one fastdiff loader each, interleaved rounds.

    python benches/shards.py ~/.cache/fastdiff/corpus/photos --resolution 512 --rounds 5

Packs DIR into shards (``fastdiff.shard.write_shards``, indexed) in a temporary folder on the same disk
unless ``--shards`` names existing ones, then times whole epochs of ``DataLoader(DIR)`` and
``DataLoader(shards)`` with the same options, alternating, after one warm-up epoch each; prints each one's
median images/s and the ratio shards/folder (issue 13's target: >= 0.95 at photos @ 512), plus the scan
time of each (with the indexes: no image bytes read). Not part of the test run; needs a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import fastdiff
from fastdiff.shard import parse_size, write_shards


def epoch_rate(loader: fastdiff.DataLoader) -> float:
    start = time.perf_counter()
    n = sum(len(b["paths"]) for b in loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument(
        "--shards", nargs="+", help="existing shards of FOLDER (default: pack them into a temp dir)"
    )
    p.add_argument("--shard-size", default="256MB")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    opts = dict(resolution=args.resolution, batch_size=args.batch_size, crop="random", flip_prob=0.5)
    with tempfile.TemporaryDirectory(dir=args.folder.parent) as tmp:
        shards = args.shards or [
            str(s) for s in write_shards(args.folder, tmp, parse_size(args.shard_size)).shards
        ]
        loaders = {}
        for name, source in (("folder", str(args.folder)), ("shards", shards)):
            start = time.perf_counter()
            loaders[name] = fastdiff.DataLoader(source, **opts)
            print(
                f"{name}: scan {time.perf_counter() - start:.2f} s, {loaders[name].report['loaded']} images"
            )
        for loader in loaders.values():
            epoch_rate(loader)  # warm-up: page cache, threads
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(args.rounds):
            for name, loader in loaders.items():
                rates[name].append(epoch_rate(loader))
        median = {name: statistics.median(r) for name, r in rates.items()}
        for name, m in median.items():
            print(f"{name}: {m:.1f} img/s (median of {args.rounds})")
        print(f"shards / folder: {median['shards'] / median['folder']:.3f}")


if __name__ == "__main__":
    main()
