"""Side-by-side read throughput of cached latents: fastdiff's cache against what trainers use today.

usage: python benches/latent_cache.py [--shape 4x128x128] [--samples 2000] [--batch-size 8]
           [--rounds 3] [--warmup-rounds 1] [--threads 1,2] [--only a,b,...] [--work DIR] [--json PATH]

Every contender reads the same latents (bf16 ``[C, h, w]`` per sample; ``--shape 4x128x128`` is SDXL's
at 1024 px, ``16x128x128`` SD3's and FLUX's) in a shuffled order, batch by batch, and hands the training
loop one ``[B, C, h, w]`` tensor per batch:

- ``npz``: one ``.npz`` per image written as kohya-ss sd-scripts does (``np.savez`` of a float32
  ``latents`` array, since numpy has no bf16, plus ``original_size``/``crop_ltrb``), read with
  ``np.load`` in a ``torch.utils.data.DataLoader`` with ``num_workers = os.cpu_count()``;
- ``pt``: one ``torch.save`` file per image (SimpleTuner, OneTrainer), ``torch.load`` in the same loader;
- ``safetensors``: one ``.safetensors`` per image (ai-toolkit), ``safetensors.torch.load_file``;
- ``fastdiff-tN``: ``fastdiff.DataLoader(images, cache=CACHE, num_threads=N)`` on the folder of images
  the cache was made for (one 1024 px bucket), reading its shards in the Rust workers (positioned
  reads into the batch buffers);
- ``ceiling``: one thread copying the same bytes, laid out in one file, from the page cache into one
  reused buffer, a batch at a time (``readinto``): what reading the latents costs at the least.

The files are written once into ``--work`` (default: a folder under ``$FASTDIFF_CACHE``), then every
contender runs once unrecorded (warm page cache), then ``--rounds`` rounds run every contender once each,
each run in its own process. Prints the median samples/s per contender and its ratio to ``npz``, and
each ratio the issue sets a target for. The latents are random: reading does not look at the values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

#: The peers' per-image formats, in the order they are run and printed.
PEERS = ("npz", "pt", "safetensors")
BASELINE = "npz"
#: Images of this size (px) stand in for the dataset: one square bucket at RESOLUTION.
IMAGE_SIDE = 64
RESOLUTION = 1024
DOWNSCALE = 8


def shape_of(text: str) -> tuple[int, int, int]:
    """``"4x128x128"`` -> ``(4, 128, 128)``."""
    c, h, w = (int(v) for v in text.lower().split("x"))
    return c, h, w


def default_work() -> Path:
    cache = os.environ.get("FASTDIFF_CACHE") or Path.home() / ".cache" / "fastdiff" / "corpus"
    return Path(cache) / "latent-bench"


def latent(i: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Sample ``i``'s latents: seeded normal values in bf16."""
    g = torch.Generator().manual_seed(i)
    return torch.randn(shape, generator=g).to(torch.bfloat16)


