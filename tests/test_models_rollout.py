"""The model layer's log-prob core for online RL: each family's stochastic step as a Gaussian (mean, std) that is the
deterministic sampler at noise 0 and the stock DDIM step with η on UNets, and the rollout recorder whose log-probs a
training update recomputes exactly."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILY_KINDS, build_family

from diffalign.models import gaussian_log_prob

UNET_KINDS = ["sd", "sd-v", "sdxl"]
FLOW_KINDS = ["sd3", "flux"]


def inputs(family, steps: int = 4, batch: int = 2):
    """Latents, a prediction and a schedule of `steps` for `family`."""
    generator = torch.Generator().manual_seed(1)
    x = family.initial_noise(batch, 32, generator)
    pred = torch.randn(x.shape, generator=generator)
    return x, pred, family.schedule(steps, x)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_noise_zero_is_the_deterministic_sampler_step_exactly(kind):
    family = build_family(kind)
    x, pred, schedule = inputs(family)
    for i in range(len(schedule)):
        mean, std = family.transition(x, pred, schedule, i, 0.0)
        assert torch.equal(mean.float(), family.step(x, pred, schedule, i).float())
        assert float(torch.as_tensor(std).max()) == 0.0


@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_cps_at_noise_zero_is_the_euler_step(kind):
    family = build_family(kind)
    x, pred, schedule = inputs(family)
    for i in range(len(schedule)):
        mean, _ = family.transition(x, pred, schedule, i, 0.0, sde="cps")
        torch.testing.assert_close(mean, family.step(x, pred, schedule, i), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", UNET_KINDS)
def test_ddim_transition_with_eta_is_the_stock_ddim_step_with_that_noise(kind):
    family = build_family(kind)
    x, pred, schedule = inputs(family, steps=5)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    family.ddim.set_timesteps(5)
    for i, t in enumerate(family.ddim.timesteps):
        mean, std = family.transition(x, pred, schedule, i, 1.0)
        stock = family.ddim.step(pred, t, x, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(mean + std * noise, stock, atol=1e-5, rtol=1e-5)
        assert torch.equal(mean + std * noise, family.step(x, pred, schedule, i, eta=1.0, noise=noise))


def test_flow_sde_follows_flow_grpo_including_its_first_step_guard():
    family = build_family("sd3")
    x, pred, schedule = inputs(family)
    sigmas = schedule.coeffs["sigmas"]
    assert sigmas[0] == 1.0  # the first step starts at pure noise, where sqrt(s / (1 - s)) is infinite
    for i in (0, 2):
        s, s_next, a = float(sigmas[i]), float(sigmas[i + 1]), 0.7
        finite = float(sigmas[1]) if s == 1 else s
        g = a * math.sqrt(s / (1 - finite))
        dt = s_next - s
        expected = x * (1 + g**2 / (2 * s) * dt) + pred * (1 + g**2 * (1 - s) / (2 * s)) * dt
        mean, std = family.transition(x, pred, schedule, i, a)
        torch.testing.assert_close(mean, expected)
        assert float(std) == pytest.approx(g * math.sqrt(-dt), rel=1e-5)


def test_cps_keeps_the_coefficients_of_x0_and_noise():
    """CPS: std = s' sin(a pi / 2), and the noise estimate's coefficient c in the mean completes it to the marginal's
    noise scale, c² + std² = s'². With v = 0 both estimates are x, so the mean is x (1 - s' + c)."""
    family = build_family("sd3")
    x, _, schedule = inputs(family)
    s_next = float(schedule.coeffs["sigmas"][2])
    mean, std = family.transition(x, torch.zeros_like(x), schedule, 1, 0.5, sde="cps")
    assert float(std) == pytest.approx(s_next * math.sin(0.5 * math.pi / 2), rel=1e-6)
    c = math.sqrt(s_next**2 - float(std) ** 2)
    torch.testing.assert_close(mean, x * (1 - s_next + c))


def test_a_flow_sde_on_a_unet_and_an_unknown_sde_are_one_line_errors():
    from diffalign.errors import UserError

    unet, flow = build_family("sd"), build_family("sd3")
    with pytest.raises(UserError, match="flow-matching SDE"):
        unet.transition(*inputs(unet), 0, 1.0, sde="cps")
    with pytest.raises(UserError, match="unknown sde 'ddim'"):
        flow.transition(*inputs(flow), 0, 0.7, sde="ddim")


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_gaussian_log_prob_is_the_normal_log_density_reduced_per_sample(reduce):
    x, mean = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    per_dim = torch.distributions.Normal(mean, 0.3).log_prob(x)
    expected = per_dim.mean(dim=(1, 2, 3)) if reduce == "mean" else per_dim.sum(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(x, mean, torch.tensor(0.3), reduce), expected)


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_rollout_log_probs_recompute_exactly_from_the_recorded_latents(kind):
    """What makes the first update of a rollout a ratio of exactly 1: the same prediction of the same latent at the
    same step gives the same log-probability, bit for bit (CFG on)."""
    family = build_family(kind)
    cond = family.encode_prompts(["a red circle", "a blue square"])
    uncond = family.encode_negative()
    generator = torch.Generator().manual_seed(3)
    latents = family.initial_noise(2, 32, generator)
    trajectory = family.rollout(
        cond, uncond, latents=latents, num_steps=4, guidance_scale=3.0, noise_level=family.default_noise_level,
        generator=generator,
    )  # fmt: skip
    assert trajectory.latents.shape == (2, 5, *latents.shape[1:]) and trajectory.stochastic.all()
    assert trajectory.means.shape == (2, 4, *latents.shape[1:])
    schedule = family.schedule(4, latents)
    with torch.no_grad():
        for i, t in enumerate(schedule.timesteps):
            x, x_next = trajectory.latents[:, i], trajectory.latents[:, i + 1]
            pred = family.predict(x, t, cond, uncond, 3.0, detach_uncond=True)
            log_prob, mean, _ = family.transition_log_prob(x, x_next, pred, schedule, i, family.default_noise_level)
            assert torch.equal(log_prob, trajectory.log_probs[:, i])
            assert torch.equal(mean, trajectory.means[:, i])  # what GRPO-Guard compares the current means with


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_rollout_outside_its_window_is_the_deterministic_sampler(kind):
    family = build_family(kind)
    cond = family.encode_prompts(["a red circle"])
    latents = family.initial_noise(1, 32, torch.Generator().manual_seed(4))
    plain = family.sample(cond, latents=latents, num_steps=4)
    none = family.rollout(cond, latents=latents, num_steps=4, noise_level=0.7, window=range(0))
    assert torch.equal(none.latents[:, -1], plain) and not none.stochastic.any() and none.log_probs.eq(0).all()
    assert torch.equal(none.means, none.latents[:, 1:])  # a deterministic step's mean is where it lands
    window = family.rollout(
        cond, latents=latents, num_steps=4, noise_level=0.7, window=range(1, 3), generator=torch.Generator()
    )
    assert window.stochastic.tolist() == [False, True, True, False]
    assert window.log_probs[:, [0, 3]].eq(0).all() and window.log_probs[:, [1, 2]].ne(0).all()
    assert torch.equal(window.latents[:, 1], none.latents[:, 1])  # step 0 is deterministic in both
    assert not torch.equal(window.latents[:, 2], none.latents[:, 2])  # step 1 drew noise


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_predicted_clean_of_the_true_target_is_the_clean_latent_and_is_affine(kind):
    """x̂0 of the regression target at the forward-noised latent is x0 exactly (ε, v and velocity alike); a
    combination of predictions whose weights sum to 1 maps to the same combination of their x̂0 (DiffusionNFT)."""
    family = build_family(kind)
    generator = torch.Generator().manual_seed(3)
    x0 = family.initial_noise(2, 32, generator)
    eps = torch.randn(x0.shape, generator=generator)
    timesteps = family.timesteps_at(torch.tensor([5, 600]))
    noisy, target = family.noisy_and_target(x0, eps, timesteps)
    torch.testing.assert_close(family.predicted_clean(noisy, target, timesteps), x0, atol=1e-4, rtol=1e-4)
    a, b = torch.randn(x0.shape, generator=generator), torch.randn(x0.shape, generator=generator)
    combined = family.predicted_clean(noisy, 1.5 * a - 0.5 * b, timesteps)
    mixed = 1.5 * family.predicted_clean(noisy, a, timesteps) - 0.5 * family.predicted_clean(noisy, b, timesteps)
    torch.testing.assert_close(combined, mixed, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_flow_time_steps_are_positive_and_add_up_to_the_sampled_span_of_flow_time(kind):
    """GRPO-Guard's step weights: each step's size in flow time s (1 noise, 0 data); a UNet's s is that of its DDIM
    state in flow variables, sqrt(1 - a) / (sqrt(a) + sqrt(1 - a))."""
    family = build_family(kind)
    _, _, schedule = inputs(family, steps=5)
    sizes = torch.stack([family.flow_time_step(schedule, i) for i in range(len(schedule))])
    assert (sizes > 0).all()
    if "sigmas" in schedule.coeffs:
        first, last = schedule.coeffs["sigmas"][0], schedule.coeffs["sigmas"][-1]
    else:

        def flow_time(alpha):
            return (1 - alpha).sqrt() / (alpha.sqrt() + (1 - alpha).sqrt())

        first, last = flow_time(schedule.coeffs["alpha"][0]), flow_time(schedule.coeffs["alpha_prev"][-1])
    torch.testing.assert_close(sizes.sum(), (first - last).float())
