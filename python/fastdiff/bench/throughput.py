"""``fastdiff bench``: images/s of fastdiff's DataLoader against the torchvision + PIL baseline, side by side.

The baseline is the loader of the diffusers ``train_text_to_image`` script, which most fine-tuning code
copies: a torch ``DataLoader`` with ``os.cpu_count()`` worker processes over a Dataset doing PIL open →
``convert("RGB")`` → ``Resize(res)`` → ``RandomCrop(res)`` → ``RandomHorizontalFlip()`` → ``ToTensor()`` →
``Normalize([0.5], [0.5])``. fastdiff runs with the same resolution and batch size, ``crop="random"``,
``flip_prob=0.5`` and float32 output, so both sides hand the training step float tensors in [-1, 1].

Both loaders live in this one process and stay alive across epochs; after warm-up epochs (which also
fill the page cache), rounds alternate one timed epoch of each side (A B A B …) and each side's median
is reported, with the ratio fastdiff / baseline. Images are counted, not batches. On a shared machine
only these medians and ratios are meaningful, never one absolute time.

This module measures; it must not change how either loader works. ``benches/side_by_side.py`` runs the
wider comparison (datago, PIL draft mode, a decode-only ceiling), each contender in its own process.
``fastdiff tune DIR`` (:mod:`fastdiff.bench.sweep`) instead tunes fastdiff's threads and prefetch.
torchvision and Pillow (the baseline's, from the ``dev`` extra) are imported where used, so that
``fastdiff.cli`` starts without them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

import torch

from fastdiff.bench import sweep
from fastdiff.bench.common import (
    Throughput,
    describe,
    limited_root,
    list_images,
    machine_info,
    read_caption,
    time_images,
)
from fastdiff.loader import DataLoader

FASTDIFF = "fastdiff"
TORCHVISION = "torchvision+PIL"


class Contender(Protocol):
    """A loader kept alive across epochs; each call of :meth:`run_epoch` times one full epoch."""

    name: str

    def run_epoch(self) -> Throughput: ...

    def close(self) -> None: ...


class FastdiffContender:
    """fastdiff's DataLoader at the bench settings: random crop, flip 0.5, float32 in [-1, 1]."""

    def __init__(
        self, root: str | os.PathLike[str], *, resolution: int, batch_size: int, threads: int | None
    ):
        self.name = FASTDIFF
        self.loader = DataLoader(
            root,
            resolution=resolution,
            batch_size=batch_size,
            crop="random",
            flip_prob=0.5,
            shuffle=True,
            seed=0,
            num_threads=threads,
            dtype=torch.float32,
        )

    def run_epoch(self) -> Throughput:
        """Time one full epoch (the next one of the loader's epoch counter)."""
        return time_images(lambda: sum(batch["pixel_values"].shape[0] for batch in self.loader))

    def close(self) -> None:
        """Nothing to release: each epoch's worker threads are joined when the epoch ends."""


