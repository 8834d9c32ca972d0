"""``fastdiff train``: a thin text-conditioned diffusion training loop on :class:`fastdiff.DataLoader`.

Two model paths share one loop (:func:`fastdiff.loop.run`: AMP, accumulation, clipping, EMA, min-SNR,
non-finite guard, checkpoints and exact resume, previews, ``loss.csv``):

- **From scratch** (no ``model``): a small diffusers ``UNet2DConditionModel`` learns to predict the
  noise added to images (epsilon prediction, DDPM: Ho et al. 2020, "Denoising Diffusion Probabilistic
  Models", arXiv:2006.11239; or the velocity, v-prediction: Salimans & Ho 2022, arXiv:2202.00512)
  directly in pixel space, conditioned on the hidden states of a small transformers ``CLIPTextModel``
  (Radford et al. 2021) trained jointly from scratch. The tokenizer is a word-level vocabulary built
  from the dataset's caption files, so nothing is downloaded. ``fastdiff demo`` uses this path.
- **Stable Diffusion fine-tuning** (``model``: a local SD 1.x/2.x/SDXL pipeline): latent-space
  training of the pipeline's UNet, fully or with LoRA; see :mod:`fastdiff.sd`.

The from-scratch pieces are separate functions: :func:`build_tokenizer`, :func:`build_tiny_models`,
:func:`build_noise_scheduler`, :func:`make_loader`, :func:`train`, :func:`sample`, :func:`plot_loss`.

diffusers, transformers, tokenizers, tqdm and matplotlib (the ``train`` extra) are imported inside the
functions that use them: ``fastdiff.cli`` imports this module to register its arguments, and
``fastdiff scan`` must work, and start fast, without them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
import torch

from fastdiff.loop import (
    LoopResult,
    add_training_noise,
    autocast_dtype,
    diffusion_loss_from,
    read_loss_csv,
)

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    from fastdiff.loader import DataLoader

__all__ = ["TrainConfig", "TrainResult", "autocast_dtype", "sample", "train"]

#: Values of ``--mixed-precision``: autocast dtype used for the forward pass (``"no"``: float32).
MIXED_PRECISION = ("no", "fp16", "bf16")
#: Samplers of :func:`sample`: deterministic DDIM or ancestral DDPM.
SAMPLERS = ("ddim", "ddpm")
#: Values of ``--prediction-type``: the network's target (diffusers ``prediction_type`` names).
PREDICTION_TYPES = ("epsilon", "v_prediction")
#: Values of ``--lr-scheduler`` (diffusers ``get_scheduler`` names; warmup via ``--lr-warmup-steps``).
LR_SCHEDULERS = ("constant", "cosine", "linear")
#: Values of ``--vae-dtype``: the frozen VAE's dtype (fp16 is refused: SD's VAEs overflow in it).
VAE_DTYPES = ("fp32", "bf16")
#: Number of dataset captions used as preview prompts when ``preview_prompts`` is empty.
DEFAULT_PREVIEW_PROMPTS = 4
#: Special tokens of the word-level tokenizer, in id order (``<pad>`` is id 0).
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
#: Loader fields of :class:`TrainConfig` that a dataset config's ``[general]`` / ``[[datasets]]`` fill.
DATASET_FIELDS = (
    "resolution",
    "batch_size",
    "bucket_step",
    "min_bucket_side",
    "max_bucket_side",
    "crop",
    "flip_prob",
)
#: Values of the loader fields that neither the run nor its dataset config set.
LOADER_DEFAULTS = {"batch_size": 8, "crop": "center", "flip_prob": 0.0}
#: Channels per attention head in the UNet and the text encoder.
HEAD_DIM = 16
#: Group count of the UNet's GroupNorm layers; every UNet channel count must be a multiple.
NORM_GROUPS = 8

Batch = dict[str, Any]


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; each field is the ``fastdiff train`` flag of the same name
    (``--max-steps`` for ``max_steps``) and a key of the ``--config`` TOML file.

    Without ``model`` the run trains the tiny from-scratch model of this module (pixel space, joint
    text encoder, word-level tokenizer); with ``model`` it fine-tunes a Stable Diffusion 1.x/2.x or
    SDXL pipeline in latent space (:mod:`fastdiff.sd`), fully (``lora_rank = 0``) or with LoRA.
    Fields marked *from scratch* apply only without ``model``; setting one with ``model`` is an error.
    Fields that default to ``None`` take a value that depends on the path (listed per field).

    Attributes:
        data: Folder of images and caption files (searched recursively by the loader), or a dataset
            config ``.toml`` (subsets, repeats, caption options; :func:`fastdiff.load_config`). The
            config's loader options fill the fields below left at ``None`` (``resolution``,
            ``batch_size``, ``bucket_step``, ``min/max_bucket_side``, ``crop``, ``flip_prob``): a value
            set here wins, as with :meth:`fastdiff.DataLoader.from_config`. A config ``seed`` must
            equal ``seed``.
        output: Folder that receives ``loss.csv`` (``step,loss``), ``loss.png``, ``train_config.json``,
            ``checkpoint-STEP/`` folders, ``previews/`` and the weights: from scratch ``unet/``,
            ``text_encoder/``, ``tokenizer/``, ``scheduler/``; full fine-tune the whole pipeline
            (``save_pretrained``); LoRA ``pytorch_lora_weights.safetensors``. Created if missing.
        model: Stable Diffusion pipeline folder (diffusers layout) or single-file checkpoint
            (``.safetensors``/``.ckpt``) to fine-tune; ``None`` trains the tiny model from scratch.
        model_config: For a single-file ``model`` (required there): a local diffusers pipeline folder
            of the same architecture whose configs ``from_single_file`` uses (nothing is downloaded).
        resolution: Bucket resolution in pixels: every batch has ``H * W <= resolution**2``. Default:
            64 from scratch; the UNet's ``sample_size`` times the VAE's downsampling for a pipeline
            (512 for SD 1.5, 1024 for SDXL).
        bucket_step: Bucket sides are multiples of this (pixels). Default 16 from scratch (must be a
            multiple of ``2 ** (len(unet_channels) - 1)``), 64 for a pipeline (a multiple of the VAE's
            and UNet's downsampling, checked).
        min_bucket_side: Smallest bucket side in pixels (``None``: the loader's default).
        max_bucket_side: Largest bucket side in pixels (``None``: the loader's default).
        crop: Loader crop mode, ``"center"`` or ``"random"`` (``None``: the dataset config's, else
            ``"center"``).
        flip_prob: Probability of a horizontal flip per sample (``None``: the dataset config's, else 0).
        batch_size: Images per batch; the last batch of a bucket may be smaller (``None``: the dataset
            config's, else 8).
        max_steps: Optimizer steps to run (skipped non-finite steps count too).
        learning_rate: Peak AdamW learning rate. Default 1e-3 from scratch, 1e-4 for LoRA, 1e-5 for a
            full fine-tune.
        lr_scheduler: ``"constant"``, ``"cosine"`` or ``"linear"`` (diffusers ``get_scheduler``; decay
            reaches 0 at ``max_steps``).
        lr_warmup_steps: Steps of linear warmup from 0 to ``learning_rate``.
        weight_decay: AdamW decoupled weight decay.
        use_8bit_adam: bitsandbytes' 8-bit AdamW (needs bitsandbytes installed).
        max_grad_norm: Gradients are clipped to this global L2 norm.
        gradient_accumulation_steps: Batches whose gradients are summed into one optimizer step.
        mixed_precision: ``"no"``, ``"fp16"`` (CUDA only, with a gradient scaler) or ``"bf16"``:
            autocast dtype of the forward passes; trained weights stay float32.
        vae_dtype: ``"fp32"`` or ``"bf16"``: dtype of the frozen VAE (pipeline only). fp16 is refused:
            SD 1.x's and SDXL's VAEs overflow to NaN in fp16.
        caption_dropout: Probability of replacing a caption by ``""`` so the model also learns the
            unconditional prediction that classifier-free guidance needs (SDXL: by zero embeddings,
            the unconditional input of its pipeline, see :func:`fastdiff.sd.zero_dropped`).
        prediction_type: ``"epsilon"``, the noise ε (Ho et al. 2020), or ``"v_prediction"``,
            ``v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0`` (Salimans & Ho 2022), whose MSE weighs the
            nearly-pure-noise timesteps ``1 / ᾱ_t`` times more than epsilon's does. Default: epsilon
            from scratch, the pipeline scheduler's ``prediction_type`` for a pipeline.
        snr_gamma: γ of min-SNR-γ loss weighting (Hang et al. 2023; 5 is their choice); ``None``: off.
        noise_offset: Offset-noise strength (0: off), see :func:`fastdiff.loop.add_training_noise`.
        input_perturbation: Input-perturbation strength (0: off), same place.
        ema_decay: Decay of an exponential moving average of the trained weights (diffusers
            ``EMAModel``; e.g. 0.9999); 0 turns EMA off. With EMA the saved weights and previews are
            the EMA weights.
        lora_rank: LoRA rank r (Hu et al. 2021, arXiv:2106.09685) of the adapters peft adds to the
            UNet (and text encoders with ``train_text_encoder``); 0 fine-tunes every weight. Pipeline only.
        lora_alpha: LoRA scale numerator (the update is ``alpha / r · B A``); ``None``: ``lora_rank``.
        lora_target_modules: UNet module names that get adapters (diffusers attention projections).
        train_text_encoder: Also train the pipeline's text encoder(s) (LoRA on their attention
            projections, or all weights with ``lora_rank = 0``). The tiny model always trains its own.
        gradient_checkpointing: Recompute activations in the backward pass to save memory (pipeline).
        max_consecutive_skips: The run stops after this many non-finite steps in a row.
        checkpoint_every: Save ``OUTPUT/checkpoint-STEP/`` every this many steps (0: never).
        resume: A ``checkpoint-STEP`` folder (or a folder holding some: the highest step is taken) to
            continue from; the run then goes on to ``max_steps`` and appends to its own ``output``.
        preview_every: Sample ``preview_prompts`` into ``OUTPUT/previews/step-N.png`` every this many
            steps and after the last (0: never).
        preview_prompts: Preview prompts; empty: the first 4 distinct captions of ``data`` (in file
            order; the first line of a multi-caption entry).
        preview_steps: Denoising steps of a preview (the pipeline's scheduler, or DDIM from scratch).
        preview_guidance_scale: Classifier-free guidance scale of the previews.
        max_caption_tokens: *From scratch*: token sequence length, special tokens included.
        unet_channels: *From scratch*: UNet ``block_out_channels``, one resolution level each
            (multiples of 8; the last a multiple of 16); attention only on the lowest level and mid block.
        layers_per_block: *From scratch*: ResNet layers per UNet level.
        text_hidden_size: *From scratch*: text encoder width (multiple of 16), also the UNet's
            cross-attention width.
        text_layers: *From scratch*: text encoder transformer layers.
        num_train_timesteps: *From scratch*: diffusion timesteps T of the DDPM schedule.
        beta_schedule: *From scratch*: diffusers ``beta_schedule``; the default ``"squaredcos_cap_v2"``
            is the cosine schedule of Nichol & Dhariwal 2021 (arXiv:2102.09672).
        seed: Seed of the initialisation, the loader's shuffle/crops/flips, noise and caption dropout.
        num_threads: Loader decode threads (``None``: every core).
        torch_threads: torch intra-op (OpenMP) threads, set process-wide with
            ``torch.set_num_threads`` (``None``: leave torch's setting). On a small CPU shared with
            other work, 1 can be several times faster than all cores: every op of the step waits at
            an OpenMP barrier for all its threads, and each wait costs a scheduler time slice.
        device: ``"auto"`` (CUDA when available, else CPU) or a torch device string.
    """

    data: Path
    output: Path
    model: Path | None = None
    model_config: Path | None = None
    resolution: int | None = None
    bucket_step: int | None = None
    min_bucket_side: int | None = None
    max_bucket_side: int | None = None
    crop: str | None = None
    flip_prob: float | None = None
    batch_size: int | None = None
    max_steps: int = 500
    learning_rate: float | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-2
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    vae_dtype: str = "fp32"
    caption_dropout: float = 0.1
    prediction_type: str | None = None
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    ema_decay: float = 0.0
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    train_text_encoder: bool = False
    gradient_checkpointing: bool = False
    max_consecutive_skips: int = 20
    checkpoint_every: int = 500
    resume: Path | None = None
    preview_every: int = 0
    preview_prompts: tuple[str, ...] = ()
    preview_steps: int = 25
    preview_guidance_scale: float = 5.0
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
            ValueError: A field is out of range, or a from-scratch field is set with ``model`` (or a
                pipeline field without it); the message names it.
        """
        positive = ("max_steps", "gradient_accumulation_steps", "max_consecutive_skips")
        positive += ("preview_steps", "layers_per_block", "text_layers")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("resolution", "bucket_step", "batch_size", "num_threads", "torch_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        non_negative = ("lr_warmup_steps", "checkpoint_every", "preview_every", "lora_rank")
        non_negative += ("noise_offset", "input_perturbation", "weight_decay")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        choices = {
            "mixed_precision": MIXED_PRECISION,
            "vae_dtype": VAE_DTYPES,
            "lr_scheduler": LR_SCHEDULERS,
            "crop": ("center", "random", None),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                hint = " (fp16 makes SD's VAE overflow to NaN)" if name == "vae_dtype" else ""
                raise ValueError(f"{name} must be one of {allowed}{hint}, got {getattr(self, name)!r}")
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0 or None, got {self.snr_gamma}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0 or None, got {self.lora_alpha}")
        if self.model is None:
            self._check_from_scratch()
        else:
            defaults = {f.name: f.default for f in fields(TrainConfig)}
            for name in FROM_SCRATCH_FIELDS:
                if getattr(self, name) != defaults[name]:
                    raise ValueError(f"{name} applies only to the from-scratch model (no `model`)")

    def _check_from_scratch(self) -> None:
        for name in ("lora_rank", "model_config", "train_text_encoder", "gradient_checkpointing"):
            if getattr(self, name):
                raise ValueError(f"{name} needs a Stable Diffusion `model` to fine-tune")
        if self.max_caption_tokens < 3:
            raise ValueError(
                f"max_caption_tokens must be >= 3 (<bos>, a word, <eos>), got {self.max_caption_tokens}"
            )
        if not self.unet_channels or any(c < 1 or c % NORM_GROUPS for c in self.unet_channels):
            raise ValueError(f"unet_channels must be multiples of {NORM_GROUPS}, got {self.unet_channels}")
        if self.unet_channels[-1] % HEAD_DIM or self.text_hidden_size < 1 or self.text_hidden_size % HEAD_DIM:
            raise ValueError(f"unet_channels[-1] and text_hidden_size must be multiples of {HEAD_DIM}")
        downsampling = 2 ** (len(self.unet_channels) - 1)
        if self.bucket_step is not None and self.bucket_step % downsampling:
            raise ValueError(
                f"bucket_step ({self.bucket_step}) must be a multiple of the UNet's downsampling factor "
                f"{downsampling} (2 ** (len(unet_channels) - 1))"
            )
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

    def resolved(self, **defaults: Any) -> TrainConfig:
        """This config with every ``None`` of ``defaults``' keys replaced by the given value."""
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


