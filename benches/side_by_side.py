"""Side-by-side throughput of fastdiff and its alternatives on one image folder (images/s).

usage: python benches/side_by_side.py [ROOT] [--resolution 512] [--batch-size 8] [--rounds 3]
           [--warmup-rounds 1] [--limit N] [--threads N] [--only a,b,...] [--json PATH] [--plot PATH]

Contenders (see contenders.py): fastdiff; torchvision (the diffusers-script baseline, the reference of
every ratio); torchvision-draft (the same plus PIL ``Image.draft``); datago; ceiling and ceiling-scaled
(decode only, on all cores). Each run is its own process timing one epoch. Warm-up rounds run every
contender once, unrecorded (page cache, CPU clocks); then each round runs every contender once, in a
fixed order, so all contenders see the same drift of a shared machine. Prints per contender the median
images/s, the ratio to the baseline, the median CPU time per image and every run; writes the same as
JSON and a bar chart if asked. ROOT defaults to the 1000-photo corpus that benches/README.md makes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

from fastdiff.bench.common import Throughput, describe, limited_root, list_images, machine_info
from fastdiff.bench.throughput import bucket_note, format_table, summarize

HERE = Path(__file__).resolve().parent
ORDER = ("fastdiff", "torchvision", "torchvision-draft", "datago", "ceiling", "ceiling-scaled")
BASELINE = "torchvision"
#: The Python module each bench-only contender imports.
PEERS = {"datago": "datago", "ceiling": "turbojpeg", "ceiling-scaled": "turbojpeg"}
#: The package (as pip names it) that installs each of those modules.
PEER_DISTRIBUTIONS = {"datago": "datago", "turbojpeg": "PyTurboJPEG"}
#: Where the corpus scripts put the 1000-photo corpus (FASTDIFF_CACHE as in tests/conftest.py).
DEFAULT_ROOT = (
    Path(os.environ.get("FASTDIFF_CACHE", Path.home() / ".cache" / "fastdiff" / "corpus")) / "photos"
)


def importable(python: str, module: str) -> bool:
    """Whether ``module`` imports in the interpreter ``python`` (the one the contenders run in)."""
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def run_once(python: str, name: str, root: Path, args: argparse.Namespace) -> Throughput:
    """Run one contender in a fresh process; return what it measured.

    Raises:
        RuntimeError: the process failed or printed no result; the message holds its output's tail.
    """
    cmd = [python, str(HERE / "contenders.py"), name, str(root)]
    cmd += ["--resolution", str(args.resolution), "--batch-size", str(args.batch_size)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{name} failed (exit {out.returncode}): {' '.join(cmd)}\n{tail}")
    got = json.loads(lines[-1])
    return Throughput(got["images"], got["seconds"], got["cpu_seconds"])


def plot(result: dict, path: Path) -> None:
    """Two bar charts side by side: median images/s per contender (each run a dot, the ratio to the
    baseline in the bar) and median CPU milliseconds per image (where measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = result["results"]
    names = list(res)
    colors = ["tab:orange" if n == "fastdiff" else "tab:gray" if n == BASELINE else "tab:blue" for n in names]
    fig, (speed, cost) = plt.subplots(1, 2, figsize=(2.0 * len(names) + 3, 4.8))

    bars = speed.bar(names, [res[n]["median_images_per_s"] for n in names], color=colors)
    for i, n in enumerate(names):
        runs = res[n]["runs_images_per_s"]
        speed.plot([i] * len(runs), runs, "k.", markersize=4)
    ratios = [f"{res[n]['ratio_to_baseline']:.2f}x" for n in names]
    speed.bar_label(bars, labels=ratios, label_type="center", color="white", fontweight="bold")
    speed.set_ylabel("images/s (bar: median, dots: each run)")
    speed.set_title(f"throughput; in the bars: ratio to {BASELINE}", fontsize=10)

    cpu = [res[n]["median_cpu_ms_per_image"] for n in names]
    measured = [(n, v, c) for n, v, c in zip(names, cpu, colors, strict=True) if v is not None]
    cost_bars = cost.bar(
        [n for n, _, _ in measured], [v for _, v, _ in measured], color=[c for *_, c in measured]
    )
    cost.bar_label(cost_bars, fmt="%.1f", padding=2)
    cost.set_ylabel("CPU ms per image (median; all threads and processes)")
    cost.set_title("CPU cost per image (lower is better)", fontsize=10)

    for ax in (speed, cost):
        ax.tick_params(axis="x", labelrotation=30)
        ax.margins(y=0.12)
    c, m = result["config"], result["machine"]
    fig.suptitle(
        f"{Path(c['root']).name}: {c['images']} images, resolution {c['resolution']}, "
        f"batch {c['batch_size']}, {m['cpus']} CPUs ({m['cpu_model']})",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    """Parse the arguments, run the rounds, print the table and write the outputs."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "root", type=Path, nargs="?", default=DEFAULT_ROOT, help=f"folder of images (default {DEFAULT_ROOT})"
    )
    p.add_argument("--resolution", type=int, default=512, help="training resolution in pixels (512)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (8)")
    p.add_argument("--rounds", type=int, default=3, help="recorded rounds (3)")
    p.add_argument("--warmup-rounds", type=int, default=1, help="unrecorded rounds first (1)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images (sorted)")
    p.add_argument("--threads", type=int, default=None, help="fastdiff worker threads (all cores)")
    p.add_argument("--only", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument("--python", default=sys.executable, help="interpreter of the contender processes")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one contender run may take (1800)")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="write a bar chart (PNG) here")
    args = p.parse_args()

    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(ORDER))
    if unknown or BASELINE not in names:
        p.error(f"--only: unknown {unknown} or missing the baseline {BASELINE!r}; choose from {ORDER}")
    if args.rounds < 1 or args.warmup_rounds < 0:
        p.error("need --rounds >= 1 and --warmup-rounds >= 0")
    if not args.root.is_dir():
        p.error(f"{args.root} is not a folder; benches/README.md says how to make the corpora")
    missing = [f"{n} needs {PEERS[n]}" for n in names if n in PEERS and not importable(args.python, PEERS[n])]
    if missing:
        p.error(f"{'; '.join(missing)}: pip install datago 'PyTurboJPEG<2', or leave them out with --only")

    runs: dict[str, list[Throughput]] = {n: [] for n in names}
    with limited_root(args.root, args.limit) as root:
        for r in range(args.warmup_rounds + args.rounds):
            label = "warm-up" if r < args.warmup_rounds else f"round {r - args.warmup_rounds + 1}"
            for name in names:
                t = run_once(args.python, name, root, args)
                print(f"  {label:>8}  {name:<18} {describe(t)}", file=sys.stderr, flush=True)
                if r >= args.warmup_rounds:
                    runs[name].append(t)

        images = len(list_images(root))
    summary = summarize(runs, BASELINE)
    peers = {PEER_DISTRIBUTIONS[PEERS[n]] for n in names if n in PEERS}
    result = {
        "machine": machine_info() | {d: importlib.metadata.version(d) for d in sorted(peers)},
        "config": {
            "root": str(args.root),
            "images": images,
            "limit": args.limit,
            "resolution": args.resolution,
            "batch_size": args.batch_size,
            "fastdiff_threads": args.threads,
            "rounds": args.rounds,
            "warmup_rounds": args.warmup_rounds,
        },
        "results": summary,
    }
    m = result["machine"]
    print(
        f"side by side: {args.root} ({images} images)  resolution {args.resolution}  batch {args.batch_size}"
        f"  {m['cpus']} CPUs ({m['cpu_model']})  median of {args.rounds} rounds"
    )
    print(format_table(summary, BASELINE))
    if "fastdiff" in summary:
        fd = summary["fastdiff"]["median_images_per_s"]
        others = [(n, s["median_images_per_s"]) for n, s in summary.items() if n != "fastdiff"]
        print("  ".join(f"fastdiff/{n}={fd / v:.2f}" for n, v in others))
        print(bucket_note(args.resolution))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
