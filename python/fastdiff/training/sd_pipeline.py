"""Stable Diffusion 1.x/2.x and SDXL pipelines from local files: their kind, their components (all, or
only some: the VAE and text encoders alone for ``fastdiff cache``, everything but them when a cache
serves the latents and text embeddings), and the frozen encoders' math shared by training
(:mod:`fastdiff.training.sd`) and the cache builder (:mod:`fastdiff.cache`): prompts to the UNet's text
conditioning, pixels to scaled VAE latents.

Nothing here downloads: every ``from_pretrained``/``from_single_file`` call passes
``local_files_only=True``. diffusers and transformers (the ``train`` extra) are imported where used.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DiffusionPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

#: Pipeline classes (``model_index.json`` ``_class_name``) that can be fine-tuned, and their kind.
SUPPORTED_PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
#: Component folders a pipeline folder must have, per kind.
COMPONENTS = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}
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
                f"model {model}: pipeline class {class_name!r} is not supported here; "
                f"supported: {', '.join(SUPPORTED_PIPELINES)} (SD3, FLUX.1 and Z-Image pipelines train "
                "from their diffusers folder as `fastdiff train --model FOLDER`, without a single file)"
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


def load_pipeline(
    model: Path, model_config: Path | None = None, *, without: Iterable[str] = ()
) -> DiffusionPipeline:
    """Load an SD 1.x/2.x or SDXL pipeline from local files only (weights in float32, diffusers' default).

    Args:
        model: A diffusers pipeline folder, or a single-file checkpoint loaded with diffusers'
            ``from_single_file``.
        model_config: For a single file (required): a local pipeline folder of the same architecture
            whose component configs and tokenizers are used.
        without: Components not to load (``"vae"``, ``"text_encoder"``, ...): they are ``None`` in the
            pipeline and their weights are never read.

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
    extra.update(dict.fromkeys(without))
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


def config_folder(model: Path, model_config: Path | None = None) -> Path:
    """The pipeline folder whose ``<component>/config.json`` files describe ``model``: ``model`` itself,
    or a single file's ``model_config``.

    Raises:
        FileNotFoundError, ValueError: As :func:`pipeline_kind`.
    """
    pipeline_kind(model, model_config)
    folder = model if model.is_dir() else model_config
    assert folder is not None  # pipeline_kind refuses a single file without one
    return folder


def component_config(model: Path, model_config: Path | None, name: str) -> dict[str, Any]:
    """The config of component ``name`` (``"vae"``, ``"unet"``, ...), read from its ``config.json``
    (the scheduler's ``scheduler_config.json``) without loading any weights.

    Raises:
        FileNotFoundError: The component has no ``config.json`` (or as :func:`pipeline_kind`).
        ValueError: As :func:`pipeline_kind`.
    """
    folder = config_folder(model, model_config) / name
    path = folder / ("scheduler_config.json" if name == "scheduler" else "config.json")
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return config


def load_component(model: Path, model_config: Path | None, name: str) -> Any:
    """One component of a pipeline (``"vae"``, ``"text_encoder_2"``, ``"tokenizer"``, ...), alone.

    A folder's component is loaded with the class ``model_index.json`` names for it; a single file's
    through :func:`load_pipeline` without every other component (only this one's weights are converted).

    Returns:
        The diffusers model, transformers model or tokenizer, on the CPU in float32.

    Raises:
        FileNotFoundError, ValueError: As :func:`load_pipeline`; ``ValueError`` also when the pipeline
            has no component ``name``.
    """
    kind = pipeline_kind(model, model_config)
    if name not in COMPONENTS[kind]:
        raise ValueError(f"model {model}: a {kind} pipeline has no component {name!r}")
    if not model.is_dir():
        others = [c for c in COMPONENTS[kind] if c not in (name, "scheduler")]
        return getattr(load_pipeline(model, model_config, without=others), name)
    library, class_name = json.loads((model / "model_index.json").read_text())[name]
    cls = getattr(importlib.import_module(library), class_name)
    return cls.from_pretrained(model, subfolder=name, local_files_only=True)


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


def scale_latents(vae_config: Any, latents: torch.Tensor) -> torch.Tensor:
    """``(latents - shift_factor) * scaling_factor`` with the VAE config's factors (SD 1.x: 0.18215,
    SDXL: 0.13025; no shift when the config has none), in float32: the latent space the UNet works in."""
    latents = latents.float()
    shift = getattr(vae_config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * vae_config.scaling_factor


def posterior(vae: AutoencoderKL, pixels: torch.Tensor) -> DiagonalGaussianDistribution:
    """The VAE encoder's diagonal Gaussian ``q(z | x)`` of ``pixels`` (float ``[B, 3, H, W]`` in
    ``[-1, 1]``, cast to the VAE's dtype), without gradients; ``.mean``/``.std`` are ``[B, C, H/f, W/f]``."""
    with torch.no_grad():
        return vae.encode(pixels.to(vae.dtype)).latent_dist


def encode_latents(
    vae: AutoencoderKL,
    pixels: torch.Tensor,
    generator: torch.Generator,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Sample VAE latents of ``pixels`` and scale them as the pipelines expect.

    ``z ~ q(z | x)`` (a draw from the encoder's diagonal Gaussian, with ``generator``: ``mean + std *
    eps``, ``eps`` drawn as diffusers' ``DiagonalGaussianDistribution.sample`` draws it, in the VAE's
    dtype on the generator's device), then :func:`scale_latents`.

    Args:
        vae: A diffusers ``AutoencoderKL`` (frozen; run without gradients in its own dtype).
        pixels: float ``[B, 3, H, W]`` in ``[-1, 1]``, ``H`` and ``W`` multiples of the VAE's downsampling.
        generator: Source of the latent draw.
        rank: With data parallelism, the rank whose share of the global batch ``pixels`` is: ``eps``
            is drawn for the global batch (:func:`fastdiff.training.objective.rank_rows`).
        world_size: Ranks sharing the global batch.

    Returns:
        float32 ``[B, latent_channels, H / f, W / f]``.
    """
    from fastdiff.training.objective import rank_rows

    dist = posterior(vae, pixels)
    mean = dist.mean
    shape, dtype = mean.shape[1:], dist.parameters.dtype
    eps = rank_rows(
        lambda n: torch.randn((n, *shape), generator=generator, device=generator.device, dtype=dtype),
        mean.shape[0],
        rank,
        world_size,
    )
    with torch.no_grad():
        sample = mean + dist.std * eps.to(mean.device)
    return scale_latents(vae.config, sample)


def draw_cached_latents(
    latents: torch.Tensor,
    latents_std: torch.Tensor,
    generator: torch.Generator,
    vae_dtype: torch.dtype,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """:func:`encode_latents`' draw from a cached posterior: ``latents + latents_std * eps``.

    ``eps`` is drawn from ``generator`` with the latents' shape in ``vae_dtype`` (the VAE's dtype in an
    uncached run), as diffusers' ``DiagonalGaussianDistribution.sample`` draws it, so a cached run draws
    what an uncached one does (equal up to float rounding: the cache scales mean and std separately,
    and stores them in its dtype).

    Args:
        latents: A cache's scaled posterior means ``[B, C, h, w]``, any float dtype.
        latents_std: Their scaled standard deviations, same shape.
        generator: Source of the draw, on the latents' device.
        vae_dtype: ``torch.float32``, or ``torch.bfloat16`` for ``vae_dtype = "bf16"``.
        rank: With data parallelism, the rank whose share of the global batch ``latents`` is: ``eps``
            is drawn for the global batch (:func:`fastdiff.training.objective.rank_rows`).
        world_size: Ranks sharing the global batch.

    Returns:
        float32 ``[B, C, h, w]``.
    """
    from fastdiff.training.objective import rank_rows

    eps = rank_rows(
        lambda n: torch.randn(
            (n, *latents.shape[1:]), generator=generator, device=latents.device, dtype=vae_dtype
        ),
        latents.shape[0],
        rank=rank,
        world_size=world_size,
    )
    return latents.float() + latents_std.float() * eps.float()


def preview_images(
    pipeline: Any,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    steps: int,
    width: int,
    height: int,
    guidance_scale: float,
    device_type: str,
    dtype: torch.dtype | None,
    **extra: Any,
) -> torch.Tensor:
    """Sample ``pipeline`` once per (prompt, seed), prompt-major, each with its own CPU generator seeded
    by the seed, under autocast to ``dtype`` (none when ``None``), with its own scheduler.

    Args:
        pipeline: A diffusers text-to-image pipeline with all its components loaded.
        prompts, seeds: What to sample; ``len(prompts) * len(seeds)`` images.
        steps: Inference steps.
        width, height: The images' size in pixels.
        guidance_scale: Classifier-free guidance scale (FLUX.1-dev's distilled guidance value).
        device_type: ``"cuda"`` or ``"cpu"``, for autocast.
        dtype: The autocast dtype, or ``None``.
        extra: More keyword arguments of the pipeline's call (the DiTs' ``max_sequence_length``).

    Returns:
        float32 ``[N, 3, height, width]`` in ``[0, 1]``, on the CPU.
    """
    texts = [p for p in prompts for _ in seeds]
    generators = [torch.Generator("cpu").manual_seed(s) for _ in prompts for s in seeds]
    with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
        images = pipeline(
            texts,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="pt",
            **extra,
        ).images
    out: torch.Tensor = images.float().clamp(0, 1).cpu()
    return out
