"""``fastdiff tune DIR``: which ``num_threads`` and ``prefetch`` to use on this machine, and why.

(``fastdiff bench DIR --sweep`` is its old spelling and still works.)

Runs fastdiff alone over a grid of thread counts (1 … cores, and cores + 1 to show oversubscription)
and prefetch depths (1, 2, 4, 8). Every grid point gets a fresh :class:`fastdiff.DataLoader` per round,
a short untimed warm-up (``prefetch + 1`` batches, so its recycled batch buffers exist before timing),
then one timed epoch over the same ``--limit`` images. Rounds visit the points in alternating order
and each point's **median** over rounds is reported, so a burst of other load on a shared machine
hits different points in different rounds instead of one point in all of them.

Per point it reports images/s, the CPU time per image of the whole process (``/proc``) and the
loader's own per-stage accounting (:meth:`fastdiff.DataLoader.stats`): worker milliseconds per image
in read, header probe, decode, resize, write (crop + flip + normalise), and the share of time the
workers sat idle and the consumer waited for a batch. From these it names the best setting and says
what bounds it.

The consumer does nothing with a batch unless ``--step-ms`` makes it sleep that long per batch (a
stand-in for a GPU training step, which leaves the CPU to the loader): with no step the consumer
always waits, by construction, and the sweep measures the loader's ceiling.

This module measures; it must not change how the loader works. matplotlib (``--plot`` only) is
imported where used, so that ``fastdiff.cli`` starts without it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

import torch

from fastdiff.bench.common import limited_root, list_images, machine_info, time_images
from fastdiff.loader import DataLoader, _available_cores
from fastdiff.types import LoadStats

#: Stage keys of :meth:`fastdiff.DataLoader.stats` (each ``<name>_s``), in pipeline order.
STAGES = ("read", "probe", "decode", "resize", "write", "other")
#: Prefetch depths tried by default.
DEFAULT_PREFETCH = (1, 2, 4, 8)
#: Images a sweep uses when ``--limit`` is not given (the first ones, sorted).
DEFAULT_LIMIT = 200
#: Settings this close to the best (relative img/s) count as equally fast: the smallest is suggested.
NOISE = 0.03
#: Queue wait (percent of wall time) below which the training step is not waiting for data.
QUEUE_WAIT_OK = 2.0


def default_threads(cores: int) -> list[int]:
    """1 … ``cores`` (powers of two and ``cores`` beyond 8 cores), plus ``cores + 1``."""
    if cores <= 8:
        grid = set(range(1, cores + 1))
    else:
        grid = {1 << k for k in range(cores.bit_length()) if 1 << k <= cores} | {cores}
    return sorted(grid | {cores + 1})


@dataclass(frozen=True)
class Run:
    """One timed epoch of one grid point."""

    images: int
    seconds: float
    cpu_seconds: float | None
    stats: LoadStats

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


def run_point(
    root: str | os.PathLike[str],
    *,
    threads: int,
    prefetch: int,
    resolution: int,
    batch_size: int,
    step_s: float = 0.0,
) -> Run:
    """One fresh loader at (``threads``, ``prefetch``): untimed warm-up batches, then one timed epoch.

    The loader is the bench's (random crop, flip 0.5, float32 in [-1, 1]); the consumer sleeps
    ``step_s`` per batch.
    """
    loader = DataLoader(
        root,
        resolution=resolution,
        batch_size=batch_size,
        crop="random",
        flip_prob=0.5,
        seed=0,
        num_threads=threads,
        prefetch=prefetch,
        dtype=torch.float32,
    )
    warm = iter(loader)
    for _ in zip(range(prefetch + 1), warm, strict=False):
        pass
    warm.close()  # type: ignore[attr-defined]  # a generator: joins this epoch's threads now
    del warm

    def epoch() -> int:
        images = 0
        for batch in loader:
            images += batch["pixel_values"].shape[0]
            if step_s:
                time.sleep(step_s)
        return images

    t = time_images(epoch)
    stats = loader.stats()
    assert stats is not None  # an epoch has just run
    return Run(t.images, t.seconds, t.cpu_seconds, stats)


def _median(xs: Sequence[float | None]) -> float | None:
    known = [x for x in xs if x is not None]
    return statistics.median(known) if known and len(known) == len(xs) else None


def summarize_point(threads: int, prefetch: int, runs: Sequence[Run]) -> dict[str, Any]:
    """Medians over ``runs`` of one point: img/s, CPU ms/img, worker ms/img per stage, idle and wait %."""

    def per_image(run: Run, key: str) -> float:
        # Stage keys are built from STAGES, so the TypedDict is read as the plain mapping it is.
        return 1000 * cast(Mapping[str, float], run.stats)[key] / max(run.stats["samples"], 1)

    stage_ms = {s: statistics.median(per_image(r, f"{s}_s") for r in runs) for s in STAGES}
    cpu = _median([None if r.cpu_seconds is None else 1000 * r.cpu_seconds / r.images for r in runs])
    return {
        "threads": threads,
        "prefetch": prefetch,
        "threads_started": max(int(r.stats["threads"]) for r in runs),
        "images": runs[0].images,
        "runs_images_per_s": [round(r.images_per_second, 2) for r in runs],
        "median_images_per_s": round(statistics.median(r.images_per_second for r in runs), 2),
        "median_cpu_ms_per_image": None if cpu is None else round(cpu, 2),
        "worker_ms_per_image": {s: round(v, 3) for s, v in stage_ms.items()},
        "busy_ms_per_image": round(statistics.median(per_image(r, "busy_s") for r in runs), 3),
        "worker_idle_pct": round(
            statistics.median(
                100 * r.stats["idle_s"] / max(r.stats["idle_s"] + r.stats["busy_s"], 1e-9) for r in runs
            ),
            1,
        ),
        "queue_wait_pct": round(
            statistics.median(100 * r.stats["queue_wait_s"] / max(r.stats["wall_s"], 1e-9) for r in runs), 1
        ),
    }


def _label(p: dict[str, Any]) -> str:
    return f"{p['threads']} thread{'s' if p['threads'] != 1 else ''}, prefetch {p['prefetch']}"


def _pct(part: float, whole: float) -> float:
    return 100 * part / whole if whole > 0 else 0.0


def explain(
    points: Sequence[dict[str, Any]], cores: int, step_ms: float, load: float | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The best point, and sentences saying why: what bounds it, how threads and prefetch matter.

    "Best" is the highest median img/s; when a point with fewer threads or less prefetch comes within
    :data:`NOISE` of it, that one is suggested as well (the difference is within run-to-run noise).
    ``load``: the machine's load average during the sweep, if known (to explain contention).
    """
    busy_machine = f"load average {load:.1f} on {cores} cores" if load is not None else "other load"
    best = max(points, key=lambda p: p["median_images_per_s"])
    top = best["median_images_per_s"]
    lines = [f"best: {_label(best)}: {top:.1f} img/s (median)"]
    near = [p for p in points if p["median_images_per_s"] >= (1 - NOISE) * top]
    cheapest = min(near, key=lambda p: (p["threads"], p["prefetch"]))
    if cheapest is not best:
        lines.append(
            f"suggested: {_label(cheapest)}: {cheapest['median_images_per_s']:.1f} img/s, within "
            f"{100 * NOISE:.0f}% of the best (noise) with fewer threads or less batch memory"
        )

    ms = best["worker_ms_per_image"]
    busy = sum(ms.values())
    ranked = sorted(STAGES, key=lambda s: -ms[s])
    shares = ", ".join(f"{s} {_pct(ms[s], busy):.0f}%" for s in ranked[1:] if _pct(ms[s], busy) >= 0.5)
    lead = ranked[0]
    kind = f"{lead}-bound" if _pct(ms[lead], busy) >= 40 else "no single stage dominates"
    lines.append(
        f"{kind}: {_pct(ms[lead], busy):.0f}% of worker time in {lead} ({shares}); "
        f"{busy:.1f} worker-ms per image"
    )
    by_threads: dict[int, dict[str, Any]] = {}
    for p in points:
        t = p["threads"]
        if t not in by_threads or p["median_images_per_s"] > by_threads[t]["median_images_per_s"]:
            by_threads[t] = p
    # Worker stage times are thread wall time; well above the CPU time, threads sat runnable without a
    # core. Judged where it matters most: at as many threads as cores (else at the best point).
    probe = by_threads.get(cores, best)
    cpu = probe["median_cpu_ms_per_image"]
    wall = sum(probe["worker_ms_per_image"].values())
    if cpu and wall > 1.25 * cpu:
        lines.append(
            f"contention: at {_label(probe)} the stage times add up to {wall / cpu:.1f}x the process's "
            f"CPU time per image ({cpu:.1f} ms): threads waited for a core ({busy_machine}), so how img/s "
            f"scales with threads here reflects that load; idle, {cores} cores would allow about "
            f"{1000 * cores / cpu:.0f} img/s"
        )

    if len(by_threads) > 1:
        base = by_threads[min(by_threads)]["median_images_per_s"]
        steps = ", ".join(
            f"{t} -> {p['median_images_per_s']:.0f} img/s ({p['median_images_per_s'] / base:.2f}x)"
            for t, p in sorted(by_threads.items())
        )
        over = [t for t in by_threads if t > cores]
        note = ""
        if over:
            at_cores = max((t for t in by_threads if t <= cores), default=None)
            if at_cores is not None:
                ratio = (
                    by_threads[max(over)]["median_images_per_s"] / by_threads[at_cores]["median_images_per_s"]
                )
                note = f"; {max(over)} threads on {cores} cores give {ratio:.2f}x of {at_cores}: "
                if ratio < 1 - NOISE:
                    note += "oversubscription costs"
                elif ratio <= 1 + NOISE:
                    note += "no gain beyond the cores"
                else:
                    note += (
                        f"more threads than cores gained, which happens when other processes share the "
                        f"cores ({busy_machine}): each extra thread wins a larger share of them; on an "
                        f"idle machine use {cores}"
                    )
        lines.append(f"threads (best prefetch each): {steps}{note}")

    same = sorted((p for p in points if p["threads"] == best["threads"]), key=lambda p: p["prefetch"])
    if len(same) > 1:
        enough = next(p for p in same if p["median_images_per_s"] >= (1 - NOISE) * top)
        parts = ", ".join(
            f"{p['prefetch']} -> {p['median_images_per_s']:.0f} img/s "
            f"(workers idle {p['worker_idle_pct']:.0f}%)"
            for p in same
        )
        lines.append(
            f"prefetch at {_label(best).split(',')[0]}: {parts}; from {enough['prefetch']} on, deeper "
            "prefetch gains less than the noise and only holds more batch buffers"
        )

    wait = best["queue_wait_pct"]
    if step_ms <= 0:
        lines.append(
            f"queue wait {wait:.0f}% of wall time: with no training step (--step-ms 0) the consumer always "
            "waits, so these are the loader's own limits; pass --step-ms with your step time to find the "
            f"smallest setting that keeps queue wait under {QUEUE_WAIT_OK:.0f}%"
        )
    else:
        ok = [p for p in points if p["queue_wait_pct"] < QUEUE_WAIT_OK]
        if ok:
            smallest = min(ok, key=lambda p: (p["threads"], p["prefetch"]))
            lines.append(
                f"with a {step_ms:g} ms step per batch, {_label(smallest)} already keeps queue wait at "
                f"{smallest['queue_wait_pct']:.1f}% (< {QUEUE_WAIT_OK:.0f}%): the step, not the loader, sets "
                "the pace, and more threads or prefetch do not help"
            )
        else:
            lines.append(
                f"with a {step_ms:g} ms step per batch the consumer still waits {wait:.0f}% of the time "
                "at the best setting: the loader cannot keep up on this machine"
            )
    return best, lines


