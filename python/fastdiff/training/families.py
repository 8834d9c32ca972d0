"""The flow-matching DiT families that ``fastdiff train --model`` fine-tunes, one preset each.

A :class:`Family` holds everything that differs between SD3/3.5, FLUX.1 and Z-Image: the pipeline
class (``model_index.json``'s ``_class_name``), which components hold the text encoders, the patch
size that with the VAE's downsampling gives the bucket alignment, the default timestep density, the
default T5/Qwen sequence length, the LoRA target modules, and four functions: ``encode`` (captions →
the transformer's text conditioning, through the pipeline's own ``encode_prompt``, so the training
conditioning is the sampling one; a dropped caption is ``""``, which is the pipelines' negative prompt),
``entries``/``from_entries`` (that conditioning as the per-caption tensors a text cache stores, and
back: what ``fastdiff cache`` writes and a cached run feeds the transformer), and ``predict`` (noisy
latents ``[B, C, h, w]`` and ``t`` → the velocity ``ε - x_0`` the transformer predicts, in the
family's calling convention: SD3 takes ``1000 t``; FLUX ``t`` with 2×2-packed latents,
``img_ids``/``txt_ids`` and, for dev-style checkpoints, the guidance embedding; Z-Image ``1 - t``
with per-sample lists and predicts ``x_0 - ε``). Sources: the families' diffusers pipelines
(``pipeline_stable_diffusion_3.py``, ``pipeline_flux.py``, ``pipeline_z_image.py``) and diffusers'
``train_dreambooth_lora_{sd3,flux}.py``.

Adding a family is one more :class:`Family` in :data:`FAMILIES` (see the README, "Fine-tune SD3 / FLUX /
Z-Image"); :mod:`fastdiff.training.dit` and the loop need no change. diffusers is imported where used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: The text conditioning of a batch, by the transformer's argument names (tensors on the device).
Conditioning = dict[str, Any]
#: A text cache entry's tensors by name, batched ``[B, ...]`` (``prompt_embeds``, ...).
TextEntries = dict[str, torch.Tensor]
#: The attention projections of the joint (MM-DiT) blocks: image stream and text stream.
JOINT_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass(frozen=True)
class PredictInputs:
    """What :attr:`Family.predict` gets besides the transformer and the latents.

    Attributes:
        sigmas: The samples' ``t`` in ``[0, 1]`` (1 = noise), float32 ``[B]``.
        conditioning: :attr:`Family.encode`'s output for the batch.
        vae_scale_factor: The VAE's downsampling (pixels per latent).
        guidance: Value of a guidance embedding (models that have one; see ``TrainConfig.guidance``).
    """

    sigmas: torch.Tensor
    conditioning: Conditioning
    vae_scale_factor: int
    guidance: float


@dataclass(frozen=True)
class Family:
    """One flow-matching DiT family (see the module doc).

    Attributes:
        name: Short name (``"sd3"``): the ``train_config.json`` value and the README's.
        pipeline: The diffusers pipeline class name of its ``model_index.json``.
        text_components: Components that encode captions (encoders and tokenizers).
        optional_text: Components that ``t5 = False`` leaves out (the pipeline then fills their part
            of ``prompt_embeds`` with zeros); empty where the text encoders are all required.
        patch: The transformer's patch side in latents, from its config (FLUX: 2, its 2×2 packing).
        sampling: Default timestep density (:data:`fastdiff.training.flow.TIMESTEP_SAMPLINGS`).
        sequence_length: Default ``max_sequence_length`` (T5/Qwen tokens), from the transformer config.
        lora_targets: Transformer module names that get LoRA adapters.
        encode: ``(pipeline, captions, max_sequence_length, device) → Conditioning``.
        entries: ``(Conditioning, max_sequence_length) → TextEntries``: each caption's tensors of one
            fixed shape (what a text cache stores), so that ``from_entries`` gives the conditioning back
            bitwise.
        from_entries: ``TextEntries → Conditioning``, the inverse of ``entries``.
        predict: ``(transformer, noisy [B, C, h, w], PredictInputs) → velocity [B, C, h, w]``.
    """

    name: str
    pipeline: str
    text_components: tuple[str, ...]
    optional_text: tuple[str, ...]
    patch: Callable[[dict[str, Any]], int]
    sampling: str
    sequence_length: Callable[[dict[str, Any]], int]
    lora_targets: tuple[str, ...]
    encode: Callable[[Any, Sequence[str], int, torch.device], Conditioning]
    entries: Callable[[Conditioning, int], TextEntries]
    from_entries: Callable[[Mapping[str, torch.Tensor]], Conditioning]
    predict: Callable[[Any, torch.Tensor, PredictInputs], torch.Tensor]


def _sd3_encode(pipe: Any, captions: Sequence[str], max_length: int, device: torch.device) -> Conditioning:
    """SD3: both CLIPs' penultimate states (concatenated, zero-padded to T5's width) then T5's
    sequence (zeros without T5) as ``prompt_embeds``; both CLIPs' projected pooled outputs as
    ``pooled_projections``."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=list(captions),
        prompt_2=None,
        prompt_3=None,
        device=device,
        do_classifier_free_guidance=False,
        max_sequence_length=max_length,
    )
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def _pooled_entries(conditioning: Conditioning, max_length: int) -> TextEntries:
    """SD3 and FLUX.1: ``prompt_embeds`` ``[B, L, D]`` (``L`` fixed: the pipelines pad to their
    maximum lengths) and ``pooled_prompt_embeds`` ``[B, P]``."""
    return {
        "prompt_embeds": conditioning["encoder_hidden_states"],
        "pooled_prompt_embeds": conditioning["pooled_projections"],
    }


