"""Stable Diffusion 1.x/2.x and SDXL fine-tuning: :class:`PipelineTask`, and LoRA.

:class:`PipelineTask` is the Stable Diffusion side of ``fastdiff train --model PATH`` (the loop itself,
with AMP, EMA, min-SNR, the non-finite guard and checkpoints, is :func:`fastdiff.training.loop.run`). It
loads a diffusers pipeline from a local folder or single file (never from the network;
:mod:`fastdiff.training.sd_pipeline`), encodes captions with the pipeline's text encoder(s) — both of
SDXL's, with the pooled embedding and the ``add_time_ids`` built from the loader's
``original_sizes``/``crop_top_lefts``/``target_sizes`` (Podell et al. 2023, "SDXL", arXiv:2307.01952,
§2.2) — encodes ``pixel_values`` to VAE latents, and adds LoRA adapters (Hu et al. 2021,
arXiv:2106.09685) with peft in the format diffusers' ``load_lora_weights`` reads.

From a cache (``fastdiff train --cache``) the batches carry ``latents``/``latents_std`` and
``prompt_embeds``/``pooled_prompt_embeds`` instead, and the task is built without the VAE and/or the
text encoders and tokenizers: their weights are never read for training. Previews and a full
fine-tune's saved pipeline need them: they are loaded for the preview (and dropped after it) or the save.

This module must not download anything. diffusers and peft (the ``train`` extra) are imported where
used: ``fastdiff.cli`` imports the training modules to register their arguments, and must start fast
and report a missing extra itself.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastdiff.training.config import TrainConfig
from fastdiff.training.objective import (
    SampleLosses,
    add_training_noise,
    ddpm_noise_levels,
    diffusion_loss_from,
    loss_mask,
    sample_losses,
)
from fastdiff.training.protocols import TrainBatch, share_of
from fastdiff.training.sd_pipeline import (
    component_config,
    draw_cached_latents,
    encode_latents,
    encode_prompts,
    load_component,
    load_pipeline,
    pipeline_kind,
    preview_images,
    zero_dropped,
)
from fastdiff.types import Batch

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

#: UNet modules that get LoRA adapters by default (diffusers' attention projections).
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: Text-encoder modules that get LoRA adapters with ``train_text_encoder`` (CLIP attention projections).
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
#: File name of a LoRA adapter (diffusers' default ``weight_name``).
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
#: Name of the LoRA adapter peft adds (its default).
ADAPTER = "default"
#: The conditioning of one caption: ``prompt_embeds`` ``[L, D]`` and SDXL's ``pooled_prompt_embeds`` ``[P]``.
EmptyPrompt = tuple[torch.Tensor, torch.Tensor | None]
#: The components a cache half stands in for: ``"latents"`` the VAE, ``"text"`` the text encoders and
#: tokenizers (per kind).
CACHED_COMPONENTS = {
    "sd": {"latents": ("vae",), "text": ("text_encoder", "tokenizer")},
    "sdxl": {"latents": ("vae",), "text": ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")},
}


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


def vae_downscale(model: Path, model_config: Path | None = None) -> int:
    """The VAE's downsampling factor (8 for SD and SDXL), from its config file."""
    return int(2 ** (len(component_config(model, model_config, "vae")["block_out_channels"]) - 1))