def format_table(points: Sequence[dict[str, Any]], best: dict[str, Any]) -> str:
    """Plain-text table of the summarised points: img/s, CPU ms/img, worker ms/img per stage, idle, wait."""
    head = (
        f"{'threads':>7} {'prefetch':>8} {'img/s':>7} {'CPU ms/img':>10} | worker ms/img: "
        + " ".join(f"{s:>6}" for s in STAGES)
        + f" {'total':>6} | {'idle%':>5} {'wait%':>5}  runs (img/s)"
    )
    rows = [head, "-" * len(head)]
    for p in points:
        ms = p["worker_ms_per_image"]
        cpu = p["median_cpu_ms_per_image"]
        mark = " * " if p is best else "   "
        rows.append(
            f"{p['threads']:>7} {p['prefetch']:>8} {p['median_images_per_s']:>7.1f} "
            f"{'-' if cpu is None else f'{cpu:.1f}':>10} | {'':14}"
            + " ".join(f"{ms[s]:>6.2f}" for s in STAGES)
            + f" {sum(ms.values()):>6.2f} | {p['worker_idle_pct']:>5.0f} {p['queue_wait_pct']:>5.0f}{mark}"
            + " ".join(f"{x:.0f}" for x in p["runs_images_per_s"])
        )
    return "\n".join(rows)


