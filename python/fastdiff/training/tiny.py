"""The tiny from-scratch text-to-image model that ``fastdiff train`` trains without ``--model`` (and
``fastdiff demo`` uses): a word-level tokenizer built from the dataset's captions, a small diffusers
``UNet2DConditionModel`` in pixel space and a small transformers ``CLIPTextModel``, both trained from
scratch, so nothing is downloaded; :class:`TinyTask` (the model side of the loop) and :func:`sample`.

The UNet learns to predict the noise added to images (epsilon prediction, DDPM: Ho et al. 2020,
"Denoising Diffusion Probabilistic Models", arXiv:2006.11239; or the velocity, v-prediction: Salimans &
Ho 2022, arXiv:2202.00512) directly in pixel space, conditioned on the hidden states of the text
encoder (Radford et al. 2021) trained jointly.

diffusers, transformers and tokenizers (the ``train`` extra) are imported inside the functions that use
them: ``fastdiff.cli`` imports the training modules to register their arguments, and must start fast
and report a missing extra itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from fastdiff.training.config import HEAD_DIM, NORM_GROUPS, SAMPLERS, TrainConfig
from fastdiff.training.objective import (
    SampleLosses,
    add_training_noise,
    ddpm_noise_levels,
    diffusion_loss_from,
    sample_losses,
)
from fastdiff.training.protocols import TrainBatch, share_of

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

#: Special tokens of the word-level tokenizer, in id order (``<pad>`` is id 0).
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"


class TinyModels(NamedTuple):
    """The two trained networks."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel


def build_tokenizer(captions: Iterable[str], max_length: int) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer whose vocabulary is every word of ``captions``.

    Text is NFKC-normalised and lowercased, split into words and punctuation runs (tokenizers'
    ``Whitespace`` pre-tokenizer), and wrapped as ``<bos> words <eos>``. Unknown words map to ``<unk>``.
    Special tokens take ids 0-3: ``<pad>``, ``<unk>``, ``<bos>``, ``<eos>``.

    Args:
        captions: Texts to take the vocabulary from.
        max_length: ``model_max_length`` of the tokenizer, in tokens (special tokens included).

    Returns:
        A transformers fast tokenizer; ``save_pretrained`` writes it and ``from_pretrained`` (or
        ``AutoTokenizer``) reloads it offline.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token=UNK))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, UNK, BOS, EOS], show_progress=False)
    core.train_from_iterator(sorted(captions), trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, core.token_to_id(BOS)), (EOS, core.token_to_id(EOS))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=max_length,
    )


def tokenize(tokenizer: PreTrainedTokenizerFast, captions: Sequence[str]) -> torch.Tensor:
    """Token ids of ``captions``, padded and truncated to ``tokenizer.model_max_length``.

    Args:
        tokenizer: From :func:`build_tokenizer`.
        captions: Texts.

    Returns:
        int64 tensor ``[len(captions), model_max_length]`` on the CPU.
    """
    encoded = tokenizer(
        list(captions),
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    )
    return encoded.input_ids


