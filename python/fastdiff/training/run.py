"""``fastdiff train``: build the run from its :class:`~fastdiff.training.config.TrainConfig`, train,
write the outputs.

:func:`train` resolves the settings (the dataset config's loader options, the model's defaults), builds
the loader (:class:`fastdiff.DataLoader`) and the model side (:class:`~fastdiff.training.tiny.TinyTask`
from scratch, :class:`~fastdiff.training.sd.PipelineTask` for a Stable Diffusion ``model``,
:class:`~fastdiff.training.dit.DiTTask` for a flow-matching DiT folder (SD3, FLUX.1, Z-Image)), runs
:func:`fastdiff.training.loop.run` (AMP, accumulation, clipping, EMA, min-SNR, non-finite guard,
checkpoints and exact resume, previews, ``loss.csv``), then plots the loss and saves the weights.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastdiff.cache.command import build_for_config
from fastdiff.cache.encoders import model_kind
from fastdiff.cache.entries import empty_entry, empty_prompt
from fastdiff.cache.manifest import MANIFEST, read_manifest
from fastdiff.loader import DataLoader
from fastdiff.training import distributed, loop
from fastdiff.training.config import (
    DEFAULT_PREVIEW_PROMPTS,
    DEFAULT_PREVIEW_SIZES,
    RESUME_MUST_MATCH,
    TrainConfig,
    parse_sizes,
)
from fastdiff.training.curriculum import ResolutionCurriculum
from fastdiff.training.dit import DiTTask
from fastdiff.training.dit_pipeline import dit_family
from fastdiff.training.flags import config_from_args
from fastdiff.training.loop import autocast_dtype
from fastdiff.training.outputs import plot_loss, read_loss_csv, read_val_loss_csv
from fastdiff.training.protocols import BatchLoader
from fastdiff.training.sd import PipelineTask
from fastdiff.training.setup import (
    make_batches,
    make_loader,
    make_validation,
    resolve_device,
    with_dataset_options,
)
from fastdiff.training.tiny import TinyTask

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        output: The output folder (see :class:`TrainConfig`).
        config: The run's settings with the path-dependent defaults filled in.
        losses: Loss of every step this process ran, in order (``nan``/``inf`` where the step was
            skipped); a resumed run starts at ``first_step``.
        first_step: Step number of ``losses[0]``.
        skipped_steps: Steps whose loss or gradients were not finite, or skipped loss spikes
            (``skip_spikes``); they did not update the weights.
        spike_steps: Steps of this run that the loss-spike detector flagged (see ``spikes.jsonl``).
        validation: ``(step, validation loss)`` of each evaluation of this run (``val_loss.csv``).
        overflow_steps: fp16 steps skipped by the gradient scaler (see
            :class:`fastdiff.training.loop.LoopResult`).
        seconds: Wall time of the training loop in seconds (model building and saving excluded).
        data_seconds: Part of ``seconds`` spent waiting for batches from the loader.
        device: The torch device trained on.
        unet: The trained UNet (on ``device``; EMA weights when EMA is on); ``None`` for a DiT.
        text_encoder: The (first) text encoder (on ``device``); ``None`` for a DiT.
        tokenizer: The (first) tokenizer; ``None`` for a DiT.
        noise_scheduler: The DDPM training noise schedule; ``None`` for a DiT.
        pipeline: The fine-tuned diffusers pipeline (``None`` from scratch); it holds ``unet`` and
            ``text_encoder`` (or ``transformer``), with LoRA adapters active.
        transformer: A DiT pipeline's trained transformer (EMA weights when EMA is on), else ``None``.
    """

    output: Path
    config: TrainConfig
    losses: list[float]
    first_step: int
    skipped_steps: int
    overflow_steps: int
    seconds: float
    data_seconds: float
    device: torch.device
    spike_steps: list[int] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    unet: UNet2DConditionModel | None = None
    text_encoder: CLIPTextModel | None = None
    tokenizer: Any = None
    noise_scheduler: DDPMScheduler | None = None
    pipeline: Any = None
    transformer: Any = None

    @property
    def loss_csv(self) -> Path:
        """``output/loss.csv``: columns ``step,loss,grad_norm,lr``
        (:data:`~fastdiff.training.outputs.LOSS_COLUMNS`), one row per step, steps counted from 1."""
        return self.output / "loss.csv"

    @property
    def loss_png(self) -> Path:
        """``output/loss.png``: the loss curve."""
        return self.output / "loss.png"