def _sd3_from_entries(entries: Mapping[str, torch.Tensor]) -> Conditioning:
    """SD3: ``prompt_embeds`` as ``encoder_hidden_states``, ``pooled_prompt_embeds`` as
    ``pooled_projections``."""
    return {
        "encoder_hidden_states": entries["prompt_embeds"],
        "pooled_projections": entries["pooled_prompt_embeds"],
    }


def _sd3_predict(transformer: Any, noisy: torch.Tensor, inputs: PredictInputs) -> torch.Tensor:
    """SD3's transformer takes the scheduler's timesteps, ``1000 t``."""
    out: torch.Tensor = transformer(
        hidden_states=noisy, timestep=inputs.sigmas * 1000, return_dict=False, **inputs.conditioning
    )[0]
    return out


def _flux_encode(pipe: Any, captions: Sequence[str], max_length: int, device: torch.device) -> Conditioning:
    """FLUX.1: T5's sequence as ``prompt_embeds``, CLIP's pooled output as ``pooled_projections``, and
    ``txt_ids`` (zeros, ``[L, 3]``); no attention mask, as the pipeline."""
    embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=list(captions), prompt_2=None, device=device, max_sequence_length=max_length
    )
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}


def _flux_from_entries(entries: Mapping[str, torch.Tensor]) -> Conditioning:
    """As SD3, with the pipeline's ``txt_ids``: zeros ``[L, 3]`` in the embeddings' dtype."""
    embeds = entries["prompt_embeds"]
    text_ids = torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype)
    return {**_sd3_from_entries(entries), "txt_ids": text_ids}


def _flux_predict(transformer: Any, noisy: torch.Tensor, inputs: PredictInputs) -> torch.Tensor:
    """FLUX.1's transformer takes 2×2-packed latents ``[B, h w / 4, 4 C]`` with their ``img_ids``, and
    ``t`` itself (it multiplies by 1000); dev-style checkpoints (``guidance_embeds``) also the guidance
    value. The packed prediction is unpacked back to ``[B, C, h, w]``."""
    from diffusers import FluxPipeline

    b, c, h, w = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((b,), inputs.guidance, device=noisy.device, dtype=torch.float32)
    out = transformer(
        hidden_states=packed,
        timestep=inputs.sigmas,
        guidance=guidance,
        img_ids=img_ids,
        return_dict=False,
        **inputs.conditioning,
    )[0]
    scale = inputs.vae_scale_factor
    unpacked: torch.Tensor = FluxPipeline._unpack_latents(out, h * scale, w * scale, scale)
    return unpacked


