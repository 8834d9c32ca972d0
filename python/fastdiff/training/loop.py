"""The training step loop shared by ``fastdiff train``'s two model paths (from scratch, and Stable Diffusion).

What a step *computes* belongs to a :class:`~fastdiff.training.protocols.Task` (the tiny pixel-space
model in :mod:`fastdiff.training.tiny`, Stable Diffusion 1.x/2.x/SDXL in :mod:`fastdiff.training.sd`);
this module does everything around it, once, for both: caption dropout, AdamW (optionally 8-bit), LR
schedule with warmup, gradient accumulation, mixed precision with a gradient scaler, gradient
clipping, the non-finite guard, EMA, and when to log, preview and checkpoint (the files themselves are
:mod:`~fastdiff.training.outputs` and :mod:`~fastdiff.training.checkpoint`). It must not know about
UNets, VAEs or tokenizers, nor about the application's config: it reads a
:class:`~fastdiff.training.protocols.LoopSettings`.

diffusers, tqdm (the ``train`` extra) and bitsandbytes are imported where used: ``fastdiff.cli`` imports
the training modules to register their arguments, and must start fast and report a missing extra itself.
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from fastdiff.training import distributed
from fastdiff.training.checkpoint import Checkpointer, find_checkpoint, rng_state, set_rng_state
from fastdiff.training.curriculum import ResolutionCurriculum
from fastdiff.training.monitor import MAD_SCALE, LossByNoiseLevel, SpikeDetector
from fastdiff.training.objective import drop_captions
from fastdiff.training.outputs import (
    LossLog,
    SpikeLog,
    ValidationLog,
    save_sample_grid,
    write_loss_by_timestep,
)
from fastdiff.training.protocols import BatchLoader, LoopSettings, Task, TrainBatch
from fastdiff.training.trackers import make_tracker
from fastdiff.training.validation import mean_loss, validation_losses
from fastdiff.types import Batch

log = logging.getLogger("fastdiff.train")
#: Images per prompt in a preview grid (seeds ``seed``, ``seed + 1``, ...).
PREVIEW_SEEDS = 2
#: Batch tensors the loop moves to the run's device: the pixels, or what a cache serves instead.
ON_DEVICE = ("pixel_values", "latents", "latents_std", "prompt_embeds", "pooled_prompt_embeds")


@dataclass
class LoopResult:
    """What :func:`run` did.

    Attributes:
        losses: Loss of every step this process ran, in order (``nan``/``inf`` where skipped); with
            gradient accumulation the mean of the step's micro-batch losses.
        first_step: Number of the first of them (1, or the checkpoint's step + 1 on resume).
        skipped_steps: Steps (of the whole run, resumed ones included) whose loss or gradients were not
            finite, or that were skipped loss spikes (``skip_spikes``), and that did not update the weights.
        spike_steps: Steps of this process's run that the spike detector flagged (skipped or not).
        validation: ``(step, validation loss)`` of each evaluation this process ran (rank 0 only).
        full_modules: With sharded modules (``sharded_modules`` on several ranks), unsharded copies of
            them holding the trained weights (EMA is refused with sharding), by the same names: what
            to save (:meth:`fastdiff.training.distributed.FullyShardedDataParallel.full_modules`);
            else empty.
        overflow_steps: fp16 steps that ``GradScaler`` skipped because the scaled gradients overflowed
            (normal while it calibrates its scale; not counted in ``skipped_steps``).
        seconds: Wall time of the loop in seconds.
        data_seconds: Part of ``seconds`` spent waiting for the loader's next batch (each step's loss
            is read back with ``.item()``, so on CUDA the GPU work of a step is inside its own time).
    """

    losses: list[float]
    first_step: int
    skipped_steps: int
    overflow_steps: int
    seconds: float
    data_seconds: float = 0.0
    spike_steps: list[int] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    full_modules: dict[str, torch.nn.Module] = field(default_factory=dict)


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mixed_precision`` (``"no"``, ``"fp16"``, ``"bf16"``) on ``device``.

    Returns:
        ``None`` for full float32, else ``torch.float16`` or ``torch.bfloat16``.

    Raises:
        ValueError: ``"fp16"`` on a non-CUDA device (its gradient scaler is for CUDA), or an unknown value.
    """
    if mixed_precision == "no":
        return None
    if mixed_precision == "fp16":
        if device.type != "cuda":
            raise ValueError(f"mixed_precision 'fp16' needs a CUDA device, got {device}; use 'bf16' or 'no'")
        return torch.float16
    if mixed_precision == "bf16":
        return torch.bfloat16
    raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}")