def build_tiny_models(
    tokenizer: PreTrainedTokenizerFast,
    *,
    resolution: int,
    unet_channels: Sequence[int],
    layers_per_block: int,
    text_hidden_size: int,
    text_layers: int,
    seed: int,
) -> TinyModels:
    """Randomly initialise a small pixel-space ``UNet2DConditionModel`` and a small ``CLIPTextModel``.

    The UNet maps RGB to RGB (3 in, 3 out channels), has one level per entry of ``unet_channels``
    (``DownBlock2D``/``UpBlock2D`` with cross-attention only on the lowest-resolution level and in
    the mid block, so attention stays cheap on CPU) and attends to the text encoder's last hidden
    states. The text encoder's vocabulary, special-token ids and positions come from ``tokenizer``.

    Args:
        tokenizer: From :func:`build_tokenizer`.
        resolution: Training resolution in pixels (stored as the UNet's ``sample_size``).
        unet_channels: ``block_out_channels`` (multiples of 8; the last a multiple of 16).
        layers_per_block: ResNet layers per UNet level.
        text_hidden_size: Text encoder width, a multiple of 16 (heads of 16 channels).
        text_layers: Text encoder transformer layers.
        seed: Seed of the initialisation (the global torch RNG is left untouched).

    Returns:
        The two models in float32 on the CPU, in train mode.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    levels = len(unet_channels)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden_size,
        intermediate_size=4 * text_hidden_size,
        num_hidden_layers=text_layers,
        num_attention_heads=text_hidden_size // HEAD_DIM,
        max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config)
        unet = UNet2DConditionModel(
            sample_size=resolution,
            in_channels=3,
            out_channels=3,
            block_out_channels=tuple(unet_channels),
            layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) * (levels - 1) + ("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
            cross_attention_dim=text_hidden_size,
            # Also add an attention-pooled text embedding to the timestep embedding, which reaches every
            # ResNet block (as DeepFloyd IF does): global properties such as colour are learnt fast.
            addition_embed_type="text",
            addition_embed_type_num_heads=text_hidden_size // HEAD_DIM,
            # diffusers' historical naming: for this model `attention_head_dim` is the number of heads.
            attention_head_dim=unet_channels[-1] // HEAD_DIM,
            norm_num_groups=NORM_GROUPS,
        )
    return TinyModels(unet.train(), text_encoder.train())


def build_noise_scheduler(
    num_train_timesteps: int, beta_schedule: str, prediction_type: str
) -> DDPMScheduler:
    """The DDPM forward-noising schedule used for training and, through its config, for sampling.

    Predicted clean samples are clipped to ``[-1, 1]`` when sampling (``clip_sample``), the pixel range.

    Args:
        num_train_timesteps: Diffusion timesteps T.
        beta_schedule: diffusers ``beta_schedule`` (``"linear"``, ``"scaled_linear"``,
            ``"squaredcos_cap_v2"`` or ``"sigmoid"``).
        prediction_type: What the network predicts: ``"epsilon"`` or ``"v_prediction"``.

    Returns:
        A diffusers ``DDPMScheduler``.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=True,
    )


