"""``fastdiff cache``: encode a dataset's VAE latents and text embeddings into a cache folder, with the
loader options ``fastdiff train`` takes (the same flags and ``--config`` TOML keys, from
:class:`~fastdiff.training.config.TrainConfig`), so the cache holds exactly the entries that run's
loader will ask for; and :func:`build_for_config`, which ``fastdiff train --cache-build`` calls.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import fields
from pathlib import Path

import torch

from fastdiff import _fastdiff
from fastdiff.cache.build import BuildReport, build_from_model, locked
from fastdiff.cache.manifest import StorageDtype
from fastdiff.training import distributed, dit, sd
from fastdiff.training.config import TrainConfig
from fastdiff.training.dit_pipeline import dit_family
from fastdiff.training.flags import add_train_arguments, config_from_mapping, read_train_toml
from fastdiff.training.setup import make_loader, resolve_device, with_dataset_options

#: The :class:`TrainConfig` fields ``fastdiff cache`` takes: everything that decides the loader's
#: samples and captions, the model and what changes its text embeddings (a DiT's ``t5`` and
#: ``max_sequence_length``), and where the encoders run.
CACHE_FIELDS = (
    *(
        f.name
        for f in fields(TrainConfig)
        if f.metadata["group"] == "data" and f.name not in ("cache", "cache_build")
    ),
    "model",
    "model_config",
    "t5",
    "max_sequence_length",
    "seed",
    "num_threads",
    "torch_threads",
    "device",
)
#: Values of ``--dtype``.
DTYPES: tuple[StorageDtype, ...] = ("bf16", "f16", "f32")


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fastdiff cache``: :data:`CACHE_FIELDS` as ``fastdiff train`` spells them, plus
    ``--output``, ``--latents/--no-latents``, ``--text/--no-text``, ``--dtype`` and ``--gc``."""
    add_train_arguments(parser, names=CACHE_FIELDS)
    own = parser.add_argument_group("cache", "the cache folder and what goes into it")
    own.add_argument("--output", type=Path, required=True, help="Cache folder (created if missing).")
    own.add_argument(
        "--latents",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Encode the VAE latents (--no-latents: leave that half as it is).",
    )
    own.add_argument(
        "--text",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Encode the text embeddings (--no-text: leave that half as it is).",
    )
    own.add_argument(
        "--dtype",
        choices=DTYPES,
        help="Storage dtype of the entries (the encoders run in float32). Default: for each half the "
        "dtype the cache already has for it, else the dtype the model's VAE weights are stored in.",
    )
    own.add_argument(
        "--gc", action="store_true", help="Afterwards delete shards holding no entry this build needs."
    )


