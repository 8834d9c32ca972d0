"""Data-parallel training: the torchrun process group, DDP over a task's trainable parameters (or FSDP2
sharding of its trained modules), the loss averaged across ranks, and the gathers a checkpoint needs.

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
from collections.abc import Iterator, Mapping
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

    #: Whether the parameters are sharded (:class:`FullyShardedDataParallel`): every rank must then
    #: take part in every forward (previews, validation) and in gathering the weights.
    sharded = False

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

    @contextlib.contextmanager
    def unsharded(self) -> Iterator[None]:
        """The task's modules hold their full weights in this block (they always do with DDP)."""
        yield

    def full_modules(self) -> dict[str, torch.nn.Module]:
        """Unsharded copies of the sharded modules (none with DDP: the task's own are whole)."""
        return {}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer``'s state dict, to checkpoint (every rank holds the same with DDP)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Restore what :meth:`optimizer_state` returned."""
        optimizer.load_state_dict(state)


class FullyShardedDataParallel(DataParallel):
    """A task's loss with its trained modules sharded over the ranks by FSDP2 (torch's
    ``torch.distributed.fsdp.fully_shard``; Zhao et al. 2023, "PyTorch FSDP", arXiv:2304.11277): each
    rank keeps ``1 / world_size`` of every parameter, its gradient and its optimizer state (dim-0
    shards, ``DTensor``), all-gathers a module's weights for its forward and backward, and
    reduce-scatters (averages) the gradients, so every rank steps its shards with the gradients of the
    mean loss over the global batch, as with :class:`DataParallel`.

    Each module is sharded as one unit (one all-gather per forward): memory per rank is the sharded
    weights, gradients and AdamW moments plus one module's full weights while it runs. With one
    process nothing is sharded (a 1-rank mesh is not built): the run is the single-process one.

    Args:
        task: The model side; every parameter of ``modules`` must be one of its ``trainable()`` ones.
        modules: The modules to shard, by name (those names prefix the checkpoint's optimizer keys).
            After construction the task's ``trainable()`` parameters are the sharded ``DTensor`` s:
            build the optimizer from them then.

    Raises:
        RuntimeError: The process group's backend cannot run FSDP2's collectives (as torch).
    """

    sharded = True

    def __init__(self, task: Task, modules: Mapping[str, torch.nn.Module]) -> None:
        self.task = task
        self.ddp = None
        self.modules = torch.nn.ModuleDict(dict(modules))
        if world_size() > 1:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            device = next(self.modules.parameters()).device
            mesh = init_device_mesh(device.type, (world_size(),))
            for module in self.modules.values():
                fully_shard(module, mesh=mesh)

    def _fsdp(self) -> list[Any]:
        return list(self.modules.values()) if world_size() > 1 else []

    @contextlib.contextmanager
    def no_sync(self, skip: bool) -> Iterator[None]:
        """With ``skip``, backward passes in this block keep their unsharded gradients locally
        (``set_requires_gradient_sync(False)``) instead of reduce-scattering them."""
        for module in self._fsdp():
            module.set_requires_gradient_sync(not skip)
        try:
            yield
        finally:
            for module in self._fsdp():
                module.set_requires_gradient_sync(True)

    @contextlib.contextmanager
    def unsharded(self) -> Iterator[None]:
        """All-gather every module's full weights for this block (every rank must enter it): the
        modules' parameters are then plain tensors, so ``trainable()`` and ``save_pretrained`` see the
        whole weights; changes made to them in the block are lost (the shards stay the truth)."""
        for module in self._fsdp():
            module.unshard()
        try:
            yield
        finally:
            for module in self._fsdp():
                module.reshard()

    def full_modules(self) -> dict[str, torch.nn.Module]:
        """A plain (unsharded) copy of each sharded module with its full weights, on every rank (every
        rank must call it): what the end of a run saves, since a sharded module's ``state_dict()``
        (which ``save_pretrained`` reads) is always its shards. A copy is built from the module's
        config (diffusers ``from_config``, transformers ``Model(config)``) on the same device, in the
        same train/eval mode and ``requires_grad`` flags. ``{}`` with one process (nothing sharded).
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.fsdp import FSDPModule

        copies: dict[str, torch.nn.Module] = {}
        for name, module in self.modules.items() if world_size() > 1 else ():
            full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
            base: Any = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
            from_config = getattr(base, "from_config", None)
            plain: torch.nn.Module = from_config(module.config) if from_config else base(module.config)
            plain.load_state_dict(full)
            plain.to(next(module.parameters()).device).train(module.training)
            flags = dict(module.named_parameters())
            for key, param in plain.named_parameters():
                param.requires_grad_(flags[key].requires_grad)
            copies[name] = plain
        return copies

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's full (unsharded) state on rank 0, keyed by the parameters' names under
        ``modules`` (``torch.distributed.checkpoint.state_dict``, ``full_state_dict``, on the CPU);
        ``{}`` on the other ranks. Every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return dict(get_optimizer_state_dict(self.modules, optimizer, options=options))

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Shard the full state :meth:`optimizer_state` wrote into ``optimizer`` (every rank passes
        the whole state, as read from the checkpoint)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.modules, optimizer, optim_state_dict=state, options=options)


def copy_full(param: torch.nn.Parameter, full: torch.Tensor) -> None:
    """Copy the full tensor ``full`` into ``param``: into its own shard when it is a ``DTensor``
    (FSDP2), else whole. Under ``no_grad``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            full = full.to(param.device_mesh.device_type)
            param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
        else:
            param.copy_(full)