def make_optimizer(params: Sequence[torch.nn.Parameter], config: LoopSettings) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019) over ``params``; bitsandbytes' 8-bit AdamW with ``use_8bit_adam``.

    Raises:
        ValueError: ``learning_rate`` is unset (``None``: the run did not resolve its default).
        ImportError: ``use_8bit_adam`` without bitsandbytes installed.
    """
    if config.learning_rate is None:
        raise ValueError("learning_rate is unset: resolve the model's default before building the optimizer")
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: LoopSettings
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' ``get_scheduler``: linear warmup over ``lr_warmup_steps``, then constant, cosine or
    linear decay to 0 at ``max_steps`` (stepped once per optimizer step)."""
    from diffusers.optimization import get_scheduler

    name = config.lr_scheduler
    if name == "constant" and config.lr_warmup_steps > 0:
        name = "constant_with_warmup"
    return get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_steps,
    )


def epochs_of(
    loader: BatchLoader, first_epoch: int, steps_done: Callable[[], int] = lambda: 0
) -> Generator[Batch, None, None]:
    """Batches of ``loader`` over epochs ``first_epoch, first_epoch + 1, …`` (``set_epoch`` each time);
    a :class:`~fastdiff.training.curriculum.ResolutionCurriculum` first advances to the stage of
    ``steps_done()`` (the optimizer steps done when the epoch starts).

    The first epoch may yield none when it is the empty rest of a resumed epoch.

    Raises:
        RuntimeError: An epoch yielded no batches (the loader has none per epoch).
    """
    epoch = first_epoch
    while True:
        if isinstance(loader, ResolutionCurriculum):
            loader.advance(steps_done())
        loader.set_epoch(epoch)
        count = 0
        for batch in loader:
            count += 1
            yield batch
        if count == 0 and (epoch != first_epoch or len(loader) == 0):
            raise RuntimeError(f"epoch {epoch} of the loader yielded no batches")
        epoch += 1


def resumed_step(step: int, saved_samples: int, samples: int) -> int:
    """The step count of a run resumed with ``samples`` samples per optimizer step from a checkpoint
    of ``step`` steps of ``saved_samples``: the steps of the samples seen, ``step * saved_samples //
    samples`` (rounded down: the part of a step left over is not counted)."""
    return step * saved_samples // samples


def advance_lr_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> None:
    """Step a fresh ``scheduler`` ``steps`` times: the state a run of that many steps leaves (the
    schedules of :func:`make_lr_scheduler` are functions of the step count alone)."""
    with warnings.catch_warnings():
        # torch warns when the scheduler steps before the optimizer ever did: intended here.
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            scheduler.step()