class _PilDataset(torch.utils.data.Dataset):
    """The diffusers ``train_text_to_image`` sample: PIL decode and the torchvision transform chain."""

    def __init__(self, files: Sequence[Path], resolution: int, draft: bool):
        from torchvision import transforms

        self.files = list(files)
        self.resolution = resolution
        self.draft = draft
        self.transform = transforms.Compose(
            [
                transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.RandomCrop(resolution),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize([0.5], [0.5]),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        path = self.files[i]
        with Image.open(path) as im:
            if self.draft and im.format == "JPEG":
                # Let libjpeg scale by 1/2, 1/4 or 1/8 in the DCT while the short side stays >= res.
                w, h = im.size
                scale = self.resolution / min(w, h)
                im.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
            rgb = im.convert("RGB")
        return self.transform(rgb), read_caption(path)


class TorchvisionContender:
    """The baseline: torch ``DataLoader`` with persistent worker processes over :class:`_PilDataset`.

    ``draft=True`` adds PIL's ``Image.draft`` (JPEG DCT downscaling) before ``convert`` — the cheapest
    change a script could make.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        resolution: int,
        batch_size: int,
        workers: int | None = None,
        draft: bool = False,
    ):
        files = list_images(root)
        if not files:
            raise ValueError(f"no images in {root}")
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        self.name = TORCHVISION + (" draft" if draft else "")
        self.loader: torch.utils.data.DataLoader | None = torch.utils.data.DataLoader(
            _PilDataset(files, resolution, draft),
            batch_size=batch_size,
            shuffle=True,
            num_workers=self.workers,
            persistent_workers=self.workers > 0,
            drop_last=False,
        )

    def run_epoch(self) -> Throughput:
        """Time one full epoch; the first one also starts the worker processes."""
        loader = self.loader
        if loader is None:
            raise RuntimeError("TorchvisionContender is closed")
        return time_images(lambda: sum(pixels.shape[0] for pixels, _captions in loader))

    def close(self) -> None:
        """Stop the persistent workers (they exit when the loader and its iterator are collected)."""
        self.loader = None


def _measure(contender: Contender, epochs: int, warmup_epochs: int) -> Throughput:
    if epochs < 1 or warmup_epochs < 0:
        raise ValueError(f"need epochs >= 1 and warmup_epochs >= 0, got {epochs} and {warmup_epochs}")
    try:
        for _ in range(warmup_epochs):
            contender.run_epoch()
        runs = [contender.run_epoch() for _ in range(epochs)]
    finally:
        contender.close()
    cpu = [r.cpu_seconds for r in runs if r.cpu_seconds is not None]
    total_cpu = sum(cpu) if len(cpu) == len(runs) else None
    return Throughput(sum(r.images for r in runs), sum(r.seconds for r in runs), total_cpu)


def measure_fastdiff(
    root: str | os.PathLike[str],
    *,
    resolution: int = 512,
    batch_size: int = 8,
    threads: int | None = None,
    epochs: int = 1,
    warmup_epochs: int = 1,
) -> Throughput:
    """Images/s of fastdiff's DataLoader over ``root`` at the bench settings.

    Runs ``warmup_epochs`` untimed epochs, then times ``epochs`` epochs; the result sums them.
    ``threads=None`` uses every core.
    """
    contender = FastdiffContender(root, resolution=resolution, batch_size=batch_size, threads=threads)
    return _measure(contender, epochs, warmup_epochs)


def measure_torchvision(
    root: str | os.PathLike[str],
    *,
    resolution: int = 512,
    batch_size: int = 8,
    workers: int | None = None,
    draft: bool = False,
    epochs: int = 1,
    warmup_epochs: int = 1,
) -> Throughput:
    """Images/s of the torchvision + PIL baseline over ``root`` (see :class:`TorchvisionContender`).

    Runs ``warmup_epochs`` untimed epochs, then times ``epochs`` epochs; the result sums them.
    ``workers=None`` uses ``os.cpu_count()`` worker processes.
    """
    contender = TorchvisionContender(
        root, resolution=resolution, batch_size=batch_size, workers=workers, draft=draft
    )
    return _measure(contender, epochs, warmup_epochs)


def summarize(runs: dict[str, list[Throughput]], baseline: str) -> dict[str, dict[str, Any]]:
    """Per contender: images per epoch, each run's images/s and CPU ms/image, their medians, and the
    ratio of the median images/s to ``baseline``'s (CPU figures are ``None`` where unmeasured)."""
    medians = {name: statistics.median(r.images_per_second for r in rs) for name, rs in runs.items()}
    summary = {}
    for name, rs in runs.items():
        cpu = [r.cpu_ms_per_image for r in rs]
        known = [c for c in cpu if c is not None]
        summary[name] = {
            "images_per_epoch": sorted({r.images for r in rs}),
            "runs_images_per_s": [round(r.images_per_second, 2) for r in rs],
            "median_images_per_s": round(medians[name], 2),
            "ratio_to_baseline": round(medians[name] / medians[baseline], 3),
            "runs_cpu_ms_per_image": [None if c is None else round(c, 2) for c in cpu],
            "median_cpu_ms_per_image": round(statistics.median(known), 2) if len(known) == len(cpu) else None,
        }
    return summary


def format_table(summary: dict[str, dict[str, Any]], baseline: str) -> str:
    """A plain-text table of :func:`summarize`'s result: images/epoch, median images/s, ratio, median
    CPU ms/image, and each run's images/s."""
    width = max(len("contender"), *(len(n) for n in summary))
    lines = [
        f"{'contender':<{width}}  {'images/epoch':>12}  {'median img/s':>12}  {'ratio':>6}  "
        f"{'CPU ms/img':>10}  runs (img/s)"
    ]
    for name, s in summary.items():
        count = "/".join(str(c) for c in s["images_per_epoch"])
        cpu = s["median_cpu_ms_per_image"]
        runs = " ".join(f"{v:.1f}" for v in s["runs_images_per_s"])
        lines.append(
            f"{name:<{width}}  {count:>12}  {s['median_images_per_s']:>12.1f}  "
            f"{s['ratio_to_baseline']:>5.2f}x  {'n/a' if cpu is None else f'{cpu:.1f}':>10}  {runs}"
        )
    lines.append(
        f"ratio = median img/s / median img/s of {baseline}; CPU ms/img = median CPU time per image of "
        "all threads and worker processes (little affected by other load on the machine)"
    )
    return "\n".join(lines)


def bucket_note(resolution: int) -> str:
    """Why fastdiff's batch shapes differ from the baseline's, and why the comparison is still fair."""
    return (
        f"fastdiff emits aspect-ratio buckets (H*W <= {resolution}^2, sides multiples of 64), the baseline "
        f"square {resolution}x{resolution} crops: the same pixel budget per image, both float32 in [-1, 1]. "
        "fastdiff resizes with lanczos3 (its default), the baseline bilinear."
    )


def bench(
    root: str | os.PathLike[str],
    *,
    resolution: int = 512,
    batch_size: int = 8,
    threads: int | None = None,
    rounds: int = 3,
    warmup_epochs: int = 1,
    limit: int | None = None,
    log: TextIO | None = None,
) -> dict[str, Any]:
    """Run fastdiff and the torchvision baseline in alternating timed epochs; return the results.

    Each side first runs ``warmup_epochs`` untimed epochs, then ``rounds`` rounds each time one epoch of
    fastdiff and then one of the baseline. ``log`` (a file, e.g. ``sys.stderr``) gets one line per
    epoch. The result holds ``machine``, ``config`` and ``results`` (see :func:`summarize`).

    Raises:
        ValueError: ``rounds`` < 1, ``warmup_epochs`` < 0, a bad ``limit``, or no images under ``root``.
    """
    if rounds < 1 or warmup_epochs < 0:
        raise ValueError(f"need rounds >= 1 and warmup_epochs >= 0, got {rounds} and {warmup_epochs}")
    with limited_root(root, limit) as data:
        baseline = TorchvisionContender(data, resolution=resolution, batch_size=batch_size)
        try:
            # The baseline forks its workers in its first epoch: let it, before fastdiff starts threads.
            for _ in range(warmup_epochs):
                _logged(baseline, "warm-up", log)
            fast = FastdiffContender(data, resolution=resolution, batch_size=batch_size, threads=threads)
            for _ in range(warmup_epochs):
                _logged(fast, "warm-up", log)
            runs: dict[str, list[Throughput]] = {FASTDIFF: [], TORCHVISION: []}
            for r in range(rounds):
                for c in (fast, baseline):
                    runs[c.name].append(_logged(c, f"round {r + 1}/{rounds}", log))
        finally:
            baseline.close()
    return {
        "machine": machine_info(),
        "config": {
            "root": os.fspath(root),
            "limit": limit,
            "resolution": resolution,
            "batch_size": batch_size,
            "fastdiff_threads": threads,
            "baseline_workers": os.cpu_count(),
            "rounds": rounds,
            "warmup_epochs": warmup_epochs,
        },
        "results": summarize(runs, TORCHVISION),
    }


def _logged(contender: Contender, label: str, log: TextIO | None) -> Throughput:
    t = contender.run_epoch()
    if log is not None:
        print(f"  {label:>11}  {contender.name:<20} {describe(t)}", file=log, flush=True)
    return t


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``fastdiff bench`` arguments on ``parser``, with the ``--sweep`` group of the old
    spelling of ``fastdiff tune``."""
    parser.add_argument("root", help="folder of images (searched recursively)")
    parser.add_argument("--resolution", type=int, default=512, help="training resolution in pixels (512)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (8)")
    parser.add_argument("--threads", type=int, default=None, help="fastdiff worker threads (all cores)")
    sweep.add_rounds_arguments(parser, what="each times one epoch of fastdiff, then one of the baseline")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help=f"use only the first N images (sorted; --sweep: {sweep.DEFAULT_LIMIT})",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write results here")
    group = parser.add_argument_group("sweep", "--sweep: the old spelling of `fastdiff tune DIR`")
    group.add_argument("--sweep", action="store_true", help="tune num_threads and prefetch instead")
    sweep.add_grid_arguments(group, prefix="--sweep-")


def run_bench(args: argparse.Namespace) -> int:
    """Body of ``fastdiff bench``: measure, print the table, optionally write JSON; returns 0.

    With ``--sweep`` it runs ``fastdiff tune`` (:func:`fastdiff.bench.sweep.run_tune`) after a note
    that ``tune`` is the new spelling; ``--plot``, ``--step-ms`` and ``--sweep-*`` without it: 2.
    """
    if args.sweep:
        print("fastdiff bench: note: `fastdiff tune DIR` is the new spelling of `--sweep`", file=sys.stderr)
        threads = args.sweep_threads or ([args.threads] if args.threads else None)
        limit = sweep.DEFAULT_LIMIT if args.limit is None else args.limit
        tune = {**vars(args), "threads": threads, "prefetch": args.sweep_prefetch, "limit": limit}
        return sweep.run_tune(argparse.Namespace(**tune))
    if args.plot or args.step_ms or args.sweep_threads or args.sweep_prefetch:
        print("fastdiff bench: --plot, --step-ms and --sweep-* need --sweep", file=sys.stderr)
        return 2
    result = bench(
        args.root,
        resolution=args.resolution,
        batch_size=args.batch_size,
        threads=args.threads,
        rounds=args.rounds,
        warmup_epochs=args.warmup,
        limit=args.limit,
        log=sys.stderr,
    )
    m = result["machine"]
    print(
        f"fastdiff bench: {args.root}  resolution {args.resolution}  batch {args.batch_size}  "
        f"{m['cpus']} CPUs ({m['cpu_model']})  median of {args.rounds} interleaved epochs per side"
    )
    print(format_table(result["results"], TORCHVISION))
    print(bucket_note(args.resolution))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastdiff.bench.throughput``: the same as ``fastdiff bench``."""
    parser = argparse.ArgumentParser(prog="fastdiff bench", description=__doc__.splitlines()[0])
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
