"""Scan time of a large indexed tar-shard set: ``DataLoader(shards)`` construction, median of rounds.

    python benches/shard_scan.py --samples 100000 --shards 100 --rounds 3

Writes ``--shards`` WebDataset tar shards holding ``--samples`` small real JPEGs (one photo of the
corpus, or ``--image``, resized to 8 aspect ratios so the samples spread over buckets, each member
named ``NNNNNNNN.jpg`` with a ``.txt`` caption) and their ``.index.json`` sidecars (``fastdiff index``,
timed too), then times the constructor of a loader over the brace pattern: the scan reads the indexes
only (no shard bytes), checks every shard's size and mtime, buckets and plans the epoch. Issue 13's
target: < 5 s for 100k samples. Not part of the test run; needs a quiet machine.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import fastdiff
from fastdiff.shard import write_index
from PIL import Image

#: (width, height) of the member images: aspect ratios from 1:2 to 2:1.
SIZES = [(96, 192), (112, 168), (128, 160), (144, 144), (160, 128), (168, 112), (192, 96), (176, 99)]


def members(image: Path) -> list[bytes]:
    with Image.open(image) as im:
        rgb = im.convert("RGB")
    out = []
    for size in SIZES:
        buf = io.BytesIO()
        rgb.resize(size).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def write_set(folder: Path, samples: int, n_shards: int, jpegs: list[bytes]) -> list[Path]:
    shards = []
    per_shard = -(-samples // n_shards)
    for s in range(n_shards):
        path = folder / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for k in range(s * per_shard, min(samples, (s + 1) * per_shard)):
                for name, data in ((f"{k:08d}.jpg", jpegs[k % len(jpegs)]), (f"{k:08d}.txt", b"a photo")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--image",
        type=Path,
        default=Path.home() / ".cache/fastdiff/corpus/photos",
        help="a JPEG, or a folder whose first JPEG is used",
    )
    p.add_argument("--resolution", type=int, default=512)
    args = p.parse_args()
    image = args.image if args.image.is_file() else sorted(args.image.glob("*.jpg"))[0]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        shards = write_set(Path(tmp), args.samples, args.shards, members(image))
        print(f"wrote {args.samples} samples in {len(shards)} shards: {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        for shard in shards:
            write_index(shard)
        print(f"indexed: {time.perf_counter() - start:.1f} s")
        pattern = f"{tmp}/shard-{{000000..{len(shards) - 1:06d}}}.tar"
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            loader = fastdiff.DataLoader(pattern, resolution=args.resolution, batch_size=8)
            times.append(time.perf_counter() - start)
            assert loader.report["loaded"] == args.samples, loader.report["loaded"]
        print(
            f"scan of {args.samples} indexed samples: {statistics.median(times):.2f} s "
            f"(median of {args.rounds}; {len(loader)} batches, {len(loader.buckets)} candidate buckets)"
        )


if __name__ == "__main__":
    main()
