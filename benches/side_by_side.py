"""Side-by-side throughput of fastdiff and its alternatives on one image folder (images/s).

usage: python benches/side_by_side.py ROOT [--resolution 512] [--batch-size 8] [--rounds 3]
           [--warmup-rounds 1] [--limit N] [--threads N] [--only a,b,...] [--json PATH] [--plot PATH]

Contenders (see contenders.py): fastdiff; torchvision (the diffusers-script baseline, the reference of
every ratio); torchvision-draft (the same plus PIL ``Image.draft``); datago; ceiling and ceiling-scaled
(decode only, on all cores). Each run is its own process timing one epoch. Warm-up rounds run every
contender once, unrecorded (page cache, CPU clocks); then each round runs every contender once, in a
fixed order, so all contenders see the same drift of a shared machine. Prints per contender the median
images/s, the ratio to the baseline and every run; writes the same as JSON and a bar chart if asked.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from fastdiff.bench import (
    Throughput,
    bucket_note,
    describe,
    format_table,
    limited_root,
    list_images,
    machine_info,
    summarize,
)

HERE = Path(__file__).resolve().parent
ORDER = ("fastdiff", "torchvision", "torchvision-draft", "datago", "ceiling", "ceiling-scaled")
BASELINE = "torchvision"


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
    """Bar chart of median images/s per contender, with each run as a dot and the ratio on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = result["results"]
    names = list(res)
    medians = [res[n]["median_images_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4.5))
    colors = ["tab:orange" if n == "fastdiff" else "tab:gray" if n == BASELINE else "tab:blue" for n in names]
    bars = ax.bar(names, medians, color=colors)
    for i, n in enumerate(names):
        runs = res[n]["runs_images_per_s"]
        ax.plot([i] * len(runs), runs, "k.", markersize=4)
    ax.bar_label(bars, labels=[f"{res[n]['ratio_to_baseline']:.2f}x" for n in names], padding=3)
    c, m = result["config"], result["machine"]
    ax.set_ylabel("images/s (median; dots: each run)")
    ax.set_title(
        f"{Path(c['root']).name}: {c['images']} images, resolution {c['resolution']}, "
        f"batch {c['batch_size']}, {m['cpus']} CPUs\nratio to {BASELINE}",
        fontsize=10,
    )
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    """Parse the arguments, run the rounds, print the table and write the outputs."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="folder of images")
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
    result = {
        "machine": machine_info(),
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
