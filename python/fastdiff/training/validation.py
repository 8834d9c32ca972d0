"""The validation loss: a task's loss on held-out images with noise and timesteps fixed per sample.

As in kohya-ss sd-scripts' validation loss (``docs/validation.md``) and SimpleTuner's evaluation
loss: training loss is noisy because every step draws new images, noise and timesteps; on a fixed
held-out set with a fixed draw per sample it is a curve that only the weights move. Each sample is
evaluated alone, with a generator seeded by (``seed``, its path) (:func:`sample_seed`): its noise,
timestep (DDPM's ``t`` or flow matching's ``t``) and VAE posterior draw are the same at every
evaluation, in every run and after a resume, whatever the batch it came in. The mean is summed in
path order with :func:`math.fsum`, so the value is reproducible bit for bit on CPU fp32.

It must not know about the application's settings or the files (the loop writes ``val_loss.csv``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Any, cast

import torch

from fastdiff.training.protocols import BatchLoader, Task, TrainBatch
from fastdiff.types import Batch


def sample_seed(seed: int, path: str) -> int:
    """The seed of a validation sample's draws: 63 bits of SHA-256 of ``"{seed}:{path}"``."""
    digest = hashlib.sha256(f"{seed}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def rows(batch: Batch) -> Iterator[dict[str, Any]]:
    """The samples of ``batch`` one by one, each a batch of one: every tensor and list of the batch's
    length ``B`` cut to its row (``[1, ...]`` tensors, one-element lists); other values kept."""
    size = len(batch["paths"])
    for i in range(size):
        row: dict[str, Any] = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == size:
                row[key] = value[i : i + 1]
            elif isinstance(value, list) and len(value) == size:
                row[key] = [value[i]]
            else:
                row[key] = value
        yield row


def validation_losses(
    task: Task,
    loader: BatchLoader,
    *,
    seed: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    on_device: tuple[str, ...],
) -> dict[str, float]:
    """Each validation sample's loss, keyed by path (one epoch of ``loader``: epoch 0).

    Every sample is a batch of one (:func:`rows`) with its own generator on ``device`` seeded by
    :func:`sample_seed` of ``seed`` and its path; captions are not dropped (``captions_dropped`` all
    false); ``rank``/``world_size`` 0 of 1 (whoever evaluates draws for the sample alone). Runs under
    ``torch.no_grad`` with the task in eval mode and restores train mode; the caller chooses the
    weights (EMA or not) and saves the global RNG state if it must.

    Args:
        task: The model side.
        loader: The validation images (``validation=True``), unshuffled.
        seed: The run's seed.
        device: The run's device; ``on_device`` names the tensors moved there.
        amp_dtype: Autocast dtype, as in training.
        on_device: Batch keys of tensors the task needs on ``device``.

    Returns:
        ``{path: loss}`` of every sample (a path met twice, as with ``num_repeats``, keeps one value:
        its draws are the same).
    """
    losses: dict[str, float] = {}
    loader.set_epoch(0)
    task.train_mode(False)
    try:
        with torch.no_grad():
            for batch in loader:
                for row in rows(batch):
                    path = row["paths"][0]
                    if path in losses:
                        continue
                    for name in on_device:
                        if name in row:
                            row[name] = row[name].to(device)
                    row.update(captions_dropped=[False], rank=0, world_size=1)
                    generator = torch.Generator(device).manual_seed(sample_seed(seed, path))
                    loss = task.loss(cast(TrainBatch, row), generator=generator, amp_dtype=amp_dtype)
                    losses[path] = float(loss.item())
    finally:
        task.train_mode(True)
    return losses


def mean_loss(losses: dict[str, float]) -> float:
    """The mean of :func:`validation_losses`' values, summed exactly (``math.fsum``) in path order."""
    if not losses:
        return math.nan
    return math.fsum(losses[p] for p in sorted(losses)) / len(losses)