def _z_image_encode(
    pipe: Any, captions: Sequence[str], max_length: int, device: torch.device
) -> Conditioning:
    """Z-Image: the Qwen3 encoder's penultimate states of the chat-formatted caption, one ``[L_i, D]``
    per sample without padding (a list)."""
    embeds, _ = pipe.encode_prompt(
        prompt=list(captions),
        device=device,
        do_classifier_free_guidance=False,
        max_sequence_length=max_length,
    )
    return {"cap_feats": embeds}


def _z_image_entries(conditioning: Conditioning, max_length: int) -> TextEntries:
    """Z-Image's per-caption ``[L_i, D]`` (``L_i ≤ max_length``) zero-padded to ``prompt_embeds``
    ``[B, max_length, D]``, with ``prompt_attention_mask`` ``[B, max_length]`` (1 for the caption's
    tokens, 0 for the padding)."""
    feats: list[torch.Tensor] = conditioning["cap_feats"]
    embeds = feats[0].new_zeros(len(feats), max_length, feats[0].shape[-1])
    mask = feats[0].new_zeros(len(feats), max_length)
    for i, f in enumerate(feats):
        embeds[i, : len(f)] = f
        mask[i, : len(f)] = 1
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


def _z_image_from_entries(entries: Mapping[str, torch.Tensor]) -> Conditioning:
    """The unpadded ``[L_i, D]`` of each caption: the rows of ``prompt_embeds`` its mask keeps."""
    embeds, mask = entries["prompt_embeds"], entries["prompt_attention_mask"]
    return {"cap_feats": [e[m > 0] for e, m in zip(embeds, mask, strict=True)]}


def _z_image_predict(transformer: Any, noisy: torch.Tensor, inputs: PredictInputs) -> torch.Tensor:
    """Z-Image's transformer takes lists of ``[C, 1, h, w]`` latents and ``1 - t``, and predicts
    ``x_0 - ε`` (its pipeline negates the output): the result is negated to the velocity ``ε - x_0``."""
    frames = list(noisy.unsqueeze(2).unbind(0))
    out = transformer(frames, 1 - inputs.sigmas, inputs.conditioning["cap_feats"], return_dict=False)[0]
    return -torch.stack(list(out)).squeeze(2)


FAMILIES = {
    family.pipeline: family
    for family in (
        Family(
            name="sd3",
            pipeline="StableDiffusion3Pipeline",
            text_components=(
                "text_encoder",
                "tokenizer",
                "text_encoder_2",
                "tokenizer_2",
                "text_encoder_3",
                "tokenizer_3",
            ),
            optional_text=("text_encoder_3", "tokenizer_3"),
            patch=lambda config: int(config["patch_size"]),
            # SD3 §5.1's choice and diffusers' SD3 scripts' default.
            sampling="logit_normal",
            sequence_length=lambda config: 256,  # the pipeline's default
            lora_targets=JOINT_ATTENTION,
            encode=_sd3_encode,
            entries=_pooled_entries,
            from_entries=_sd3_from_entries,
            predict=_sd3_predict,
        ),
        Family(
            name="flux",
            pipeline="FluxPipeline",
            text_components=("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
            optional_text=(),
            patch=lambda config: 2 * int(config["patch_size"]),
            # diffusers' FLUX LoRA script's default ("none"); the scheduler's resolution shift applies.
            sampling="uniform",
            # dev (guidance embedding): 512 T5 tokens, schnell: 256.
            sequence_length=lambda config: 512 if config.get("guidance_embeds") else 256,
            lora_targets=(
                *JOINT_ATTENTION,
                "ff.net.0.proj",
                "ff.net.2",
                "ff_context.net.0.proj",
                "ff_context.net.2",
            ),
            encode=_flux_encode,
            entries=_pooled_entries,
            from_entries=_flux_from_entries,
            predict=_flux_predict,
        ),
        Family(
            name="z_image",
            pipeline="ZImagePipeline",
            text_components=("text_encoder", "tokenizer"),
            optional_text=(),
            patch=lambda config: int(config["all_patch_size"][0]),
            sampling="logit_normal",
            sequence_length=lambda config: 512,  # the pipeline's default
            lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
            encode=_z_image_encode,
            entries=_z_image_entries,
            from_entries=_z_image_from_entries,
            predict=_z_image_predict,
        ),
    )
}
