"""One epoch of fastdiff from a latent cache against the same epoch decoded from the images.

usage: python benches/cached_epoch.py [ROOT] [--resolution 1024] [--channels 4] [--batch-size 8]
           [--rounds 3] [--warmup-rounds 1] [--threads N]

``pixels``: ``fastdiff.DataLoader(ROOT, resolution=R)`` decoding, resizing and cropping every image
(bf16 ``pixel_values``, what a trainer that encodes latents itself is fed). ``cached``: the same
loader with ``cache=`` a cache of the same samples (same buckets, order and crops), reading bf16
latents ``[C, H/8, W/8]`` from its shards instead. The cache is written once beside the
other bench files (``$FASTDIFF_CACHE/latent-bench``) with seeded random latents: reading does not
look at the values, and this measures the loader, not a VAE. Each run is its own process; building a
loader (the scan, and with a cache the content hash of every file) is not timed. ROOT defaults to
the 200 phone photos (12 MP) of ``make corpus``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from latent_cache import default_work, write_fastdiff_cache

DEFAULT_ROOT = (
    Path(os.environ.get("FASTDIFF_CACHE") or Path.home() / ".cache" / "fastdiff" / "corpus") / "large"
)


def seeded_latent(path: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """Random bf16 latents of ``shape``, seeded by the file's name."""
    seed = int.from_bytes(hashlib.sha256(path.name.encode()).digest()[:8], "little")
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def run(name: str, root: Path, cache: Path, args: argparse.Namespace) -> tuple[int, float]:
    """One epoch of contender ``name``; (samples, wall seconds from the first request to the last)."""
    import fastdiff

    kwargs = {"cache": cache} if name == "cached" else {"dtype": torch.bfloat16}
    loader = fastdiff.DataLoader(
        root, resolution=args.resolution, batch_size=args.batch_size, num_threads=args.threads, **kwargs
    )
    key = "latents" if name == "cached" else "pixel_values"
    t0 = time.perf_counter()
    n = sum(len(b[key]) for b in loader)
    return n, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, nargs="?", default=DEFAULT_ROOT)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--channels", type=int, default=4, help="latent channels (4: SD/SDXL, 16: SD3/FLUX)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup-rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="fastdiff worker threads (all cores)")
    p.add_argument("--contender", default=None, help=argparse.SUPPRESS)  # one run, in a child process
    args = p.parse_args()
    if not args.root.is_dir():
        p.error(f"{args.root} is not a folder; benches/README.md says how to make the corpora")
    cache = default_work() / f"cache-{args.root.name}-{args.resolution}-c{args.channels}"
    if args.contender:
        n, seconds = run(args.contender, args.root, cache, args)
        print(json.dumps({"samples": n, "seconds": seconds}))
        return 0
    write_fastdiff_cache(args.root, cache, args.channels, seeded_latent, resolution=args.resolution)
    runs: dict[str, list[float]] = {"pixels": [], "cached": []}
    for r in range(args.warmup_rounds + args.rounds):
        for name in runs:
            cmd = [sys.executable, __file__, str(args.root), "--contender", name]
            cmd += ["--resolution", str(args.resolution), "--channels", str(args.channels)]
            cmd += ["--batch-size", str(args.batch_size)]
            if args.threads is not None:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            got = json.loads(out.stdout.strip().splitlines()[-1])
            rate = got["samples"] / got["seconds"]
            label = "warm-up" if r < args.warmup_rounds else f"round {r - args.warmup_rounds + 1}"
            print(f"  {label:>8}  {name:<7} {rate:10.1f} samples/s", file=sys.stderr, flush=True)
            if r >= args.warmup_rounds:
                runs[name].append(rate)
    med = {n: statistics.median(v) for n, v in runs.items()}
    ratio = med["cached"] / med["pixels"]
    print(
        f"{args.root} at {args.resolution}, batch {args.batch_size}, {os.cpu_count()} CPUs, "
        f"median of {args.rounds}: pixels {med['pixels']:.1f} samples/s, cached {med['cached']:.1f} "
        f"samples/s ({args.channels}-channel bf16 latents): cached/pixels = {ratio:.1f}x (target >= 20)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
