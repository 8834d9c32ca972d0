"""The flow-matching (rectified flow) training objective of the diffusion transformers (SD3/3.5, FLUX.1,
Z-Image): timestep sampling and shifting, the straight-line noising, the velocity target and the loss
weights.

Rectified flow (Liu et al. 2022, arXiv:2209.03003; as trained in Esser et al. 2024, "Scaling Rectified
Flow Transformers for High-Resolution Image Synthesis", arXiv:2403.03206, "SD3"): with ``t`` in
``[0, 1]`` (1 = pure noise), ``x_t = (1 - t) x_0 + t ε`` and the network regresses the velocity
``ε - x_0``. ``t`` is drawn from a density over ``[0, 1]`` (uniform, logit-normal, mode; SD3 §3.1, via
diffusers' ``compute_density_for_timestep_sampling``), then optionally shifted towards noise,
``t' = s t / (1 + (s - 1) t)`` (SD3 §5.3.2), with ``s`` fixed or ``exp(μ)`` where ``μ`` grows linearly
with the image's token count (FLUX's resolution-dependent shift, diffusers' ``calculate_shift`` with the
scheduler config's ``base_shift``/``max_shift``). The loss is the per-sample MSE weighted by
``none``, ``sigma_sqrt`` (``1 / t²``) or ``cosmap`` (diffusers' ``compute_loss_weighting_for_sd3``).

Pure functions of tensors and a scheduler config, like :mod:`fastdiff.training.objective` (whose
:func:`~fastdiff.training.objective.weighted_mse` they share); they must not know about a run's settings,
the loop or the models. diffusers (the ``train`` extra) is imported where used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from fastdiff.training.objective import rank_rows, weighted_mse

#: Densities of the training timesteps (``t`` in ``[0, 1]``): uniform, logit-normal(m, s) (the
#: sigmoid of a normal draw), and SD3's "mode" density with heavy tails (scale ``mode_scale``).
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")
#: Per-sample loss weights of the velocity MSE: none, ``sigma_sqrt`` (``t ** -2``) or ``cosmap``
#: (``2 / (π (1 - 2t + 2t²))``); SD3 §3.1.
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


class FlowNoised(NamedTuple):
    """One forward-noising draw (see :func:`add_flow_noise`)."""

    noisy: torch.Tensor
    sigmas: torch.Tensor
    target: torch.Tensor


def sample_timesteps(
    batch_size: int,
    sampling: str,
    *,
    generator: torch.Generator,
    device: torch.device,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Draw ``batch_size`` timesteps ``t`` in ``[0, 1]`` from ``sampling``'s density (diffusers'
    ``compute_density_for_timestep_sampling``; ``"uniform"`` is its ``"none"``).

    Args:
        batch_size: Number of draws.
        sampling: One of :data:`TIMESTEP_SAMPLINGS`.
        generator: Source of the draws, on ``device``.
        device: Where the result goes.
        logit_mean: ``m`` of ``logit_normal`` (``logit(t) ~ N(m, s²)``).
        logit_std: ``s`` of ``logit_normal``.
        mode_scale: Scale of ``mode`` (SD3 paper's 1.29).

    Returns:
        float32 ``[batch_size]`` in ``[0, 1]``.

    Raises:
        ValueError: Unknown ``sampling``.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    if sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {sampling!r}")
    scheme = "none" if sampling == "uniform" else sampling
    t: torch.Tensor = compute_density_for_timestep_sampling(
        scheme,
        batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        device=device,
        generator=generator,
    )
    return t


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``s t / (1 + (s - 1) t)``: timesteps moved towards noise for ``s > 1`` (SD3 §5.3.2; the fixed
    ``shift`` of diffusers' ``FlowMatchEulerDiscreteScheduler``). ``s = 1`` leaves ``t`` as it is."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_mu(image_tokens: int, scheduler_config: Mapping[str, Any]) -> float:
    """FLUX's ``μ`` for an image of ``image_tokens`` transformer tokens: linear from ``base_shift`` at
    ``base_image_seq_len`` tokens to ``max_shift`` at ``max_image_seq_len`` (diffusers' ``calculate_shift``
    with the scheduler config's values; defaults 0.5 at 256 and 1.15 at 4096, FLUX.1's)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu: float = calculate_shift(
        image_tokens,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )
    return mu