def run(
    task: Task,
    loader: BatchLoader,
    config: LoopSettings,
    device: torch.device,
    *,
    preview_prompts: Sequence[str] = (),
    preview_sizes: Sequence[tuple[int, int]] = (),
    resume_must_match: Sequence[str] = (),
    checkpoint_files: Callable[[Path], None] | None = None,
    validation_loader: BatchLoader | None = None,
    sharded_modules: Mapping[str, torch.nn.Module] | None = None,
) -> LoopResult:
    """Train ``task`` for ``config.max_steps`` optimizer steps on ``loader``'s batches.

    One step: take ``gradient_accumulation_steps`` batches; drop captions with ``caption_dropout``;
    for each, ``task.loss`` under autocast (``mixed_precision``) and backward of ``loss / accumulation``
    (scaled by ``GradScaler`` for fp16); unscale, clip the global L2 gradient norm to
    ``max_grad_norm``; optimizer step; LR scheduler step; EMA update (``ema_decay > 0``, diffusers
    ``EMAModel`` over the trainable parameters).

    Stability guard: when a micro-batch's loss is not finite, its backward is not run, the step's
    gradients are discarded and the weights, optimizer and EMA are left untouched; the same when the
    gradient norm is not finite (bf16/fp32; with fp16, ``GradScaler`` skips overflowing steps itself and
    they are counted as ``overflow_steps``). The step is counted, logged with its batches' paths, and
    still advances the step counter and the LR schedule. ``max_consecutive_skips`` skipped steps in a
    row stop the run.

    Monitoring: each step's row of ``OUTPUT/loss.csv`` holds its loss, the global gradient norm before
    clipping (as ``clip_grad_norm_`` returns it, of the unscaled gradients with fp16) and the learning
    rate it used. The loss-spike detector (:class:`~fastdiff.training.monitor.SpikeDetector`,
    ``spike_k``/``spike_window``) judges each finite step loss against the window of the ones before;
    a spike is logged with every rank's batch paths (gathered) and written to ``OUTPUT/spikes.jsonl``;
    with ``skip_spikes`` its update is skipped on every rank (all ranks see the same all-reduced loss,
    so they decide alike) and counted in ``skipped_steps``. Every sample's unweighted loss and noise
    level (:attr:`~fastdiff.training.protocols.Task.last_sample_losses`, every rank's, gathered at the
    end) are binned into ``OUTPUT/loss_by_timestep.csv`` and ``.png`` (the steps this process ran).

    Checkpoints (every ``checkpoint_every`` steps, ``OUTPUT/checkpoint-STEP/``): the trainable
    parameters (``trainable.safetensors``), optimizer, LR scheduler, EMA, GradScaler, counters and
    every RNG state (``training_state.pt``), the loader's ``state_dict()`` (``loader.json``) and the
    config (``train_config.json``), plus ``checkpoint_files(folder)``. ``config.resume`` restores all of
    them, so the next step's loss equals an uninterrupted run's (bit-exact on CPU with the same torch
    thread count), and appends to ``OUTPUT/loss.csv`` (rows after the checkpoint's step are dropped).

    Validation (with ``validation_loader``: every ``validate_every`` steps and after the last): the
    mean loss over its images with noise, timesteps and posterior draws fixed per sample
    (:func:`~fastdiff.training.validation.validation_losses`), under ``torch.no_grad`` in eval mode,
    with the EMA weights when EMA is on (the weights that are saved), under ``torch.random.fork_rng``;
    appended to ``OUTPUT/val_loss.csv`` and logged. With several ranks rank 0 evaluates every image
    (all ranks hold the same weights) while the others wait at a barrier.

    Trackers (``report_to``, :mod:`~fastdiff.training.trackers`, rank 0): each step's loss, gradient
    norm, learning rate, skipped steps so far and data-wait share so far, each validation loss and each
    preview grid also go to TensorBoard event files in ``OUTPUT/tensorboard/`` and/or an offline wandb
    run in ``OUTPUT/wandb/``.

    Previews (every ``preview_every`` steps and after the last): ``task.preview`` of
    ``preview_prompts`` with :data:`PREVIEW_SEEDS` seeds from ``seed`` at each of ``preview_sizes``,
    EMA weights when EMA is on, under ``torch.random.fork_rng`` so that training randomness is
    unaffected; one grid per size (a row per prompt, a column per seed), saved as
    ``OUTPUT/previews/step-NNNNNN-WxH.png`` (:func:`~fastdiff.training.outputs.save_sample_grid`).

    After the last step, EMA weights (when on) are copied into the model before the caller saves it.

    Several ranks (a torchrun process group, :mod:`~fastdiff.training.distributed`): the loss goes
    through DDP, so the gradients are averaged over the ranks at each step's last micro-batch
    (``no_sync`` before it); every random draw is made for the global batch (see
    :class:`~fastdiff.training.protocols.TrainBatch`), so all ranks keep identical weights, optimizer
    states and generators; the logged loss is the mean over ranks (a non-finite loss on any rank
    skips the step on all). Rank 0 alone writes ``loss.csv``, previews, checkpoints and the progress
    bar and log lines; a checkpoint holds every rank's RNG states (gathered) and the number of ranks.
    With ``sharded_modules`` (``--fsdp``) those modules are sharded with FSDP2 instead
    (:class:`~fastdiff.training.distributed.FullyShardedDataParallel`): the optimizer holds the shards,
    checkpoints the full weights and full optimizer state, previews and validation run on every rank
    (rank 0 writes), and the run ends with unsharded copies (:attr:`LoopResult.full_modules`).
    A run resumed with another global batch (``batch_size`` × ranks × accumulation) continues at the
    step of the samples seen (:func:`resumed_step`; the LR schedule too), and says so in the log.

    Args:
        task: The model side.
        loader: Batches (``pixel_values`` or cached ``latents``/``prompt_embeds``, ``captions``,
            ``paths``, …); the tensors of :data:`ON_DEVICE` go to ``device``.
        config: The run's resolved settings (``learning_rate`` set).
        device: Where the task's modules are.
        preview_prompts: Prompts of the previews (none: no previews).
        preview_sizes: ``(width, height)`` in pixels of each preview grid's images.
        validation_loader: The held-out images (a loader built with ``validation=True``, unshuffled,
            of this rank alone); ``None``: no validation loss.
        sharded_modules: Modules of ``task`` whose parameters are all trained, to shard over the ranks
            (FSDP2) instead of replicating the trainable parameters (DDP); ``None``: DDP.
        checkpoint_files: Writes extra files into each checkpoint folder (e.g. a LoRA adapter), from
            the EMA weights when EMA is on, as the final output.
        resume_must_match: Settings (names in ``config.to_json()``) that ``config.resume``'s
            checkpoint must share with this run.

    Returns:
        Losses and counters.

    Raises:
        RuntimeError: ``max_consecutive_skips`` steps in a row were skipped, or an epoch was empty.
        ValueError: ``config.resume`` is a checkpoint of an incompatible run.
        FileNotFoundError: ``config.resume`` holds no checkpoint.
    """
    from tqdm.auto import tqdm

    amp_dtype = autocast_dtype(config.mixed_precision, device)
    model = (
        distributed.DataParallel(task)
        if sharded_modules is None
        else distributed.FullyShardedDataParallel(task, sharded_modules)
    )
    params_by_name = task.trainable()
    params = list(params_by_name.values())
    if not params:
        raise ValueError("the task has no trainable parameters")
    optimizer = make_optimizer(params, config)
    lr_scheduler = make_lr_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler(device.type, enabled=config.mixed_precision == "fp16")
    ema = None
    if config.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=config.ema_decay)
        ema.to(device)
    noise_gen = torch.Generator(device).manual_seed(config.seed)
    caption_rng = random.Random(config.seed)
    pin = device.type == "cuda"
    checkpointer = Checkpointer(config.output, config.to_json(), resume_must_match, task, loader)
    rank, world_size, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    accumulation = config.gradient_accumulation_steps
    samples_per_step = (config.batch_size or 1) * world_size * accumulation

    detector = SpikeDetector(config.spike_k, config.spike_window)
    step = skipped = consecutive = overflow = 0
    first_epoch = 0
    if config.resume is not None:
        folder = find_checkpoint(config.resume)
        state = checkpointer.load(folder)
        model.load_optimizer_state(optimizer, state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
            ema.to(device)  # the loaded averages are on the CPU (map_location), the weights on `device`
        # Every rank's own states when the rank count is the same; else rank 0's, which all ranks
        # shared (every draw is made for the global batch).
        saved_ranks = int(state.get("world_size", 1))
        rngs = state.get("rng_ranks") or [state["rng"]]
        set_rng_state(rngs[rank] if saved_ranks == world_size else rngs[0], noise_gen, caption_rng)
        step, skipped, consecutive, overflow = (
            int(state[k]) for k in ("step", "skipped", "consecutive", "overflow")
        )
        if state.get("spike_detector") is not None:
            detector.load_state_dict(state["spike_detector"])
        saved_samples = int(state.get("samples_per_step", samples_per_step))
        if saved_samples != samples_per_step:
            steps = resumed_step(step, saved_samples, samples_per_step)
            if main:
                log.warning(
                    "resuming with %d samples per step (batch_size %s x %d ranks x %d accumulation) from "
                    "a checkpoint of %d (%d ranks): its step %d (%d samples seen) is step %d here",
                    samples_per_step,
                    config.batch_size,
                    world_size,
                    accumulation,
                    saved_samples,
                    saved_ranks,
                    step,
                    step * saved_samples,
                    steps,
                )
            step = steps
            lr_scheduler = make_lr_scheduler(optimizer, config)
            advance_lr_scheduler(lr_scheduler, step)
        first_epoch = loader.epoch  # type: ignore[attr-defined]
        if main:
            log.info("resumed from %s at step %d", folder, step)

    first_step = step + 1
    loss_log = spike_log = val_log = tracker = None
    if main:
        tracker = make_tracker(config.report_to, config.output, config.to_json())
        config.output.mkdir(parents=True, exist_ok=True)
        loss_log = LossLog(config.output / "loss.csv", first_step)
        spike_log = SpikeLog(config.output / "spikes.jsonl", first_step)
        if validation_loader is not None:
            val_log = ValidationLog(config.output / "val_loss.csv", first_step)
    validation: list[tuple[int, float]] = []
    batches = epochs_of(loader, first_epoch, lambda: step - 1)  # read while fetching step `step`
    losses: list[float] = []
    spike_steps: list[int] = []
    by_noise_level = LossByNoiseLevel()
    task.train_mode(True)
    start = time.perf_counter()
    data_seconds = 0.0

    def user_files(folder: Path) -> None:
        # The files a user loads from a checkpoint hold what the run's output would: the EMA weights.
        # (The raw weights that resuming needs are in the checkpoint's trainable file.)
        if checkpoint_files is None:
            return
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        try:
            checkpoint_files(folder)
        finally:
            if ema is not None:
                ema.restore(params)

    def validate(at: int) -> None:
        if validation_loader is None:
            return
        if main or model.sharded:  # sharded weights: every rank takes part in each forward
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if ema is not None:
                    ema.store(params)
                    ema.copy_to(params)
                try:
                    per_sample = validation_losses(
                        task,
                        validation_loader,
                        seed=config.seed,
                        device=device,
                        amp_dtype=amp_dtype,
                        on_device=ON_DEVICE,
                    )
                finally:
                    if ema is not None:
                        ema.restore(params)
            value = mean_loss(per_sample)
        if main:
            validation.append((at, value))
            if val_log is not None:
                val_log.write(at, value, len(per_sample))
            if tracker is not None:
                tracker.scalars(at, {"val/loss": value})
            weights = " (EMA weights)" if ema is not None else ""
            log.info("step %d: validation loss %.6g over %d images%s", at, value, len(per_sample), weights)
        distributed.barrier()

    def preview(at: int) -> None:
        if not preview_prompts:
            return
        grids = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if ema is not None:
                ema.store(params)
                ema.copy_to(params)
            task.train_mode(False)
            try:
                seeds = [config.seed + i for i in range(PREVIEW_SEEDS)]
                for width, height in preview_sizes:
                    grids.append(
                        task.preview(
                            preview_prompts,
                            seeds=seeds,
                            steps=config.preview_steps,
                            width=width,
                            height=height,
                        )
                    )
            finally:
                task.train_mode(True)
                if ema is not None:
                    ema.restore(params)
        if not main:
            return
        folder = config.output / "previews"
        folder.mkdir(exist_ok=True)
        for (width, height), images in zip(preview_sizes, grids, strict=True):
            save_sample_grid(images, preview_prompts, folder / f"step-{at:06d}-{width}x{height}.png")
            if tracker is not None:
                # Prompt-major [P * S, 3, H, W] as one [3, P * H, S * W] grid: a row per prompt.
                rows, channels = len(preview_prompts), images.shape[1]
                grid = images.view(rows, -1, channels, height, width).permute(2, 0, 3, 1, 4)
                tracker.image(at, f"previews/{width}x{height}", grid.reshape(channels, rows * height, -1))

    try:
        with tqdm(total=config.max_steps, initial=step, desc="train", unit="step", disable=not main) as bar:
            while step < config.max_steps:
                step += 1
                waited = time.perf_counter()
                micro = [next(batches) for _ in range(accumulation)]
                data_seconds += time.perf_counter() - waited
                values: list[float] = []
                finite = True
                for i, loaded in enumerate(micro):
                    captions, dropped = drop_captions(
                        loaded["captions"], config.caption_dropout, caption_rng, rank, world_size
                    )
                    # A copy: the loader's batch keeps its own tensors and captions.
                    on_device: dict[str, Any] = {
                        **loaded,
                        "captions": captions,
                        "captions_dropped": dropped,
                        "rank": rank,
                        "world_size": world_size,
                    }
                    for name in ON_DEVICE:
                        if name in on_device:
                            tensor = on_device[name]
                            on_device[name] = (tensor.pin_memory() if pin else tensor).to(
                                device, non_blocking=pin
                            )
                    batch = cast(TrainBatch, on_device)
                    last = i == accumulation - 1
                    with model.no_sync(not last):
                        loss = model.loss(batch, generator=noise_gen, amp_dtype=amp_dtype)
                        # The mean over ranks: every rank skips a step that is not finite on one.
                        value = distributed.mean(loss)
                        values.append(value)
                        if not math.isfinite(value):
                            finite = False
                            break
                        if task.last_sample_losses is not None:
                            levels, per_sample = task.last_sample_losses
                            by_noise_level.add(levels.numpy(), per_sample.numpy())
                        scaler.scale(loss / accumulation).backward()
                step_loss = float(np.mean(values)) if finite else values[-1]
                lr = float(optimizer.param_groups[0]["lr"])
                grad_norm = float("nan")
                reason = "" if finite else "loss"
                spike = detector.check(step, step_loss)
                if spike is not None:
                    spike_steps.append(step)
                    paths = [p for rank_paths in distributed.gather(batch_paths(micro)) for p in rank_paths]
                    skip = config.skip_spikes
                    if main:
                        log.warning(
                            "step %d: loss spike %.6g > %.6g (median %.6g + %g x %g x MAD %.6g)%s "
                            "(batch: %s)",
                            step,
                            step_loss,
                            spike.threshold,
                            spike.median,
                            config.spike_k,
                            MAD_SCALE,
                            spike.mad,
                            ", update skipped" if skip else "",
                            ", ".join(paths),
                        )
                    if spike_log is not None:
                        spike_log.write({**asdict(spike), "skipped": skip, "paths": paths})
                    if skip:
                        reason = "spike"
                        # The gradients' norm without unscale_ (whose GradScaler state a skipped
                        # step must not leave behind): the scaled norm over the scale.
                        grads = [p.grad for p in params if p.grad is not None]
                        grad_norm = float(torch.nn.utils.get_total_norm(grads)) / scaler.get_scale()
                if not (spike is not None and config.skip_spikes):
                    detector.add(step_loss)
                if finite and not reason:
                    scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    grad_norm = float(norm)  # (of the full gradients when they are sharded DTensors)
                    grads_finite = math.isfinite(grad_norm)
                    if scaler.is_enabled():
                        scale = scaler.get_scale()
                        scaler.step(optimizer)  # skips the update itself when the gradients overflowed
                        scaler.update()
                        if not grads_finite or scaler.get_scale() < scale:
                            overflow += 1
                        elif ema is not None:
                            ema.step(params)
                    elif grads_finite:
                        optimizer.step()
                        if ema is not None:
                            ema.step(params)
                    else:
                        reason = "gradient"
                optimizer.zero_grad(set_to_none=True)
                lr_scheduler.step()
                if reason:
                    skipped += 1
                    consecutive += 1
                    paths = batch_paths(micro)
                    what = "a loss spike" if reason == "spike" else f"a non-finite {reason}"
                    if main and reason != "spike":
                        log.warning(
                            "step %d skipped: non-finite %s (batch: %s)", step, reason, ", ".join(paths)
                        )
                    if consecutive >= config.max_consecutive_skips:
                        raise RuntimeError(
                            f"{consecutive} consecutive steps (up to step {step}) were skipped, the last for "
                            f"{what}; stopping. Last batch: {', '.join(paths) or '?'}. Check those images, "
                            "lower learning_rate, or use mixed_precision 'no' or 'bf16'."
                        )
                else:
                    consecutive = 0
                losses.append(step_loss)
                if loss_log is not None:
                    loss_log.write(step, step_loss, grad_norm, lr)
                if tracker is not None:
                    elapsed = time.perf_counter() - start
                    tracker.scalars(
                        step,
                        {
                            "train/loss": step_loss,
                            "train/grad_norm": grad_norm,
                            "train/lr": lr,
                            "train/skipped_steps": skipped,
                            "train/data_wait_share": data_seconds / elapsed if elapsed > 0 else 0.0,
                        },
                    )
                bar.set_postfix(loss=f"{step_loss:.4f}", skipped=skipped, refresh=False)
                bar.update()
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    state = {
                        "step": step,
                        "skipped": skipped,
                        "consecutive": consecutive,
                        "overflow": overflow,
                        "optimizer": model.optimizer_state(optimizer),
                        "lr_scheduler": lr_scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None,
                        "spike_detector": detector.state_dict(),
                        "rng": rng_state(noise_gen, caption_rng),
                        "world_size": world_size,
                        "samples_per_step": samples_per_step,
                    }
                    state["rng_ranks"] = distributed.gather(state["rng"])
                    with model.unsharded():
                        if main:
                            checkpointer.save(step, state, user_files)
                if config.validate_every and step % config.validate_every == 0:
                    validate(step)
                if (main or model.sharded) and config.preview_every and step % config.preview_every == 0:
                    preview(step)
        if not config.validate_every or step % config.validate_every != 0:
            validate(step)
        if (main or model.sharded) and config.preview_every and step % config.preview_every != 0:
            preview(step)
    finally:
        for opened in (loss_log, spike_log, val_log, tracker):
            if opened is not None:
                opened.close()
        batches.close()
    seconds = time.perf_counter() - start
    for other in distributed.gather(by_noise_level)[1:]:
        by_noise_level.merge(other)
    if main and by_noise_level.counts.any():
        write_loss_by_timestep(
            by_noise_level.rows(),
            config.output / "loss_by_timestep.csv",
            config.output / "loss_by_timestep.png",
            title=f"loss by noise level, steps {first_step}-{step}",
        )
    if ema is not None:
        ema.copy_to(params)
    full = model.full_modules()
    return LoopResult(
        losses, first_step, skipped, overflow, seconds, data_seconds, spike_steps, validation, full
    )


def batch_paths(micro: Sequence[Batch]) -> list[str]:
    """The image paths of a step's micro-batches, in order (none where a batch has no ``paths``)."""
    return [p for b in micro for p in b.get("paths", [])]
