"""``fastdiff cache`` throughput: the build against the loader alone and the VAE alone, on the same batches.

usage: python benches/cache_build.py [ROOT] [--resolution 512] [--batch-size 4] [--vae-width 32]
           [--rounds 3] [--warmup-rounds 1] [--json PATH]

The build (:func:`fastdiff.cache.build.build`, what ``fastdiff cache`` runs) decodes the images in the
Rust workers while the VAE encodes the previous batch on the main thread, then writes the entries into
safetensors shards. When decoding and encoding overlap, the build runs at the rate of the slower of
the two alone; the issue's target is ≥ 0.9 × min(loader alone, encoder alone), with shard writing < 5%
of the build's time.

Overlap needs two resources: on a trainer's machine the VAE runs on the GPU while the CPU decodes. On a
CPU-only machine the bench gives each side its own core instead: the loader one worker thread
(``num_threads=1``), torch one intra-op thread (``torch.set_num_threads(1)``); it needs ≥ 2 cores.
Each round, in one process:

- ``loader``: ``DataLoader(ROOT, resolution=R, cache=EMPTY, pixels=True, num_threads=1)`` walking its
  build plan (``iter_build``): every image decoded, resized and cropped, nothing encoded;
- ``encoder``: the VAE encoding the same batches, held in memory beforehand (nothing decoded);
- ``build``: ``build()`` into an empty cache: both, overlapped, plus the shard writes (timed by the
  build itself: ``BuildReport.write_seconds``).

The VAE is a diffusers ``AutoencoderKL`` with random weights (the values do not change the cost) and
SD's layout (4 blocks, 8x downscale, 4 latent channels) at ``--vae-width`` channels in its first block
(SD's is 128): pick it so that the loader and the VAE alone run at similar rates, the case where
overlap matters most. Rates are samples/s; the table prints each round's and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from fastdiff.cache.build import build
from fastdiff.cache.encoders import LATENT_TENSORS, LatentEncoder
from fastdiff.cache.manifest import LatentSpec, read_manifest, with_halves, write_manifest

DEFAULT_ROOT = (
    Path(os.environ.get("FASTDIFF_CACHE") or Path.home() / ".cache" / "fastdiff" / "corpus") / "wallpapers"
)
CONTENDERS = ("loader", "encoder", "build")


def make_encoder(width: int) -> LatentEncoder:
    """A random-weight SD-layout VAE with ``width`` channels in its first block, as a cache encoder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=min(32, width),
    )
    vae.requires_grad_(False).eval()
    spec: LatentSpec = {
        "salt": f"{width:032x}",
        "dtype": "bf16",
        "channels": 4,
        "downscale": 8,
        "tensors": list(LATENT_TENSORS),
        "vae": {
            "digest": f"bench-{width}",
            "scaling_factor": 0.18215,
            "shift_factor": None,
            "class": "AutoencoderKL",
        },
    }
    return LatentEncoder(vae, spec)


def run_round(root: Path, args: argparse.Namespace, encoder: LatentEncoder) -> dict[str, float]:
    """One round of the three contenders; samples/s each, and the build's write share."""
    import fastdiff

    def make_loader(cache: Path) -> fastdiff.DataLoader:
        return fastdiff.DataLoader(
            root,
            resolution=args.resolution,
            batch_size=args.batch_size,
            cache=cache,
            pixels=True,
            num_threads=1,
        )

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty"
        empty.mkdir()
        manifest = with_halves(
            read_manifest(empty), latents=encoder.spec, text=None, model="bench", kind="sd"
        )
        write_manifest(empty, manifest)
        loader = make_loader(empty)
        t0 = time.perf_counter()
        batches = [b["pixel_values"].clone() for b in loader.iter_build(missing_only=True)]
        n = sum(len(b) for b in batches)
        out["loader"] = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            for px in batches:
                encoder.encode(px)
        out["encoder"] = n / (time.perf_counter() - t0)
        cache = Path(tmp) / "cache"
        report = build(
            cache,
            lambda: make_loader(cache),
            latents=encoder,
            text=None,
            model="bench",
            kind="sd",
            progress=False,
        )
        if report.latents_encoded != n:
            raise SystemExit(f"the build encoded {report.latents_encoded} samples, the loader gave {n}")
        out["build"] = n / report.seconds
        out["write_share"] = report.write_seconds / report.seconds
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, nargs="?", default=DEFAULT_ROOT)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--vae-width", type=int, default=32, help="channels of the VAE's first block (SD: 128)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup-rounds", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the rounds and medians here")
    args = p.parse_args()
    if not args.root.is_dir():
        p.error(f"{args.root} is not a folder; benches/README.md says how to make the corpora")
    if (os.cpu_count() or 1) < 2:
        p.error("the bench gives the loader and the VAE a core each: it needs at least 2 cores")
    torch.set_num_threads(1)
    encoder = make_encoder(args.vae_width)
    rounds: list[dict[str, float]] = []
    for r in range(args.warmup_rounds + args.rounds):
        got = run_round(args.root, args, encoder)
        label = "warm-up" if r < args.warmup_rounds else f"round {r - args.warmup_rounds + 1}"
        cells = "  ".join(f"{k} {got[k]:7.1f}" for k in CONTENDERS)
        print(f"  {label:>8}  {cells}  samples/s, writing {100 * got['write_share']:.2f}%", file=sys.stderr)
        if r >= args.warmup_rounds:
            rounds.append(got)
    med = {k: statistics.median(g[k] for g in rounds) for k in (*CONTENDERS, "write_share")}
    ratio = med["build"] / min(med["loader"], med["encoder"])
    print(
        f"{args.root} at {args.resolution}, batch {args.batch_size}, VAE width {args.vae_width}, median of "
        f"{args.rounds}: loader {med['loader']:.1f}, encoder {med['encoder']:.1f}, build {med['build']:.1f} "
        f"samples/s; build / min(loader, encoder) = {ratio:.2f} (target >= 0.9); shard writing "
        f"{100 * med['write_share']:.2f}% of the build (target < 5%)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps({"rounds": rounds, "median": med, "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
