"""Data-parallel training: the torchrun process group, DDP over a task's trainable parameters, the
loss averaged across ranks, and the gathers a checkpoint needs.

``torchrun --nproc_per_node M -m fastdiff train …`` starts M processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous in the environment; :func:`join` makes each one a member of the
process group (NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on the CPU). Each rank's
:class:`fastdiff.DataLoader` then takes its slice of every global batch (it reads rank/world_size
from the process group), and :class:`DataParallel` all-reduces the gradients (torch DDP). What only
rank 0 does (the files) is the caller's: :func:`is_main`. Without torchrun (or with one process)
nothing here communicates and a run is exactly the single-process one.

It must not know about the application's settings, the models or the loader.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from fastdiff.training.protocols import Task, TrainBatch


def join(device: torch.device) -> torch.device:
    """Join torchrun's process group when this process is one of several, and give its device.

    With ``WORLD_SIZE > 1`` in the environment (torchrun sets it with ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR`` and ``MASTER_PORT``): on CUDA the device is ``cuda:LOCAL_RANK`` (unless ``device``
    names an index) and the backend NCCL; elsewhere gloo. A group already initialised (by the caller)
    is used as it is. Otherwise ``device`` is returned unchanged.

    Args:
        device: The run's resolved device (``cuda`` or ``cpu``).

    Returns:
        The device this rank trains on.

    Raises:
        RuntimeError: The rendezvous fails (as ``torch.distributed.init_process_group``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return device


def leave() -> None:
    """Destroy the process group :func:`join` started (no-op without one), once every rank is done
    with it (gloo aborts a rank whose peers tear their connections down while it still uses them)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Ranks in the process group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this is rank 0: the one process that writes logs and files."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank is here (no-op with one process)."""
    if world_size() > 1:
        dist.barrier()


def mean(value: torch.Tensor) -> float:
    """The mean over ranks of a scalar tensor (its ``.item()`` with one process)."""
    if world_size() == 1:
        return float(value.item())
    total = value.detach().float().reshape(1).clone()
    dist.all_reduce(total)
    return float(total.item()) / world_size()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    objects: list[Any] = [None] * world_size()
    dist.all_gather_object(objects, obj)
    return objects


class _Trainable(torch.nn.Module):
    """The task's trainable parameters as one module whose forward is the task's loss, for DDP: its
    gradient hooks are on those parameters, whatever module of the task uses them."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.params = torch.nn.ParameterList(task.trainable().values())
        self.task = task

    def forward(self, batch: TrainBatch, generator: torch.Generator, amp_dtype: torch.dtype | None) -> Any:
        return self.task.loss(batch, generator=generator, amp_dtype=amp_dtype)


class DataParallel:
    """A task's loss with its gradients averaged over the ranks by torch's
    ``DistributedDataParallel`` (Li et al. 2020, "PyTorch Distributed", arXiv:2006.15704); with one
    process, the task's loss itself.

    DDP broadcasts rank 0's trainable parameters when built, and all-reduces (averages) each
    parameter's gradient in buckets while the backward runs, so every rank ends the backward with the
    same gradients: those of the mean loss over the global batch when every rank's batch has the same
    size (the loader makes it so). The module DDP wraps holds the parameters only, so no buffers are
    synchronised (the tasks' modules have none that training changes).

    Args:
        task: The model side; its ``trainable()`` parameters are the ones reduced (every one must get
            a gradient each step: DDP is built with ``find_unused_parameters=False``).
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        if world_size() > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(_Trainable(task))

    def loss(
        self, batch: TrainBatch, *, generator: torch.Generator, amp_dtype: torch.dtype | None
    ) -> torch.Tensor:
        """``task.loss`` of ``batch`` (through DDP with several ranks, so its backward reduces)."""
        if self.ddp is None:
            return self.task.loss(batch, generator=generator, amp_dtype=amp_dtype)
        loss: torch.Tensor = self.ddp(batch, generator, amp_dtype)
        return loss

    @contextlib.contextmanager
    def no_sync(self, skip: bool) -> Iterator[None]:
        """With ``skip``, backward passes in this block accumulate gradients locally without
        reducing them (gradient accumulation: all micro-batches but the step's last)."""
        if self.ddp is None or not skip:
            yield
        else:
            with self.ddp.no_sync():
                yield
