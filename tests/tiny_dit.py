"""Tiny random flow-matching DiT pipelines (SD3, FLUX.1 dev/schnell, Z-Image), built and saved locally.

The layouts of the real checkpoints (``transformer/``, ``vae/``, the families' text encoders and
tokenizers, ``scheduler/``, ``model_index.json``) with a few channels per layer, as diffusers' own
pipeline tests build their dummy components, so that a training step takes a fraction of a second on
a CPU. Every tokenizer is built here from a character-level vocabulary (nothing downloads): CLIP's from
:func:`tiny_sd.write_tokenizer`, T5's a unigram model over printable ASCII, Qwen's a byte-level BPE
without merges with a plain chat template. The VAEs carry the real families' ``shift_factor`` and
``scaling_factor`` and 16 latent channels; they downsample by 2 (the real ones by 8).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from tiny_sd import MAX_TOKENS, TEXT_WIDTH, _byte_symbols, _text_config, write_tokenizer

#: Latent channels of every family's VAE (SD3, FLUX.1, Z-Image).
LATENT_CHANNELS = 16
#: Width of the T5 / Qwen encoders' hidden states.
T5_WIDTH = 2 * TEXT_WIDTH
#: Tokens of a T5 / Qwen sequence.
SEQUENCE_TOKENS = 24
#: The VAE factors of the real checkpoints' ``vae/config.json``.
SD3_VAE = {"shift_factor": 0.0609, "scaling_factor": 1.5305}
FLUX_VAE = {"shift_factor": 0.1159, "scaling_factor": 0.3611}


def _vae(factors: dict[str, float]) -> Any:
    """A 2x-downsampling VAE whose posterior is nearly deterministic, as a trained VAE's is (its log
    variance channels are set to -12: std 0.0025), so that the latents are a function of the image."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **factors,
    )
    conv_out = vae.encoder.conv_out  # 2 * LATENT_CHANNELS outputs: the mean, then the log variance
    with torch.no_grad():
        conv_out.weight[LATENT_CHANNELS:] = 0
        conv_out.bias[LATENT_CHANNELS:] = -12
    return vae


def _clip_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_tokenizer(folder / "_vocab"))


def _t5() -> tuple[Any, Any]:
    """A tiny ``T5EncoderModel`` and a character-level unigram ``T5Tokenizer``."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in string.printable if not c.isspace()]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=SEQUENCE_TOKENS)
    encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(pieces),
            d_model=T5_WIDTH,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    return encoder, tokenizer


def build_sd3(folder: Path, *, seed: int = 0) -> Path:
    """Save a tiny random ``StableDiffusion3Pipeline`` (two CLIPs with projection, T5) to ``folder``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=2 * TEXT_WIDTH,  # both CLIPs' projected pooled outputs, concatenated
        pos_embed_max_size=32,
    )
    tokenizer = _clip_tokenizer(folder)
    t5, t5_tokenizer = _t5()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(SD3_VAE),
        text_encoder=CLIPTextModelWithProjection(_text_config(projection_dim=TEXT_WIDTH)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=TEXT_WIDTH)),
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_flux(folder: Path, *, guidance: bool = True, seed: int = 0) -> Path:
    """Save a tiny random ``FluxPipeline`` to ``folder``: dev-style with a guidance embedding
    (``guidance``), else schnell-style."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,  # 2x2 packed latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )
    t5, t5_tokenizer = _t5()
    pipe = FluxPipeline(
        transformer=transformer,
        # FLUX.1's scheduler config: the resolution-dependent shift.
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_vae(FLUX_VAE),
        text_encoder=CLIPTextModel(_text_config()),
        tokenizer=_clip_tokenizer(folder),
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


#: A chat template in Qwen's message format, without its special tokens (the tiny vocabulary has none).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _qwen_tokenizer() -> Any:
    from transformers import Qwen2Tokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=SEQUENCE_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_z_image(folder: Path, *, seed: int = 0) -> Path:
    """Save a tiny random ``ZImagePipeline`` (Qwen3 text encoder, single-stream transformer)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer()
    encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
        )
    )
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=LATENT_CHANNELS,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=TEXT_WIDTH,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(FLUX_VAE),
        text_encoder=encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


__all__ = ["MAX_TOKENS", "build_flux", "build_sd3", "build_z_image"]