def prepare(work: Path, shape: tuple[int, int, int], samples: int) -> Path:
    """Write every contender's files for ``samples`` latents of ``shape`` under ``work``, once."""
    from PIL import Image
    from safetensors.torch import save_file

    folder = work / f"{'x'.join(map(str, shape))}-{samples}"
    done = folder / ".complete"
    if done.exists():
        return folder
    side = RESOLUTION // DOWNSCALE
    if shape[1:] != (side, side):
        raise SystemExit(f"--shape must be Cx{side}x{side} (latents of a {RESOLUTION} px bucket)")
    for sub in ("images", *PEERS):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    with open(folder / "ceiling.bin", "wb") as flat:
        for i in range(samples):
            x = latent(i, shape)
            stem = f"{i:06d}"
            # Distinct tiny images: the cache is keyed by their content.
            rgb = np.full((IMAGE_SIDE, IMAGE_SIDE, 3), (i % 251, i // 251 % 251, 7), np.uint8)
            Image.fromarray(rgb).save(folder / "images" / f"{stem}.png")
            np.savez(
                folder / "npz" / f"{stem}.npz",
                latents=x.float().numpy(),
                original_size=np.array([IMAGE_SIDE, IMAGE_SIDE]),
                crop_ltrb=np.array([0, 0, RESOLUTION, RESOLUTION]),
            )
            torch.save({"latents": x}, folder / "pt" / f"{stem}.pt")
            save_file({"latents": x}, str(folder / "safetensors" / f"{stem}.safetensors"))
            flat.write(x.view(torch.int16).numpy().tobytes())
    done.write_text(f"{samples}\n")
    return folder


def write_fastdiff_cache(
    images: Path,
    cache: Path,
    channels: int,
    latent_of: Callable[[Path, tuple[int, int, int]], torch.Tensor],
    *,
    resolution: int = RESOLUTION,
) -> None:
    """A fastdiff cache at ``cache`` of bf16 latents ``latent_of(image, (C, h, w))`` for the images in
    ``images`` at ``resolution`` (centre crop, no flip), keyed as the loader keys them; once."""
    import fastdiff
    from fastdiff import _fastdiff

    if (cache / ".complete").exists():
        return
    cache.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": "fastdiff-cache-1",
        "latents": {
            "salt": "0" * 32,
            "dtype": "bf16",
            "channels": channels,
            "downscale": DOWNSCALE,
            "tensors": ["latents"],
            "vae": {"digest": "bench", "scaling_factor": 1.0, "shift_factor": None, "class": "none"},
        },
        "failed": {},
    }
    (cache / "fastdiff-cache.json").write_text(json.dumps(manifest))
    loader = fastdiff.DataLoader(images, resolution=resolution, batch_size=16, cache=cache, pixels=True)
    writer = _fastdiff.ShardWriter(cache, "latents")
    for batch in loader.iter_build():
        _, _, h, w = batch["pixel_values"].shape
        shape = (channels, h // DOWNSCALE, w // DOWNSCALE)
        for key, path, meta in zip(
            batch["latent_keys"], batch["paths"], batch["latent_provenance"], strict=True
        ):
            x = latent_of(Path(path), shape)
            writer.add(key, meta, [("latents", "bf16", shape, x.view(torch.int16).numpy())])
        if writer.nbytes > 512 * 2**20:
            writer.finish()
            writer = _fastdiff.ShardWriter(cache, "latents")
    if len(writer):
        writer.finish()
    (cache / ".complete").write_text("")


class PerFile(torch.utils.data.Dataset):
    """One file per sample, read by the peer's own reader."""

    def __init__(self, files: list[Path], kind: str) -> None:
        self.files, self.kind = files, kind

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.files[i]
        if self.kind == "npz":
            with np.load(path) as f:
                return torch.from_numpy(f["latents"])
        if self.kind == "pt":
            return torch.load(path)["latents"]
        from safetensors.torch import load_file

        return load_file(str(path))["latents"]


def run_contender(name: str, folder: Path, batch_size: int) -> tuple[int, float]:
    """Read every sample once; return (samples, wall seconds from the first request to the last batch)."""
    if name in PEERS:
        files = sorted((folder / name).iterdir())
        loader = torch.utils.data.DataLoader(
            PerFile(files, name), batch_size=batch_size, shuffle=True, num_workers=os.cpu_count() or 1
        )
        t0 = time.perf_counter()
        n = sum(len(b) for b in loader)
        return n, time.perf_counter() - t0
    if name == "ceiling":
        flat = folder / "ceiling.bin"
        total = flat.stat().st_size
        per = total // len(list((folder / "images").iterdir()))
        buf = bytearray(per * batch_size)
        t0 = time.perf_counter()
        with open(flat, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
        return total // per, time.perf_counter() - t0
    import fastdiff

    threads = int(name.rsplit("-t", 1)[1])
    loader = fastdiff.DataLoader(
        folder / "images",
        resolution=RESOLUTION,
        batch_size=batch_size,
        cache=folder / "fastdiff-cache",
        num_threads=threads,
    )
    t0 = time.perf_counter()
    n = sum(len(b["latents"]) for b in loader)
    return n, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4x128x128", help="latent shape CxHxW per sample (4x128x128)")
    p.add_argument("--samples", type=int, default=2000, help="samples (2000)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup-rounds", type=int, default=1)
    p.add_argument("--threads", default="1,2", help="fastdiff thread counts to run (1,2)")
    p.add_argument("--only", default=None, help="comma-separated contenders")
    p.add_argument("--work", type=Path, default=default_work())
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--contender", default=None, help=argparse.SUPPRESS)  # one run, in a child process
    p.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.contender:
        n, seconds = run_contender(args.contender, args.folder, args.batch_size)
        print(json.dumps({"samples": n, "seconds": seconds}))
        return 0

    shape = shape_of(args.shape)
    folder = prepare(args.work, shape, args.samples)
    names = [*PEERS, *(f"fastdiff-t{t}" for t in args.threads.split(",")), "ceiling"]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    if any(n.startswith("fastdiff") for n in names):
        write_fastdiff_cache(
            folder / "images", folder / "fastdiff-cache", shape[0], lambda p, s: latent(int(p.stem), s)
        )
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.warmup_rounds + args.rounds):
        for name in names:
            cmd = [sys.executable, __file__, "--contender", name, "--folder", str(folder)]
            out = subprocess.run([*cmd, "--batch-size", str(args.batch_size)], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            got = json.loads(out.stdout.strip().splitlines()[-1])
            rate = got["samples"] / got["seconds"]
            print(
                f"  {'warm-up' if r < args.warmup_rounds else f'round {r - args.warmup_rounds + 1}':>8}"
                f"  {name:<14} {rate:10.0f} samples/s",
                file=sys.stderr,
                flush=True,
            )
            if r >= args.warmup_rounds:
                runs[name].append(rate)
    medians = {n: statistics.median(v) for n, v in runs.items()}
    mb = 2 * shape[0] * shape[1] * shape[2] / 2**20
    print(
        f"latents {args.shape} bf16 ({mb:.3f} MiB/sample), {args.samples} samples, batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs, median of {args.rounds} rounds"
    )
    print(f"{'contender':<14} {'samples/s':>10} {'MiB/s':>8} {'x npz':>7}")
    for n, v in medians.items():
        ratio = v / medians[BASELINE] if BASELINE in medians else float("nan")
        print(f"{n:<14} {v:10.0f} {v * mb:8.0f} {ratio:7.2f}")
    best = max((v for n, v in medians.items() if n.startswith("fastdiff")), default=None)
    if best is not None:
        targets = {"npz": 10, "pt": 5, "safetensors": 3}
        line = [
            f"fastdiff/{n}={best / medians[n]:.2f} (target >= {t})"
            for n, t in targets.items()
            if n in medians
        ]
        if "ceiling" in medians:
            line.append(f"fastdiff/ceiling={best / medians['ceiling']:.2f} (target >= 0.5)")
        print("  ".join(line))
    if args.json is not None:
        args.json.write_text(
            json.dumps({"shape": args.shape, "samples": args.samples, "runs": runs}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
