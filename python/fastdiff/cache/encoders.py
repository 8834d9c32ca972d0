"""The encoders of a cache: only the VAE, or only the text encoders and tokenizers, of a local pipeline
(never the UNet), and what they compute for the cache's entries.

The math is the training path's own (:mod:`fastdiff.training.sd_pipeline`), so a cached entry is what
training would compute: ``latents`` = the VAE posterior's mean scaled as the UNet expects, ``(mean -
shift_factor) * scaling_factor``, and ``latents_std`` = ``std * scaling_factor``, the scaled posterior
whose draw ``latents + latents_std * eps`` is the training draw (OneTrainer caches the distribution the
same way); ``prompt_embeds``/``pooled_prompt_embeds`` = :func:`~fastdiff.training.sd_pipeline.encode_prompts`.
The encoders run in float32 (training's default ``vae_dtype``); entries are stored in the manifest's
``dtype``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdiff.cache.digest import component_digest, salt
from fastdiff.cache.manifest import LatentSpec, StorageDtype, TextSpec
from fastdiff.training.sd_pipeline import (
    config_folder,
    encode_prompts,
    load_component,
    pipeline_kind,
    posterior,
    scale_latents,
)

#: Torch dtype of each storage dtype.
TORCH_DTYPES: dict[StorageDtype, torch.dtype] = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
}
#: Storage dtype of each safetensors dtype name a weights file may use (others are stored as f32).
SAFETENSORS_DTYPES: dict[str, StorageDtype] = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
#: Names of the tensors of a latent entry.
LATENT_TENSORS = ["latents", "latents_std"]


def stored_dtype(model: Path, model_config: Path | None = None) -> StorageDtype:
    """The dtype the pipeline's VAE weights are stored in (the default dtype of a cache of it): the
    first floating tensor of the VAE's (or the single file's) ``.safetensors``; ``"f32"`` for other
    formats.

    Raises:
        FileNotFoundError, ValueError: As :func:`~fastdiff.training.sd_pipeline.pipeline_kind`.
    """
    from safetensors import safe_open

    pipeline_kind(model, model_config)
    files = sorted((model / "vae").glob("*.safetensors")) if model.is_dir() else [model]
    for path in files:
        if path.suffix != ".safetensors":
            continue
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                dtype = f.get_slice(name).get_dtype()
                if dtype in SAFETENSORS_DTYPES:
                    return SAFETENSORS_DTYPES[dtype]
    return "f32"


@dataclass
class LatentEncoder:
    """A pipeline's VAE alone, on ``device``, in float32, frozen, with its manifest half.

    Attributes:
        vae: The diffusers ``AutoencoderKL``.
        spec: The manifest's ``latents`` half for entries stored in ``spec["dtype"]``.
    """

    vae: Any
    spec: LatentSpec

    @classmethod
    def load(
        cls, model: Path, model_config: Path | None, dtype: StorageDtype, device: torch.device
    ) -> LatentEncoder:
        """Load only ``vae/`` of ``model`` (a pipeline folder, or a single file with its
        ``model_config``) and compute the latents' salt: the VAE's digest (config and weights), the
        storage dtype and the tensor names.

        Raises:
            FileNotFoundError, ValueError: As :func:`~fastdiff.training.sd_pipeline.load_component`.
        """
        vae = load_component(model, model_config, "vae").to(device).requires_grad_(False).eval()
        digest = component_digest(model, config_folder(model, model_config), "vae")
        spec: LatentSpec = {
            "salt": salt({"vae": digest, "dtype": dtype, "tensors": LATENT_TENSORS}),
            "dtype": dtype,
            "channels": int(vae.config.latent_channels),
            "downscale": 2 ** (len(vae.config.block_out_channels) - 1),
            "tensors": list(LATENT_TENSORS),
            "vae": {
                "digest": digest,
                "scaling_factor": float(vae.config.scaling_factor),
                "shift_factor": getattr(vae.config, "shift_factor", None),
                "class": type(vae).__name__,
            },
        }
        return cls(vae, spec)

    def encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The latent entries of a pixel batch.

        Args:
            pixels: float ``[B, 3, H, W]`` in ``[-1, 1]`` (a loader batch's ``pixel_values``), ``H``
                and ``W`` multiples of ``downscale``; moved to the VAE's device.

        Returns:
            ``{"latents": (mean - shift) * scale, "latents_std": std * scale}``, float32
            ``[B, channels, H / downscale, W / downscale]`` on the VAE's device.
        """
        dist = posterior(self.vae, pixels.to(self.vae.device))
        return {
            "latents": scale_latents(self.vae.config, dist.mean),
            "latents_std": dist.std.float() * self.vae.config.scaling_factor,
        }


@dataclass
class TextEncoder:
    """A pipeline's text encoder(s) and tokenizer(s) alone, on ``device``, in float32, frozen, with
    their manifest half.

    Attributes:
        text_encoders: ``[text_encoder]``, SDXL ``[text_encoder, text_encoder_2]``.
        tokenizers: The matching tokenizers.
        sdxl: Whether the SDXL convention applies (penultimate states of both, pooled output).
        spec: The manifest's ``text`` half.
    """

    text_encoders: list[Any]
    tokenizers: list[Any]
    sdxl: bool
    spec: TextSpec

    @classmethod
    def load(
        cls, model: Path, model_config: Path | None, dtype: StorageDtype, device: torch.device
    ) -> TextEncoder:
        """Load only the text encoders and tokenizers of ``model`` and compute the text salt: their
        digests (configs, weights, vocabularies), ``max_length`` (the first tokenizer's
        ``model_max_length``), the storage dtype and the tensor shapes.

        Raises:
            FileNotFoundError, ValueError: As :func:`~fastdiff.training.sd_pipeline.load_component`.
        """
        sdxl = pipeline_kind(model, model_config) == "sdxl"
        suffixes = ["", "_2"] if sdxl else [""]
        encoders = [
            load_component(model, model_config, f"text_encoder{s}").to(device).requires_grad_(False).eval()
            for s in suffixes
        ]
        tokenizers = [load_component(model, model_config, f"tokenizer{s}") for s in suffixes]
        folder = config_folder(model, model_config)
        digests = {
            name: component_digest(model, folder, name)
            for s in suffixes
            for name in (f"text_encoder{s}", f"tokenizer{s}")
        }
        max_length = int(tokenizers[0].model_max_length)
        tensors = {"prompt_embeds": [max_length, sum(int(e.config.hidden_size) for e in encoders)]}
        if sdxl:
            tensors["pooled_prompt_embeds"] = [int(encoders[-1].config.projection_dim)]
        spec: TextSpec = {
            "salt": salt({"encoders": digests, "max_length": max_length, "dtype": dtype, "tensors": tensors}),
            "dtype": dtype,
            "tensors": tensors,
            "encoders": {"digest": salt(digests), "max_length": max_length},
        }
        return cls(encoders, tokenizers, sdxl, spec)

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The text entries of ``B`` captions, as training encodes them (no gradients).

        Returns:
            ``{"prompt_embeds": float32 [B, L, D]}``, plus ``"pooled_prompt_embeds"`` ``[B, P]`` for
            SDXL, on the encoders' device.
        """
        with torch.no_grad():
            hidden, pooled = encode_prompts(self.text_encoders, self.tokenizers, captions, sdxl=self.sdxl)
        out = {"prompt_embeds": hidden.float()}
        if pooled is not None:
            out["pooled_prompt_embeds"] = pooled.float()
        return out