def plot(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a PNG: img/s against threads per prefetch depth, and each point's worker ms/img by stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    cfg = result["config"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.4]})
    for pf in sorted({p["prefetch"] for p in points}):
        row = sorted((p for p in points if p["prefetch"] == pf), key=lambda p: p["threads"])
        ax1.plot(
            [p["threads"] for p in row],
            [p["median_images_per_s"] for p in row],
            marker="o",
            label=f"prefetch {pf}",
        )
    best = result["best"]
    ax1.scatter(
        [best["threads"]], [best["median_images_per_s"]], s=160, facecolors="none", edgecolors="k", zorder=5
    )
    ax1.axvline(result["machine"]["cpus"], color="grey", linestyle=":", label="cores")
    ax1.set_xlabel("num_threads")
    ax1.set_ylabel("images/s (median)")
    ax1.set_xticks(sorted({p["threads"] for p in points}))
    ax1.set_ylim(0, 1.12 * max(p["median_images_per_s"] for p in points))
    ax1.legend()
    ax1.set_title("throughput")

    labels = [f"t{p['threads']} p{p['prefetch']}" for p in points]
    left = [0.0] * len(points)
    for stage in STAGES:
        widths = [p["worker_ms_per_image"][stage] for p in points]
        ax2.barh(labels, widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    cpu = [p["median_cpu_ms_per_image"] for p in points]
    if all(c is not None for c in cpu):
        ax2.scatter(cpu, labels, marker="|", s=300, color="k", zorder=5, label="CPU ms/img (process)")
    for y, p in enumerate(points):
        ax2.text(
            left[y],
            y,
            f" {p['median_images_per_s']:.0f} img/s, wait {p['queue_wait_pct']:.0f}%",
            va="center",
            fontsize=8,
        )
    ax2.invert_yaxis()
    ax2.set_xlabel("worker ms per image (summed over threads)")
    ax2.set_xlim(right=max(left) * 1.45)
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(STAGES) + 1, fontsize=8)
    ax2.set_title("where worker time goes")
    fig.suptitle(
        f"fastdiff sweep: {Path(cfg['root']).name}, {cfg['images']} images, resolution {cfg['resolution']}, "
        f"batch {cfg['batch_size']}, {result['machine']['cpus']} CPUs"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep(
    root: str | os.PathLike[str],
    *,
    resolution: int = 512,
    batch_size: int = 8,
    threads: Sequence[int] | None = None,
    prefetch: Sequence[int] = DEFAULT_PREFETCH,
    rounds: int = 3,
    warmup_epochs: int = 1,
    limit: int | None = DEFAULT_LIMIT,
    step_ms: float = 0.0,
    log: TextIO | None = None,
) -> dict[str, Any]:
    """Measure every (threads, prefetch) point; return machine, config, points, best and the verdict.

    ``threads=None`` uses :func:`default_threads` of the cores this process may use. ``warmup_epochs``
    untimed epochs run first (they fill the page cache). ``log`` gets one line per timed epoch.

    Raises:
        ValueError: An empty grid, a value below 1, ``rounds`` < 1, ``warmup_epochs`` < 0 or
            ``step_ms`` < 0, a bad ``limit``, or no images under ``root``.
    """
    cores = _available_cores()
    grid_t = sorted(set(threads if threads is not None else default_threads(cores)))
    grid_p = sorted(set(prefetch))
    if not grid_t or not grid_p or min(grid_t) < 1 or min(grid_p) < 1:
        raise ValueError(f"threads and prefetch need values >= 1, got {grid_t} and {grid_p}")
    if rounds < 1 or warmup_epochs < 0 or step_ms < 0:
        raise ValueError(
            f"need rounds >= 1, warmup_epochs >= 0, step_ms >= 0; got {rounds}, {warmup_epochs}, {step_ms}"
        )
    grid = [(t, p) for t in grid_t for p in grid_p]
    runs: dict[tuple[int, int], list[Run]] = {g: [] for g in grid}
    started = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with limited_root(root, limit) as data:
        images = len(list_images(data))
        for _ in range(warmup_epochs):
            run_point(data, threads=cores, prefetch=2, resolution=resolution, batch_size=batch_size)
        for r in range(rounds):
            # Alternate the order: slow stretches of a shared machine then hit different points each round.
            for t, p in grid if r % 2 == 0 else reversed(grid):
                run = run_point(
                    data,
                    threads=t,
                    prefetch=p,
                    resolution=resolution,
                    batch_size=batch_size,
                    step_s=step_ms / 1000,
                )
                runs[(t, p)].append(run)
                if log is not None:
                    print(
                        f"  round {r + 1}/{rounds}  threads {t:2d}  prefetch {p:2d}  "
                        f"{run.images_per_second:7.1f} img/s  queue wait "
                        f"{_pct(run.stats['queue_wait_s'], run.stats['wall_s']):3.0f}%",
                        file=log,
                        flush=True,
                    )
    points = [summarize_point(t, p, runs[(t, p)]) for t, p in grid]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    best, verdict = explain(points, cores, step_ms, load)
    return {
        "machine": machine_info(),
        "config": {
            "root": os.fspath(root),
            "limit": limit,
            "images": images,
            "resolution": resolution,
            "batch_size": batch_size,
            "threads": grid_t,
            "prefetch": grid_p,
            "rounds": rounds,
            "warmup_epochs": warmup_epochs,
            "step_ms": step_ms,
            "load_average_1min": [None if x is None else round(x, 2) for x in (load_start, load)],
            "seconds": round(time.perf_counter() - started, 1),
        },
        "points": points,
        "best": best,
        "verdict": verdict,
    }


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_rounds_arguments(parser: argparse.ArgumentParser, *, what: str) -> None:
    """``--rounds`` (alias ``--epochs``) and ``--warmup``, shared with ``fastdiff bench``.

    Args:
        parser: Where to add them.
        what: What one round times, for the help.
    """
    parser.add_argument(
        "--rounds", "--epochs", dest="rounds", type=int, default=3, help=f"timed rounds; {what} (3)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up epochs (1)")


def add_grid_arguments(group: argparse._ActionsContainer, *, prefix: str) -> None:
    """The grid and consumer options: ``{prefix}threads``, ``{prefix}prefetch``, ``--step-ms``, ``--plot``.

    Args:
        group: A parser or argument group.
        prefix: ``"--"`` for ``fastdiff tune``; ``"--sweep-"`` for ``fastdiff bench --sweep``, whose
            ``--threads`` is the bench's own.
    """
    group.add_argument(
        f"{prefix}threads",
        type=_int_list,
        default=None,
        metavar="N,N,...",
        help="thread counts to try (default: 1..cores and cores+1"
        + ("; --threads N tries only N)" if prefix == "--sweep-" else ")"),
    )
    group.add_argument(
        f"{prefix}prefetch",
        type=_int_list,
        default=None,
        metavar="N,N,...",
        help=f"prefetch depths to try (default: {','.join(map(str, DEFAULT_PREFETCH))})",
    )
    group.add_argument(
        "--step-ms",
        type=float,
        default=0.0,
        help="simulated training step: the consumer sleeps this long per batch (0)",
    )
    group.add_argument("--plot", type=Path, default=None, metavar="PATH", help="write a PNG plot here")


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``fastdiff tune`` arguments on ``parser``."""
    parser.add_argument("root", help="folder of images (searched recursively)")
    parser.add_argument("--resolution", type=int, default=512, help="training resolution in pixels (512)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (8)")
    add_rounds_arguments(parser, what="each times one epoch of every grid point")
    parser.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"use only the first N images (sorted; {DEFAULT_LIMIT})",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write results here")
    add_grid_arguments(parser, prefix="--")


def run_tune(args: argparse.Namespace) -> int:
    """Body of ``fastdiff tune``: measure the grid, print table and verdict, write JSON/PNG; returns 0."""
    result = sweep(
        args.root,
        resolution=args.resolution,
        batch_size=args.batch_size,
        threads=args.threads,
        prefetch=args.prefetch or DEFAULT_PREFETCH,
        rounds=args.rounds,
        warmup_epochs=args.warmup,
        limit=args.limit,
        step_ms=args.step_ms,
        log=sys.stderr,
    )
    m, c = result["machine"], result["config"]
    print(
        f"fastdiff tune: {args.root}  {c['images']} images  resolution {c['resolution']}  "
        f"batch {c['batch_size']}  step {c['step_ms']:g} ms  {m['cpus']} CPUs ({m['cpu_model']})  "
        f"median of {c['rounds']} rounds  ({c['seconds']:.0f} s)"
    )
    print(format_table(result["points"], result["best"]))
    print("worker ms/img: worker-thread milliseconds per image in each stage, summed over threads;")
    print("idle%: worker time with no sample to load; wait%: consumer time waiting for a batch.")
    print()
    print("\n".join(result["verdict"]))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastdiff.bench.sweep``: the same as ``fastdiff tune``."""
    parser = argparse.ArgumentParser(prog="fastdiff tune", description=__doc__.splitlines()[0])
    add_tune_arguments(parser)
    return run_tune(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
