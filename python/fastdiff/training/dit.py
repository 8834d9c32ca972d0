"""Flow-matching DiT fine-tuning (SD3/3.5, FLUX.1, Z-Image): :class:`DiTTask`, and its LoRA.

:class:`DiTTask` is the DiT side of ``fastdiff train --model PATH`` for a pipeline folder whose
``model_index.json`` names a :data:`~fastdiff.training.families.FAMILIES` pipeline (the loop, with AMP,
EMA, the non-finite guard and exact resume, is :func:`fastdiff.training.loop.run`, as for Stable
Diffusion). A step encodes ``pixel_values`` to VAE latents normalised as the family's pipeline
denormalises them (``(z - shift_factor) · scaling_factor`` from the VAE config), encodes the captions
with the family's frozen text encoders (its preset's ``encode``), noises the latents along the
rectified-flow line at a drawn and shifted ``t`` (:mod:`fastdiff.training.flow`) and regresses the
transformer's velocity (its preset's ``predict``) with the chosen loss weighting. The transformer is
trained fully or with LoRA adapters (peft, the family's target modules), saved in the format the
pipeline's ``load_lora_weights`` reads.

From a cache (``fastdiff train --cache``) the batches carry ``latents``/``latents_std`` (unpacked
``[B, 16, h, w]``, normalised) and the preset's text entries (``prompt_embeds``, ...) instead, and the
task is built without the VAE and/or the text encoders and tokenizers, as the Stable Diffusion path
(:mod:`fastdiff.training.sd`): the latents are drawn from the cached posterior as the VAE draws them,
the conditioning is the preset's ``from_entries`` of the cached tensors, and a dropped caption takes
the cache's entry of ``""``. Previews and a full fine-tune's save load the missing components for
that moment.

Not yet on this path: training the text encoders, single-file checkpoints, and the DDPM settings
(``prediction_type``, ``snr_gamma``, noise offset, input perturbation): each is refused with a message.
Nothing here downloads; diffusers and peft are imported where used.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastdiff.training.config import TrainConfig
from fastdiff.training.dit_pipeline import (
    check_components,
    component_config,
    load_component,
    load_pipeline,
    vae_downscale,
)
from fastdiff.training.families import Conditioning, Family, PredictInputs
from fastdiff.training.flow import add_flow_noise, flow_loss, timestep_shift
from fastdiff.training.objective import SampleLosses, loss_mask, sample_losses
from fastdiff.training.protocols import TrainBatch, share_of
from fastdiff.training.sd_pipeline import draw_cached_latents, encode_latents, preview_images

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

#: File name of a LoRA adapter (diffusers' default ``weight_name``).
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
#: Name of the LoRA adapter peft adds (its default).
ADAPTER = "default"
#: Resolution of every supported family's base checkpoints, the default without a transformer
#: ``sample_size`` (FLUX.1, Z-Image).
NATIVE_RESOLUTION = 1024
#: Default ``bucket_step``: 64 px, as the Stable Diffusion path (and SimpleTuner), rounded up to a
#: multiple of the model's alignment.
BUCKET_STEP = 64
#: Settings of the DDPM objective that a flow-matching run must leave at their defaults.
DDPM_SETTINGS = ("prediction_type", "snr_gamma", "noise_offset", "input_perturbation")


def alignment(model: Path, family: Family) -> int:
    """Pixels per transformer token side: the VAE's downsampling × the family's patch (16 for SD3,
    FLUX.1 and Z-Image: 8 × 2). Bucket sides must be multiples of it."""
    return vae_downscale(model) * family.patch(component_config(model, "transformer"))


def with_model_defaults(config: TrainConfig, family: Family) -> TrainConfig:
    """``config`` with its model-dependent defaults filled in from the pipeline's config files (no
    weights are read), after checking what this path supports.

    Defaults: ``resolution`` the transformer's ``sample_size`` × the VAE's downsampling (1024 for SD3),
    else :data:`NATIVE_RESOLUTION`; ``bucket_step`` the least multiple of :func:`alignment` ≥
    :data:`BUCKET_STEP` (64 for every family); ``learning_rate`` 1e-4 for LoRA, 1e-5 for a full
    fine-tune; ``lora_target_modules``, ``timestep_sampling`` and ``max_sequence_length`` the family's.

    Raises:
        ValueError: ``bucket_step`` is not a multiple of the alignment (both numbers are named);
            ``t5`` off for a family without optional encoders; or a setting this path does not
            support (``train_text_encoder``, ``model_config``, a DDPM setting).
    """
    assert config.model is not None
    model = config.model
    unsupported = {
        "train_text_encoder": config.train_text_encoder,
        "model_config": config.model_config is not None,
        **{name: getattr(config, name) not in (None, 0.0) for name in DDPM_SETTINGS},
    }
    refused = [name for name, on in unsupported.items() if on]
    if refused:
        raise ValueError(f"{', '.join(refused)}: not supported for {family.pipeline} ({model}) yet")
    if not config.t5 and not family.optional_text:
        raise ValueError(f"--no-t5: {family.pipeline} needs all its text encoders")
    check_components(model, family, without=() if config.t5 else family.optional_text)
    align = alignment(model, family)
    transformer = component_config(model, "transformer")
    sample_size = transformer.get("sample_size")
    resolution = NATIVE_RESOLUTION if sample_size is None else int(sample_size) * vae_downscale(model)
    config = config.resolved(
        resolution=resolution,
        bucket_step=math.ceil(BUCKET_STEP / align) * align,
        learning_rate=1e-4 if config.lora_rank > 0 else 1e-5,
        lora_target_modules=family.lora_targets,
        timestep_sampling=family.sampling,
        max_sequence_length=family.sequence_length(transformer),
    )
    assert config.bucket_step is not None
    if config.bucket_step % align:
        raise ValueError(
            f"bucket_step ({config.bucket_step}) must be a multiple of {align}, the VAE's downsampling "
            f"({vae_downscale(model)}) times the transformer's patch ({align // vae_downscale(model)}) "
            f"of {model}"
        )
    return config


def lora_layers(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The transformer's LoRA weights in peft's key format (``…to_q.lora_A.weight``), what the
    families' ``save_lora_weights`` take (as diffusers' DreamBooth LoRA scripts save them)."""
    from peft.utils import get_peft_model_state_dict

    layers: dict[str, torch.Tensor] = get_peft_model_state_dict(transformer, adapter_name=ADAPTER)
    return layers


