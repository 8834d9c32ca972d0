"""Tiny random Stable Diffusion 1.x and SDXL pipelines, built and saved locally (nothing downloads).

Same layouts as the real checkpoints (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, SDXL's
``text_encoder_2/`` and ``tokenizer_2/``, ``scheduler/``, ``model_index.json``), with a few channels per
layer so that a training step takes a fraction of a second on a CPU. The tokenizer is a real
``CLIPTokenizer`` (byte-level BPE) whose vocabulary is CLIP's 256 byte symbols, each also with the
end-of-word mark ``</w>``, and no merges: every character is a token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

#: Tokens per prompt (CLIP's is 77); long captions are cut.
MAX_TOKENS = 16
#: Width of each text encoder's hidden states.
TEXT_WIDTH = 32


def _byte_symbols() -> list[str]:
    """CLIP's (GPT-2's) byte-to-unicode table: the 256 symbols byte-level BPE works on."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            symbols.append(256 + extra)
            extra += 1
    return [chr(c) for c in symbols]


def write_tokenizer(folder: Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` into ``folder``; save a ``CLIPTokenizer`` of them there."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS
    )
    tokenizer.save_pretrained(folder)
    return folder


def _text_config(**extra: object) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=514,
        hidden_size=TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        **extra,
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    # Two levels: latents are 1/2 of the image side (SD's VAE: 1/8), 4 channels as SD's.
    return AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=32,
    )


def build_sd15(folder: Path, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a tiny random SD 1.x-layout ``StableDiffusionPipeline`` to ``folder`` and return it."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(folder / "_vocab"))
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type=prediction_type,
            clip_sample=False,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_sdxl(folder: Path, *, seed: int = 0) -> Path:
    """Save a tiny random SDXL-layout ``StableDiffusionXLPipeline`` (two text encoders) to ``folder``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        # SDXL: both encoders' penultimate hidden states, concatenated.
        cross_attention_dim=2 * TEXT_WIDTH,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # 6 size/crop numbers embedded with `time_embed_dim` channels each, plus the pooled text embedding.
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_WIDTH,
        norm_num_groups=4,
    )
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(folder / "_vocab"))
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=TEXT_WIDTH)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading"
        ),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
