"""The diffusion training objective: forward noising (with noise offset and input perturbation), the
regression target (ε or v), min-SNR-γ weights, the (weighted) MSE, each sample's loss with its noise
level (for the loss-by-timestep plot), and caption dropout.

Pure functions of tensors and a diffusers noise schedule; shared by the tiny model
(:mod:`fastdiff.training.tiny`) and Stable Diffusion (:mod:`fastdiff.training.sd`). It must not know
about a run's settings, the loop or the models.

diffusers (the ``train`` extra) is imported where used: ``fastdiff.cli`` imports the training modules
to register their arguments, and must start fast and report a missing extra itself.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers import DDPMScheduler


def rank_rows(
    draw: Callable[[int], torch.Tensor], rows: int, rank: int = 0, world_size: int = 1
) -> torch.Tensor:
    """This rank's rows of a draw made for the whole global batch.

    With data parallelism each rank holds rows ``[rank * rows, (rank + 1) * rows)`` of a global batch
    of ``rows * world_size`` samples (the loader's split). Every rank makes the draw a single process
    with the global batch makes, ``draw(rows * world_size)`` (first dimension the batch), from a
    generator in the same state on every rank, and keeps its own rows: so ``world_size`` ranks draw
    the same numbers for the same samples as one process does, and their generators stay in step.
    With one rank this is ``draw(rows)``.

    Args:
        draw: Makes a draw with a first dimension of the given size.
        rows: Rows of this rank's share (its batch size).
        rank: This rank, ``< world_size``.
        world_size: Ranks sharing the global batch.

    Returns:
        ``draw(rows * world_size)[rank * rows : (rank + 1) * rows]``.
    """
    if world_size == 1:
        return draw(rows)
    return draw(rows * world_size)[rank * rows : (rank + 1) * rows]


class Noised(NamedTuple):
    """One forward-noising draw (see :func:`add_training_noise`)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def add_training_noise(
    x0: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    *,
    generator: torch.Generator,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
    rank: int = 0,
    world_size: int = 1,
) -> Noised:
    """Noise clean samples at uniformly drawn timesteps and give the network's regression target.

    Draws ε ~ N(0, I) and t ~ U{0..T-1} per sample (in that order, from ``generator``) and forms
    ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`` (DDPM, Ho et al. 2020, arXiv:2006.11239). Options:

    - ``noise_offset``: ε += offset · n with n ~ N(0, 1) per sample and channel (shape ``[B, C, 1, 1]``),
      which lets the model change an image's mean brightness (N. Guttenberg, "Diffusion with offset
      noise", crosslabs.org, 2023).
    - ``input_perturbation``: ``x_t`` is formed with ε + γ·n instead of ε while the target keeps ε
      (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion Models",
      arXiv:2301.11706).

    Args:
        x0: Clean samples (pixels in ``[-1, 1]`` or scaled VAE latents), float ``[B, C, H, W]``.
        noise_scheduler: The training schedule (``num_train_timesteps``, ``prediction_type``).
        generator: Source of every random draw, on ``x0``'s device.
        noise_offset: Offset-noise strength (0: off).
        input_perturbation: Input-perturbation strength γ (0: off).
        rank: With data parallelism, the rank whose share of the global batch ``x0`` is; every draw is
            made for the global batch of ``world_size`` equal shares (:func:`rank_rows`).
        world_size: Ranks sharing the global batch (1: ``x0`` is the whole batch).

    Returns:
        ``noisy`` (``x_t``, like ``x0``), ``timesteps`` (int64 ``[B]``) and ``target``: ε for
        ``prediction_type="epsilon"``, ``v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0`` for ``"v_prediction"``
        (Salimans & Ho 2022, arXiv:2202.00512).

    Raises:
        ValueError: Another ``prediction_type``.
    """
    device, rows, share = x0.device, x0.shape[0], (rank, world_size)

    def randn(*shape: int) -> Callable[[int], torch.Tensor]:
        return lambda n: torch.randn((n, *shape), generator=generator, device=device, dtype=x0.dtype)

    noise = rank_rows(randn(*x0.shape[1:]), rows, *share)
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = rank_rows(
        lambda n: torch.randint(0, steps, (n,), generator=generator, device=device), rows, *share
    )
    if noise_offset:
        offset = rank_rows(randn(x0.shape[1], 1, 1), rows, *share)
        noise = noise + noise_offset * offset
    if input_perturbation:
        extra = rank_rows(randn(*x0.shape[1:]), rows, *share)
        noisy = noise_scheduler.add_noise(x0, noise + input_perturbation * extra, timesteps)
    else:
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(x0, noise, timesteps)
    else:
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    return Noised(noisy, timesteps, target)


class SampleLosses(NamedTuple):
    """Each sample's unweighted MSE of one batch with its noise level: what the loss-by-timestep plot
    bins (:func:`fastdiff.training.outputs.plot_loss_by_timestep`).

    Attributes:
        noise_levels: float32 ``[B]`` in ``[0, 1]``, CPU: ``t / T`` for the DDPM objective (``t`` in
            ``0..T-1``), the shifted ``t`` (sigma) for flow matching; 1 is pure noise in both.
        losses: float32 ``[B]``, CPU: ``mean((prediction - target)²)`` per sample, without min-SNR,
            flow or sample weights.
    """

    noise_levels: torch.Tensor
    losses: torch.Tensor


def sample_losses(prediction: torch.Tensor, target: torch.Tensor, noise_levels: torch.Tensor) -> SampleLosses:
    """The :class:`SampleLosses` of a prediction ``[B, ...]`` of ``target`` (no gradient; on the CPU)."""
    with torch.no_grad():
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
        per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
    return SampleLosses(noise_levels.detach().float().cpu(), per_sample.cpu())


def ddpm_noise_levels(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Integer DDPM timesteps ``[B]`` as noise levels in ``[0, 1)``: ``t / T``."""
    return timesteps.float() / noise_scheduler.config.num_train_timesteps


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy", arXiv:2303.09556; the v-prediction form as in their code and diffusers' examples).

    With ``SNR(t) = ᾱ_t / (1 - ᾱ_t)`` (diffusers' ``compute_snr``), the weight on the MSE of a
    prediction is ``min(SNR, γ) / SNR`` for ε-prediction and ``min(SNR, γ) / (SNR + 1)`` for
    v-prediction: both equal ``min(SNR, γ)`` as a weight on the x_0 error. For ε at ``SNR = 0``
    (zero-terminal-SNR schedules) the weight is its limit, 1.

    Args:
        noise_scheduler: The training schedule (``alphas_cumprod``, ``prediction_type``).
        timesteps: int64 ``[B]``.
        gamma: γ > 0 (the paper uses 5).

    Returns:
        float32 ``[B]`` on ``timesteps``' device.

    Raises:
        ValueError: ``gamma <= 0`` or an unknown ``prediction_type``.
    """
    from diffusers.training_utils import compute_snr

    if gamma <= 0:
        raise ValueError(f"snr_gamma must be > 0, got {gamma}")
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return torch.where(snr > 0, clipped / snr, torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def loss_mask(batch: Mapping[str, Any], size: Sequence[int], device: torch.device) -> torch.Tensor | None:
    """The batch's loss mask (``masks_latent`` or ``masks``, see :class:`fastdiff.types.Batch`) at a
    prediction's spatial ``size`` ``(h, w)``: float32 ``[B, 1, h, w]`` in ``[0, 1]`` on ``device``, or
    ``None`` when the batch has no mask.

    The one whose size matches is used as is (``masks_latent`` for latent-space models); otherwise
    ``masks`` is area-resized (``F.interpolate(mode="area")``, as kohya-ss ``apply_masked_loss``).
    """
    size = tuple(int(s) for s in size)
    for key in ("masks_latent", "masks"):
        mask = batch.get(key)
        if mask is not None and tuple(mask.shape[-2:]) == size:
            return mask.to(device, torch.float32)
    mask = batch.get("masks")
    if mask is None:
        return None
    return F.interpolate(mask.to(device, torch.float32), size=size, mode="area")


def weighted_mse(
    prediction: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error in float32; with ``weights`` (``[B]``) each sample's mean is weighted first;
    with a loss ``mask`` (``[B, 1, h, w]`` in ``[0, 1]``, broadcast over channels) each sample's mean is
    masked and normalised by the mask's mean.

    Masked (kohya-ss ``apply_masked_loss`` multiplies the error by the mask; the division makes the loss
    a mean over the trained pixels, so that its scale does not shrink with the masked area):
    ``l_b = mean(mask_b · (pred_b - target_b)²) / mean(mask_b)``; a sample whose mask is all zero
    contributes 0.

    Returns:
        A float32 scalar: ``mean_b(w_b · l_b)`` with ``l_b = mean((pred_b - target_b)²)`` unmasked,
        or the plain MSE without weights and mask.
    """
    if weights is None and mask is None:
        return F.mse_loss(prediction.float(), target.float())
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
    dims = tuple(range(1, per_sample.ndim))
    if mask is None:
        per_sample = per_sample.mean(dim=dims)
    else:
        mask = mask.float()
        area = mask.mean(dim=dims)
        per_sample = (per_sample * mask).mean(dim=dims) / area.clamp_min(torch.finfo(torch.float32).tiny)
    return (per_sample if weights is None else per_sample * weights.float()).mean()


def diffusion_loss_from(
    noise_scheduler: DDPMScheduler,
    noised: Noised,
    prediction: torch.Tensor,
    snr_gamma: float | None,
    sample_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MSE of ``prediction`` to ``noised.target``, min-SNR-γ weighted when ``snr_gamma`` is set.

    ``sample_weights`` (float ``[B]``, the loader's ``loss_weights``) multiply each sample's loss as
    well; all ones (every subset at the default ``loss_weight``) leaves the loss as without them.
    ``mask`` (float ``[B, 1, h, w]``, from :func:`loss_mask`): the masked loss of :func:`weighted_mse`.
    """
    weights = None if snr_gamma is None else min_snr_weights(noise_scheduler, noised.timesteps, snr_gamma)
    if sample_weights is not None and not bool(torch.all(sample_weights == 1)):
        sample_weights = sample_weights.to(prediction.device, torch.float32)
        weights = sample_weights if weights is None else weights * sample_weights
    return weighted_mse(prediction, noised.target, weights, mask)


def drop_captions(
    captions: Sequence[str], probability: float, rng: random.Random, rank: int = 0, world_size: int = 1
) -> tuple[list[str], list[bool]]:
    """Replace each caption by ``""`` with ``probability`` (classifier-free guidance training, Ho &
    Salimans 2022, arXiv:2207.12598); one ``rng.random()`` draw per caption of the global batch
    (``captions`` being share ``rank`` of ``world_size`` equal shares of it; see :func:`rank_rows`).

    Returns:
        (captions, dropped): the new captions, and which of them were dropped (a task may give those
        another unconditional embedding than that of ``""``, as SDXL's zeros).
    """
    n = len(captions)
    draws = [rng.random() < probability for _ in range(n * world_size)]
    dropped = draws[rank * n : (rank + 1) * n]
    return ["" if d else c for c, d in zip(captions, dropped, strict=True)], dropped