def cache_config(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` whose loader ``fastdiff cache`` encodes: the flags given (over the
    ``--config`` file's keys), with ``cache`` = ``output`` = ``--output``.

    Raises:
        ValueError: ``--model`` is missing, or as :func:`~fastdiff.training.flags.config_from_mapping`.
    """
    given = {k: v for k, v in vars(args).items() if v is not None and k in CACHE_FIELDS}
    from_file = read_train_toml(args.config) if args.config is not None else {}
    values = {**from_file, **given, "output": args.output, "cache": args.output}
    if values.get("model") is None:
        raise ValueError("--model is required: the pipeline whose VAE and text encoders encode the cache")
    return config_from_mapping(values)


def merged(reports: list[BuildReport]) -> BuildReport:
    """One report of several builds into the same cache: counts and times added, failures and shards
    joined (a key two builds both needed counts in each)."""
    return BuildReport(
        latents_needed=sum(r.latents_needed for r in reports),
        latents_encoded=sum(r.latents_encoded for r in reports),
        latents_decoded=sum(r.latents_decoded for r in reports),
        text_needed=sum(r.text_needed for r in reports),
        text_encoded=sum(r.text_encoded for r in reports),
        failed={k: v for r in reports for k, v in r.failed.items()},
        shards=[shard for r in reports for shard in r.shards],
        seconds=sum(r.seconds for r in reports),
        write_seconds=sum(r.write_seconds for r in reports),
    )


def build_for_config(
    config: TrainConfig,
    *,
    latents: bool = True,
    text: bool = True,
    dtype: StorageDtype | None = None,
    progress: bool = True,
    device: torch.device | None = None,
    split: bool = False,
) -> BuildReport:
    """Encode into ``config.cache`` what the loader of ``config`` needs and the cache lacks; with
    ``validation_split``, what its validation loader needs too (the held-out images, center-cropped
    and unflipped: the validation loss then reads them from the cache).

    The settings resolve as in ``fastdiff train`` (dataset config, model defaults), so the keys are
    the run's; then :func:`~fastdiff.cache.build.build_from_model` loads only the VAE / the text
    encoders, on ``config.device``, builds, and frees them before returning.

    Args:
        config: A run's settings with ``model`` and ``cache`` set.
        latents: Build the latents half.
        text: Build the text half.
        dtype: Storage dtype; ``None``: per half, the cache's dtype for it, else
            :func:`~fastdiff.cache.encoders.stored_dtype` of the model.
        progress: Show progress bars.
        device: Where the encoders run; ``None``: ``config.device`` resolved.
        split: Share the work across torchrun's ranks (every rank calls this, each with its device), as
            :func:`~fastdiff.cache.build.build`.

    Returns:
        The build's report (:func:`merged`, with validation images).

    Raises:
        ValueError, OSError, fastdiff.FastdiffError: As the loader, the encoders and
            :func:`~fastdiff.cache.build.build`.
    """
    assert config.model is not None and config.cache is not None
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    config = with_dataset_options(config)
    assert config.model is not None
    family = dit_family(config.model)
    config = sd.with_model_defaults(config) if family is None else dit.with_model_defaults(config, family)
    assert config.model is not None and config.cache is not None
    model, cache = config.model, config.cache
    reports = [
        build_from_model(
            cache,
            functools.partial(make_loader, config, pixels=True, validation=validation),
            model,
            config.model_config,
            device=resolve_device(config.device) if device is None else device,
            latents=latents,
            text=text,
            dtype=dtype,
            max_sequence_length=config.max_sequence_length,
            t5=config.t5,
            progress=progress,
            split=split,
        )
        # The held-out images too (center-cropped, unflipped, as the validation loss reads them).
        for validation in ((False, True) if config.validation_split else (False,))
    ]
    return reports[0] if len(reports) == 1 else merged(reports)


def run_cache(args: argparse.Namespace) -> int:
    """Body of ``fastdiff cache``: build, optionally collect garbage, print a summary; returns 0.

    Under torchrun (``torchrun --nproc_per_node M -m fastdiff cache …``) every rank joins the process
    group (:func:`~fastdiff.training.distributed.join`: ``cuda:LOCAL_RANK`` on CUDA, gloo on the CPU)
    and encodes its share of the build (:func:`~fastdiff.cache.build.build` with ``split``); rank 0
    prints the summary and collects the garbage.

    Raises:
        ValueError: ``--gc`` with ``--no-latents`` or ``--no-text`` (gc keeps only the keys this build
            needs), or as :func:`cache_config` and :func:`build_for_config`.
        OSError, fastdiff.FastdiffError: As :func:`build_for_config`.
    """
    config = cache_config(args)
    if args.gc and not (args.latents and args.text):
        raise ValueError(
            "--gc keeps the keys this build needs: it needs both halves (no --no-latents/--no-text)"
        )
    device = distributed.join(resolve_device(config.device))
    try:
        report = build_for_config(
            config, latents=args.latents, text=args.text, dtype=args.dtype, device=device, split=True
        )
        if not distributed.is_main():
            return 0
        assert config.cache is not None
        ranks = distributed.world_size()
        line = (
            f"cache {config.cache}: latents {report.latents_encoded} encoded / {report.latents_needed} "
            f"needed, text {report.text_encoded} encoded / {report.text_needed} needed, "
            f"{len(report.failed)} failed, {len(report.shards)} shards written in {report.seconds:.1f} s "
            f"(shard writing {report.write_seconds:.1f} s)" + (f" by {ranks} ranks" if ranks > 1 else "")
        )
        if args.gc:
            with locked(config.cache):
                done = _fastdiff.cache_gc(config.cache, sorted(report.live_latents), sorted(report.live_text))
            line += (
                f"; gc deleted {done['orphans']} orphan, {done['corrupt']} corrupt and "
                f"{done['partials']} partial files ({done['bytes_freed'] / 2**20:.1f} MiB), "
                f"kept {done['kept']} shards"
            )
        print(line)
        return 0
    finally:
        distributed.leave()