def diffusion_loss(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    noise_scheduler: DDPMScheduler,
    pixels: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    generator: torch.Generator,
    amp_dtype: torch.dtype | None,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
    sample_weights: torch.Tensor | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, SampleLosses]:
    """The denoising loss of one batch of the from-scratch model (Ho et al. 2020, algorithm 1).

    Noises ``pixels`` with :func:`fastdiff.training.objective.add_training_noise` (ε, t ~ U{0..T-1},
    optional noise offset and input perturbation), predicts the scheduler's ``prediction_type`` target
    from ``(x_t, t, text)`` under ``torch.autocast`` when ``amp_dtype`` is set, and returns the MSE to
    that target, min-SNR-γ weighted when ``snr_gamma`` is set
    (:func:`fastdiff.training.objective.min_snr_weights`).

    Args:
        unet: The denoiser.
        text_encoder: The caption encoder; its last hidden states condition the UNet.
        noise_scheduler: The training schedule (its ``num_train_timesteps`` and ``prediction_type``).
        pixels: Clean images ``x_0``, float ``[B, 3, H, W]`` in ``[-1, 1]`` on the models' device.
        input_ids: Caption token ids, int64 ``[B, L]`` on the same device.
        generator: Source of the noise and timesteps, on the same device.
        amp_dtype: Autocast dtype of the forward pass; ``None`` runs it in float32.
        snr_gamma: Min-SNR γ, or ``None`` for the unweighted MSE.
        noise_offset: Offset-noise strength (0: off).
        input_perturbation: Input-perturbation strength (0: off).
        sample_weights: Per-sample loss weights, float ``[B]`` (the loader's ``loss_weights``), or
            ``None``.
        rank: With data parallelism, whose share of the global batch ``pixels`` is (see
            :func:`fastdiff.training.objective.add_training_noise`).
        world_size: Ranks sharing the global batch.

    Returns:
        The loss, a float32 scalar tensor (not finite if the batch or model is not), and each sample's
        unweighted loss with its noise level.
    """
    noised = add_training_noise(
        pixels,
        noise_scheduler,
        generator=generator,
        noise_offset=noise_offset,
        input_perturbation=input_perturbation,
        rank=rank,
        world_size=world_size,
    )
    with torch.autocast(pixels.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        hidden = text_encoder(input_ids).last_hidden_state
        prediction = unet(noised.noisy, noised.timesteps, encoder_hidden_states=hidden).sample
    per_sample = sample_losses(
        prediction, noised.target, ddpm_noise_levels(noise_scheduler, noised.timesteps)
    )
    return diffusion_loss_from(noise_scheduler, noised, prediction, snr_gamma, sample_weights), per_sample


class TinyTask:
    """The from-scratch model as a :class:`~fastdiff.training.protocols.Task`: UNet and text encoder,
    both trained."""

    def __init__(self, config: TrainConfig, device: torch.device, captions: Sequence[str]) -> None:
        """Build the tokenizer from ``captions`` and the two models from ``config`` on ``device``.

        Raises:
            ValueError: ``config.resolution`` or ``prediction_type`` is unset (the run fills them in).
        """
        if config.resolution is None or config.prediction_type is None:
            raise ValueError("TinyTask needs a config with resolution and prediction_type set")
        self.config, self.resolution = config, config.resolution
        self.tokenizer = build_tokenizer(captions, config.max_caption_tokens)
        self.unet, self.text_encoder = build_tiny_models(
            self.tokenizer,
            resolution=config.resolution,
            unet_channels=config.unet_channels,
            layers_per_block=config.layers_per_block,
            text_hidden_size=config.text_hidden_size,
            text_layers=config.text_layers,
            seed=config.seed,
        )
        self.unet.to(device)
        # transformers types `PreTrainedModel.to` through a decorator that loses its signature.
        self.text_encoder.to(device)  # type: ignore[arg-type]
        self.noise_scheduler = build_noise_scheduler(
            config.num_train_timesteps, config.beta_schedule, config.prediction_type
        )
        self.device = device
        #: Each sample's loss and noise level of the last :meth:`loss` call.
        self.last_sample_losses: SampleLosses | None = None

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        named = {f"unet.{k}": p for k, p in self.unet.named_parameters()}
        named.update({f"text_encoder.{k}": p for k, p in self.text_encoder.named_parameters()})
        return named

    def sharded_modules(self) -> dict[str, torch.nn.Module]:
        """The modules ``--fsdp`` shards: both (every parameter of them is trained)."""
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def use_modules(self, modules: dict[str, torch.nn.Module]) -> None:
        """Replace the modules :meth:`sharded_modules` named (by the unsharded copies a run ends with)."""
        self.unet, self.text_encoder = modules["unet"], modules["text_encoder"]  # type: ignore[assignment]

    def train_mode(self, on: bool) -> None:
        self.unet.train(on)
        self.text_encoder.train(on)

    def loss(
        self, batch: TrainBatch, *, generator: torch.Generator, amp_dtype: torch.dtype | None
    ) -> torch.Tensor:
        input_ids = tokenize(self.tokenizer, batch["captions"]).to(self.device, non_blocking=True)
        loss, self.last_sample_losses = diffusion_loss(
            self.unet,
            self.text_encoder,
            self.noise_scheduler,
            batch["pixel_values"],
            input_ids,
            generator=generator,
            amp_dtype=amp_dtype,
            snr_gamma=self.config.snr_gamma,
            noise_offset=self.config.noise_offset,
            input_perturbation=self.config.input_perturbation,
            sample_weights=batch.get("loss_weights"),
            **share_of(batch),
        )
        return loss

    @property
    def size_multiple(self) -> int:
        """The UNet's downsampling, ``2 ** (len(unet_channels) - 1)``."""
        return int(2 ** (len(self.config.unet_channels) - 1))

    def preview(
        self, prompts: Sequence[str], *, seeds: Sequence[int], steps: int, width: int, height: int
    ) -> torch.Tensor:
        per_seed = [
            sample(
                self.unet,
                self.text_encoder,
                self.tokenizer,
                prompts,
                noise_scheduler=self.noise_scheduler,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=self.config.preview_guidance_scale,
                seed=seed,
            )
            for seed in seeds
        ]
        # Prompt-major: row p holds prompt p under every seed.
        return torch.stack(per_seed, dim=1).flatten(0, 1)

    def save(self, output: Path) -> None:
        self.unet.save_pretrained(output / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(output / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(output / "tokenizer")
        self.noise_scheduler.save_pretrained(output / "scheduler")


@torch.no_grad()
def sample(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    *,
    noise_scheduler: DDPMScheduler,
    height: int,
    width: int,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    sampler: str = "ddim",
    seed: int = 0,
) -> torch.Tensor:
    """Generate one image per prompt by running the reverse diffusion with a diffusers scheduler.

    ``sampler="ddim"`` uses deterministic DDIM (Song et al. 2021, arXiv:2010.02502, η = 0),
    ``"ddpm"`` ancestral DDPM sampling (Ho et al. 2020), both configured from the training schedule.
    With ``guidance_scale > 1`` classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598) mixes
    the conditional and the empty-caption predictions (ε or v): ``ε = ε_∅ + s (ε_c - ε_∅)``. The initial noise
    and DDPM's per-step noise come from a CPU generator seeded with ``seed``, so results do not depend
    on the device. The models are put in eval mode for the call and restored afterwards.

    Args:
        unet: Trained UNet (its device and dtype are used).
        text_encoder: Trained text encoder, on the UNet's device.
        tokenizer: The run's tokenizer.
        prompts: One caption per image.
        noise_scheduler: The training schedule (its config is copied; it is not modified).
        height: Image height in pixels (a multiple of the UNet's downsampling factor).
        width: Image width in pixels (a multiple of the UNet's downsampling factor).
        num_inference_steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale; 1 disables guidance.
        sampler: ``"ddim"`` or ``"ddpm"``.
        seed: Seed of the noise.

    Returns:
        float32 tensor ``[len(prompts), 3, height, width]`` in ``[0, 1]`` on the CPU.

    Raises:
        ValueError: Unknown ``sampler``.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    if sampler == "ddim":
        scheduler = DDIMScheduler.from_config(noise_scheduler.config)
    elif sampler == "ddpm":
        scheduler = DDPMScheduler.from_config(noise_scheduler.config)
    else:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    scheduler.set_timesteps(num_inference_steps)
    device, dtype = unet.device, unet.dtype
    guided = guidance_scale > 1.0
    texts = [*prompts, *([""] * len(prompts))] if guided else list(prompts)
    generator = torch.Generator("cpu").manual_seed(seed)
    modes = (unet.training, text_encoder.training)
    unet.eval()
    text_encoder.eval()
    try:
        hidden = text_encoder(tokenize(tokenizer, texts).to(device)).last_hidden_state.to(dtype)
        shape = (len(prompts), 3, height, width)
        x = torch.randn(shape, generator=generator).to(device, dtype) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
            out = unet(model_in, t, encoder_hidden_states=hidden).sample
            if guided:
                out_cond, out_uncond = out.chunk(2)
                out = out_uncond + guidance_scale * (out_cond - out_uncond)
            x = scheduler.step(out, t, x, generator=generator).prev_sample
    finally:
        unet.train(modes[0])
        text_encoder.train(modes[1])
    return ((x.float().clamp(-1, 1) + 1) / 2).cpu()