def timestep_shift(scheduler_config: Mapping[str, Any], image_tokens: int, shift: float | None) -> float:
    """The shift ``s`` of :func:`shift_timesteps` for one batch.

    ``shift`` when given; else the scheduler's own: with ``use_dynamic_shifting`` (FLUX.1)
    ``exp(μ)``, ``μ`` = :func:`resolution_mu` of ``image_tokens`` (the scheduler's exponential time
    shift ``e^μ / (e^μ + 1/t - 1)`` is exactly :func:`shift_timesteps` with ``s = e^μ``); otherwise the
    config's ``shift`` (3.0 for SD3), 1 without one.
    """
    if shift is not None:
        return shift
    if scheduler_config.get("use_dynamic_shifting", False):
        return math.exp(resolution_mu(image_tokens, scheduler_config))
    return float(scheduler_config.get("shift", 1.0))


def loss_weights(weighting: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample weights of the velocity MSE (diffusers' ``compute_loss_weighting_for_sd3``).

    Args:
        weighting: One of :data:`LOSS_WEIGHTINGS`.
        sigmas: The samples' ``t``, float ``[B]`` in ``(0, 1]`` (``sigma_sqrt`` is infinite at 0).

    Returns:
        float32 ``[B]``.

    Raises:
        ValueError: Unknown ``weighting``.
    """
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    weights: torch.Tensor = compute_loss_weighting_for_sd3(weighting, sigmas.float())
    return weights.float()


def add_flow_noise(
    x0: torch.Tensor,
    *,
    generator: torch.Generator,
    sampling: str,
    shift: float,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    rank: int = 0,
    world_size: int = 1,
) -> FlowNoised:
    """Noise clean latents along straight lines and give the velocity target.

    Draws ε ~ N(0, I) like ``x0``, then ``t`` per sample (:func:`sample_timesteps`, in that order from
    ``generator``), shifts it (:func:`shift_timesteps`) and forms ``x_t = (1 - t) x_0 + t ε``.

    Args:
        x0: Clean (normalised) latents, float ``[B, ...]``.
        generator: Source of every draw, on ``x0``'s device.
        sampling, logit_mean, logit_std, mode_scale: As :func:`sample_timesteps`.
        shift: ``s`` of :func:`shift_timesteps` (1: none).
        rank: With data parallelism, the rank whose share of the global batch ``x0`` is: ε and ``t`` are
            drawn for the global batch and this rank keeps its rows
            (:func:`fastdiff.training.objective.rank_rows`), so ranks draw what one process draws.
        world_size: Ranks sharing the global batch.

    Returns:
        ``noisy`` (like ``x0``), ``sigmas`` (the shifted ``t``, float32 ``[B]``) and ``target``
        ``ε - x_0`` (like ``x0``).
    """
    share = {"rank": rank, "world_size": world_size}
    rows = x0.shape[0]
    noise = rank_rows(
        lambda n: torch.randn((n, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype),
        rows,
        **share,
    )
    t = rank_rows(
        lambda n: sample_timesteps(
            n,
            sampling,
            generator=generator,
            device=x0.device,
            logit_mean=logit_mean,
            logit_std=logit_std,
            mode_scale=mode_scale,
        ),
        rows,
        **share,
    )
    sigmas = shift_timesteps(t.float(), shift)
    s = sigmas.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return FlowNoised((1 - s) * x0 + s * noise, sigmas, noise - x0)


def flow_loss(
    prediction: torch.Tensor,
    noised: FlowNoised,
    weighting: str,
    sample_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The velocity MSE, each sample's mean weighted by :func:`loss_weights` and by ``sample_weights``
    (float ``[B]``, the loader's ``loss_weights``), masked by ``mask`` (float ``[B, 1, h, w]``, see
    :func:`~fastdiff.training.objective.weighted_mse`); a float32 scalar."""
    weights = loss_weights(weighting, noised.sigmas)
    if sample_weights is not None:
        weights = weights * sample_weights.to(weights.device, torch.float32)
    return weighted_mse(prediction, noised.target, weights, mask)