def dataset_captions(config: TrainConfig, loader: BatchLoader) -> list[str]:
    """The caption of each training image, in file order (``""`` where an image has none).

    Args:
        config: The run's settings.
        loader: The run's loader: its ``captions`` (:attr:`fastdiff.DataLoader.captions`) if it has
            them, else those of a :func:`make_loader` of ``config`` (a header scan of ``data``).
    """
    captions = getattr(loader, "captions", None)
    return list(captions) if captions is not None else make_loader(config).captions


def cached_halves(config: TrainConfig) -> set[str]:
    """The halves (``"latents"``, ``"text"``) that ``config.cache`` holds for ``config.model``: what the
    run takes from the batches instead of loading the VAE / the text encoders (none without a cache).

    Raises:
        ValueError: ``config.cache`` has no manifest (not built yet: ``fastdiff cache`` or
            ``--cache-build``), or was built from a pipeline of another kind than ``config.model``.
        FileNotFoundError: As :func:`~fastdiff.cache.encoders.model_kind`.
    """
    if config.cache is None:
        return set()
    assert config.model is not None
    manifest = read_manifest(config.cache)
    if manifest is None:
        raise ValueError(
            f"cache {config.cache} has no {MANIFEST}: build it with `fastdiff cache --model "
            f"{config.model} --data {config.data} --output {config.cache}` or pass --cache-build"
        )
    kind = model_kind(config.model, config.model_config)
    if manifest.get("kind") != kind:
        raise ValueError(
            f"cache {config.cache} holds {manifest.get('kind')} entries (of {manifest.get('model')}), "
            f"but {config.model} is an {kind} pipeline"
        )
    return {half for half in ("latents", "text") if half in manifest}


def preview_sizes(config: TrainConfig, loader: BatchLoader, multiple: int) -> list[tuple[int, int]]:
    """``(width, height)`` of the run's previews: ``config.preview_sizes``, else the
    :data:`~fastdiff.training.config.DEFAULT_PREVIEW_SIZES` buckets holding the most images in the
    loader's report (``images_per_bucket``; ties: the earlier bucket), else (a loader without a
    report) the square ``resolution``.

    Raises:
        ValueError: A given size is not a multiple of ``multiple`` (the model's downsampling).
    """
    sizes = parse_sizes(config.preview_sizes)
    bad = [f"{w}x{h}" for w, h in sizes if w % multiple or h % multiple]
    if bad:
        raise ValueError(
            f"preview_sizes {', '.join(bad)}: width and height must be multiples of {multiple} "
            "(the model's downsampling)"
        )
    if sizes:
        return sizes
    report = getattr(loader, "report", None)
    if report is None or not report.get("images_per_bucket"):
        assert config.resolution is not None
        return [(config.resolution, config.resolution)]
    populated = sorted(report["images_per_bucket"], key=lambda bucket: -bucket[1])  # stable: ties keep order
    return [(w, h) for (h, w), _ in populated[:DEFAULT_PREVIEW_SIZES]]


