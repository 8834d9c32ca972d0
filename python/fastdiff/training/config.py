"""The settings of a training run: :class:`TrainConfig`, the one definition of each ``fastdiff train``
option, and what derives from it: the command's flags (``--help`` grouped by :data:`GROUPS`), the keys of
a ``--config`` TOML file, the range and choice checks, and the class's attribute docs.

Each field carries its documentation and its CLI shape as metadata (see :func:`setting`); nothing else
restates them, so a new setting is one field (the metadata helpers are
:mod:`fastdiff.training.settings`; the flags and TOML keys made from the fields,
:mod:`fastdiff.training.flags`). The loader options among them (resolution, batch size,
bucket sides, crop, flip) take their bounds, choices and doc from the loader's option schema,
:mod:`fastdiff.options` (see :func:`loader_setting`); only what their default means in a run is said
here. This is the application's vocabulary: the training mechanics (``loop``, ``objective``,
``checkpoint``, ``outputs``) never import it; they read what they need through
:class:`fastdiff.training.protocols.LoopSettings`, which this class satisfies.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Collection
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from fastdiff.options import DATASET_TABLES, LOADER, LOADER_OPTIONS
from fastdiff.training.curriculum import parse_schedule
from fastdiff.training.flow import LOSS_WEIGHTINGS, TIMESTEP_SAMPLINGS
from fastdiff.training.settings import FLOW_ONLY, check_field, loader_setting, setting
from fastdiff.training.trackers import parse_report_to

#: Values of ``--mixed-precision``: autocast dtype used for the forward pass (``"no"``: float32).
MIXED_PRECISION = ("no", "fp16", "bf16")
#: Samplers of :func:`fastdiff.training.tiny.sample`: deterministic DDIM or ancestral DDPM.
SAMPLERS = ("ddim", "ddpm")
#: Values of ``--prediction-type``: the network's target (diffusers ``prediction_type`` names).
PREDICTION_TYPES = ("epsilon", "v_prediction")
#: Values of ``--lr-scheduler`` (diffusers ``get_scheduler`` names; warmup via ``--lr-warmup-steps``).
LR_SCHEDULERS = ("constant", "cosine", "linear")
#: Values of ``--vae-dtype``: the frozen VAE's dtype (fp16 is refused: SD's VAEs overflow in it).
VAE_DTYPES = ("fp32", "bf16")
#: Number of dataset captions used as preview prompts when ``preview_prompts`` is empty.
DEFAULT_PREVIEW_PROMPTS = 4
#: Number of the training set's most populated buckets previewed when ``preview_sizes`` is empty.
DEFAULT_PREVIEW_SIZES = 2
#: Values of the loader fields that neither the run nor its dataset config set (crop and flip: the
#: loader's own defaults).
LOADER_DEFAULTS = {"batch_size": 8, "crop": LOADER["crop"].default, "flip_prob": LOADER["flip_prob"].default}
#: Channels per attention head in the tiny UNet and text encoder.
HEAD_DIM = 16
#: Group count of the tiny UNet's GroupNorm layers; every UNet channel count must be a multiple.
NORM_GROUPS = 8
#: Settings that must be the same in a resumed run as in the run that wrote the checkpoint.
RESUME_MUST_MATCH = (
    "lora_rank",
    "lora_alpha",
    "lora_target_modules",
    "train_text_encoder",
    "gradient_accumulation_steps",
    "mixed_precision",
    "use_8bit_adam",
    "ema_decay",
    "lr_scheduler",
    "fsdp",
)
#: Settings only flow-matching DiT pipelines use: setting one for a UNet (or from scratch) is an error.
FLOW_SETTINGS = (
    "timestep_sampling",
    "logit_mean",
    "logit_std",
    "mode_scale",
    "timestep_shift",
    "loss_weighting",
    "guidance",
    "t5",
    "max_sequence_length",
)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; each field is the ``fastdiff train`` flag of the same name
    (``--max-steps`` for ``max_steps``) and a key of the ``--config`` TOML file.

    Without ``model`` the run trains the tiny from-scratch model (:mod:`fastdiff.training.tiny`:
    pixel space, joint text encoder, word-level tokenizer); with ``model`` it fine-tunes a Stable
    Diffusion 1.x/2.x or SDXL pipeline in latent space (:mod:`fastdiff.training.sd`), fully
    (``lora_rank = 0``) or with LoRA. Settings marked *from scratch* apply only without ``model``;
    setting one with ``model`` is an error. Settings that default to ``None`` take a value that
    depends on the path (listed per setting). The attributes below are the fields' ``help``
    metadata, which ``fastdiff train --help`` prints too.
    """

    data: Path = setting(  # noqa: RUF009 (a dataclasses.field)
        group="data",
        help="Folder of images and caption files (searched recursively), or a dataset config .toml "
        "(subsets, repeats, caption options; fastdiff.load_config). The config's loader options fill "
        "the loader settings left unset (resolution, batch size, bucket sides, crop, flip): a value set "
        "here wins. A config seed must equal --seed. Required.",
    )
    output: Path = setting(  # noqa: RUF009 (a dataclasses.field)
        group="checkpoints",
        help="Folder (created if missing) for loss.csv (step,loss,grad_norm,lr), loss.png, "
        "loss_by_timestep.csv/.png, spikes.jsonl, train_config.json, "
        "checkpoint-STEP/ folders, previews/ and the weights: from scratch unet/, text_encoder/, "
        "tokenizer/, scheduler/; a full fine-tune the whole pipeline (save_pretrained); LoRA "
        "pytorch_lora_weights.safetensors. Required.",
    )
    model: Path | None = setting(  # noqa: RUF009 (a dataclasses.field)
        None,
        group="model",
        help="Pipeline to fine-tune: a Stable Diffusion 1.x/2.x/SDXL folder (diffusers layout) or "
        "single-file checkpoint (.safetensors/.ckpt), or an SD3/3.5, FLUX.1 or Z-Image folder (the "
        "family is read from its model_index.json); unset: train the tiny model from scratch.",
    )
    model_config: Path | None = setting(  # noqa: RUF009 (a dataclasses.field)
        None,
        group="model",
        help="For a single-file --model (required there): a local diffusers pipeline folder of the same "
        "architecture whose configs from_single_file uses (nothing is downloaded).",
    )
    resolution: int | None = loader_setting(
        "resolution",
        default_doc="Default: the dataset config's, else 64 from scratch; the UNet's sample_size times "
        "the VAE's downsampling for a pipeline (512 for SD 1.5, 1024 for SDXL).",
    )
    resolution_schedule: str | None = setting(
        None,
        group="data",
        help="Coarse-to-fine curriculum RES:STEP,...,RES (256:2000,512: 256 px until step 2000, then "
        "512), each switch at the first epoch boundary at or after its step, re-bucketed without a "
        "rescan (logged; saved in checkpoints); validation and previews stay at --resolution.",
        parse=parse_schedule,
    )
    bucket_step: int | None = loader_setting(
        "bucket_step",
        default_doc="Default: the dataset config's, else 16 from scratch (a multiple of "
        "2 ** (len(unet_channels) - 1)), 64 for a pipeline (a multiple of the VAE's and UNet's "
        "downsampling, checked).",
    )
    min_bucket_side: int | None = loader_setting(
        "min_bucket_side", default_doc="Default: the dataset config's, else the loader's."
    )
    max_bucket_side: int | None = loader_setting(
        "max_bucket_side", default_doc="Default: the dataset config's, else the loader's."
    )
    min_bucket_fill: int | None = loader_setting(
        "min_bucket_fill",
        default_doc="Counted over every rank (batch_size x ranks fills whole global batches); the "
        "report (and `fastdiff scan`) say how many images moved. Default: the dataset config's, else "
        "no merging.",
    )
    max_extra_crop: float | None = loader_setting(
        "max_extra_crop",
        default_doc=f"Default: the dataset config's, else {LOADER['max_extra_crop'].default:g}.",
    )
    crop: str | None = loader_setting(
        "crop", default_doc=f"Default: the dataset config's, else {LOADER_DEFAULTS['crop']}."
    )
    flip_prob: float | None = loader_setting(
        "flip_prob", default_doc=f"Default: the dataset config's, else {LOADER_DEFAULTS['flip_prob']:g}."
    )
    crop_variants: int | None = loader_setting(
        "crop_variants",
        default_doc="Needed to cache random crops (--cache): the crops are frozen into the cache. Default: "
        "the dataset config's, else a new crop per sample and epoch.",
    )
    text_variants: int | None = loader_setting(
        "text_variants",
        default_doc="Needed to cache captions with caption operations (--cache). Default: the dataset "
        "config's, else new caption operations per sample and epoch.",
    )
    batch_size: int | None = loader_setting(
        "batch_size",
        default_doc="The last batch of a bucket may be smaller. Default: the dataset config's, else "
        f"{LOADER_DEFAULTS['batch_size']}.",
    )
    validation_split: float | None = loader_setting(
        "validation_split",
        default_doc="The held-out images give the validation loss (val_loss.csv, drawn in loss.png) every "
        "--validate-every steps and after the last (with --cache, from their cached entries, which "
        "`fastdiff cache` and --cache-build encode too). Default: the dataset config's, else 0 (none).",
    )
    cache: Path | None = setting(  # noqa: RUF009 (a dataclasses.field)
        None,
        group="data",
        help="Cache folder made by `fastdiff cache` (pipeline only: SD, SDXL, SD3, FLUX.1, Z-Image): "
        "batches bring the cached VAE latents "
        "(a fresh draw from the cached posterior each step) and text embeddings instead of pixels and "
        "captions, and the VAE / text encoders the cache stands in for are not loaded (previews load "
        "them for the preview, a full fine-tune's save for the save). A sample the cache lacks is an "
        "error naming the file and what changed; --cache-build fills it first.",
    )
    cache_build: bool = setting(
        False,
        group="data",
        help="Before training, encode what --cache lacks for this run's samples and captions (as "
        "`fastdiff cache` with this run's data, model and loader options; an up-to-date cache costs a "
        "scan). The VAE and text encoders are freed before the UNet (or a DiT's transformer) loads.",
    )
    max_steps: int = setting(
        500,
        group="optimisation",
        flags=("--steps",),
        min=1,
        help="Optimizer steps to run (skipped non-finite steps count too).",
    )
    learning_rate: float | None = setting(
        None,
        group="optimisation",
        gt=0,
        help="Peak AdamW learning rate. Default 1e-3 from scratch, 1e-4 for LoRA, 1e-5 for a full fine-tune.",
    )
    lr_scheduler: str = setting(
        "constant",
        group="optimisation",
        choices=LR_SCHEDULERS,
        help="Learning-rate schedule (diffusers get_scheduler; decay reaches 0 at max_steps).",
    )
    lr_warmup_steps: int = setting(
        0, group="optimisation", min=0, help="Steps of linear warmup from 0 to the learning rate."
    )
    weight_decay: float = setting(1e-2, group="optimisation", min=0, help="AdamW decoupled weight decay.")
    use_8bit_adam: bool = setting(
        False, group="optimisation", help="bitsandbytes' 8-bit AdamW (needs bitsandbytes installed)."
    )
    max_grad_norm: float = setting(
        1.0, group="optimisation", gt=0, help="Gradients are clipped to this global L2 norm."
    )
    gradient_accumulation_steps: int = setting(
        1, group="optimisation", min=1, help="Batches whose gradients are summed into one optimizer step."
    )
    mixed_precision: str = setting(
        "no",
        group="precision",
        choices=MIXED_PRECISION,
        help="Autocast dtype of the forward passes: no (float32), fp16 (CUDA only, with a gradient "
        "scaler) or bf16; trained weights stay float32.",
    )
    vae_dtype: str = setting(
        "fp32",
        group="precision",
        choices=VAE_DTYPES,
        help="Dtype of the frozen VAE (pipeline only). fp16 is refused: SD 1.x's and SDXL's VAEs "
        "overflow to NaN in fp16.",
    )
    caption_dropout: float = setting(
        0.1,
        group="optimisation",
        min=0,
        lt=1,
        help="Probability of replacing a caption by '' so the model also learns the unconditional "
        "prediction that classifier-free guidance needs (SDXL: by zero embeddings, the unconditional "
        "input of its pipeline).",
    )
    prediction_type: str | None = setting(
        None,
        group="model",
        choices=PREDICTION_TYPES,
        help="The network's target: epsilon, the noise (Ho et al. 2020), or v_prediction, "
        "v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 (Salimans & Ho 2022), whose MSE weighs the nearly-pure-"
        "noise timesteps 1 / a_t times more than epsilon's does. Default: epsilon from scratch, the "
        "pipeline scheduler's prediction_type for a pipeline.",
    )
    snr_gamma: float | None = setting(
        None,
        group="optimisation",
        gt=0,
        help="Gamma of min-SNR-gamma loss weighting (Hang et al. 2023; 5 is their choice); unset: off.",
    )
    noise_offset: float = setting(
        0.0, group="optimisation", min=0, help="Offset-noise strength (0: off; Guttenberg 2023)."
    )
    input_perturbation: float = setting(
        0.0, group="optimisation", min=0, help="Input-perturbation strength (0: off; Ning et al. 2023)."
    )
    timestep_sampling: str | None = setting(
        None,
        group="optimisation",
        choices=TIMESTEP_SAMPLINGS,
        help=f"{FLOW_ONLY}density of the training timesteps t in [0, 1] (1 = noise): uniform, "
        "logit_normal (logit(t) ~ N(logit_mean, logit_std^2); Esser et al. 2024, the SD3 paper) or mode "
        "(the SD3 paper's mode density; mode_scale > 0 moves mass to mid t). Default: the family's: "
        "logit_normal for SD3 and Z-Image, uniform for FLUX.1 (diffusers' SD3 and FLUX LoRA scripts).",
    )
    logit_mean: float = setting(
        0.0, group="optimisation", help=f"{FLOW_ONLY}mean m of logit(t) with logit_normal sampling."
    )
    logit_std: float = setting(
        1.0, group="optimisation", gt=0, help=f"{FLOW_ONLY}std s of logit(t) with logit_normal sampling."
    )
    mode_scale: float = setting(
        1.29, group="optimisation", help=f"{FLOW_ONLY}scale of mode sampling (the SD3 paper's 1.29)."
    )
    timestep_shift: float | None = setting(
        None,
        group="optimisation",
        gt=0,
        help=f"{FLOW_ONLY}shift s of the drawn timesteps, t' = s t / (1 + (s - 1) t), towards noise for "
        "s > 1 (SD3 paper; 1: none). Default: the pipeline scheduler's: with use_dynamic_shifting "
        "(FLUX.1) the resolution-dependent exp(mu), mu linear in the image's token count from base_shift "
        "at base_image_seq_len to max_shift at max_image_seq_len (0.5 at 256 tokens to 1.15 at 4096); "
        "else its shift (3.0 for SD3 and Z-Image).",
    )
    loss_weighting: str = setting(
        "none",
        group="optimisation",
        choices=LOSS_WEIGHTINGS,
        help=f"{FLOW_ONLY}per-sample weight of the velocity MSE: none, sigma_sqrt (1 / t^2) or cosmap "
        "(2 / (pi (1 - 2t + 2t^2))), as in the SD3 paper.",
    )
    guidance: float = setting(
        3.5,
        group="model",
        min=0,
        help=f"{FLOW_ONLY}value fed to the guidance embedding of FLUX.1-dev-style transformers "
        "(guidance_embeds) in training: diffusers' FLUX LoRA script's default. Transformers without a "
        "guidance embedding (schnell, SD3, Z-Image) have no use for it.",
    )
    t5: bool = setting(
        True,
        group="model",
        help="SD3: encode captions with T5 (text_encoder_3) too. --no-t5 does not load T5; its part of "
        "prompt_embeds is zeros, as in the pipeline without text_encoder_3 (less memory). FLUX.1 needs "
        "its T5.",
    )
    max_sequence_length: int | None = setting(
        None,
        group="model",
        min=1,
        help=f"{FLOW_ONLY}T5/Qwen tokens per caption (longer ones are cut). Default: the pipeline's: "
        "256 for SD3 and FLUX.1-schnell (no guidance embedding), 512 for FLUX.1-dev and Z-Image.",
    )
    ema_decay: float = setting(
        0.0,
        group="optimisation",
        min=0,
        lt=1,
        help="Decay of an exponential moving average of the trained weights (diffusers EMAModel; e.g. "
        "0.9999); 0 turns EMA off. With EMA the saved weights and previews are the EMA weights.",
    )
    lora_rank: int = setting(
        0,
        group="model",
        min=0,
        help="LoRA rank r (Hu et al. 2021) of the adapters peft adds to the UNet (and the text "
        "encoders with --train-text-encoder); 0 fine-tunes every weight. Pipeline only.",
    )
    lora_alpha: float | None = setting(
        None,
        group="model",
        gt=0,
        help="LoRA scale numerator (the update is alpha / r * B A); default: the rank.",
    )
    lora_target_modules: tuple[str, ...] | None = setting(
        None,
        group="model",
        help="Module names that get adapters. Default: the model's attention projections: the UNet's "
        "to_q to_k to_v to_out.0; a DiT family's (fastdiff.training.families; SD3 and FLUX.1 add the "
        "text stream's add_q_proj add_k_proj add_v_proj to_add_out, FLUX.1 its feed-forwards too).",
    )
    train_text_encoder: bool = setting(
        False,
        group="model",
        help="Also train the pipeline's text encoder(s) (LoRA on their attention projections, or all "
        "weights with --lora-rank 0). The tiny model always trains its own.",
    )
    gradient_checkpointing: bool = setting(
        False,
        group="precision",
        help="Recompute activations in the backward pass to save memory (pipeline).",
    )
    fsdp: bool = setting(
        False,
        group="precision",
        help="Under torchrun, shard the trained modules' weights, gradients and AdamW states over the "
        "ranks with FSDP2 (torch.distributed.fsdp.fully_shard; each module one unit) instead of "
        "replicating them with DDP: for full fine-tunes of the SD/SDXL UNet (and text encoders with "
        "--train-text-encoder) and the from-scratch model; NCCL on CUDA, gloo on the CPU. Checkpoints "
        "and the saved weights are the full (unsharded) ones, as with DDP, written by rank 0; a "
        "checkpoint resumes with the same --fsdp. Refused with LoRA, EMA, 8-bit Adam, fp16 and DiT "
        "pipelines. With one process it trains as without.",
    )
    max_consecutive_skips: int = setting(
        20, group="optimisation", min=1, help="The run stops after this many non-finite steps in a row."
    )
    spike_k: float = setting(
        6.0,
        group="optimisation",
        min=0,
        help="Loss-spike detector (a one-sided Hampel filter): a step whose loss exceeds the median of the "
        "last spike_window finite step losses by more than spike_k * 1.4826 * their MAD (median absolute "
        "deviation) is a spike; its step and the batch's paths (every rank's) go to the log and to "
        "OUTPUT/spikes.jsonl. It judges from the 10th finite loss on; 0 turns it off.",
    )
    spike_window: int = setting(
        50, group="optimisation", min=10, help="Step losses in the spike detector's rolling window."
    )
    skip_spikes: bool = setting(
        False,
        group="optimisation",
        help="Do not update the weights (nor EMA) on a spike step, on every rank, as for a non-finite "
        "one; the step still counts and advances the LR schedule, and skipped spikes count towards "
        "max_consecutive_skips. A skipped spike stays out of the detector's window.",
    )
    checkpoint_every: int = setting(
        500,
        group="checkpoints",
        min=0,
        help="Save OUTPUT/checkpoint-STEP/ every this many steps (0: never).",
    )
    resume: Path | None = setting(  # noqa: RUF009 (a dataclasses.field)
        None,
        group="checkpoints",
        help="A checkpoint-STEP folder (or a folder holding some: the highest step is taken) to "
        "continue from; the run then goes on to max_steps and appends to its own output.",
    )
    validate_every: int = setting(
        0,
        group="logging",
        min=0,
        help="Compute the validation loss (needs validation_split > 0) every this many steps; it is "
        "always computed after the last step (0: only then). Each held-out image is evaluated alone with "
        "noise, timestep and VAE draw seeded by (seed, its path), center-cropped and unflipped, in eval "
        "mode under no_grad, with the EMA weights when EMA is on; written to val_loss.csv.",
    )
    report_to: str = setting(
        "none",
        group="logging",
        help="Also log the loss, validation loss, learning rate, gradient norm, skipped steps, "
        "data-wait share and preview grids to: tensorboard (event files in OUTPUT/tensorboard/; needs "
        "the tensorboard package), wandb (a Weights & Biases run in offline mode in OUTPUT/wandb/, "
        "uploaded later with `wandb sync`; needs the wandb package), or both: tensorboard,wandb. The "
        "CSV and PNG files are written either way.",
    )
    preview_every: int = setting(
        0,
        group="logging",
        min=0,
        help="Sample the preview prompts into OUTPUT/previews/step-N-WxH.png (a grid per --preview-sizes "
        "size) every this many steps and after the last (0: never).",
    )
    preview_prompts: tuple[str, ...] = setting(
        (),
        group="logging",
        help=f"Preview prompts; default: the first {DEFAULT_PREVIEW_PROMPTS} distinct captions of the "
        "data (in file order; the first line of a multi-caption entry).",
    )
    preview_sizes: tuple[str, ...] = setting(
        (),
        group="logging",
        help="Preview sizes WxH in pixels (width x height, multiples of the model's downsampling: the "
        "VAE's x the UNet's for SD, the VAE's x the patch for a DiT, 2 ** (len(unet_channels) - 1) from "
        "scratch), given as several values or comma-separated ('1024x1024,832x1216'); one grid per size, "
        f"OUTPUT/previews/step-N-WxH.png. Default: the {DEFAULT_PREVIEW_SIZES} buckets holding the most "
        "training images (ties: the earlier bucket).",
    )
    preview_steps: int = setting(
        25,
        group="logging",
        min=1,
        help="Denoising steps of a preview (the pipeline's scheduler, or DDIM from scratch).",
    )
    preview_guidance_scale: float = setting(
        5.0, group="logging", help="Classifier-free guidance scale of the previews."
    )
    max_caption_tokens: int = setting(
        32,
        group="model",
        min=3,
        from_scratch=True,
        help="Token sequence length, special tokens included (<bos>, a word, <eos>).",
    )
    unet_channels: tuple[int, ...] = setting(
        (32, 64, 64),
        group="model",
        from_scratch=True,
        help=f"UNet block_out_channels, one resolution level each (multiples of "
        f"{NORM_GROUPS}; the last a multiple of {HEAD_DIM}); attention only on the lowest level and the "
        "mid block.",
    )
    layers_per_block: int = setting(
        1, group="model", min=1, from_scratch=True, help="ResNet layers per UNet level."
    )
    text_hidden_size: int = setting(
        64,
        group="model",
        min=1,
        from_scratch=True,
        help=f"Text encoder width (a multiple of {HEAD_DIM}), also the UNet's cross-attention width.",
    )
    text_layers: int = setting(
        2, group="model", min=1, from_scratch=True, help="Text encoder transformer layers."
    )
    num_train_timesteps: int = setting(
        1000, group="model", min=2, from_scratch=True, help="Diffusion timesteps T of the DDPM schedule."
    )
    beta_schedule: str = setting(
        "squaredcos_cap_v2",
        group="model",
        from_scratch=True,
        help="diffusers beta_schedule; the default is the cosine schedule of Nichol & Dhariwal 2021.",
    )
    seed: int = setting(
        0,
        group="optimisation",
        help="Seed of the initialisation, the loader's shuffle/crops/flips, noise and caption dropout.",
    )
    num_threads: int | None = setting(
        None, group="precision", min=1, help="Loader decode threads (default: every core)."
    )
    torch_threads: int | None = setting(
        None,
        group="precision",
        min=1,
        help="torch intra-op (OpenMP) threads, set process-wide with torch.set_num_threads (default: "
        "leave torch's setting). On a small CPU shared with other work, 1 can be several times faster "
        "than all cores: every op waits at an OpenMP barrier for all its threads.",
    )
    device: str = setting(
        "auto", group="precision", help="auto (CUDA when available, else CPU) or a torch device string."
    )

    def __post_init__(self) -> None:
        """Check each field's range and choices (from its metadata), then the cross-field rules.

        Raises:
            ValueError: A field is out of range, or a from-scratch field is set with ``model`` (or a
                pipeline field without it); the message names it.
        """
        for f in fields(self):
            check_field(f, getattr(self, f.name))
        if self.cache_build and self.cache is None:
            raise ValueError("cache_build needs a cache folder (--cache)")
        if self.fsdp:
            self._check_fsdp()
        parse_sizes(self.preview_sizes)
        parse_report_to(self.report_to)
        if self.validate_every and not self.validation_split and self.data.suffix.lower() != ".toml":
            # (a dataset config may set validation_split: the run checks once it is read)
            raise ValueError("validate_every needs held-out images: set validation_split > 0")
        if self.model is None:
            self._check_from_scratch()
        else:
            for f in fields(self):
                if f.metadata["from_scratch"] and getattr(self, f.name) != f.default:
                    raise ValueError(f"{f.name} applies only to the from-scratch model (no `model`)")

    def _check_fsdp(self) -> None:
        refused = {
            "lora_rank": "LoRA adapters are small: train them with DDP (without --fsdp)",
            "ema_decay": "EMA of sharded weights is not supported: use DDP for EMA",
            "use_8bit_adam": "bitsandbytes' 8-bit AdamW does not take sharded (DTensor) parameters",
        }
        for name, why in refused.items():
            if getattr(self, name):
                raise ValueError(f"fsdp with {name}: {why}")
        if self.mixed_precision == "fp16":
            raise ValueError(
                "fsdp with mixed_precision 'fp16': the gradient scaler does not run over sharded "
                "gradients; use 'bf16'"
            )

    def _check_from_scratch(self) -> None:
        for name in ("lora_rank", "model_config", "train_text_encoder", "gradient_checkpointing", "cache"):
            if getattr(self, name):
                raise ValueError(f"{name} needs a Stable Diffusion `model` to fine-tune")
        flow = self.flow_settings_set()
        if flow:
            raise ValueError(f"{flow[0]} needs a flow-matching DiT `model` (SD3, FLUX.1, Z-Image)")
        if not self.unet_channels or any(c < 1 or c % NORM_GROUPS for c in self.unet_channels):
            raise ValueError(f"unet_channels must be multiples of {NORM_GROUPS}, got {self.unet_channels}")
        if self.unet_channels[-1] % HEAD_DIM or self.text_hidden_size % HEAD_DIM:
            raise ValueError(f"unet_channels[-1] and text_hidden_size must be multiples of {HEAD_DIM}")
        downsampling = 2 ** (len(self.unet_channels) - 1)
        if self.bucket_step is not None and self.bucket_step % downsampling:
            raise ValueError(
                f"bucket_step ({self.bucket_step}) must be a multiple of the UNet's downsampling factor "
                f"{downsampling} (2 ** (len(unet_channels) - 1))"
            )

    def flow_settings_set(self) -> list[str]:
        """The :data:`FLOW_SETTINGS` set away from their defaults (what a UNet run must refuse)."""
        by_name = {f.name: f for f in fields(self)}
        return [name for name in FLOW_SETTINGS if getattr(self, name) != by_name[name].default]

    def resolved(self, **defaults: Any) -> TrainConfig:
        """This config with every ``None`` of ``defaults``' keys replaced by the given value."""
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON values (paths as strings, tuples as lists): ``train_config.json``."""
        return {k: _json_value(v) for k, v in asdict(self).items()}


def parse_sizes(values: Collection[str]) -> list[tuple[int, int]]:
    """``(width, height)`` of each ``"WxH"`` in ``values``, each of which may hold several separated by
    commas (``["1024x1024,832x1216"]`` → ``[(1024, 1024), (832, 1216)]``).

    Raises:
        ValueError: A size is not two positive integers joined by ``x`` (the message names it).
    """
    sizes = []
    for value in values:
        for part in value.split(","):
            width, sep, height = part.strip().lower().partition("x")
            if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
                raise ValueError(f"preview_sizes: {part!r} is not WIDTHxHEIGHT in pixels (e.g. 832x1216)")
            sizes.append((int(width), int(height)))
    return sizes


def _json_value(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value


def _attributes_doc() -> str:
    """The ``Attributes:`` section of :class:`TrainConfig`'s docstring, from the fields' ``help``."""
    lines = ["", "    Attributes:"]
    for f in fields(TrainConfig):
        lines.append(f"        {f.name}: {f.metadata['help']}")
    return "\n".join(lines) + "\n"


if TrainConfig.__doc__ is not None:  # None under python -OO
    TrainConfig.__doc__ += _attributes_doc()


def _base_type(hint: Any) -> tuple[type, bool]:
    """``(element type, is a tuple)`` of a field's annotation: ``Path | None`` → ``(Path, False)``,
    ``tuple[int, ...]`` → ``(int, True)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], True
    return hint, False


#: ``{field name: (element type, is a tuple)}`` of every :class:`TrainConfig` field.
FIELD_TYPES = {name: _base_type(hint) for name, hint in typing.get_type_hints(TrainConfig).items()}

#: Loader fields of :class:`TrainConfig` that a dataset config's ``[general]`` / ``[[datasets]]`` fill:
#: the options those tables hold that are ``None``-default fields here, in the schema's order. (``seed``
#: is in the tables too but never ``None``: a config seed must equal the run's, not fill it.)
DATASET_FIELDS = tuple(
    o.name
    for o in LOADER_OPTIONS
    if set(DATASET_TABLES) <= set(o.toml)
    and any(f.name == o.name and f.default is None for f in fields(TrainConfig))
)
