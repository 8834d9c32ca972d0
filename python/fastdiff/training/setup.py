"""What a training run is built from, below both commands that build one (``fastdiff train`` and
``fastdiff cache``, whose entries must be keyed exactly as the run's loader keys them): the settings
with their dataset config's loader options, the :class:`fastdiff.DataLoader` of the settings, and
the torch device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastdiff.dataset import load_datasets
from fastdiff.group import DatasetGroup
from fastdiff.loader import DataLoader
from fastdiff.training.config import DATASET_FIELDS, LOADER_DEFAULTS, TrainConfig
from fastdiff.training.curriculum import ResolutionCurriculum, parse_schedule


def is_dataset_config(data: Path) -> bool:
    """Whether ``data`` names a dataset config (a ``.toml`` file) rather than a folder of images."""
    return data.suffix.lower() == ".toml" and not data.is_dir()


def with_dataset_options(config: TrainConfig) -> TrainConfig:
    """``config`` with the loader fields it leaves at ``None`` taken from its dataset config.

    Fields filled (when ``config.data`` is a ``.toml`` that sets them in ``[general]`` or
    ``[[datasets]]``): :data:`DATASET_FIELDS`; then ``batch_size``, ``crop`` and ``flip_prob`` still
    at ``None`` get :data:`LOADER_DEFAULTS`. A folder ``data`` only gets the defaults. With several
    ``[[datasets]]`` the fields come from the first (for previews and the log; each dataset's loader
    keeps its own, see :func:`make_batches`), and none may be set here.

    Raises:
        ValueError: The dataset config is invalid (as :func:`fastdiff.load_datasets`), a dataset sets a
            ``seed`` other than ``config.seed``, or the config has several datasets and ``config`` sets
            one of :data:`DATASET_FIELDS` (or ``cache``).
    """
    if is_dataset_config(config.data):
        datasets = load_datasets(config.data)
        for options, _ in datasets:
            if options.get("seed", config.seed) != config.seed:
                raise ValueError(
                    f"{config.data}: seed = {options['seed']} differs from the run's seed {config.seed} "
                    "(--seed); set it in one place"
                )
        given = [k for k in (*DATASET_FIELDS, "cache") if getattr(config, k) is not None]
        if len(datasets) > 1 and given:
            raise ValueError(
                f"{config.data} has {len(datasets)} [[datasets]], each with its own loader options: set "
                f"{', '.join(given)} in the file's [general] or [[datasets]] tables, not for the run "
                "(a cache holds one dataset)"
            )
        options = datasets[0][0]
        config = config.resolved(**{k: options[k] for k in DATASET_FIELDS if k in options})
    return config.resolved(**LOADER_DEFAULTS)


#: What makes a loader the validation loader of a run: the held-out images, unshuffled, center-cropped,
#: unflipped, on this rank alone (whoever evaluates draws for the sample alone).
VALIDATION = {
    "validation": True,
    "crop": "center",
    "flip_prob": 0.0,
    "rank": 0,
    "world_size": 1,
    "shuffle": False,
}


def make_batches(config: TrainConfig) -> DataLoader | DatasetGroup | ResolutionCurriculum:
    """The batches a run trains on: :func:`make_loader`'s loader, or for a dataset config with several
    ``[[datasets]]`` a :class:`fastdiff.DatasetGroup` of them (float32 pixel batches, the config's own
    options per dataset, ``validation_split`` included, and the run's ``seed`` and ``num_threads``); with
    ``resolution_schedule``, a :class:`~fastdiff.training.curriculum.ResolutionCurriculum` of the loader.

    Raises:
        ValueError: As :func:`make_loader` or :meth:`fastdiff.DatasetGroup.from_config`, or a
            ``resolution_schedule`` with several ``[[datasets]]`` (not supported).
    """
    if is_dataset_config(config.data) and len(load_datasets(config.data)) > 1:
        if config.resolution_schedule is not None:
            raise ValueError("resolution_schedule with several [[datasets]] is not supported yet")
        return DatasetGroup.from_config(
            config.data, dtype=torch.float32, seed=config.seed, **_threads(config)
        )
    if config.resolution_schedule is not None:
        return ResolutionCurriculum(make_loader(config), parse_schedule(config.resolution_schedule))
    return make_loader(config)


def make_validation(config: TrainConfig) -> DataLoader | DatasetGroup | None:
    """The held-out images of a run (:data:`VALIDATION`): :func:`make_loader` with ``validation=True``,
    or for several ``[[datasets]]`` a :class:`fastdiff.DatasetGroup`, unshuffled, of the held-out images
    of each dataset whose ``validation_split`` is above 0, in dataset order; ``None`` when nothing is held
    out.

    Raises:
        ValueError: As :func:`make_loader`.
    """
    datasets = load_datasets(config.data) if is_dataset_config(config.data) else []
    if len(datasets) > 1:
        loaders = [
            DataLoader(subsets=subsets, **{**options, **_threads(config), **VALIDATION}, dtype=torch.float32)
            for options, subsets in datasets
            if options.get("validation_split")
        ]
        return DatasetGroup(loaders, seed=config.seed, shuffle=False) if loaders else None
    return make_loader(config, validation=True) if config.validation_split else None


def _threads(config: TrainConfig) -> dict[str, int]:
    return {} if config.num_threads is None else {"num_threads": config.num_threads}


def make_loader(config: TrainConfig, *, pixels: bool | None = None, validation: bool = False) -> DataLoader:
    """The :class:`fastdiff.DataLoader` of a run: float32 batches in ``[-1, 1]``, shuffled per epoch;
    with ``config.cache``, batches of the cache's ``latents``/``prompt_embeds`` instead of pixels.

    Args:
        config: The run's settings (data, bucket and augmentation fields, ``seed``, ``num_threads``,
            ``cache``); a dataset config ``data`` is read with :meth:`fastdiff.DataLoader.from_config`,
            the fields set here winning over its values; fields left at ``None`` take the loader's
            defaults.
        pixels: With a cache, also the pixels (``fastdiff cache`` encodes them); ``None``: the
            loader's default (pixels only without a cache).
        validation: The validation loader instead: the images ``config.validation_split`` holds out
            (the same ``seed``), unshuffled, center-cropped, unflipped, on this rank alone (rank 0 of 1);
            served from ``config.cache`` when set, where a missing entry raises
            ``fastdiff.CacheMissError`` (``on_error="raise"``) instead of leaving the image out.

    Returns:
        The loader.

    Raises:
        ValueError: As :class:`fastdiff.DataLoader`, or the dataset config has several datasets
            (:func:`make_batches` reads those).
    """
    options: dict[str, Any] = {
        "resolution": config.resolution,
        "batch_size": config.batch_size,
        "bucket_step": config.bucket_step,
        "min_bucket_side": config.min_bucket_side,
        "max_bucket_side": config.max_bucket_side,
        "min_bucket_fill": config.min_bucket_fill,
        "max_extra_crop": config.max_extra_crop,
        "crop": config.crop,
        "flip_prob": config.flip_prob,
        "crop_variants": config.crop_variants,
        "text_variants": config.text_variants,
        "seed": config.seed,
        "num_threads": config.num_threads,
        # With a cache the batches bring its latents/embeddings (the loader's `cache` option).
        "cache": config.cache,
        "pixels": pixels,
        "validation_split": config.validation_split,
    }
    if validation:
        options.update(VALIDATION)
        if config.cache is not None and not pixels:
            # A held-out image the cache lacks would otherwise be skipped, shrinking the validation set
            # silently: it is an error naming the file (fastdiff.CacheMissError).
            options["on_error"] = "raise"
    options = {k: v for k, v in options.items() if v is not None}
    if is_dataset_config(config.data):
        return DataLoader.from_config(config.data, dtype=torch.float32, **options)
    return DataLoader(config.data, **{"shuffle": True, **options}, dtype=torch.float32)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when ``torch.cuda.is_available()``, else CPU; anything else → ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
