"""Stable Diffusion 1.x/2.x and SDXL fine-tuning pieces: local pipelines, prompts, latents, LoRA.

:class:`PipelineTask` is the Stable Diffusion side of ``fastdiff train --model PATH`` (the loop itself,
with AMP, EMA, min-SNR, the non-finite guard and checkpoints, is :func:`fastdiff.training.loop.run`). It
loads a diffusers pipeline from a local folder or single file (never from the network), encodes captions
with the pipeline's text encoder(s) — both of SDXL's, with the pooled embedding and the ``add_time_ids``
built from the loader's ``original_sizes``/``crop_top_lefts``/``target_sizes`` (Podell et al. 2023,
"SDXL", arXiv:2307.01952, §2.2) — encodes ``pixel_values`` to VAE latents, and adds LoRA adapters (Hu et
al. 2021, arXiv:2106.09685) with peft in the format diffusers' ``load_lora_weights`` reads.

This module must not download anything: every ``from_pretrained``/``from_single_file`` call passes
``local_files_only=True``. diffusers and peft (the ``train`` extra) are imported where used:
``fastdiff.cli`` imports the training modules to register their arguments, and must start fast and
report a missing extra itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastdiff.training.config import TrainConfig
from fastdiff.training.objective import add_training_noise, diffusion_loss_from
from fastdiff.training.protocols import TrainBatch
from fastdiff.types import Batch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DiffusionPipeline

#: Pipeline classes (``model_index.json`` ``_class_name``) that can be fine-tuned, and their kind.
SUPPORTED_PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
#: Component folders a pipeline folder must have, per kind.
COMPONENTS = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}
#: Text-encoder modules that get LoRA adapters with ``train_text_encoder`` (CLIP attention projections).
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
#: File name of a LoRA adapter (diffusers' default ``weight_name``).
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
#: Name of the LoRA adapter peft adds (its default).
ADAPTER = "default"
#: Suffixes of single-file checkpoints.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def pipeline_kind(model: Path, model_config: Path | None = None) -> str:
    """``"sd"`` (SD 1.x/2.x) or ``"sdxl"`` for a pipeline folder or single-file checkpoint.

    A folder is identified by its ``model_index.json``; a single file by ``model_config``'s (required
    for single files: without it diffusers would look for configs online).

    Raises:
        FileNotFoundError: ``model`` does not exist.
        ValueError: The layout is unknown or the pipeline class is not supported; the message says why.
    """
    if not model.exists():
        raise FileNotFoundError(f"model {model} does not exist")
    if model.is_dir():
        index = model / "model_index.json"
        if not index.is_file():
            raise ValueError(
                f"model {model}: unknown layout, no model_index.json. Expected a diffusers pipeline folder "
                f"(SD: {', '.join(COMPONENTS['sd'])}/; SDXL adds text_encoder_2/, tokenizer_2/) or a "
                f"single-file checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)})"
            )
        class_name = json.loads(index.read_text()).get("_class_name")
        if class_name not in SUPPORTED_PIPELINES:
            raise ValueError(
                f"model {model}: pipeline class {class_name!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_PIPELINES)}"
            )
        kind = SUPPORTED_PIPELINES[class_name]
        missing = [c for c in COMPONENTS[kind] if not (model / c).is_dir()]
        if missing:
            raise ValueError(
                f"model {model}: {class_name} folder lacks {', '.join(f'{m}/' for m in missing)}"
            )
        return kind
    if model.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ValueError(
            f"model {model}: unknown layout; expected a pipeline folder or a "
            f"{'/'.join(SINGLE_FILE_SUFFIXES)} file"
        )
    if model_config is None:
        # Without it diffusers looks for the configs in the Hugging Face cache and may try to download.
        raise ValueError(
            f"model {model}: a single-file checkpoint needs --model-config, a local diffusers pipeline "
            "folder of the same architecture (its configs and tokenizers are used; nothing is downloaded)"
        )
    return pipeline_kind(model_config)


def load_pipeline(model: Path, model_config: Path | None = None) -> DiffusionPipeline:
    """Load an SD 1.x/2.x or SDXL pipeline from local files only (weights in float32, diffusers' default).

    Args:
        model: A diffusers pipeline folder, or a single-file checkpoint loaded with diffusers'
            ``from_single_file``.
        model_config: For a single file (required): a local pipeline folder of the same architecture
            whose component configs and tokenizers are used.

    Returns:
        A ``StableDiffusionPipeline`` (no safety checker) or ``StableDiffusionXLPipeline`` on the CPU.

    Raises:
        FileNotFoundError: ``model`` does not exist.
        ValueError: Unknown layout or class (see :func:`pipeline_kind`), or a single file that does not
            load with ``model_config``'s configs.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kind = pipeline_kind(model, model_config)
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    extra: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False} if kind == "sd" else {}
    if model.is_dir():
        return cls.from_pretrained(model, local_files_only=True, **extra)
    try:
        return cls.from_single_file(
            str(model),
            config=None if model_config is None else str(model_config),
            local_files_only=True,
            **extra,
        )
    except Exception as e:  # diffusers raises several types here (SingleFileComponentError, OSError, ...)
        raise ValueError(
            f"model {model}: could not load the single-file checkpoint with the configs of "
            f"{model_config}: {e}"
        ) from e


