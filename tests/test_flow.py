"""The flow-matching objective (fastdiff.training.flow) against closed forms and diffusers' own helpers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from fastdiff.training import flow

DRAWS = 100_000


def draw(sampling: str, **kwargs: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return flow.sample_timesteps(DRAWS, sampling, generator=generator, device=torch.device("cpu"), **kwargs)


@pytest.mark.parametrize(("m", "s"), [(0.0, 1.0), (0.5, 0.7), (-1.0, 1.5)])
def test_logit_normal_has_the_asked_mean_and_std_of_logit_t(m: float, s: float) -> None:
    t = draw("logit_normal", logit_mean=m, logit_std=s).double()
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - m) < 0.01
    assert abs(logit.std().item() - s) < 0.01


def test_uniform_and_mode_stay_in_the_unit_interval_with_their_means() -> None:
    uniform = draw("uniform")
    assert uniform.min() >= 0 and uniform.max() < 1 and abs(uniform.mean().item() - 0.5) < 0.005
    # mode(scale) is 1 - u - scale (cos²(πu/2) - 1 + u) of u ~ U(0, 1) (SD3 paper, eq. 20): its mean is
    # 1/2 for any scale (∫cos²(πu/2) du = 1/2); scale 1.29 moves mass from the ends to the middle.
    mode = draw("mode", mode_scale=1.29)
    u = torch.rand(DRAWS, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mode, 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u))
    assert mode.min() >= 0 and mode.max() <= 1 and abs(mode.mean().item() - 0.5) < 0.005
    tails = lambda t: ((t < 0.1) | (t > 0.9)).float().mean().item()  # noqa: E731
    assert tails(mode) < tails(uniform) - 0.05
    with pytest.raises(ValueError, match="timestep_sampling"):
        draw("cosine")


def test_shift_3_is_the_closed_form_exactly_and_the_schedulers_shift() -> None:
    t = draw("uniform").double()
    shifted = flow.shift_timesteps(t, 3.0)
    assert torch.equal(shifted, 3 * t / (1 + 2 * t))
    assert torch.equal(flow.shift_timesteps(t, 1.0), t)
    # The scheduler's own fixed shift on its sigma table is the same map.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    unshifted = FlowMatchEulerDiscreteScheduler(shift=1.0)
    torch.testing.assert_close(flow.shift_timesteps(unshifted.sigmas, 3.0), scheduler.sigmas)


@pytest.mark.parametrize(("tokens", "mu"), [(256, 0.5), (4096, 1.15)])
def test_resolution_shift_is_the_closed_form_for_256_and_4096_tokens(tokens: int, mu: float) -> None:
    config = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config  # FLUX.1's values
    assert flow.resolution_mu(tokens, config) == pytest.approx(mu, abs=1e-12)
    s = flow.timestep_shift(config, tokens, None)
    assert s == pytest.approx(math.exp(mu), abs=1e-12)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    closed = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    torch.testing.assert_close(flow.shift_timesteps(t, s), closed, rtol=1e-12, atol=0)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    torch.testing.assert_close(scheduler.time_shift(mu, 1.0, t), closed, rtol=1e-12, atol=0)


def test_timestep_shift_comes_from_the_scheduler_config_unless_given() -> None:
    assert flow.timestep_shift(FlowMatchEulerDiscreteScheduler(shift=3.0).config, 4096, None) == 3.0
    assert flow.timestep_shift(FlowMatchEulerDiscreteScheduler().config, 4096, None) == 1.0
    assert flow.timestep_shift(FlowMatchEulerDiscreteScheduler(shift=3.0).config, 4096, 2.0) == 2.0


def test_noising_is_the_straight_line_and_the_target_the_velocity() -> None:
    x0 = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    noised = flow.add_flow_noise(
        x0, generator=torch.Generator().manual_seed(2), sampling="uniform", shift=3.0
    )
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.rand(4, generator=generator)
    sigmas = 3 * t / (1 + 2 * t)
    assert torch.equal(noised.sigmas, sigmas)
    s = sigmas[:, None, None, None]
    assert torch.equal(noised.noisy, (1 - s) * x0 + s * noise)
    assert torch.equal(noised.target, noise - x0)


def test_loss_weightings_are_the_sd3_papers_and_multiply_each_samples_mse() -> None:
    sigmas = torch.tensor([0.25, 0.5])
    assert flow.loss_weights("none", sigmas).tolist() == [1.0, 1.0]
    assert flow.loss_weights("sigma_sqrt", sigmas).tolist() == [16.0, 4.0]
    cosmap = [2 / (math.pi * (1 - 2 * s + 2 * s * s)) for s in (0.25, 0.5)]
    assert flow.loss_weights("cosmap", sigmas).tolist() == pytest.approx(cosmap, rel=1e-6)
    with pytest.raises(ValueError, match="loss_weighting"):
        flow.loss_weights("snr", sigmas)
    target = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    noised = flow.FlowNoised(torch.zeros_like(target), sigmas, target)
    pred = torch.zeros_like(target)
    # Per-sample MSEs 1 and 4.
    assert flow.flow_loss(pred, noised, "none").item() == pytest.approx(2.5)
    assert flow.flow_loss(pred, noised, "sigma_sqrt").item() == pytest.approx((16 + 4 * 4) / 2)
    weighted = flow.flow_loss(pred, noised, "none", torch.tensor([1.0, 0.25]))
    assert weighted.item() == pytest.approx((1 + 0.25 * 4) / 2)
