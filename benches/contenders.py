"""One contender of the side-by-side bench, timed over one epoch in this process; prints one JSON line.

usage: contenders.py NAME ROOT --resolution R --batch-size B [--threads N]
NAME: fastdiff | torchvision | torchvision-draft | datago | ceiling | ceiling-scaled

Output: ``{"name": NAME, "images": N, "seconds": S, "cpu_seconds": C}`` on stdout, where S is the wall
time from asking for the first sample to receiving the last and C the CPU time this process and its
worker processes spent meanwhile; building the loader (file listing, fastdiff's header scan, datago's
client) is not timed. ``side_by_side.py`` starts one such process per contender and round,
so that no two contenders share CPU time, memory or state.

The ceiling contenders decode every image once on all cores and do nothing else: JPEG with
libjpeg-turbo (PyTurboJPEG 1.x on the system libturbojpeg), other formats with Pillow. ``ceiling``
decodes at full size; ``ceiling-scaled`` at the smallest DCT scale (1/8, 1/4, 1/2) that still covers the
image's aspect bucket, the decode work a DCT-scaling loader cannot avoid.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from fastdiff.bench.common import Throughput, list_images, time_images
from fastdiff.bench.throughput import measure_fastdiff, measure_torchvision

#: DCT scale factors libjpeg-turbo accelerates with SIMD, smallest first.
DCT_SCALES = ((1, 8), (1, 4), (1, 2))
#: Bucket sides are multiples of this many pixels (fastdiff's and the bench's default).
BUCKET_STEP = 64


def run_fastdiff(root: Path, resolution: int, batch_size: int, threads: int | None) -> Throughput:
    """fastdiff's DataLoader: random crop, flip 0.5, float32 [B, 3, H, W] in [-1, 1]."""
    return measure_fastdiff(
        root, resolution=resolution, batch_size=batch_size, threads=threads, epochs=1, warmup_epochs=0
    )


def run_torchvision(root: Path, resolution: int, batch_size: int, draft: bool) -> Throughput:
    """The diffusers-script baseline on ``os.cpu_count()`` workers; ``draft`` adds PIL's ``Image.draft``."""
    return measure_torchvision(
        root, resolution=resolution, batch_size=batch_size, draft=draft, epochs=1, warmup_epochs=0
    )


def run_datago(root: Path, resolution: int) -> Throughput:
    """Photoroom datago over the folder, crop+resize into aspect buckets of ~``resolution``² pixels.

    datago yields single uint8 HWC samples; each is turned into a float32 CHW tensor in [-1, 1] here,
    the conversion a training step needs (datago does not batch, so no batching is charged to it).
    """
    from datago import DatagoClient, initialize_logging

    initialize_logging(log_level="error")
    n_files = len(list_images(root))
    config = {
        "source_type": "file",
        "source_config": {"root_path": str(root), "random_sampling": True, "rank": 0, "world_size": 1},
        "limit": n_files,
        "samples_buffer_size": 64,
        "image_config": {
            "crop_and_resize": True,
            "default_image_size": resolution,
            "downsampling_ratio": BUCKET_STEP,
            "min_aspect_ratio": 0.5,
            "max_aspect_ratio": 2.0,
            "pre_encode_images": False,
        },
    }
    client = DatagoClient(json.dumps(config))

    def consume() -> int:
        client.start()
        n = 0
        while (sample := client.get_sample()) is not None:
            # datago's arrays are read-only: convert to float32 in numpy, then scale in place in torch.
            hwc = torch.from_numpy(sample.image.to_numpy_array().astype(np.float32))
            hwc.permute(2, 0, 1).mul_(2.0 / 255.0).sub_(1.0)
            n += 1
        return n

    measured = time_images(consume)
    client.stop()
    return measured


def dct_scale_for(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The smallest of :data:`DCT_SCALES` whose decoded image still covers this image's bucket.

    The bucket has about the image's aspect ratio and ``resolution``² pixels; its sides are rounded up
    to :data:`BUCKET_STEP` here, so the estimate errs on the large (safe) side.
    """
    aspect = width / height
    bucket_w = math.ceil(resolution * math.sqrt(aspect) / BUCKET_STEP) * BUCKET_STEP
    bucket_h = math.ceil(resolution / math.sqrt(aspect) / BUCKET_STEP) * BUCKET_STEP
    need = max(bucket_w / width, bucket_h / height)
    for num, den in DCT_SCALES:
        if num / den >= need:
            return num, den
    return 1, 1


class _Decoder:
    """Per-process decode state for the ceiling (one TurboJPEG handle per worker process)."""

    turbo = None
    resolution: int | None = None


def _init_decoder(resolution: int | None) -> None:
    from turbojpeg import TurboJPEG

    _Decoder.turbo = TurboJPEG()
    _Decoder.resolution = resolution


def _decode(path: str) -> int:
    """Decode one file to RGB pixels and drop them; returns 1 (an image count)."""
    data = Path(path).read_bytes()
    if data[:3] == b"\xff\xd8\xff":
        scale = (1, 1)
        if _Decoder.resolution is not None:
            width, height, _, _ = _Decoder.turbo.decode_header(data)
            scale = dct_scale_for(width, height, _Decoder.resolution)
        _Decoder.turbo.decode(data, scaling_factor=scale)
    else:
        from PIL import Image

        with Image.open(path) as im:
            im.convert("RGB")
    return 1


def run_ceiling(root: Path, resolution: int | None) -> Throughput:
    """Decode every image once on ``os.cpu_count()`` processes; ``resolution`` set = DCT-scaled decode."""
    files = [str(f) for f in list_images(root)]
    procs = os.cpu_count() or 1
    chunk = max(1, len(files) // (procs * 8))
    with multiprocessing.get_context("fork").Pool(procs, _init_decoder, (resolution,)) as pool:
        pool.map(_decode, files[: 2 * procs], chunksize=1)  # start every worker before timing
        return time_images(lambda: sum(pool.imap_unordered(_decode, files, chunksize=chunk)))


CONTENDERS: dict[str, Callable[[argparse.Namespace], Throughput]] = {
    "fastdiff": lambda a: run_fastdiff(a.root, a.resolution, a.batch_size, a.threads),
    "torchvision": lambda a: run_torchvision(a.root, a.resolution, a.batch_size, draft=False),
    "torchvision-draft": lambda a: run_torchvision(a.root, a.resolution, a.batch_size, draft=True),
    "datago": lambda a: run_datago(a.root, a.resolution),
    "ceiling": lambda a: run_ceiling(a.root, None),
    "ceiling-scaled": lambda a: run_ceiling(a.root, a.resolution),
}


def main() -> None:
    """Parse the arguments, run the contender, print its JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(CONTENDERS))
    p.add_argument("root", type=Path)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="fastdiff worker threads (all cores)")
    args = p.parse_args()
    t = CONTENDERS[args.name](args)
    print(
        json.dumps(
            {"name": args.name, "images": t.images, "seconds": t.seconds, "cpu_seconds": t.cpu_seconds}
        )
    )


if __name__ == "__main__":
    main()
