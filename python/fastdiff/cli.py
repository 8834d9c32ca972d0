"""The ``fastdiff`` command: ``scan | shard | index | bench | tune | train | cache | demo``.

Each subcommand's arguments and body live in its own module (``bench.throughput``, ``bench.sweep``,
``training.config`` / ``training.run``, ``cache.command``, ``training.demo``, ``shard`` for ``shard``
and ``index``); this file only registers them, plus ``scan``, which is a thin view of
:attr:`fastdiff.DataLoader.report`, and checks before a command starts that the optional packages
it needs are installed (:func:`missing_extra`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence

#: Import names of the ``train`` extra's packages (pyproject ``[project.optional-dependencies]``).
TRAIN_MODULES = (
    "diffusers",
    "transformers",
    "tokenizers",
    "peft",
    "safetensors",
    "tqdm",
    "matplotlib",
    "PIL",
)
#: Import names of what the ``dev`` extra adds that ``fastdiff bench``'s baseline needs.
BENCH_MODULES = ("torchvision", "PIL")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fastdiff`` command and its subcommands."""
    # Here, not at the top: they import torch (seconds), which the extras check in main() must not wait for.
    from fastdiff import scan, shard
    from fastdiff.bench import sweep, throughput
    from fastdiff.cache import command as cache_command
    from fastdiff.training import demo, flags, run

    description = __doc__.splitlines()[0].replace("``", "")
    parser = argparse.ArgumentParser(prog="fastdiff", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    scan_p = sub.add_parser("scan", help="scan a folder: formats, sizes, buckets, captions, skipped files")
    scan.add_scan_arguments(scan_p)
    scan_p.set_defaults(func=scan.run_scan)
    shard_p = sub.add_parser("shard", help="pack a folder of images and captions into WebDataset tar shards")
    shard.add_shard_arguments(shard_p)
    shard_p.set_defaults(func=shard.run_shard)
    index_p = sub.add_parser("index", help="write the sidecar index of tar shards (member offsets, headers)")
    shard.add_index_arguments(index_p)
    index_p.set_defaults(func=shard.run_index)
    bench_p = sub.add_parser("bench", help="images/s of fastdiff vs the torchvision+PIL DataLoader")
    throughput.add_bench_arguments(bench_p)
    bench_p.set_defaults(func=throughput.run_bench)
    tune_p = sub.add_parser("tune", help="which num_threads and prefetch to use on this machine, and why")
    sweep.add_tune_arguments(tune_p)
    tune_p.set_defaults(func=sweep.run_tune)
    train_p = sub.add_parser(
        "train", help="fine-tune Stable Diffusion (--model), or train a tiny text-to-image model from scratch"
    )
    flags.add_train_arguments(train_p)
    train_p.set_defaults(func=run.run_train)
    cache_p = sub.add_parser(
        "cache", help="encode a dataset's VAE latents and text embeddings into a cache for train --cache"
    )
    cache_command.add_cache_arguments(cache_p)
    cache_p.set_defaults(func=cache_command.run_cache)
    demo_p = sub.add_parser("demo", help="make a synthetic captioned set, train on it, draw samples")
    demo.add_demo_arguments(demo_p)
    demo_p.set_defaults(func=demo.run_demo)
    return parser


def needed_modules(argv: Sequence[str]) -> list[tuple[str, str]]:
    """``(extra, import name)`` of each optional package that the command line will import.

    Read from the raw arguments, before the parser is built: building it imports torch and the
    subcommands' modules, seconds that a refusal must not wait for.
    """
    command = next((a for a in argv if not a.startswith("-")), None)
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    if flags & {"-h", "--help"}:
        return []  # help needs no optional package
    if command in ("train", "cache", "demo"):
        return [("train", m) for m in TRAIN_MODULES]
    needs = [("train", "matplotlib")] if "--plot" in flags else []
    if command == "bench" and "--sweep" not in flags:
        needs += [("dev", m) for m in BENCH_MODULES]
    return needs


def _importable(name: str) -> bool:
    # find_spec locates a top-level package without importing it (diffusers alone takes seconds).
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_extra(argv: Sequence[str]) -> str | None:
    """The one-line error for a command whose optional packages are not installed, else ``None``.

    Returns:
        ``"fastdiff demo: error: needs the train extra: pip install 'fastdiff[train]' (missing:
        tokenizers)"``: the first extra with a missing package, naming every missing one of it.
    """
    missing: dict[str, list[str]] = {}
    command = next((a for a in argv if not a.startswith("-")), "")
    for extra, module in needed_modules(argv):
        if not _importable(module):
            missing.setdefault(extra, []).append(module)
    for extra, modules in missing.items():
        return (
            f"fastdiff {command}: error: needs the {extra} extra: pip install 'fastdiff[{extra}]' "
            f"(missing: {', '.join(modules)})"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastdiff`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # Before any work: without this a command would die minutes in, at its first import of the extra.
    error = missing_extra(argv)
    if error is not None:
        print(error, file=sys.stderr)
        return 2
    from fastdiff._fastdiff import FastdiffError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, MemoryError, FastdiffError) as e:
        # Bad input (a missing folder, an unknown config key, a broken file with on_error="raise"):
        # the message names the file or key; a traceback would only hide it. Set FASTDIFF_TRACEBACK=1
        # to get one.
        if os.environ.get("FASTDIFF_TRACEBACK"):
            raise
        print(f"fastdiff {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