class DiTTask:
    """A flow-matching DiT pipeline as a :class:`fastdiff.training.protocols.Task` (see :meth:`from_config`).

    Attributes:
        config: The run's config with the model-dependent defaults filled in.
        family: The pipeline's preset.
        pipeline: The diffusers pipeline; its ``transformer`` is trained, the rest frozen.
        transformer: The trained transformer.
        scheduler_config: The pipeline scheduler's config (its shift settings).
        patch: The family's patch side in latents (image tokens = ``h · w / patch²``).
        cached: The cache halves the batches bring: ``"latents"`` (no ``vae``), ``"text"`` (no text
            encoders or tokenizers).
        empty_entry: With cached text, the cache's entry of ``""`` (each tensor without a batch
            dimension): a dropped caption's conditioning, and the names of the cached text tensors.
    """

    def __init__(
        self,
        config: TrainConfig,
        device: torch.device,
        pipeline: DiffusionPipeline,
        family: Family,
        empty_entry: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    ):
        """Freeze, adapt and place the pipeline's modules for training.

        ``empty_entry`` gives the cache's text entry of ``""``; it is called (once) when the pipeline
        has no text encoders (cached text).

        Raises:
            ValueError: Cached text (no text encoders) without ``empty_entry``.
        """
        from diffusers.training_utils import cast_training_params

        assert config.model is not None
        self.config, self.device, self.pipeline, self.family = config, device, pipeline, family
        #: Each sample's loss and noise level (sigma) of the last :meth:`loss` call.
        self.last_sample_losses: SampleLosses | None = None
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        self.text_encoders = [
            module
            for name in family.text_components
            if isinstance(module := getattr(pipeline, name, None), torch.nn.Module)
        ]
        absent = {"latents": self.vae is None, "text": not self.text_encoders}
        self.cached = {half for half, gone in absent.items() if gone}
        self.empty_entry: dict[str, torch.Tensor] = {}
        if "text" in self.cached:
            if empty_entry is None:
                raise ValueError("cached text needs the cache's embeddings of '' (empty_entry)")
            self.empty_entry = {k: v.to(device) for k, v in empty_entry().items()}
        self.scheduler_config = dict(pipeline.scheduler.config)
        self.patch = family.patch(dict(self.transformer.config))
        self.lora = config.lora_rank > 0
        self.amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
        for module in (self.transformer, *([self.vae] if self.vae is not None else []), *self.text_encoders):
            module.requires_grad_(False)
        if self.lora:
            from peft import LoraConfig

            assert config.lora_target_modules is not None  # resolved by with_model_defaults
            alpha = config.lora_alpha if config.lora_alpha is not None else config.lora_rank
            # peft draws the gaussian A matrices from torch's global generator: seed it from the run.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                self.transformer.add_adapter(
                    LoraConfig(
                        r=config.lora_rank,
                        # peft annotates an int, but scales by lora_alpha / r in floats: 8.5 is valid.
                        lora_alpha=alpha,  # type: ignore[arg-type]
                        init_lora_weights="gaussian",
                        target_modules=list(config.lora_target_modules),
                    )
                )
        else:
            self.transformer.requires_grad_(True)
        if config.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        pipeline.to(device)
        if config.vae_dtype == "bf16" and self.vae is not None:
            self.vae.to(dtype=torch.bfloat16)
        if self.amp is not None:
            for encoder in self.text_encoders:
                encoder.to(dtype=self.amp)
            if self.lora:
                # Frozen base weights in the autocast dtype; the adapters stay float32 for AdamW.
                self.transformer.to(dtype=self.amp)
                cast_training_params([self.transformer], torch.float32)
        pipeline.set_progress_bar_config(disable=True)

    @classmethod
    def from_config(
        cls,
        config: TrainConfig,
        device: torch.device,
        family: Family,
        *,
        cached: Collection[str] = (),
        empty_entry: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    ) -> DiTTask:
        """Load ``config.model`` (without T5 when ``t5`` is off, without the components a cache stands
        in for) and fill in the config's defaults (:func:`with_model_defaults`).

        Args:
            config: The run's settings.
            device: Where the modules go.
            family: The model's preset.
            cached: The cache halves the batches bring (``"latents"``, ``"text"``): the VAE, resp. the
                family's text encoders and tokenizers, are not loaded.
            empty_entry: Gives the cache's text entry of ``""`` (needed with ``"text"``).

        Raises:
            ValueError: As :func:`with_model_defaults` and ``__init__``.
        """
        config = with_model_defaults(config, family)
        assert config.model is not None
        pipeline = load_pipeline(config.model, without=cls.left_out(config, family, cached))
        # What the pipeline computes from its VAE at construction; without one it assumes 8.
        pipeline.vae_scale_factor = vae_downscale(config.model)
        return cls(config, device, pipeline, family, empty_entry)

    @staticmethod
    def left_out(config: TrainConfig, family: Family, cached: Collection[str]) -> list[str]:
        """The components a run does not load: T5 with ``t5`` off, the VAE for cached latents, the
        text encoders and tokenizers for cached text."""
        out = [] if config.t5 else list(family.optional_text)
        if "latents" in cached:
            out.append("vae")
        if "text" in cached:
            out += [c for c in family.text_components if c not in out]
        return out

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {f"transformer.{k}": p for k, p in self.transformer.named_parameters() if p.requires_grad}

    def train_mode(self, on: bool) -> None:
        self.transformer.train(on)

    def loss(
        self, batch: TrainBatch, *, generator: torch.Generator, amp_dtype: torch.dtype | None
    ) -> torch.Tensor:
        """Flow-matching loss of a batch: VAE latents (a posterior draw, normalised), the text
        conditioning of the (possibly dropped, i.e. ``""``) captions, noise at a drawn ``t`` shifted by
        :func:`~fastdiff.training.flow.timestep_shift` for the batch's image token count, the
        transformer's velocity and the weighted MSE (with the loader's ``loss_weights``)."""
        config = self.config
        assert config.timestep_sampling is not None and config.max_sequence_length is not None
        if self.vae is not None:
            latents = encode_latents(self.vae, batch["pixel_values"], generator, **share_of(batch))
        else:
            dtype = torch.bfloat16 if config.vae_dtype == "bf16" else torch.float32
            latents = draw_cached_latents(
                batch["latents"], batch["latents_std"], generator, dtype, **share_of(batch)
            )
        tokens = latents.shape[-2] * latents.shape[-1] // self.patch**2
        noised = add_flow_noise(
            latents,
            generator=generator,
            sampling=config.timestep_sampling,
            shift=timestep_shift(self.scheduler_config, tokens, config.timestep_shift),
            logit_mean=config.logit_mean,
            logit_std=config.logit_std,
            mode_scale=config.mode_scale,
            **share_of(batch),
        )
        autocast = torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
        with autocast, torch.no_grad():
            conditioning = self._conditioning(batch)
        inputs = PredictInputs(
            noised.sigmas, conditioning, int(self.pipeline.vae_scale_factor), config.guidance
        )
        with autocast:
            prediction = self.family.predict(self.transformer, noised.noisy, inputs)
        self.last_sample_losses = sample_losses(prediction, noised.target, noised.sigmas)
        # Batches with a mask train the masked loss (latents [B, C, h, w]; other layouts unmasked).
        mask = loss_mask(batch, prediction.shape[-2:], prediction.device) if prediction.ndim == 4 else None
        return flow_loss(prediction, noised, config.loss_weighting, batch.get("loss_weights"), mask)

    def _conditioning(self, batch: TrainBatch) -> Conditioning:
        """The preset's conditioning of the batch's (possibly dropped) captions: encoded, or the
        ``from_entries`` of the cached tensors (float32), a dropped caption's rows those of ``""``."""
        assert self.config.max_sequence_length is not None
        if "text" not in self.cached:
            return self.family.encode(
                self.pipeline, batch["captions"], self.config.max_sequence_length, self.device
            )
        raw: Mapping[str, Any] = batch
        entries = {name: raw[name].to(self.device).float() for name in self.empty_entry}
        dropped = batch.get("captions_dropped")
        if dropped is not None and any(dropped):
            # The loader's embeddings are of the caption before the loop dropped it: use "" 's.
            rows = torch.tensor(dropped, device=self.device)
            entries = {
                name: torch.where(rows.view(-1, *[1] * (t.dim() - 1)), self.empty_entry[name].to(t), t)
                for name, t in entries.items()
            }
        return self.family.from_entries(entries)

    @contextmanager
    def _frozen_components(self) -> Iterator[None]:
        """The pipeline with the components a cache stands in for loaded (on the device, in the dtypes
        training would hold them in), dropped again on exit."""
        assert self.config.model is not None
        names = self.cached_names()
        for name in names:
            component = load_component(self.config.model, name)
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False).to(self.device)
                if name == "vae" and self.config.vae_dtype == "bf16":
                    component.to(dtype=torch.bfloat16)
                elif name != "vae" and self.amp is not None:
                    component.to(dtype=self.amp)
            self.pipeline.register_modules(**{name: component})
        if "tokenizer" in names and hasattr(self.pipeline, "tokenizer_max_length"):
            # What SD3's and FLUX.1's pipelines read from their CLIP tokenizer at construction (77 without).
            self.pipeline.tokenizer_max_length = self.pipeline.tokenizer.model_max_length
        try:
            yield
        finally:
            self.pipeline.register_modules(**dict.fromkeys(names))
            gc.collect()

    def cached_names(self) -> list[str]:
        """The components the cache stands in for (the VAE, the run's text encoders and tokenizers)."""
        return [
            n
            for n in self.left_out(self.config, self.family, self.cached)
            if n not in self.left_out(self.config, self.family, ())
        ]

    @property
    def size_multiple(self) -> int:
        """The VAE's downsampling times the transformer's patch (16 for SD3, FLUX.1 and Z-Image)."""
        assert self.config.model is not None
        return vae_downscale(self.config.model) * self.patch

    def preview(
        self, prompts: Sequence[str], *, seeds: Sequence[int], steps: int, width: int, height: int
    ) -> torch.Tensor:
        """Sample with the pipeline (its own scheduler and shift), one CPU generator per (prompt, seed);
        the components a cache stands in for are loaded for the preview only."""
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
                max_sequence_length=self.config.max_sequence_length,
            )

    def save_lora(self, folder: Path) -> Path:
        """Write the adapter as ``folder/pytorch_lora_weights.safetensors`` with peft's adapter config
        as metadata (``load_lora_weights`` restores alpha and targets from it)."""
        type(self.pipeline).save_lora_weights(
            folder,
            transformer_lora_layers=lora_layers(self.transformer),
            transformer_lora_adapter_metadata=self.transformer.peft_config[ADAPTER].to_dict(),
            weight_name=LORA_WEIGHTS,
            safe_serialization=True,
        )
        return folder / LORA_WEIGHTS

    def checkpoint_files(self, folder: Path) -> None:
        """Extra files of a checkpoint: the adapter so far, loadable as is (LoRA runs only)."""
        if self.lora:
            self.save_lora(folder)

    def save(self, output: Path) -> None:
        """LoRA: the adapter file. Full fine-tune: the whole pipeline (``save_pretrained``, safetensors),
        frozen components held in bf16/fp16 for training reloaded from ``model`` in float32, and those
        left out (a T5 by ``t5 = False``, the components a cache stood in for) loaded as they are (when
        ``model`` has them)."""
        if self.lora:
            self.save_lora(output)
            return
        model = self.config.model
        assert model is not None
        names = [
            n for n in self.pipeline.components if isinstance(getattr(self.pipeline, n), torch.nn.Module)
        ]
        reload = [n for n in names if n != "transformer" and getattr(self.pipeline, n).dtype != torch.float32]
        missing = [
            n
            for n in self.left_out(self.config, self.family, self.cached)
            if getattr(self.pipeline, n) is None and (model / n).is_dir()
        ]
        for name in (*reload, *missing):
            component: Any = load_component(model, name)
            self.pipeline.register_modules(**{name: component})
        self.pipeline.save_pretrained(output, safe_serialization=True)