def train(config: TrainConfig, loader: BatchLoader | None = None) -> TrainResult:
    """Train the tiny model from scratch, or fine-tune the Stable Diffusion or DiT pipeline ``config.model``.

    Each step takes a batch (any aspect bucket) from the loader, replaces captions by ``""`` with
    probability ``caption_dropout`` and minimises the diffusion loss (the "simple" objective of Ho et
    al. 2020, eq. 14, optionally min-SNR-γ weighted) with AdamW (Loshchilov & Hutter 2019) after
    clipping the global gradient norm; see :func:`fastdiff.training.loop.run` for accumulation, mixed
    precision, EMA, the non-finite guard, checkpoints, ``--resume`` and previews. Epochs restart the
    loader with ``set_epoch`` until ``max_steps`` steps ran.

    Files written to ``config.output``: ``loss.csv`` (``step,loss,grad_norm,lr``, written as training
    goes), ``loss.png`` (every step in ``loss.csv``), ``spikes.jsonl`` (flagged loss spikes and their
    batches), ``loss_by_timestep.csv``/``.png`` (loss binned by noise level), ``train_config.json``
    (resolved settings), checkpoints,
    previews, and the weights: from scratch ``unet/``, ``text_encoder/`` (``save_pretrained``,
    safetensors), ``tokenizer/``, ``scheduler/``; a full fine-tune the whole pipeline; LoRA
    ``pytorch_lora_weights.safetensors`` (what diffusers' ``load_lora_weights`` reads).

    Under torchrun (``WORLD_SIZE > 1``) the process joins the process group
    (:func:`fastdiff.training.distributed.join`; the caller may :func:`~fastdiff.training.distributed.leave`
    it after) and trains data-parallel: each rank's loader takes its slice of every global batch of
    ``batch_size * world_size``; rank 0 alone writes the files (with ``cache_build`` every rank
    encodes its share of the cache first).

    Args:
        config: The run's settings.
        loader: Batches to train on; ``None`` builds :func:`make_batches` from the resolved config. The
            from-scratch vocabulary and the default preview prompts come from
            :func:`dataset_captions`. With ``resolution_schedule``, it must be a
            :class:`~fastdiff.training.curriculum.ResolutionCurriculum` (else the schedule would not apply).

    Returns:
        Losses, counters, timings and the trained models.

    Raises:
        ValueError: The loader has no batches, the settings are invalid for the device or model,
            ``resume`` does not match the run, or ``resolution_schedule`` is set with a ``loader`` that
            is not a :class:`~fastdiff.training.curriculum.ResolutionCurriculum`.
        FileNotFoundError: ``model`` or ``resume`` does not exist.
        RuntimeError: Too many consecutive non-finite steps, or an epoch yielded no batches.
    """
    if config.resolution_schedule and loader is not None and not isinstance(loader, ResolutionCurriculum):
        raise ValueError("resolution_schedule needs loader=None or a ResolutionCurriculum loader")
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    device = distributed.join(resolve_device(config.device))
    autocast_dtype(config.mixed_precision, device)  # fail before loading anything
    config = with_dataset_options(config)
    pipeline = None
    task: TinyTask | PipelineTask | DiTTask
    checkpoint_files: Callable[[Path], None] | None = None
    if config.model is None:
        config = config.resolved(resolution=64, bucket_step=16, learning_rate=1e-3, prediction_type="epsilon")
        batches = make_batches(config) if loader is None else loader
        captions = dataset_captions(config, batches)
        task = TinyTask(config, device, captions)
    else:
        if config.cache_build:
            build_for_config(config, device=device, split=True)
        cached = cached_halves(config)
        cache = config.cache
        family = dit_family(config.model)
        if family is not None and config.fsdp:
            raise ValueError(
                f"fsdp is not supported for DiT pipelines ({config.model}) yet (the from-scratch model "
                "and SD/SDXL full fine-tunes are): train without --fsdp"
            )
        if family is not None:
            entry = None if cache is None else lambda: empty_entry(cache)
            task = DiTTask.from_config(config, device, family, cached=cached, empty_entry=entry)
        else:
            empty = None if cache is None else lambda: empty_prompt(cache)
            task = PipelineTask.from_config(config, device, cached=cached, empty_prompt=empty)
        config = task.config
        pipeline = task.pipeline
        checkpoint_files = task.checkpoint_files
        batches = make_batches(config) if loader is None else loader
        captions = dataset_captions(config, batches) if config.preview_every else []
    if len(batches) == 0:
        raise ValueError(f"no training batches in {config.data}")
    validation_loader = make_validation(config)
    if config.validate_every and validation_loader is None:
        raise ValueError(f"validate_every needs held-out images: {config.data} sets no validation_split > 0")
    if config.cache is not None and isinstance(validation_loader, DataLoader):
        lacking = sum(not cached for _, cached in validation_loader.build_latent_keys())
        if lacking:
            raise ValueError(
                f"cache {config.cache} lacks {lacking} of the {validation_loader.report['loaded']} "
                "held-out images' latents (validation_split; center crop, no flip): pass "
                "--cache-build, or rebuild with `fastdiff cache` and the same --validation-split"
            )
    prompts = config.preview_prompts
    if config.preview_every and not prompts:
        first_lines = (c.split("\n", 1)[0] for c in captions if c)
        prompts = tuple(dict.fromkeys(first_lines))[:DEFAULT_PREVIEW_PROMPTS]
    sizes = preview_sizes(config, batches, task.size_multiple) if config.preview_every else []

    main = distributed.is_main()
    if main:
        config.output.mkdir(parents=True, exist_ok=True)
        (config.output / "train_config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")
    result = loop.run(
        task,
        batches,
        config,
        device,
        preview_prompts=prompts,
        preview_sizes=sizes,
        checkpoint_files=checkpoint_files,
        resume_must_match=RESUME_MUST_MATCH,
        validation_loader=validation_loader,
        sharded_modules=task.sharded_modules() if config.fsdp and not isinstance(task, DiTTask) else None,
    )
    if result.full_modules and not isinstance(task, DiTTask):
        task.use_modules(result.full_modules)  # the trained weights, unsharded (--fsdp)
    name = config.data.name if config.model is None else f"{config.model.name} on {config.data.name}"
    title = f"{name}: {config.prediction_type}, {config.resolution} px, batch {config.batch_size}"
    if main:
        plot_loss(
            read_loss_csv(config.output / "loss.csv"),
            config.output / "loss.png",
            title=title,
            validation=read_val_loss_csv(config.output / "val_loss.csv")
            if validation_loader is not None
            else [],
        )
        task.save(config.output)
    models: dict[str, Any] = (
        {"transformer": task.transformer}
        if isinstance(task, DiTTask)
        else {
            "unet": task.unet,
            "text_encoder": task.text_encoder,
            "tokenizer": task.tokenizer,
            "noise_scheduler": task.noise_scheduler,
        }
    )
    return TrainResult(
        output=config.output,
        config=config,
        losses=result.losses,
        first_step=result.first_step,
        skipped_steps=result.skipped_steps,
        overflow_steps=result.overflow_steps,
        seconds=result.seconds,
        data_seconds=result.data_seconds,
        device=device,
        spike_steps=result.spike_steps,
        validation=result.validation,
        pipeline=pipeline,
        **models,
    )


def run_train(args: argparse.Namespace) -> int:
    """Body of ``fastdiff train``: train, print a summary (rank 0); returns the exit status (0)."""
    try:
        result = train(config_from_args(args))
        main = distributed.is_main()
    finally:
        distributed.leave()
    if not main:
        return 0
    last = result.losses[-1] if result.losses else float("nan")
    waiting = 100 * result.data_seconds / max(result.seconds, 1e-9)
    print(
        f"trained steps {result.first_step}-{result.first_step + len(result.losses) - 1} on {result.device} "
        f"in {result.seconds:.1f} s ({waiting:.0f}% waiting for data), last loss {last:.4f}, "
        f"{result.skipped_steps} steps skipped (non-finite or spike), {len(result.spike_steps)} loss spikes; "
        f"wrote {result.output}"
    )
    if result.validation:
        step, value = result.validation[-1]
        print(f"validation loss at step {step}: {value:.6g} (val_loss.csv)")
    return 0
