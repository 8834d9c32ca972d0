"""What the training mechanics need of the rest, as protocols: batches, a model, and the run's settings.

The mechanics (``loop``, ``checkpoint``) are written against these, so they import neither the
application (:class:`fastdiff.training.config.TrainConfig` satisfies :class:`LoopSettings`) nor a model
(:class:`fastdiff.training.tiny.TinyTask` and :class:`fastdiff.training.sd.PipelineTask` satisfy
:class:`Task`), nor a loader (:class:`fastdiff.DataLoader` satisfies :class:`BatchLoader`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypedDict

import torch

from fastdiff.training.objective import SampleLosses
from fastdiff.types import Batch


class BatchLoader(Protocol):
    """What training needs of a loader: :class:`fastdiff.DataLoader` satisfies it.

    Each iteration yields one epoch of batches in the ``fastdiff.DataLoader`` format (at least
    ``pixel_values``: float tensor ``[B, 3, H, W]`` in ``[-1, 1]``, and ``captions``: ``list[str]``).
    Checkpoints also need ``state_dict()`` / ``load_state_dict()`` and ``epoch`` (looked up when used).
    """

    def __len__(self) -> int:
        """Batches per epoch."""
        ...

    def __iter__(self) -> Iterator[Batch]:
        """One epoch of batches."""
        ...

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that the next iteration runs."""
        ...


class TrainBatch(Batch, total=False):
    """A loader :class:`~fastdiff.types.Batch` as the loop hands it to :meth:`Task.loss`.

    Keys (besides the batch's own): ``captions_dropped``, ``B`` flags of the captions that caption
    dropout replaced by ``""`` (for classifier-free guidance); ``rank`` and ``world_size``: with data
    parallelism the batch is share ``rank`` of ``world_size`` equal shares of the step's global batch,
    and a task draws its noise for the global batch and keeps its rows
    (:func:`fastdiff.training.objective.rank_rows`), so that N ranks draw what one process with the
    global batch draws (absent: 0 of 1). ``pixel_values`` is on the run's device. A cache-served
    batch's ``latents``/``latents_std``/``prompt_embeds``/``pooled_prompt_embeds`` are on the run's
    device too; its embeddings are of the loader's captions (before caption dropout).
    """

    captions_dropped: list[bool]
    rank: int
    world_size: int


class Share(TypedDict):
    """Whose share of the global batch a batch is: the ``rank`` of ``world_size`` ranks."""

    rank: int
    world_size: int


def share_of(batch: TrainBatch) -> Share:
    """The batch's ``rank``/``world_size`` (0 of 1 when absent), as keyword arguments of the draws."""
    return {"rank": batch.get("rank", 0), "world_size": batch.get("world_size", 1)}


class Task(Protocol):
    """The model side of a run: what is trained, how a batch's loss is computed, how it is saved.

    Attributes:
        last_sample_losses: Each sample's unweighted loss and noise level of the last :meth:`loss`
            call (``None`` before the first): the loop bins them by noise level.
    """

    last_sample_losses: SampleLosses | None

    @property
    def size_multiple(self) -> int:
        """What image sides must be multiples of (pixels): the model's downsampling."""
        ...

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The parameters the optimizer updates, by a stable name (checkpoint keys), in a fixed order."""
        ...

    def train_mode(self, on: bool) -> None:
        """Put the trained modules in train (``True``) or eval mode."""
        ...

    def loss(
        self, batch: TrainBatch, *, generator: torch.Generator, amp_dtype: torch.dtype | None
    ) -> torch.Tensor:
        """The (weighted) diffusion loss of ``batch``, a float32 scalar; noise drawn from ``generator``."""
        ...

    def preview(
        self, prompts: Sequence[str], *, seeds: Sequence[int], steps: int, width: int, height: int
    ) -> torch.Tensor:
        """One image per (prompt, seed), prompt-major: float32 ``[P * S, 3, height, width]`` in
        ``[0, 1]``, CPU (sides multiples of :attr:`size_multiple`)."""
        ...

    def save(self, output: Path) -> None:
        """Write the trained weights (or adapter) into ``output``."""
        ...


class LoopSettings(Protocol):
    """The settings :func:`fastdiff.training.loop.run` reads; their meaning is documented once, on the
    fields of the same name of :class:`fastdiff.training.config.TrainConfig` (read-only here)."""

    @property
    def output(self) -> Path: ...
    @property
    def batch_size(self) -> int | None: ...
    @property
    def max_steps(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def learning_rate(self) -> float | None: ...
    @property
    def lr_scheduler(self) -> str: ...
    @property
    def lr_warmup_steps(self) -> int: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def use_8bit_adam(self) -> bool: ...
    @property
    def max_grad_norm(self) -> float: ...
    @property
    def gradient_accumulation_steps(self) -> int: ...
    @property
    def mixed_precision(self) -> str: ...
    @property
    def caption_dropout(self) -> float: ...
    @property
    def ema_decay(self) -> float: ...
    @property
    def max_consecutive_skips(self) -> int: ...
    @property
    def spike_k(self) -> float: ...
    @property
    def spike_window(self) -> int: ...
    @property
    def skip_spikes(self) -> bool: ...
    @property
    def validate_every(self) -> int: ...
    @property
    def report_to(self) -> str: ...
    @property
    def checkpoint_every(self) -> int: ...
    @property
    def resume(self) -> Path | None: ...
    @property
    def preview_every(self) -> int: ...
    @property
    def preview_steps(self) -> int: ...

    def to_json(self) -> dict[str, Any]:
        """Every setting as JSON values: what a checkpoint's ``train_config.json`` holds."""
        ...
