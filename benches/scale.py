"""Scale checks of issue 3: header scan of 100 000 files, time to first batch, peak RSS over epochs.

usage: python benches/scale.py scan  [PHOTOS] [--files 100000] [--tree DIR]
       python benches/scale.py epochs [ROOT] [--resolution 1024] [--batch-size 4] [--epochs 10]
                                      [--limit N] [--dtype float32]

``scan`` builds (once) a tree of hard links to the photos and their captions until it holds
``--files`` images (links cost no disk space), then times ``fastdiff.DataLoader(tree)`` (the parallel
header scan, bucketing and epoch planning) and the wait for the first batch, each in a fresh process so
the page cache is the only thing shared. Targets: scan < 10 s, first batch < 1 s after the scan.

``epochs`` runs whole epochs with the default prefetch and prints the process's resident memory
(``VmRSS``, and the peak ``VmHWM``) after each: the targets are a flat RSS across epochs and a peak
≤ 1.5 GB at resolution 1024. Batches are dropped as a training loop drops them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("FASTDIFF_CACHE", Path.home() / ".cache" / "fastdiff" / "corpus"))


def link_tree(photos: Path, tree: Path, files: int) -> Path:
    """``tree`` holding ``files`` images: hard links to ``photos``' images and captions, 1000 per folder."""
    stamp = tree / f".complete-{files}"
    if stamp.exists():
        return tree
    images = sorted(p for p in photos.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
    if not images:
        raise SystemExit(f"no images in {photos}")
    for i in range(files):
        src = images[i % len(images)]
        folder = tree / f"{i // 1000:04}"
        dst = folder / f"{i:06}{src.suffix}"
        if dst.exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)
        caption = src.with_suffix(".txt")
        if caption.exists():
            os.link(caption, dst.with_suffix(".txt"))
    stamp.touch()
    return tree


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB, from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def time_scan(root: Path, resolution: int, batch_size: int) -> dict[str, float]:
    """Seconds to construct the loader (scan) and then to get the first batch; in this process."""
    import fastdiff

    t0 = time.perf_counter()
    loader = fastdiff.DataLoader(root, resolution=resolution, batch_size=batch_size)
    t1 = time.perf_counter()
    batch = next(iter(loader))
    t2 = time.perf_counter()
    return {
        "images": loader.report["loaded"],
        "scan_s": t1 - t0,
        "first_batch_s": t2 - t1,
        "batch_shape": list(batch["pixel_values"].shape),
    }


def run_epochs(root: Path, args: argparse.Namespace) -> list[dict[str, float]]:
    import fastdiff
    import torch
    from fastdiff.bench.common import limited_root

    rows = []
    with limited_root(root, args.limit) as data:
        loader = fastdiff.DataLoader(
            data, resolution=args.resolution, batch_size=args.batch_size, dtype=getattr(torch, args.dtype)
        )
        rss, peak = rss_mib()
        rows.append({"epoch": -1, "rss_mib": rss, "peak_mib": peak, "seconds": 0.0, "images": 0})
        for epoch in range(args.epochs):
            t0, images = time.perf_counter(), 0
            for batch in loader:
                images += batch["pixel_values"].shape[0]
                del batch
            rss, peak = rss_mib()
            rows.append(
                {
                    "epoch": epoch,
                    "rss_mib": rss,
                    "peak_mib": peak,
                    "seconds": time.perf_counter() - t0,
                    "images": images,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scan")
    s.add_argument("photos", type=Path, nargs="?", default=CACHE / "photos")
    s.add_argument("--files", type=int, default=100_000)
    s.add_argument("--tree", type=Path, default=CACHE / "links100k")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    e = sub.add_parser("epochs")
    e.add_argument("root", type=Path, nargs="?", default=CACHE / "large")
    e.add_argument("--resolution", type=int, default=1024)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--epochs", type=int, default=10)
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--dtype", default="float32")
    args = p.parse_args()

    if args.cmd == "epochs":
        rows = run_epochs(args.root, args)
        growth = rows[-1]["rss_mib"] - rows[1]["rss_mib"]
        print(
            f"peak RSS {max(r['peak_mib'] for r in rows):.0f} MiB; RSS after epoch 0 "
            f"{rows[1]['rss_mib']:.0f} MiB, after epoch {args.epochs - 1} {rows[-1]['rss_mib']:.0f} MiB "
            f"(growth {growth:+.0f} MiB)"
        )
        return 0

    if args.in_process:
        print(json.dumps(time_scan(args.tree, 512, 8)))
        return 0
    tree = link_tree(args.photos, args.tree, args.files)
    results = []
    for _ in range(args.repeats):
        out = subprocess.run(
            [sys.executable, __file__, "scan", "--tree", str(tree), "--in-process"],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    scans = sorted(r["scan_s"] for r in results)
    firsts = sorted(r["first_batch_s"] for r in results)
    print(
        f"{results[0]['images']} images: scan median {scans[len(scans) // 2]:.2f} s "
        f"(target < 10 s), first batch median {firsts[len(firsts) // 2]:.3f} s (target < 1 s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
