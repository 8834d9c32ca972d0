"""``fastdiff train``: a thin text-conditioned diffusion training loop on :class:`fastdiff.DataLoader`.

A small diffusers ``UNet2DConditionModel`` learns to predict the noise added to images (epsilon
prediction, DDPM: Ho et al. 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239; or
optionally the velocity, v-prediction: Salimans & Ho 2022, arXiv:2202.00512) directly in pixel space,
conditioned on the hidden states of a small transformers ``CLIPTextModel`` (Radford et al. 2021) that
is trained jointly from scratch. The tokenizer is a word-level vocabulary built from the dataset's
caption files, so nothing is downloaded.

The pieces are separate functions so that the later Stable Diffusion fine-tuning (VAE latents, LoRA,
EMA, min-SNR weighting, resume) can replace one at a time: :func:`build_tokenizer`,
:func:`build_tiny_models`, :func:`build_noise_scheduler`, :func:`make_loader`, :func:`train`,
:func:`sample`, :func:`plot_loss`.

diffusers, transformers, tokenizers, tqdm and matplotlib (the ``train`` extra) are imported inside the
functions that use them: ``fastdiff.cli`` imports this module to register its arguments, and
``fastdiff scan`` must work, and start fast, without them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

#: Values of ``--mixed-precision``: autocast dtype used for the forward pass (``"no"``: float32).
MIXED_PRECISION = ("no", "fp16", "bf16")
#: Samplers of :func:`sample`: deterministic DDIM or ancestral DDPM.
SAMPLERS = ("ddim", "ddpm")
#: Values of ``--prediction-type``: the network's target (diffusers ``prediction_type`` names).
PREDICTION_TYPES = ("epsilon", "v_prediction")
#: Special tokens of the word-level tokenizer, in id order (``<pad>`` is id 0).
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
#: Caption file extensions read for the vocabulary, as the loader's default ``caption_extensions``.
CAPTION_EXTENSIONS = (".txt", ".caption")
#: Channels per attention head in the UNet and the text encoder.
HEAD_DIM = 16
#: Group count of the UNet's GroupNorm layers; every UNet channel count must be a multiple.
NORM_GROUPS = 8

Batch = dict[str, Any]


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; each field is the ``fastdiff train`` flag of the same name.

    Attributes:
        data: Folder of images and caption files (searched recursively by the loader).
        output: Folder that receives ``loss.csv``, ``loss.png``, ``unet/``, ``text_encoder/``,
            ``tokenizer/``, ``scheduler/`` and ``train_config.json``; created if missing.
        resolution: Bucket resolution in pixels: every batch has ``H * W <= resolution**2``.
        bucket_step: Bucket sides are multiples of this (pixels); must be a multiple of
            ``2 ** (len(unet_channels) - 1)``, the UNet's total downsampling.
        min_bucket_side: Smallest bucket side in pixels (``None``: the loader's default).
        max_bucket_side: Largest bucket side in pixels (``None``: the loader's default).
        crop: Loader crop mode, ``"center"`` or ``"random"``.
        flip_prob: Probability of a horizontal flip per sample.
        batch_size: Images per batch (the last batch of a bucket may be smaller).
        steps: Optimizer steps to run (skipped non-finite steps count too).
        learning_rate: AdamW learning rate (constant).
        weight_decay: AdamW decoupled weight decay.
        max_grad_norm: Gradients are clipped to this global L2 norm.
        mixed_precision: ``"no"``, ``"fp16"`` (CUDA only, with a gradient scaler) or ``"bf16"``.
        caption_dropout: Probability of replacing a caption by ``""`` so the model also learns the
            unconditional prediction that classifier-free guidance needs.
        max_caption_tokens: Token sequence length, special tokens included (longer captions are cut).
        unet_channels: UNet ``block_out_channels``, one resolution level each (multiples of 8; the last
            a multiple of 16); attention runs only on the lowest level and in the mid block.
        layers_per_block: ResNet layers per UNet level.
        text_hidden_size: Text encoder width (multiple of 16), also the UNet's cross-attention width.
        text_layers: Text encoder transformer layers.
        prediction_type: The network's target: ``"epsilon"``, the noise ε (Ho et al. 2020), or
            ``"v_prediction"``, ``v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0`` (Salimans & Ho 2022), whose
            MSE weighs the nearly-pure-noise timesteps, where only the caption tells the image,
            ``1 / ᾱ_t`` times more than epsilon's does.
        num_train_timesteps: Diffusion timesteps T of the DDPM schedule.
        beta_schedule: diffusers ``beta_schedule``; the default ``"squaredcos_cap_v2"`` is the cosine
            schedule of Nichol & Dhariwal 2021 (arXiv:2102.09672), better than linear in pixel space.
        seed: Seed of the model initialisation, the loader's shuffle/crops/flips, noise and dropout.
        num_threads: Loader decode threads (``None``: every core).
        torch_threads: torch intra-op (OpenMP) threads, set process-wide with
            ``torch.set_num_threads`` (``None``: leave torch's setting). On a small CPU shared with
            other work, 1 can be several times faster than all cores: every op of the step waits at
            an OpenMP barrier for all its threads, and each wait costs a scheduler time slice.
        device: ``"auto"`` (CUDA when available, else CPU) or a torch device string.
    """

    data: Path
    output: Path
    resolution: int = 64
    bucket_step: int = 16
    min_bucket_side: int | None = None
    max_bucket_side: int | None = None
    crop: str = "center"
    flip_prob: float = 0.0
    batch_size: int = 8
    steps: int = 500
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    caption_dropout: float = 0.1
    prediction_type: str = "epsilon"
    max_caption_tokens: int = 32
    unet_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    text_hidden_size: int = 64
    text_layers: int = 2
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    seed: int = 0
    num_threads: int | None = None
    torch_threads: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        """Check the values that are not checked later by the loader or the libraries.

        Raises:
            ValueError: A field is out of range; the message names it.
        """
        positive = ("resolution", "bucket_step", "batch_size", "steps", "layers_per_block", "text_layers")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"
            )
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        for name in ("num_threads", "torch_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.max_caption_tokens < 3:
            raise ValueError(
                f"max_caption_tokens must be >= 3 (<bos>, a word, <eos>), got {self.max_caption_tokens}"
            )
        if self.learning_rate <= 0 or self.max_grad_norm <= 0:
            raise ValueError("learning_rate and max_grad_norm must be > 0")
        if not self.unet_channels or any(c < 1 or c % NORM_GROUPS for c in self.unet_channels):
            raise ValueError(f"unet_channels must be multiples of {NORM_GROUPS}, got {self.unet_channels}")
        if self.unet_channels[-1] % HEAD_DIM or self.text_hidden_size < 1 or self.text_hidden_size % HEAD_DIM:
            raise ValueError(f"unet_channels[-1] and text_hidden_size must be multiples of {HEAD_DIM}")
        downsampling = 2 ** (len(self.unet_channels) - 1)
        if self.bucket_step % downsampling:
            raise ValueError(
                f"bucket_step ({self.bucket_step}) must be a multiple of the UNet's downsampling factor "
                f"{downsampling} (2 ** (len(unet_channels) - 1))"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")


class BatchLoader(Protocol):
    """What :func:`train` needs of a loader: :class:`fastdiff.DataLoader` satisfies it.

    Each iteration yields one epoch of batches in the ``fastdiff.DataLoader`` format (at least
    ``pixel_values``: float tensor ``[B, 3, H, W]`` in ``[-1, 1]``, and ``captions``: ``list[str]``).
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


class TinyModels(NamedTuple):
    """The two trained networks."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        output: The output folder (see :class:`TrainConfig`).
        losses: Loss of every step in order (``nan``/``inf`` where the step was skipped).
        skipped_steps: Steps whose loss was not finite; they did not update the weights.
        seconds: Wall time of the training loop in seconds (model building and saving excluded).
        device: The torch device trained on.
        unet: The trained UNet (on ``device``, train mode).
        text_encoder: The trained text encoder (on ``device``, train mode).
        tokenizer: The tokenizer built from the captions.
        noise_scheduler: The DDPM training noise schedule.
    """

    output: Path
    losses: list[float]
    skipped_steps: int
    seconds: float
    device: torch.device
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerFast
    noise_scheduler: DDPMScheduler

    @property
    def loss_csv(self) -> Path:
        """``output/loss.csv``: columns ``step,loss``, one row per step, steps counted from 1."""
        return self.output / "loss.csv"

    @property
    def loss_png(self) -> Path:
        """``output/loss.png``: the loss curve."""
        return self.output / "loss.png"


def read_captions(root: Path, extensions: Sequence[str] = CAPTION_EXTENSIONS) -> list[str]:
    """Read every caption file under ``root``, recursively, sorted by path.

    Args:
        root: Dataset folder.
        extensions: Caption file extensions with their leading dot (compared case-insensitively).

    Returns:
        The stripped contents of each caption file (UTF-8).

    Raises:
        UnicodeDecodeError: A caption file is not valid UTF-8.
    """
    suffixes = {e.lower() for e in extensions}
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    return [p.read_text(encoding="utf-8").strip() for p in files]


def build_tokenizer(captions: Iterable[str], max_length: int) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer whose vocabulary is every word of ``captions``.

    Text is NFKC-normalised and lowercased, split into words and punctuation runs (tokenizers'
    ``Whitespace`` pre-tokenizer), and wrapped as ``<bos> words <eos>``. Unknown words map to ``<unk>``.
    Special tokens take ids 0-3: ``<pad>``, ``<unk>``, ``<bos>``, ``<eos>``.

    Args:
        captions: Texts to take the vocabulary from.
        max_length: ``model_max_length`` of the tokenizer, in tokens (special tokens included).

    Returns:
        A transformers fast tokenizer; ``save_pretrained`` writes it and ``from_pretrained`` (or
        ``AutoTokenizer``) reloads it offline.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token=UNK))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, UNK, BOS, EOS], show_progress=False)
    core.train_from_iterator(sorted(captions), trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, core.token_to_id(BOS)), (EOS, core.token_to_id(EOS))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=max_length,
    )


def tokenize(tokenizer: PreTrainedTokenizerFast, captions: Sequence[str]) -> torch.Tensor:
    """Token ids of ``captions``, padded and truncated to ``tokenizer.model_max_length``.

    Args:
        tokenizer: From :func:`build_tokenizer`.
        captions: Texts.

    Returns:
        int64 tensor ``[len(captions), model_max_length]`` on the CPU.
    """
    encoded = tokenizer(
        list(captions),
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    )
    return encoded.input_ids


def build_tiny_models(
    tokenizer: PreTrainedTokenizerFast,
    *,
    resolution: int,
    unet_channels: Sequence[int],
    layers_per_block: int,
    text_hidden_size: int,
    text_layers: int,
    seed: int,
) -> TinyModels:
    """Randomly initialise a small pixel-space ``UNet2DConditionModel`` and a small ``CLIPTextModel``.

    The UNet maps RGB to RGB (3 in, 3 out channels), has one level per entry of ``unet_channels``
    (``DownBlock2D``/``UpBlock2D`` with cross-attention only on the lowest-resolution level and in
    the mid block, so attention stays cheap on CPU) and attends to the text encoder's last hidden
    states. The text encoder's vocabulary, special-token ids and positions come from ``tokenizer``.

    Args:
        tokenizer: From :func:`build_tokenizer`.
        resolution: Training resolution in pixels (stored as the UNet's ``sample_size``).
        unet_channels: ``block_out_channels`` (multiples of 8; the last a multiple of 16).
        layers_per_block: ResNet layers per UNet level.
        text_hidden_size: Text encoder width, a multiple of 16 (heads of 16 channels).
        text_layers: Text encoder transformer layers.
        seed: Seed of the initialisation (the global torch RNG is left untouched).

    Returns:
        The two models in float32 on the CPU, in train mode.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    levels = len(unet_channels)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden_size,
        intermediate_size=4 * text_hidden_size,
        num_hidden_layers=text_layers,
        num_attention_heads=text_hidden_size // HEAD_DIM,
        max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config)
        unet = UNet2DConditionModel(
            sample_size=resolution,
            in_channels=3,
            out_channels=3,
            block_out_channels=tuple(unet_channels),
            layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) * (levels - 1) + ("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
            cross_attention_dim=text_hidden_size,
            # Also add an attention-pooled text embedding to the timestep embedding, which reaches every
            # ResNet block (as DeepFloyd IF does): global properties such as colour are learnt fast.
            addition_embed_type="text",
            addition_embed_type_num_heads=text_hidden_size // HEAD_DIM,
            # diffusers' historical naming: for this model `attention_head_dim` is the number of heads.
            attention_head_dim=unet_channels[-1] // HEAD_DIM,
            norm_num_groups=NORM_GROUPS,
        )
    return TinyModels(unet.train(), text_encoder.train())


def build_noise_scheduler(
    num_train_timesteps: int, beta_schedule: str, prediction_type: str
) -> DDPMScheduler:
    """The DDPM forward-noising schedule used for training and, through its config, for sampling.

    Predicted clean samples are clipped to ``[-1, 1]`` when sampling (``clip_sample``), the pixel range.

    Args:
        num_train_timesteps: Diffusion timesteps T.
        beta_schedule: diffusers ``beta_schedule`` (``"linear"``, ``"scaled_linear"``,
            ``"squaredcos_cap_v2"`` or ``"sigmoid"``).
        prediction_type: What the network predicts: ``"epsilon"`` or ``"v_prediction"``.

    Returns:
        A diffusers ``DDPMScheduler``.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=True,
    )


def make_loader(config: TrainConfig) -> BatchLoader:
    """The :class:`fastdiff.DataLoader` of a run: float32 batches in ``[-1, 1]``, shuffled per epoch.

    Args:
        config: The run's settings (data, bucket and augmentation fields, ``seed``, ``num_threads``).

    Returns:
        The loader.
    """
    # Imported here: the package's __init__ may import the CLI, which imports this module.
    from fastdiff import DataLoader

    return DataLoader(
        config.data,
        resolution=config.resolution,
        batch_size=config.batch_size,
        bucket_step=config.bucket_step,
        min_bucket_side=config.min_bucket_side,
        max_bucket_side=config.max_bucket_side,
        crop=config.crop,
        flip_prob=config.flip_prob,
        shuffle=True,
        seed=config.seed,
        num_threads=config.num_threads,
        dtype=torch.float32,
        caption_extensions=CAPTION_EXTENSIONS,
    )


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when ``torch.cuda.is_available()``, else CPU; anything else → ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mixed_precision`` on ``device``; ``None`` for full float32.

    Raises:
        ValueError: ``"fp16"`` on a non-CUDA device (its gradient scaler is for CUDA).
    """
    if mixed_precision == "no":
        return None
    if mixed_precision == "fp16":
        if device.type != "cuda":
            raise ValueError(f"mixed_precision 'fp16' needs a CUDA device, got {device}; use 'bf16' or 'no'")
        return torch.float16
    return torch.bfloat16


def diffusion_loss(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    noise_scheduler: DDPMScheduler,
    pixels: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    generator: torch.Generator,
    amp_dtype: torch.dtype | None,
) -> torch.Tensor:
    """The denoising loss of one batch (Ho et al. 2020, algorithm 1).

    Draws Gaussian noise ε and timesteps t ~ U{0..T-1} per image, forms
    ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`` (``DDPMScheduler.add_noise``), predicts the scheduler's
    ``prediction_type`` target (ε, or ``v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0``) from ``(x_t, t, text)``
    under ``torch.autocast`` when ``amp_dtype`` is set, and returns the MSE to that target.

    Args:
        unet: The denoiser.
        text_encoder: The caption encoder; its last hidden states condition the UNet.
        noise_scheduler: The training schedule (its ``num_train_timesteps`` and ``prediction_type``).
        pixels: Clean images ``x_0``, float ``[B, 3, H, W]`` in ``[-1, 1]`` on the models' device.
        input_ids: Caption token ids, int64 ``[B, L]`` on the same device.
        generator: Source of the noise and timesteps, on the same device.
        amp_dtype: Autocast dtype of the forward pass; ``None`` runs it in float32.

    Returns:
        The mean squared error, a float32 scalar tensor (not finite if the batch or model is not).
    """
    device = pixels.device
    noise = torch.randn(pixels.shape, generator=generator, device=device)
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (pixels.shape[0],), generator=generator, device=device)
    noisy = noise_scheduler.add_noise(pixels, noise, timesteps)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        hidden = text_encoder(input_ids).last_hidden_state
        prediction = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(pixels, noise, timesteps)
    return F.mse_loss(prediction.float(), target)


def train(config: TrainConfig, loader: BatchLoader | None = None) -> TrainResult:
    """Train the tiny text-conditioned UNet and text encoder on a folder of captioned images.

    Each step takes a batch (any aspect bucket), replaces captions by ``""`` with probability
    ``caption_dropout`` and minimises :func:`diffusion_loss` (the "simple" objective of Ho et al.
    2020, eq. 14) with AdamW (Loshchilov & Hutter 2019) after clipping the global gradient norm. fp16 uses
    ``torch.amp.GradScaler``. A step whose loss is not finite is skipped (no backward, no update),
    logged and counted. Epochs restart the loader with ``set_epoch`` until ``steps`` steps ran.

    Files written to ``config.output``: ``loss.csv`` (``step,loss``, written as training goes),
    ``loss.png``, ``unet/`` and ``text_encoder/`` (``save_pretrained``, safetensors),
    ``tokenizer/``, ``scheduler/`` and ``train_config.json``.

    Args:
        config: The run's settings.
        loader: Batches to train on; ``None`` builds :func:`make_loader` ``(config)``. The vocabulary
            is read from the caption files under ``config.data`` either way.

    Returns:
        Losses, timings and the trained models.

    Raises:
        ValueError: The loader has no batches, or the settings are invalid for the device.
        RuntimeError: An epoch yielded no batches.
    """
    from tqdm.auto import tqdm

    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    device = resolve_device(config.device)
    amp_dtype = autocast_dtype(config.mixed_precision, device)
    batches = make_loader(config) if loader is None else loader
    if len(batches) == 0:
        raise ValueError(f"no training batches in {config.data}")

    tokenizer = build_tokenizer(read_captions(config.data), config.max_caption_tokens)
    unet, text_encoder = build_tiny_models(
        tokenizer,
        resolution=config.resolution,
        unet_channels=config.unet_channels,
        layers_per_block=config.layers_per_block,
        text_hidden_size=config.text_hidden_size,
        text_layers=config.text_layers,
        seed=config.seed,
    )
    unet.to(device)
    text_encoder.to(device)
    noise_scheduler = build_noise_scheduler(
        config.num_train_timesteps, config.beta_schedule, config.prediction_type
    )
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=config.mixed_precision == "fp16")
    noise_gen = torch.Generator(device).manual_seed(config.seed)
    dropout_rng = random.Random(config.seed)
    pin = device.type == "cuda"

    config.output.mkdir(parents=True, exist_ok=True)
    losses: list[float] = []
    skipped = 0
    start = time.perf_counter()
    with (
        (config.output / "loss.csv").open("w", newline="") as log,
        tqdm(total=config.steps, desc="train", unit="step") as bar,
    ):
        writer = csv.writer(log)
        writer.writerow(["step", "loss"])
        epoch = 0
        while len(losses) < config.steps:
            batches.set_epoch(epoch)
            batches_this_epoch = 0
            for batch in batches:
                batches_this_epoch += 1
                pixels = batch["pixel_values"]
                pixels = (pixels.pin_memory() if pin else pixels).to(device, non_blocking=pin)
                captions = [
                    "" if dropout_rng.random() < config.caption_dropout else c for c in batch["captions"]
                ]
                input_ids = tokenize(tokenizer, captions).to(device, non_blocking=pin)
                loss = diffusion_loss(
                    unet,
                    text_encoder,
                    noise_scheduler,
                    pixels,
                    input_ids,
                    generator=noise_gen,
                    amp_dtype=amp_dtype,
                )
                value = loss.item()
                if math.isfinite(value):
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    skipped += 1
                optimizer.zero_grad(set_to_none=True)
                losses.append(value)
                writer.writerow([len(losses), f"{value:.6g}"])
                log.flush()
                bar.set_postfix(loss=f"{value:.4f}", skipped=skipped, refresh=False)
                bar.update()
                if len(losses) == config.steps:
                    break
            if batches_this_epoch == 0:
                raise RuntimeError(f"epoch {epoch} of the loader yielded no batches")
            epoch += 1
    seconds = time.perf_counter() - start

    title = f"{config.data.name}: {config.prediction_type}, {config.resolution} px, batch {config.batch_size}"
    plot_loss(losses, config.output / "loss.png", title=title)
    unet.save_pretrained(config.output / "unet", safe_serialization=True)
    text_encoder.save_pretrained(config.output / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(config.output / "tokenizer")
    noise_scheduler.save_pretrained(config.output / "scheduler")
    (config.output / "train_config.json").write_text(json.dumps(asdict(config), indent=2, default=str) + "\n")
    return TrainResult(
        output=config.output,
        losses=losses,
        skipped_steps=skipped,
        seconds=seconds,
        device=device,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=noise_scheduler,
    )


def plot_loss(losses: Sequence[float], path: Path, *, title: str) -> None:
    """Plot the per-step loss and its running mean (log scale) to a PNG with matplotlib's Agg backend.

    Args:
        losses: Loss per step; non-finite values are left out of the plot.
        path: PNG file to write.
        title: Figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.asarray(losses, dtype=np.float64)
    steps = np.arange(1, len(values) + 1)
    finite = np.isfinite(values)
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps[finite], values[finite], lw=0.8, alpha=0.4, label="loss")
    window = max(1, len(values) // 20)
    if finite.sum() >= window:
        kernel = np.ones(window) / window
        ax.plot(steps[finite][window - 1 :], np.convolve(values[finite], kernel, "valid"), lw=2, label="mean")
    if finite.any():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE loss")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


@torch.no_grad()
def sample(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    *,
    noise_scheduler: DDPMScheduler,
    height: int,
    width: int,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    sampler: str = "ddim",
    seed: int = 0,
) -> torch.Tensor:
    """Generate one image per prompt by running the reverse diffusion with a diffusers scheduler.

    ``sampler="ddim"`` uses deterministic DDIM (Song et al. 2021, arXiv:2010.02502, η = 0),
    ``"ddpm"`` ancestral DDPM sampling (Ho et al. 2020), both configured from the training schedule.
    With ``guidance_scale > 1`` classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598) mixes
    the conditional and the empty-caption predictions (ε or v): ``ε = ε_∅ + s (ε_c - ε_∅)``. The initial noise
    and DDPM's per-step noise come from a CPU generator seeded with ``seed``, so results do not depend
    on the device. The models are put in eval mode for the call and restored afterwards.

    Args:
        unet: Trained UNet (its device and dtype are used).
        text_encoder: Trained text encoder, on the UNet's device.
        tokenizer: The run's tokenizer.
        prompts: One caption per image.
        noise_scheduler: The training schedule (its config is copied; it is not modified).
        height: Image height in pixels (a multiple of the UNet's downsampling factor).
        width: Image width in pixels (a multiple of the UNet's downsampling factor).
        num_inference_steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale; 1 disables guidance.
        sampler: ``"ddim"`` or ``"ddpm"``.
        seed: Seed of the noise.

    Returns:
        float32 tensor ``[len(prompts), 3, height, width]`` in ``[0, 1]`` on the CPU.

    Raises:
        ValueError: Unknown ``sampler``.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    if sampler == "ddim":
        scheduler = DDIMScheduler.from_config(noise_scheduler.config)
    elif sampler == "ddpm":
        scheduler = DDPMScheduler.from_config(noise_scheduler.config)
    else:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    scheduler.set_timesteps(num_inference_steps)
    device, dtype = unet.device, unet.dtype
    guided = guidance_scale > 1.0
    texts = [*prompts, *([""] * len(prompts))] if guided else list(prompts)
    generator = torch.Generator("cpu").manual_seed(seed)
    modes = (unet.training, text_encoder.training)
    unet.eval()
    text_encoder.eval()
    try:
        hidden = text_encoder(tokenize(tokenizer, texts).to(device)).last_hidden_state.to(dtype)
        shape = (len(prompts), 3, height, width)
        x = torch.randn(shape, generator=generator).to(device, dtype) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
            out = unet(model_in, t, encoder_hidden_states=hidden).sample
            if guided:
                out_cond, out_uncond = out.chunk(2)
                out = out_uncond + guidance_scale * (out_cond - out_uncond)
            x = scheduler.step(out, t, x, generator=generator).prev_sample
    finally:
        unet.train(modes[0])
        text_encoder.train(modes[1])
    return ((x.float().clamp(-1, 1) + 1) / 2).cpu()


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``fastdiff train`` flags, one per :class:`TrainConfig` field, to ``parser``.

    Args:
        parser: The subcommand's parser.
    """
    d = TrainConfig
    parser.add_argument("--data", type=Path, required=True, help="folder of images and caption files")
    parser.add_argument("--output", type=Path, required=True, help="folder for weights, loss.csv, loss.png")
    parser.add_argument("--resolution", type=int, default=d.resolution, help="bucket resolution, pixels")
    parser.add_argument("--bucket-step", type=int, default=d.bucket_step, help="bucket side multiple, pixels")
    parser.add_argument("--min-bucket-side", type=int, default=None, help="default: the loader's")
    parser.add_argument("--max-bucket-side", type=int, default=None, help="default: the loader's")
    parser.add_argument("--crop", default=d.crop, help="'center' or 'random'")
    parser.add_argument("--flip-prob", type=float, default=d.flip_prob, help="horizontal flip probability")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    parser.add_argument("--learning-rate", type=float, default=d.learning_rate, help="AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    parser.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clip norm")
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=d.mixed_precision)
    parser.add_argument(
        "--caption-dropout", type=float, default=d.caption_dropout, help="P(caption -> '') for guidance"
    )
    parser.add_argument("--max-caption-tokens", type=int, default=d.max_caption_tokens)
    parser.add_argument(
        "--unet-channels", type=int, nargs="+", default=list(d.unet_channels), help="UNet channels per level"
    )
    parser.add_argument("--layers-per-block", type=int, default=d.layers_per_block)
    parser.add_argument("--text-hidden-size", type=int, default=d.text_hidden_size)
    parser.add_argument("--text-layers", type=int, default=d.text_layers)
    parser.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=d.prediction_type)
    parser.add_argument("--num-train-timesteps", type=int, default=d.num_train_timesteps)
    parser.add_argument("--beta-schedule", default=d.beta_schedule, help="diffusers beta_schedule")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--num-threads", type=int, default=None, help="loader threads (default: all cores)")
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's setting)"
    )
    parser.add_argument("--device", default=d.device, help="'auto' (CUDA if available), 'cpu', 'cuda', ...")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``fastdiff train`` arguments."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    values["unet_channels"] = tuple(values["unet_channels"])
    return TrainConfig(**values)


def run_train(args: argparse.Namespace) -> int:
    """Body of ``fastdiff train``: train, print a summary; returns the exit status (0)."""
    result = train(config_from_args(args))
    print(
        f"trained {len(result.losses)} steps on {result.device} in {result.seconds:.1f} s, last loss "
        f"{result.losses[-1]:.4f}, {result.skipped_steps} non-finite steps skipped; wrote {result.output}"
    )
    return 0