#: Fields that only the from-scratch model uses.
FROM_SCRATCH_FIELDS = (
    "max_caption_tokens",
    "unet_channels",
    "layers_per_block",
    "text_hidden_size",
    "text_layers",
    "num_train_timesteps",
    "beta_schedule",
)


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
        config: The run's settings with the path-dependent defaults filled in.
        losses: Loss of every step this process ran, in order (``nan``/``inf`` where the step was
            skipped); a resumed run starts at ``first_step``.
        first_step: Step number of ``losses[0]``.
        skipped_steps: Steps whose loss or gradients were not finite; they did not update the weights.
        overflow_steps: fp16 steps skipped by the gradient scaler (see :class:`fastdiff.loop.LoopResult`).
        seconds: Wall time of the training loop in seconds (model building and saving excluded).
        data_seconds: Part of ``seconds`` spent waiting for batches from the loader.
        device: The torch device trained on.
        unet: The trained UNet (on ``device``; EMA weights when EMA is on).
        text_encoder: The (first) text encoder (on ``device``).
        tokenizer: The (first) tokenizer.
        noise_scheduler: The DDPM training noise schedule.
        pipeline: The fine-tuned diffusers pipeline (``None`` from scratch); it holds ``unet`` and
            ``text_encoder``, with LoRA adapters active.
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
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: Any
    noise_scheduler: DDPMScheduler
    pipeline: Any = None

    @property
    def loss_csv(self) -> Path:
        """``output/loss.csv``: columns ``step,loss``, one row per step, steps counted from 1."""
        return self.output / "loss.csv"

    @property
    def loss_png(self) -> Path:
        """``output/loss.png``: the loss curve."""
        return self.output / "loss.png"


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
    from fastdiff.dataset import load_config

    if is_dataset_config(config.data):
        options, _ = load_config(config.data)
        if options.get("seed", config.seed) != config.seed:
            raise ValueError(
                f"{config.data}: seed = {options['seed']} differs from the run's seed {config.seed} "
                "(--seed); set it in one place"
            )
        config = config.resolved(**{k: options[k] for k in DATASET_FIELDS if k in options})
    return config.resolved(**LOADER_DEFAULTS)