def with_model_defaults(config: TrainConfig) -> TrainConfig:
    """``config`` with its model-dependent defaults filled in from ``config.model``'s config files (no
    weights are read): ``resolution`` = the UNet's ``sample_size`` × the VAE's downsampling (512 for SD
    1.5, 1024 for SDXL); ``bucket_step`` 64; ``learning_rate`` 1e-4 for LoRA, 1e-5 for a full
    fine-tune; ``prediction_type`` from the pipeline's scheduler config; ``lora_target_modules``
    :data:`UNET_LORA_TARGETS`.

    Raises:
        FileNotFoundError, ValueError: As :func:`~fastdiff.training.sd_pipeline.component_config`; or
            ``bucket_step`` is not a multiple of the VAE's × the UNet's downsampling factor, or a
            flow-matching setting (:data:`~fastdiff.training.config.FLOW_SETTINGS`) is set.
    """
    assert config.model is not None
    model, model_config = config.model, config.model_config
    vae_factor = vae_downscale(model, model_config)
    unet = component_config(model, model_config, "unet")
    unet_factor = 2 ** (len(unet["block_out_channels"]) - 1)
    sample_size = unet["sample_size"]
    if not isinstance(sample_size, int):
        sample_size = max(sample_size)
    scheduler = component_config(model, model_config, "scheduler")
    flow = config.flow_settings_set()
    if flow:
        raise ValueError(f"{flow[0]} applies to flow-matching DiT pipelines, not to {model}'s UNet")
    config = config.resolved(
        resolution=sample_size * vae_factor,
        bucket_step=64,
        learning_rate=1e-4 if config.lora_rank > 0 else 1e-5,
        prediction_type=scheduler.get("prediction_type", "epsilon"),
        lora_target_modules=UNET_LORA_TARGETS,
    )
    assert config.bucket_step is not None
    if config.bucket_step % (vae_factor * unet_factor):
        raise ValueError(
            f"bucket_step ({config.bucket_step}) must be a multiple of {vae_factor * unet_factor}, "
            f"the VAE's ({vae_factor}) times the UNet's ({unet_factor}) downsampling factor"
        )
    return config


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
        pipeline: The diffusers pipeline; its ``unet`` (and text encoders) are the trained modules. Its
            ``vae`` is ``None`` when the batches bring cached ``latents``, its text encoders and
            tokenizers when they bring cached ``prompt_embeds`` (see :meth:`from_config`).
        sdxl: Whether it is SDXL (two text encoders, ``add_time_ids``).
        empty_prompt: The conditioning of ``""`` (``[L, D]``, and ``[P]`` for SDXL) that replaces a
            dropped caption's cached embeddings when ``zero_dropped_captions`` is off; ``None`` when
            no dropped caption needs it (the text encoders encode ``""`` themselves).
        zero_dropped_captions: Whether a dropped caption (``caption_dropout``) is conditioned on zero
            embeddings rather than those of ``""``: SDXL pipelines with ``force_zeros_for_empty_prompt``
            (the default), whose classifier-free guidance uses zeros as the unconditional input.
        noise_scheduler: The DDPM training schedule made from the pipeline scheduler's config, with
            the run's ``prediction_type``.
    """

    def __init__(
        self,
        config: TrainConfig,
        device: torch.device,
        pipeline: DiffusionPipeline,
        sdxl: bool,
        empty_prompt: Callable[[], EmptyPrompt] | None = None,
    ) -> None:
        """Freeze, adapt and place the pipeline's modules for training.

        Raises:
            ValueError: ``train_text_encoder`` without the text encoders (cached text), or cached text
                with caption dropout on, no ``empty_prompt`` and no zero embeddings for dropped captions.

        ``empty_prompt`` gives the cached conditioning of ``""``; it is called (once) only when a
        dropped caption needs it: cached text, ``caption_dropout > 0``, no zero embeddings.
        """
        from diffusers import DDPMScheduler
        from diffusers.training_utils import cast_training_params

        self.config, self.device, self.pipeline, self.sdxl = config, device, pipeline, sdxl
        #: Each sample's loss and noise level of the last :meth:`loss` call.
        self.last_sample_losses: SampleLosses | None = None
        self.unet = pipeline.unet
        self.text_encoder = pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        encoder_names = ["text_encoder", "text_encoder_2"][: 2 if sdxl else 1]
        self.text_encoders = [getattr(pipeline, n) for n in encoder_names if getattr(pipeline, n) is not None]
        self.tokenizers = [pipeline.tokenizer] + ([pipeline.tokenizer_2] if sdxl else [])
        self.vae = pipeline.vae
        #: Which cache halves the batches must bring: ``"latents"`` without a VAE, ``"text"`` without
        #: text encoders.
        absent = {"latents": self.vae is None, "text": not self.text_encoders}
        self.cached = {half for half, gone in absent.items() if gone}
        self.zero_dropped_captions = sdxl and bool(
            getattr(pipeline.config, "force_zeros_for_empty_prompt", False)
        )
        if "text" in self.cached and config.train_text_encoder:
            raise ValueError(
                "train_text_encoder needs the text encoders: cached prompt_embeds cannot be trained"
            )
        self.empty_prompt: EmptyPrompt | None = None
        if "text" in self.cached and config.caption_dropout > 0 and not self.zero_dropped_captions:
            if empty_prompt is None:
                raise ValueError(
                    "cached text with caption_dropout > 0 needs the embeddings of '' (empty_prompt)"
                )
            self.empty_prompt = empty_prompt()
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

        for module in (self.unet, *([self.vae] if self.vae is not None else []), *self.text_encoders):
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
                        target_modules=list(config.lora_target_modules or UNET_LORA_TARGETS),
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
        if config.vae_dtype == "bf16" and self.vae is not None:
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
    def from_config(
        cls,
        config: TrainConfig,
        device: torch.device,
        *,
        cached: Collection[str] = (),
        empty_prompt: Callable[[], EmptyPrompt] | None = None,
    ) -> PipelineTask:
        """Load ``config.model`` (without the components a cache stands in for) and fill in the config's
        model-dependent defaults (:func:`with_model_defaults`).

        Args:
            config: The run's settings.
            device: Where the modules go.
            cached: The cache halves the batches bring (``"latents"``, ``"text"``): the VAE, resp. the
                text encoders and tokenizers (:data:`CACHED_COMPONENTS`), are not loaded. ``"text"`` is
                ignored with ``train_text_encoder`` (the trained encoders encode the captions).
            empty_prompt: Gives the cached conditioning of ``""``, for dropped captions (see
                ``__init__``).

        Raises:
            FileNotFoundError, ValueError: As :func:`load_pipeline` and :func:`with_model_defaults`.
        """
        assert config.model is not None
        kind = pipeline_kind(config.model, config.model_config)
        config = with_model_defaults(config)
        halves = [h for h in cached if not (h == "text" and config.train_text_encoder)]
        without = [c for h in halves for c in CACHED_COMPONENTS[kind][h]]
        model, model_config = config.model, config.model_config
        assert model is not None
        pipeline = load_pipeline(model, model_config, without=without)
        # What the pipeline computes from its VAE at construction (8 without one); previews need it.
        pipeline.vae_scale_factor = vae_downscale(model, model_config)
        return cls(config, device, pipeline, kind == "sdxl", empty_prompt if "text" in halves else None)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        named = {}
        names = ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]
        modules = {"unet": self.unet, **dict(zip(names, self.text_encoders, strict=True))}
        for prefix, module in modules.items():
            named.update({f"{prefix}.{k}": p for k, p in module.named_parameters() if p.requires_grad})
        return named

    def sharded_modules(self) -> dict[str, torch.nn.Module]:
        """The modules ``--fsdp`` shards: the UNet, and the text encoders when they are trained (a full
        fine-tune: every parameter of them is trained).

        Raises:
            ValueError: A LoRA run (its frozen base weights are not the trained ones).
        """
        if self.config.lora_rank:
            raise ValueError("fsdp shards full fine-tunes (lora_rank 0)")
        names = ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]
        encoders = dict(zip(names, self.text_encoders, strict=True)) if self.config.train_text_encoder else {}
        return {"unet": self.unet, **encoders}

    def use_modules(self, modules: dict[str, torch.nn.Module]) -> None:
        """Replace the modules :meth:`sharded_modules` named, in the task and its pipeline (by the
        unsharded copies a run ends with)."""
        for name, module in modules.items():
            setattr(self.pipeline, name, module)
        self.unet, self.text_encoder = self.pipeline.unet, self.pipeline.text_encoder
        names = ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]
        self.text_encoders = [getattr(self.pipeline, n) for n in names]

    def train_mode(self, on: bool) -> None:
        self.unet.train(on)
        for encoder in self.text_encoders:
            encoder.train(on and not self._frozen_text)

    def loss(
        self, batch: TrainBatch, *, generator: torch.Generator, amp_dtype: torch.dtype | None
    ) -> torch.Tensor:
        """Latent diffusion loss of a batch: VAE latents, noise, UNet prediction, (weighted) MSE.

        With cached latents (no VAE) the latents are drawn from the cached posterior
        (:func:`~fastdiff.training.sd_pipeline.draw_cached_latents`), as an uncached run draws them.
        """
        latents = self._latents(batch, generator)
        noised = add_training_noise(
            latents,
            self.noise_scheduler,
            generator=generator,
            noise_offset=self.config.noise_offset,
            input_perturbation=self.config.input_perturbation,
            **share_of(batch),
        )
        autocast = torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
        with autocast, torch.set_grad_enabled(not self._frozen_text):
            hidden, pooled = self._conditioning(batch)
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
        levels = ddpm_noise_levels(self.noise_scheduler, noised.timesteps)
        self.last_sample_losses = sample_losses(prediction, noised.target, levels)
        # Batches with a mask (mask_from_alpha / mask_dir) train the masked loss, automatically.
        mask = loss_mask(batch, prediction.shape[-2:], prediction.device)
        return diffusion_loss_from(
            self.noise_scheduler, noised, prediction, self.config.snr_gamma, batch.get("loss_weights"), mask
        )

    def _latents(self, batch: TrainBatch, generator: torch.Generator) -> torch.Tensor:
        """float32 ``[B, C, h, w]`` scaled latents: encoded from ``pixel_values``, or drawn from the
        cached posterior (``latents``, ``latents_std``)."""
        if self.vae is not None:
            return encode_latents(self.vae, batch["pixel_values"], generator, **share_of(batch))
        dtype = torch.bfloat16 if self.config.vae_dtype == "bf16" else torch.float32
        return draw_cached_latents(
            batch["latents"], batch["latents_std"], generator, dtype, **share_of(batch)
        )

    def _conditioning(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(hidden [B, L, D], pooled [B, P] or None)`` of the batch's (possibly dropped) captions."""
        dropped = batch.get("captions_dropped")
        if self.text_encoders:
            hidden, pooled = encode_prompts(
                self.text_encoders, self.tokenizers, batch["captions"], sdxl=self.sdxl
            )
        else:
            hidden = batch["prompt_embeds"].float()
            pooled = batch["pooled_prompt_embeds"].float() if self.sdxl else None
            if dropped is not None and any(dropped) and not self.zero_dropped_captions:
                # The loader's embeddings are of the caption before the loop dropped it: use "" 's.
                assert self.empty_prompt is not None  # checked in __init__
                rows = torch.tensor(dropped, device=hidden.device)
                empty_hidden, empty_pooled = self.empty_prompt
                hidden = torch.where(rows[:, None, None], empty_hidden.to(hidden), hidden)
                if pooled is not None and empty_pooled is not None:
                    pooled = torch.where(rows[:, None], empty_pooled.to(pooled), pooled)
        if self.zero_dropped_captions and dropped is not None and any(dropped):
            hidden, pooled = zero_dropped(hidden, pooled, dropped)
        return hidden, pooled

    @contextmanager
    def _frozen_components(self) -> Iterator[None]:
        """The pipeline with every component, for sampling: those a cache stands in for are loaded (on
        the device, in the dtypes training would hold them in) and dropped again on exit."""
        assert self.config.model is not None
        kind = "sdxl" if self.sdxl else "sd"
        names = [c for half in sorted(self.cached) for c in CACHED_COMPONENTS[kind][half]]
        for name in names:
            component = load_component(self.config.model, self.config.model_config, name)
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
                component.to(self.device)
                if name == "vae" and self.config.vae_dtype == "bf16":
                    component.to(dtype=torch.bfloat16)
                elif name != "vae" and self.amp is not None:
                    component.to(dtype=self.amp)
            self.pipeline.register_modules(**{name: component})
        try:
            yield
        finally:
            self.pipeline.register_modules(**dict.fromkeys(names))
            gc.collect()

    @property
    def size_multiple(self) -> int:
        """The VAE's times the UNet's downsampling (64 for SD 1.x and SDXL)."""
        return int(self.pipeline.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1))

    def preview(
        self, prompts: Sequence[str], *, seeds: Sequence[int], steps: int, width: int, height: int
    ) -> torch.Tensor:
        """Sample with the pipeline (its own scheduler), one CPU generator per (prompt, seed); the
        components a cache stands in for are loaded for the preview only."""
        with self._frozen_components():
            return preview_images(
                self.pipeline,
                prompts,
                seeds=seeds,
                steps=steps,
                width=width,
                height=height,
                guidance_scale=self.config.preview_guidance_scale,
                device_type=self.device.type,
                dtype=self.amp or (torch.bfloat16 if self.config.vae_dtype == "bf16" else None),
            )

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
        in float32: reloaded from a ``model`` folder, else upcast; those a cache stood in for loaded
        from ``model`` as they are."""
        if self.lora:
            self.save_lora(output)
            return
        model = self.config.model
        assert model is not None
        kind = "sdxl" if self.sdxl else "sd"
        for half in sorted(self.cached):
            for name in CACHED_COMPONENTS[kind][half]:
                self.pipeline.register_modules(
                    **{name: load_component(model, self.config.model_config, name)}
                )
        for name in ("vae", "text_encoder", "text_encoder_2"):
            component = getattr(self.pipeline, name, None)
            if component is None or component.dtype == torch.float32:
                continue
            if model.is_dir():
                component = type(component).from_pretrained(model, subfolder=name, local_files_only=True)
            setattr(self.pipeline, name, component.to(dtype=torch.float32))
        self.pipeline.save_pretrained(output, safe_serialization=True)
