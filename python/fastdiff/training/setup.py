"""What a training run is built from, below both commands that build one (``fastdiff train`` and
``fastdiff cache``, whose entries must be keyed exactly as the run's loader keys them): the settings
with their dataset config's loader options, the :class:`fastdiff.DataLoader` of the settings, and
the torch device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastdiff.dataset import load_config
from fastdiff.loader import DataLoader
from fastdiff.training.config import DATASET_FIELDS, LOADER_DEFAULTS, TrainConfig


def is_dataset_config(data: Path) -> bool:
    """Whether ``data`` names a dataset config (a ``.toml`` file) rather than a folder of images."""
    return data.suffix.lower() == ".toml" and not data.is_dir()


def with_dataset_options(config: TrainConfig) -> TrainConfig:
    """``config`` with the loader fields it leaves at ``None`` taken from its dataset config.

    Fields filled (when ``config.data`` is a ``.toml`` that sets them in ``[general]`` or
    ``[[datasets]]``): :data:`DATASET_FIELDS`; then ``batch_size``, ``crop`` and ``flip_prob`` still
    at ``None`` get :data:`LOADER_DEFAULTS`. A folder ``data`` only gets the defaults.

    Raises:
        ValueError: The dataset config is invalid (as :func:`fastdiff.load_config`), or it sets a
            ``seed`` other than ``config.seed``.
    """
    if is_dataset_config(config.data):
        options, _ = load_config(config.data)
        if options.get("seed", config.seed) != config.seed:
            raise ValueError(
                f"{config.data}: seed = {options['seed']} differs from the run's seed {config.seed} "
                "(--seed); set it in one place"
            )
        config = config.resolved(**{k: options[k] for k in DATASET_FIELDS if k in options})
    return config.resolved(**LOADER_DEFAULTS)


def make_loader(config: TrainConfig, *, pixels: bool | None = None) -> DataLoader:
    """The :class:`fastdiff.DataLoader` of a run: float32 batches in ``[-1, 1]``, shuffled per epoch;
    with ``config.cache``, batches of the cache's ``latents``/``prompt_embeds`` instead of pixels.

    Args:
        config: The run's settings (data, bucket and augmentation fields, ``seed``, ``num_threads``,
            ``cache``); a dataset config ``data`` is read with :meth:`fastdiff.DataLoader.from_config`,
            the fields set here winning over its values; fields left at ``None`` take the loader's
            defaults.
        pixels: With a cache, also the pixels (``fastdiff cache`` encodes them); ``None``: the
            loader's default (pixels only without a cache).

    Returns:
        The loader.

    Raises:
        ValueError: As :class:`fastdiff.DataLoader`.
    """
    options: dict[str, Any] = {
        "resolution": config.resolution,
        "batch_size": config.batch_size,
        "bucket_step": config.bucket_step,
        "min_bucket_side": config.min_bucket_side,
        "max_bucket_side": config.max_bucket_side,
        "crop": config.crop,
        "flip_prob": config.flip_prob,
        "crop_variants": config.crop_variants,
        "text_variants": config.text_variants,
        "seed": config.seed,
        "num_threads": config.num_threads,
        # With a cache the batches bring its latents/embeddings (the loader's `cache` option).
        "cache": config.cache,
        "pixels": pixels,
    }
    options = {k: v for k, v in options.items() if v is not None}
    if is_dataset_config(config.data):
        return DataLoader.from_config(config.data, dtype=torch.float32, **options)
    return DataLoader(config.data, shuffle=True, dtype=torch.float32, **options)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when ``torch.cuda.is_available()``, else CPU; anything else → ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