def dataset_captions(config: TrainConfig, loader: BatchLoader) -> list[str]:
    """The caption of each training image, in file order (``""`` where an image has none).

    Args:
        config: The run's settings.
        loader: The run's loader: its ``captions`` (:attr:`fastdiff.DataLoader.captions`) if it has
            them, else those of a :func:`make_loader` of ``config`` (a header scan of ``data``).
    """
    captions = getattr(loader, "captions", None)
    return list(captions) if captions is not None else make_loader(config).captions


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


def make_loader(config: TrainConfig) -> DataLoader:
    """The :class:`fastdiff.DataLoader` of a run: float32 batches in ``[-1, 1]``, shuffled per epoch.

    Args:
        config: The run's settings (data, bucket and augmentation fields, ``seed``, ``num_threads``);
            a dataset config ``data`` is read with :meth:`fastdiff.DataLoader.from_config`, the fields
            set here winning over its values; fields left at ``None`` take the loader's defaults.

    Returns:
        The loader.

    Raises:
        ValueError: As :class:`fastdiff.DataLoader`.
    """
    # Imported here: the package's __init__ may import the CLI, which imports this module.
    from fastdiff import DataLoader

    options = {
        "resolution": config.resolution,
        "batch_size": config.batch_size,
        "bucket_step": config.bucket_step,
        "min_bucket_side": config.min_bucket_side,
        "max_bucket_side": config.max_bucket_side,
        "crop": config.crop,
        "flip_prob": config.flip_prob,
        "seed": config.seed,
        "num_threads": config.num_threads,
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


def diffusion_loss(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    noise_scheduler: DDPMScheduler,
    pixels: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    generator: torch.Generator,
    amp_dtype: torch.dtype | None,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The denoising loss of one batch of the from-scratch model (Ho et al. 2020, algorithm 1).

    Noises ``pixels`` with :func:`fastdiff.loop.add_training_noise` (ε, t ~ U{0..T-1}, optional noise
    offset and input perturbation), predicts the scheduler's ``prediction_type`` target from
    ``(x_t, t, text)`` under ``torch.autocast`` when ``amp_dtype`` is set, and returns the MSE to that
    target, min-SNR-γ weighted when ``snr_gamma`` is set (:func:`fastdiff.loop.min_snr_weights`).

    Args:
        unet: The denoiser.
        text_encoder: The caption encoder; its last hidden states condition the UNet.
        noise_scheduler: The training schedule (its ``num_train_timesteps`` and ``prediction_type``).
        pixels: Clean images ``x_0``, float ``[B, 3, H, W]`` in ``[-1, 1]`` on the models' device.
        input_ids: Caption token ids, int64 ``[B, L]`` on the same device.
        generator: Source of the noise and timesteps, on the same device.
        amp_dtype: Autocast dtype of the forward pass; ``None`` runs it in float32.
        snr_gamma: Min-SNR γ, or ``None`` for the unweighted MSE.
        noise_offset: Offset-noise strength (0: off).
        input_perturbation: Input-perturbation strength (0: off).
        sample_weights: Per-sample loss weights, float ``[B]`` (the loader's ``loss_weights``), or
            ``None``.

    Returns:
        The loss, a float32 scalar tensor (not finite if the batch or model is not).
    """
    noised = add_training_noise(
        pixels,
        noise_scheduler,
        generator=generator,
        noise_offset=noise_offset,
        input_perturbation=input_perturbation,
    )
    with torch.autocast(pixels.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        hidden = text_encoder(input_ids).last_hidden_state
        prediction = unet(noised.noisy, noised.timesteps, encoder_hidden_states=hidden).sample
    return diffusion_loss_from(noise_scheduler, noised, prediction, snr_gamma, sample_weights)


class TinyTask:
    """The from-scratch model as a :class:`fastdiff.loop.Task`: UNet and text encoder, both trained."""

    def __init__(self, config: TrainConfig, device: torch.device, captions: Sequence[str]) -> None:
        self.config = config
        self.tokenizer = build_tokenizer(captions, config.max_caption_tokens)
        self.unet, self.text_encoder = build_tiny_models(
            self.tokenizer,
            resolution=config.resolution,
            unet_channels=config.unet_channels,
            layers_per_block=config.layers_per_block,
            text_hidden_size=config.text_hidden_size,
            text_layers=config.text_layers,
            seed=config.seed,
        )
        self.unet.to(device)
        self.text_encoder.to(device)
        self.noise_scheduler = build_noise_scheduler(
            config.num_train_timesteps, config.beta_schedule, config.prediction_type
        )
        self.device = device

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        named = {f"unet.{k}": p for k, p in self.unet.named_parameters()}
        named.update({f"text_encoder.{k}": p for k, p in self.text_encoder.named_parameters()})
        return named

    def train_mode(self, on: bool) -> None:
        self.unet.train(on)
        self.text_encoder.train(on)

    def loss(
        self, batch: Batch, *, generator: torch.Generator, amp_dtype: torch.dtype | None
    ) -> torch.Tensor:
        input_ids = tokenize(self.tokenizer, batch["captions"]).to(self.device, non_blocking=True)
        return diffusion_loss(
            self.unet,
            self.text_encoder,
            self.noise_scheduler,
            batch["pixel_values"],
            input_ids,
            generator=generator,
            amp_dtype=amp_dtype,
            snr_gamma=self.config.snr_gamma,
            noise_offset=self.config.noise_offset,
            input_perturbation=self.config.input_perturbation,
            sample_weights=batch.get("loss_weights"),
        )

    def preview(self, prompts: Sequence[str], *, seeds: Sequence[int], steps: int) -> torch.Tensor:
        per_seed = [
            sample(
                self.unet,
                self.text_encoder,
                self.tokenizer,
                prompts,
                noise_scheduler=self.noise_scheduler,
                height=self.config.resolution,
                width=self.config.resolution,
                num_inference_steps=steps,
                guidance_scale=self.config.preview_guidance_scale,
                seed=seed,
            )
            for seed in seeds
        ]
        # Prompt-major: row p holds prompt p under every seed.
        return torch.stack(per_seed, dim=1).flatten(0, 1)

    def save(self, output: Path) -> None:
        self.unet.save_pretrained(output / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(output / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(output / "tokenizer")
        self.noise_scheduler.save_pretrained(output / "scheduler")


def train(config: TrainConfig, loader: BatchLoader | None = None) -> TrainResult:
    """Train the tiny model from scratch, or fine-tune the Stable Diffusion pipeline ``config.model``.

    Each step takes a batch (any aspect bucket) from the loader, replaces captions by ``""`` with
    probability ``caption_dropout`` and minimises the diffusion loss (the "simple" objective of Ho et
    al. 2020, eq. 14, optionally min-SNR-γ weighted) with AdamW (Loshchilov & Hutter 2019) after
    clipping the global gradient norm; see :func:`fastdiff.loop.run` for accumulation, mixed
    precision, EMA, the non-finite guard, checkpoints, ``--resume`` and previews. Epochs restart the
    loader with ``set_epoch`` until ``max_steps`` steps ran.

    Files written to ``config.output``: ``loss.csv`` (``step,loss``, written as training goes),
    ``loss.png`` (every step in ``loss.csv``), ``train_config.json`` (resolved settings), checkpoints,
    previews, and the weights: from scratch ``unet/``, ``text_encoder/`` (``save_pretrained``,
    safetensors), ``tokenizer/``, ``scheduler/``; a full fine-tune the whole pipeline; LoRA
    ``pytorch_lora_weights.safetensors`` (what diffusers' ``load_lora_weights`` reads).

    Args:
        config: The run's settings.
        loader: Batches to train on; ``None`` builds :func:`make_loader` from the resolved config. The
            from-scratch vocabulary and the default preview prompts come from
            :func:`dataset_captions`.

    Returns:
        Losses, counters, timings and the trained models.

    Raises:
        ValueError: The loader has no batches, the settings are invalid for the device or model, or
            ``resume`` does not match the run.
        FileNotFoundError: ``model`` or ``resume`` does not exist.
        RuntimeError: Too many consecutive non-finite steps, or an epoch yielded no batches.
    """
    from fastdiff import loop

    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    device = resolve_device(config.device)
    autocast_dtype(config.mixed_precision, device)  # fail before loading anything
    config = with_dataset_options(config)
    pipeline = None
    if config.model is None:
        config = config.resolved(resolution=64, bucket_step=16, learning_rate=1e-3, prediction_type="epsilon")
        batches = make_loader(config) if loader is None else loader
        captions = dataset_captions(config, batches)
        task: Any = TinyTask(config, device, captions)
        checkpoint_files = None
    else:
        from fastdiff import sd

        task = sd.PipelineTask.from_config(config, device)
        config = task.config
        pipeline = task.pipeline
        checkpoint_files = task.checkpoint_files
        batches = make_loader(config) if loader is None else loader
        captions = dataset_captions(config, batches) if config.preview_every else []
    if len(batches) == 0:
        raise ValueError(f"no training batches in {config.data}")
    prompts = config.preview_prompts
    if config.preview_every and not prompts:
        first_lines = (c.split("\n", 1)[0] for c in captions if c)
        prompts = tuple(dict.fromkeys(first_lines))[:DEFAULT_PREVIEW_PROMPTS]

    config.output.mkdir(parents=True, exist_ok=True)
    (config.output / "train_config.json").write_text(json.dumps(asdict(config), indent=2, default=str) + "\n")
    result: LoopResult = loop.run(
        task, batches, config, device, preview_prompts=prompts, checkpoint_files=checkpoint_files
    )
    name = config.data.name if config.model is None else f"{config.model.name} on {config.data.name}"
    title = f"{name}: {config.prediction_type}, {config.resolution} px, batch {config.batch_size}"
    plot_loss(read_loss_csv(config.output / "loss.csv"), config.output / "loss.png", title=title)
    task.save(config.output)
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
        unet=task.unet,
        text_encoder=task.text_encoder,
        tokenizer=task.tokenizer,
        noise_scheduler=task.noise_scheduler,
        pipeline=pipeline,
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


#: ``TrainConfig`` fields holding paths, tuples of ints and tuples of strings (for the TOML file).
_PATH_FIELDS = ("data", "output", "model", "model_config", "resume")
_TUPLE_FIELDS = ("unet_channels", "lora_target_modules", "preview_prompts")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``fastdiff train`` flags, one per :class:`TrainConfig` field, and ``--config``.

    Every flag defaults to ``None`` here ("not given"): :func:`config_from_args` fills in the TOML
    file's value, else the :class:`TrainConfig` default.

    Args:
        parser: The subcommand's parser.
    """
    d = TrainConfig
    a = parser.add_argument
    a("--config", type=Path, help="TOML file whose keys are these flags' names (flags given here win)")
    a("--data", type=Path, help="folder of images and captions, or a dataset config .toml (required)")
    a("--output", type=Path, help="folder for weights, loss.csv, loss.png, checkpoints (required)")
    a(
        "--model",
        type=Path,
        help="SD 1.x/2.x/SDXL pipeline folder or .safetensors file to fine-tune "
        "(default: train the tiny model from scratch)",
    )
    a("--model-config", type=Path, help="local pipeline folder with the configs of a single-file --model")
    a("--resolution", type=int, help="bucket resolution, pixels (default: 64, or the model's)")
    a("--bucket-step", type=int, help="bucket side multiple, pixels (default: 16, or 64 for a model)")
    a("--min-bucket-side", type=int, help="default: the loader's")
    a("--max-bucket-side", type=int, help="default: the loader's")
    a(
        "--crop",
        choices=("center", "random"),
        help=f"default: the dataset config's, else {LOADER_DEFAULTS['crop']}",
    )
    a("--flip-prob", type=float, help="horizontal flip probability (default: the dataset config's, else 0)")
    a("--batch-size", type=int, help=f"default: the dataset config's, else {LOADER_DEFAULTS['batch_size']}")
    a("--max-steps", "--steps", dest="max_steps", type=int, help=f"optimizer steps (default {d.max_steps})")
    a("--learning-rate", type=float, help="peak AdamW learning rate (default: 1e-3, 1e-4 LoRA, 1e-5 full)")
    a("--lr-scheduler", choices=LR_SCHEDULERS, help=f"default {d.lr_scheduler}")
    a("--lr-warmup-steps", type=int, help="linear warmup steps (default 0)")
    a("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay})")
    a("--use-8bit-adam", action=argparse.BooleanOptionalAction, help="bitsandbytes AdamW8bit")
    a("--max-grad-norm", type=float, help=f"gradient clip norm (default {d.max_grad_norm})")
    a("--gradient-accumulation-steps", type=int, help="batches per optimizer step (default 1)")
    a("--mixed-precision", choices=MIXED_PRECISION, help="autocast dtype (default no)")
    a("--vae-dtype", choices=VAE_DTYPES, help="frozen VAE dtype (default fp32)")
    a("--caption-dropout", type=float, help=f"P(caption -> '') for guidance (default {d.caption_dropout})")
    a("--prediction-type", choices=PREDICTION_TYPES, help="default: epsilon, or the model scheduler's")
    a("--snr-gamma", type=float, help="min-SNR-gamma loss weighting (default off; 5 is usual)")
    a("--noise-offset", type=float, help="offset-noise strength (default 0)")
    a("--input-perturbation", type=float, help="input-perturbation strength (default 0)")
    a("--ema-decay", type=float, help="EMA decay of the trained weights, e.g. 0.9999 (default 0: off)")
    a("--lora-rank", type=int, help="LoRA rank; 0 = full fine-tune (default 0)")
    a("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    a(
        "--lora-target-modules",
        nargs="+",
        help=f"UNet modules with adapters (default {' '.join(d.lora_target_modules)})",
    )
    a("--train-text-encoder", action=argparse.BooleanOptionalAction, help="also train the text encoder(s)")
    a("--gradient-checkpointing", action=argparse.BooleanOptionalAction, help="trade compute for memory")
    a(
        "--max-consecutive-skips",
        type=int,
        help=f"stop after this many non-finite steps in a row (default {d.max_consecutive_skips})",
    )
    a(
        "--checkpoint-every",
        type=int,
        help=f"save OUTPUT/checkpoint-STEP every N steps, 0: never (default {d.checkpoint_every})",
    )
    a("--resume", type=Path, help="checkpoint-STEP folder (or a folder of them: the latest) to continue from")
    a("--preview-every", type=int, help="sample preview grids every N steps (default 0: never)")
    a("--preview-prompts", nargs="+", help="preview prompts (default: the first 4 captions)")
    a("--preview-steps", type=int, help=f"denoising steps per preview (default {d.preview_steps})")
    a("--preview-guidance-scale", type=float, help=f"default {d.preview_guidance_scale}")
    a("--max-caption-tokens", type=int, help=f"from scratch (default {d.max_caption_tokens})")
    a("--unet-channels", type=int, nargs="+", help="from scratch: UNet channels per level")
    a("--layers-per-block", type=int, help="from scratch")
    a("--text-hidden-size", type=int, help="from scratch")
    a("--text-layers", type=int, help="from scratch")
    a("--num-train-timesteps", type=int, help="from scratch")
    a("--beta-schedule", help="from scratch: diffusers beta_schedule")
    a("--seed", type=int, help="default 0")
    a("--num-threads", type=int, help="loader threads (default: all cores)")
    a("--torch-threads", type=int, help="torch.set_num_threads (default: torch's setting)")
    a("--device", help="'auto' (CUDA if available), 'cpu', 'cuda', ... (default auto)")


def read_train_toml(path: Path) -> dict[str, Any]:
    """The settings of a ``fastdiff train --config`` TOML file, as :class:`TrainConfig` field values.

    Keys are the flag names without ``--`` (``max-steps``; ``max_steps`` also works) at the top level;
    relative paths are taken relative to the TOML file's folder, as in dataset configs.

    Returns:
        ``{field name: value}`` of the keys present.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not valid TOML, or a key is not a flag (the message names it).
        ImportError: Python 3.10 without the ``tomli`` package.
    """
    from fastdiff.dataset import _load_toml  # tomllib, or tomli on Python 3.10

    raw = _load_toml(Path(path))
    names = {f.name for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in names:
            raise ValueError(f"{path}: unknown key {key!r} (keys are `fastdiff train` flag names)")
        if name in _PATH_FIELDS and isinstance(value, str):
            value = Path(path).parent / value
        values[name] = value
    return values


def config_from_mapping(values: Mapping[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from field values as argparse or TOML give them (lists, strings for paths).

    Raises:
        ValueError: ``data`` or ``output`` is missing, or as :class:`TrainConfig`.
    """
    values = dict(values)
    for name in ("data", "output"):
        if values.get(name) is None:
            raise ValueError(f"--{name} is required (as a flag or a key of --config)")
    for name in _PATH_FIELDS:
        if values.get(name) is not None:
            values[name] = Path(values[name])
    for name in _TUPLE_FIELDS:
        if values.get(name) is not None:
            value = values[name]
            values[name] = (value,) if isinstance(value, str | int) else tuple(value)
    return TrainConfig(**values)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``fastdiff train`` arguments: flags given win over the
    ``--config`` file's keys, which win over the defaults.

    Raises:
        ValueError: As :func:`read_train_toml` and :func:`config_from_mapping`.
    """
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", "func", "command")}
    from_file = read_train_toml(args.config) if getattr(args, "config", None) is not None else {}
    return config_from_mapping({**from_file, **given})


def run_train(args: argparse.Namespace) -> int:
    """Body of ``fastdiff train``: train, print a summary; returns the exit status (0)."""
    result = train(config_from_args(args))
    last = result.losses[-1] if result.losses else float("nan")
    waiting = 100 * result.data_seconds / max(result.seconds, 1e-9)
    print(
        f"trained steps {result.first_step}-{result.first_step + len(result.losses) - 1} on {result.device} "
        f"in {result.seconds:.1f} s ({waiting:.0f}% waiting for data), last loss {last:.4f}, "
        f"{result.skipped_steps} non-finite steps skipped; wrote {result.output}"
    )
    return 0