def tokenize(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """CLIP token ids padded/truncated to ``tokenizer.model_max_length`` (77 for SD): int64 ``[B, L]``."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompts(
    text_encoders: Sequence[torch.nn.Module],
    tokenizers: Sequence[Any],
    captions: Sequence[str],
    *,
    sdxl: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The UNet's text conditioning, as the diffusers pipelines compute it (no clip skip).

    SD 1.x/2.x: the text encoder's last hidden state. SDXL: each encoder's penultimate hidden state,
    concatenated on the channel axis (768 + 1280 = 2048 for SDXL), and the second encoder's projected
    pooled output (``text_embeds``).

    Args:
        text_encoders: ``[text_encoder]``, or ``[text_encoder, text_encoder_2]`` for SDXL.
        tokenizers: The matching tokenizers.
        captions: ``B`` texts.
        sdxl: Which of the two conventions.

    Returns:
        ``(hidden, pooled)``: float ``[B, L, D]`` on the encoders' device, and ``[B, P]`` for SDXL
        (``None`` otherwise).
    """
    device = next(text_encoders[0].parameters()).device
    if not sdxl:
        return text_encoders[0](tokenize(tokenizers[0], captions).to(device))[0], None
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        out = encoder(tokenize(tokenizer, captions).to(device), output_hidden_states=True)
        pooled = out[0]  # CLIPTextModelWithProjection (the last encoder): text_embeds
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def zero_dropped(
    hidden: torch.Tensor, pooled: torch.Tensor | None, dropped: Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The conditioning with the rows of dropped captions set to zero.

    SDXL's unconditional input is all-zero embeddings: its pipeline zeroes the negative prompt's
    hidden states and pooled output (``force_zeros_for_empty_prompt``), as Stability's
    generative-models training zeroes the embeddings of dropped captions (``ucg_rate``). Training the
    dropped captions on the embeddings of ``""`` instead would teach a different unconditional
    prediction from the one guidance uses.

    Args:
        hidden: ``[B, L, D]`` text hidden states.
        pooled: ``[B, P]`` pooled text embeddings, or ``None``.
        dropped: ``B`` flags.

    Returns:
        ``(hidden, pooled)`` with the dropped rows zero (a multiplication, so gradients still flow to
        the kept rows).
    """
    keep = torch.tensor([not d for d in dropped], dtype=hidden.dtype, device=hidden.device)
    hidden = hidden * keep[:, None, None]
    if pooled is not None:
        pooled = pooled * keep.to(pooled.dtype)[:, None]
    return hidden, pooled


def add_time_ids(batch: Batch, device: torch.device) -> torch.Tensor:
    """SDXL's micro-conditioning: ``original_size + crop_top_left + target_size`` per sample.

    Args:
        batch: A :class:`fastdiff.DataLoader` batch (``original_sizes`` and ``target_sizes`` as ``(h, w)``,
            ``crop_top_lefts`` as ``(top, left)``, in pixels).
        device: Where the result goes.

    Returns:
        float32 ``[B, 6]``: ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``.
    """
    rows = [
        [*original, *crop, *target]
        for original, crop, target in zip(
            batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"], strict=True
        )
    ]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sample VAE latents of ``pixels`` and scale them as the pipelines expect.

    ``z ~ q(z | x)`` (a draw from the encoder's diagonal Gaussian, with ``generator``), then
    ``(z - shift_factor) * scaling_factor`` from the VAE config (SD 1.x: 0.18215, SDXL: 0.13025).

    Args:
        vae: A diffusers ``AutoencoderKL`` (frozen; run without gradients in its own dtype).
        pixels: float ``[B, 3, H, W]`` in ``[-1, 1]``, ``H`` and ``W`` multiples of the VAE's downsampling.
        generator: Source of the latent draw, on ``pixels``' device.

    Returns:
        float32 ``[B, latent_channels, H / f, W / f]``.
    """
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator=generator).float()
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * vae.config.scaling_factor


def lora_layers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A peft-adapted module's LoRA weights (adapter :data:`ADAPTER`) with diffusers' key names, what
    ``save_lora_weights`` takes: ``…q_proj.lora_A.default.weight`` → ``…q_proj.lora.down.weight``."""
    from diffusers.utils import convert_state_dict_to_diffusers

    pattern = re.compile(rf"\.(lora_[AB])\.{ADAPTER}\.")
    peft_state = {
        pattern.sub(r".\1.", k): v for k, v in module.state_dict().items() if pattern.search(k) is not None
    }
    return convert_state_dict_to_diffusers(peft_state)


class PipelineTask:
    """A Stable Diffusion pipeline as a :class:`fastdiff.training.protocols.Task` (see :meth:`from_config`).

    Attributes:
        config: The run's config with the model-dependent defaults filled in.
        pipeline: The diffusers pipeline; its ``unet`` (and text encoders) are the trained modules.
        sdxl: Whether it is SDXL (two text encoders, ``add_time_ids``).
        zero_dropped_captions: Whether a dropped caption (``caption_dropout``) is conditioned on zero
            embeddings rather than those of ``""``: SDXL pipelines with ``force_zeros_for_empty_prompt``
            (the default), whose classifier-free guidance uses zeros as the unconditional input.
        noise_scheduler: The DDPM training schedule made from the pipeline scheduler's config, with
            the run's ``prediction_type``.
    """

    def __init__(
        self, config: TrainConfig, device: torch.device, pipeline: DiffusionPipeline, sdxl: bool
    ) -> None:
        from diffusers import DDPMScheduler
        from diffusers.training_utils import cast_training_params

        self.config, self.device, self.pipeline, self.sdxl = config, device, pipeline, sdxl
        self.unet = pipeline.unet
        self.text_encoder = pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        self.text_encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if sdxl else [])
        self.tokenizers = [pipeline.tokenizer] + ([pipeline.tokenizer_2] if sdxl else [])
        self.vae = pipeline.vae
        self.zero_dropped_captions = sdxl and bool(
            getattr(pipeline.config, "force_zeros_for_empty_prompt", False)
        )
        self.lora = config.lora_rank > 0
        amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
        self.amp = amp

        scheduler_config = pipeline.scheduler.config
        self.noise_scheduler = DDPMScheduler.from_config(
            scheduler_config, prediction_type=config.prediction_type
        )
        if scheduler_config.get("prediction_type") != config.prediction_type:
            # Previews (and a saved full fine-tune) must sample with what the UNet now predicts.
            pipeline.scheduler = type(pipeline.scheduler).from_config(
                scheduler_config, prediction_type=config.prediction_type
            )

        for module in (self.unet, self.vae, *self.text_encoders):
            module.requires_grad_(False)
        trained = [self.unet, *(self.text_encoders if config.train_text_encoder else [])]
        if self.lora:
            from peft import LoraConfig

            alpha = config.lora_alpha if config.lora_alpha is not None else config.lora_rank
            # peft draws the gaussian A matrices from torch's global generator: seed it from the run
            # (and leave the caller's state alone), so that `seed` fixes the initialisation.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                self.unet.add_adapter(
                    LoraConfig(
                        r=config.lora_rank,
                        # peft annotates an int, but scales by lora_alpha / r in floats: 8.5 is valid.
                        lora_alpha=alpha,  # type: ignore[arg-type]
                        init_lora_weights="gaussian",
                        target_modules=list(config.lora_target_modules),
                    )
                )
                if config.train_text_encoder:
                    from peft import inject_adapter_in_model

                    # peft directly, not transformers' `add_adapter` (transformers 5 wants peft >= 0.22).
                    self.text_lora_config = LoraConfig(
                        r=config.lora_rank,
                        # peft annotates an int, but scales by lora_alpha / r in floats: 8.5 is valid.
                        lora_alpha=alpha,  # type: ignore[arg-type]
                        init_lora_weights="gaussian",
                        target_modules=list(TEXT_ENCODER_LORA_TARGETS),
                    )
                    for encoder in self.text_encoders:
                        inject_adapter_in_model(self.text_lora_config, encoder, adapter_name=ADAPTER)
        else:
            for module in trained:
                module.requires_grad_(True)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if config.train_text_encoder:
                for encoder in self.text_encoders:
                    # transformers 5 renamed it (the old name warns); 4.x has only the old one.
                    enable = getattr(encoder, "activation_checkpointing_enable", None)
                    (enable or encoder.gradient_checkpointing_enable)()

        pipeline.to(device)
        if config.vae_dtype == "bf16":
            self.vae.to(dtype=torch.bfloat16)
        if amp is not None and self.lora:
            # Frozen base weights in the autocast dtype (half the memory); the adapters stay float32 so
            # that AdamW and the gradient scaler work on float32. Only the adapter is saved.
            for module in (self.unet, *self.text_encoders):
                module.to(dtype=amp)
            cast_training_params(trained, torch.float32)
        elif amp is not None and not config.train_text_encoder:
            for encoder in self.text_encoders:
                encoder.to(dtype=amp)
        self._frozen_text = not config.train_text_encoder
        pipeline.set_progress_bar_config(disable=True)

    @classmethod
    def from_config(cls, config: TrainConfig, device: torch.device) -> PipelineTask:
        """Load ``config.model`` and fill in the config's model-dependent defaults.

        Defaults: ``resolution`` = the UNet's ``sample_size`` × the VAE's downsampling (512 for SD 1.5,
        1024 for SDXL); ``bucket_step`` 64; ``learning_rate`` 1e-4 for LoRA, 1e-5 for a full fine-tune;
        ``prediction_type`` from the pipeline's scheduler config.

        Raises:
            FileNotFoundError, ValueError: As :func:`load_pipeline`; or ``bucket_step`` is not a multiple
                of the VAE's × the UNet's downsampling factor.
        """
        assert config.model is not None
        kind = pipeline_kind(config.model, config.model_config)
        pipeline = load_pipeline(config.model, config.model_config)
        vae_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        unet_factor = 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
        sample_size = pipeline.unet.config.sample_size
        if not isinstance(sample_size, int):
            sample_size = max(sample_size)
        config = config.resolved(
            resolution=sample_size * vae_factor,
            bucket_step=64,
            learning_rate=1e-4 if config.lora_rank > 0 else 1e-5,
            prediction_type=pipeline.scheduler.config.get("prediction_type", "epsilon"),
        )
        if config.bucket_step % (vae_factor * unet_factor):
            raise ValueError(
                f"bucket_step ({config.bucket_step}) must be a multiple of {vae_factor * unet_factor}, "
                f"the VAE's ({vae_factor}) times the UNet's ({unet_factor}) downsampling factor"
            )
        return cls(config, device, pipeline, kind == "sdxl")

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        named = {}
        modules = {"unet": self.unet, "text_encoder": self.text_encoders[0]}
        if self.sdxl:
            modules["text_encoder_2"] = self.text_encoders[1]
        for prefix, module in modules.items():
            named.update({f"{prefix}.{k}": p for k, p in module.named_parameters() if p.requires_grad})
        return named

    def train_mode(self, on: bool) -> None:
        self.unet.train(on)
        for encoder in self.text_encoders:
            encoder.train(on and not self._frozen_text)

    def loss(
        self, batch: TrainBatch, *, generator: torch.Generator, amp_dtype: torch.dtype | None
    ) -> torch.Tensor:
        """Latent diffusion loss of a batch: VAE latents, noise, UNet prediction, (weighted) MSE."""
        latents = encode_latents(self.vae, batch["pixel_values"], generator)
        noised = add_training_noise(
            latents,
            self.noise_scheduler,
            generator=generator,
            noise_offset=self.config.noise_offset,
            input_perturbation=self.config.input_perturbation,
        )
        autocast = torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
        with autocast, torch.set_grad_enabled(not self._frozen_text):
            hidden, pooled = encode_prompts(
                self.text_encoders, self.tokenizers, batch["captions"], sdxl=self.sdxl
            )
            dropped = batch.get("captions_dropped")
            if self.zero_dropped_captions and dropped is not None and any(dropped):
                hidden, pooled = zero_dropped(hidden, pooled, dropped)
        kwargs: dict[str, Any] = {}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": pooled,
                "time_ids": add_time_ids(batch, self.device),
            }
        with autocast:
            prediction = self.unet(
                noised.noisy, noised.timesteps, encoder_hidden_states=hidden, **kwargs
            ).sample
        return diffusion_loss_from(
            self.noise_scheduler, noised, prediction, self.config.snr_gamma, batch.get("loss_weights")
        )

    def preview(self, prompts: Sequence[str], *, seeds: Sequence[int], steps: int) -> torch.Tensor:
        """Sample with the pipeline (its own scheduler), one CPU generator per (prompt, seed)."""
        texts = [p for p in prompts for _ in seeds]
        generators = [torch.Generator("cpu").manual_seed(s) for _ in prompts for s in seeds]
        dtype = self.amp or (torch.bfloat16 if self.config.vae_dtype == "bf16" else None)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            images = self.pipeline(
                texts,
                height=self.config.resolution,
                width=self.config.resolution,
                num_inference_steps=steps,
                guidance_scale=self.config.preview_guidance_scale,
                generator=generators,
                output_type="pt",
            ).images
        return images.float().clamp(0, 1).cpu()

    def save_lora(self, folder: Path) -> Path:
        """Write the adapters as ``folder/pytorch_lora_weights.safetensors`` (diffusers' LoRA format,
        with peft's adapter config as metadata so ``load_lora_weights`` restores alpha and targets)."""
        layers: dict[str, Any] = {
            "unet_lora_layers": lora_layers(self.unet),
            "unet_lora_adapter_metadata": self.unet.peft_config[ADAPTER].to_dict(),
        }
        if self.config.train_text_encoder:
            names = ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]
            for name, encoder in zip(names, self.text_encoders, strict=True):
                layers[f"{name}_lora_layers"] = lora_layers(encoder)
                layers[f"{name}_lora_adapter_metadata"] = self.text_lora_config.to_dict()
        type(self.pipeline).save_lora_weights(
            folder, **layers, weight_name=LORA_WEIGHTS, safe_serialization=True
        )
        return folder / LORA_WEIGHTS

    def checkpoint_files(self, folder: Path) -> None:
        """Extra files of a checkpoint: the adapter so far, loadable as is (LoRA runs only)."""
        if self.lora:
            self.save_lora(folder)

    def save(self, output: Path) -> None:
        """LoRA: the adapter file. Full fine-tune: the whole pipeline (``save_pretrained``, safetensors),
        with frozen components that were held in bf16/fp16 for training (VAE, text encoders) put back
        in float32: reloaded from a ``model`` folder, else upcast."""
        if self.lora:
            self.save_lora(output)
            return
        model = self.config.model
        for name in ("vae", "text_encoder", "text_encoder_2"):
            component = getattr(self.pipeline, name, None)
            if component is None or component.dtype == torch.float32:
                continue
            if model is not None and model.is_dir():
                component = type(component).from_pretrained(model, subfolder=name, local_files_only=True)
            setattr(self.pipeline, name, component.to(dtype=torch.float32))
        self.pipeline.save_pretrained(output, safe_serialization=True)
