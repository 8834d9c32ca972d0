"""The encoders of a cache: only the VAE, or only the text encoders and tokenizers, of a local pipeline
(never the UNet or the transformer), and what they compute for the cache's entries.

The math is the training path's own, so a cached entry is what training would compute: ``latents`` =
the VAE posterior's mean scaled as the denoiser expects, ``(mean - shift_factor) * scaling_factor``
(:mod:`fastdiff.training.sd_pipeline`; every family's VAE, SD's without a shift, SD3/FLUX.1/Z-Image's
16-channel ones with theirs), and ``latents_std`` = ``std * scaling_factor``, the scaled posterior whose
draw ``latents + latents_std * eps`` is the training draw (OneTrainer caches the distribution the same
way); latents are stored unpacked, ``[C, h, w]`` (FLUX.1 packs them at train time). Text: SD/SDXL's
``prompt_embeds``/``pooled_prompt_embeds`` = :func:`~fastdiff.training.sd_pipeline.encode_prompts`; a
DiT family's = its preset's ``encode`` (the pipeline's ``encode_prompt``) as its ``entries``
(:mod:`fastdiff.training.families`: SD3 and FLUX.1 ``prompt_embeds`` ``[L, D]`` and
``pooled_prompt_embeds`` ``[P]``; Z-Image ``prompt_embeds`` zero-padded to ``[max_sequence_length, D]``
with ``prompt_attention_mask``). The encoders run in float32 (training's default ``vae_dtype``);
entries are stored in the manifest's ``dtype``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from fastdiff.cache.digest import component_digest, salt
from fastdiff.cache.manifest import LatentSpec, StorageDtype, TextSpec
from fastdiff.training import dit_pipeline, sd_pipeline
from fastdiff.training.dit_pipeline import dit_family
from fastdiff.training.families import Family
from fastdiff.training.sd_pipeline import encode_prompts, pipeline_kind, posterior, scale_latents

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


def model_kind(model: Path, model_config: Path | None = None) -> str:
    """The manifest's ``kind`` of a cache of ``model``: a DiT family's preset name (``"sd3"``,
    ``"flux"``, ``"z_image"``), else ``"sd"`` or ``"sdxl"``.

    Raises:
        FileNotFoundError, ValueError: As :func:`~fastdiff.training.sd_pipeline.pipeline_kind`.
    """
    family = dit_family(model)
    return family.name if family is not None else pipeline_kind(model, model_config)


def _load(model: Path, model_config: Path | None, name: str) -> Any:
    """Component ``name`` of ``model`` alone (float32, CPU), a DiT folder's or a Stable Diffusion one's."""
    if dit_family(model) is not None:
        return dit_pipeline.load_component(model, name)
    return sd_pipeline.load_component(model, model_config, name)


def _digest(model: Path, model_config: Path | None, name: str) -> str:
    """:func:`~fastdiff.cache.digest.component_digest` of component ``name``."""
    folder = model if dit_family(model) is not None else sd_pipeline.config_folder(model, model_config)
    return component_digest(model, folder, name)


def stored_dtype(model: Path, model_config: Path | None = None) -> StorageDtype:
    """The dtype the pipeline's VAE weights are stored in (the default dtype of a cache of it): the
    first floating tensor of the VAE's (or the single file's) ``.safetensors``; ``"f32"`` for other
    formats.

    Raises:
        FileNotFoundError, ValueError: As :func:`model_kind`.
    """
    from safetensors import safe_open

    model_kind(model, model_config)
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
        """Load only ``vae/`` of ``model`` (a pipeline folder, or a Stable Diffusion single file with
        its ``model_config``) and compute the latents' salt: the VAE's digest (config and weights), the
        storage dtype and the tensor names.

        Raises:
            FileNotFoundError, ValueError: As :func:`~fastdiff.training.sd_pipeline.load_component`.
        """
        vae = _load(model, model_config, "vae").to(device).requires_grad_(False).eval()
        digest = _digest(model, model_config, "vae")
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
        modules: What was loaded (the encoders, tokenizers, or a DiT pipeline holding only them).
        compute: ``B`` captions → the entries' tensors, batched (see :meth:`encode`).
        spec: The manifest's ``text`` half.
    """

    modules: list[Any]
    compute: Callable[[list[str]], dict[str, torch.Tensor]]
    spec: TextSpec

    @classmethod
    def load(
        cls,
        model: Path,
        model_config: Path | None,
        dtype: StorageDtype,
        device: torch.device,
        *,
        max_sequence_length: int | None = None,
        t5: bool = True,
    ) -> TextEncoder:
        """Load only the text encoders and tokenizers of ``model`` and compute the text salt: their
        digests (configs, weights, vocabularies), the maximum length, the storage dtype and the tensor
        shapes; for a DiT family also its name and ``t5``.

        Args:
            model: A pipeline folder, or a Stable Diffusion single file with its ``model_config``.
            model_config: As :meth:`LatentEncoder.load`.
            dtype: Storage dtype of the entries.
            device: Where the encoders run (in float32).
            max_sequence_length: DiT families: T5/Qwen tokens per caption (``None``: the family's
                default for the transformer). SD/SDXL use their tokenizer's ``model_max_length``.
            t5: SD3: whether T5 (``text_encoder_3``) encodes too (without it its part is zeros).

        Raises:
            FileNotFoundError, ValueError: As :func:`~fastdiff.training.sd_pipeline.load_component`.
        """
        family = dit_family(model)
        if family is not None:
            return _dit_text(model, family, dtype, device, max_sequence_length, t5)
        sdxl = pipeline_kind(model, model_config) == "sdxl"
        suffixes = ["", "_2"] if sdxl else [""]
        encoders = [
            _load(model, model_config, f"text_encoder{s}").to(device).requires_grad_(False).eval()
            for s in suffixes
        ]
        tokenizers = [_load(model, model_config, f"tokenizer{s}") for s in suffixes]
        digests = {
            name: _digest(model, model_config, name)
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

        def compute(captions: list[str]) -> dict[str, torch.Tensor]:
            hidden, pooled = encode_prompts(encoders, tokenizers, captions, sdxl=sdxl)
            out = {"prompt_embeds": hidden}
            if pooled is not None:
                out["pooled_prompt_embeds"] = pooled
            return out

        return cls([*encoders, *tokenizers], compute, spec)

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The text entries of ``B`` captions, as training encodes them (no gradients).

        Returns:
            float32 tensors on the encoders' device, by :attr:`spec`'s names, each ``[B, *shape]``:
            ``{"prompt_embeds": [B, L, D]}``, plus ``"pooled_prompt_embeds"`` ``[B, P]`` (SDXL, SD3,
            FLUX.1), or Z-Image's ``"prompt_attention_mask"`` ``[B, L]``.
        """
        with torch.no_grad():
            return {name: t.float() for name, t in self.compute(captions).items()}


def _dit_text(
    model: Path,
    family: Family,
    dtype: StorageDtype,
    device: torch.device,
    max_sequence_length: int | None,
    t5: bool,
) -> TextEncoder:
    """:meth:`TextEncoder.load` of a DiT folder: the family's pipeline with only its text components
    (and the scheduler), encoding through the preset (``encode``, then ``entries``); the transformer's
    weights are never read. The tensor shapes are those of the entry of ``""``."""
    index = json.loads((model / "model_index.json").read_text(encoding="utf-8"))
    text = [c for c in family.text_components if t5 or c not in family.optional_text]
    without = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)]
    without = [k for k in without if k not in text and k != "scheduler"]
    pipe = dit_pipeline.load_pipeline(model, without=without)
    # The transformer's config without its weights: SD3's encode_prompt without T5 reads the width of
    # T5's zeros (joint_attention_dim) from it. Set past the pipeline's __setattr__, which would record
    # it as a component.
    config = SimpleNamespace(**dit_pipeline.component_config(model, "transformer"))
    object.__setattr__(pipe, "transformer", SimpleNamespace(config=config))
    pipe.to(device)
    for name in text:
        module = getattr(pipe, name)
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    max_length = (
        max_sequence_length if max_sequence_length is not None else family.sequence_length(vars(config))
    )

    def compute(captions: list[str]) -> dict[str, torch.Tensor]:
        return family.entries(family.encode(pipe, captions, max_length, device), max_length)

    digests = {name: _digest(model, None, name) for name in text}
    with torch.no_grad():
        tensors = {name: list(t.shape[1:]) for name, t in compute([""]).items()}
    inputs = {"family": family.name, "max_length": max_length, "t5": t5}
    spec: TextSpec = {
        "salt": salt({"encoders": digests, **inputs, "dtype": dtype, "tensors": tensors}),
        "dtype": dtype,
        "tensors": tensors,
        "encoders": {"digest": salt(digests), **inputs},
    }
    return TextEncoder([pipe], compute, spec)
