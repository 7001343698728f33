"""GRPO / DDPO tensor math, checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.losses.grpo import (
    PromptStats,
    group_advantages,
    kl_to_reference,
    ppo_loss,
    ratio_norm,
    weighted_advantages,
    zero_spread_fraction,
)


def test_group_advantages_normalise_within_each_group_or_by_the_global_std():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 8.0])
    groups = torch.tensor([0, 0, 1, 1, 1])
    # group 0: mean 2, population std 1; group 1: mean 4, std sqrt((4 + 4 + 16) / 3) = sqrt(8)
    expected = torch.tensor([-1 / (1 + 1e-4), 1 / (1 + 1e-4), *(v / (math.sqrt(8) + 1e-4) for v in (-2.0, -2.0, 4.0))])
    torch.testing.assert_close(group_advantages(rewards, groups), expected)
    # global: each group's deviations over the std of all five (mean 3.2): sqrt((2.2² + 0.2² + 2·1.2² + 4.8²) / 5)
    spread = math.sqrt(30.8 / 5)
    expected = torch.tensor([-1.0, 1.0, -2.0, -2.0, 4.0]) / (spread + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, groups, global_std=True), expected)


def test_weighted_advantages_normalise_each_reward_before_the_weighted_sum():
    groups = torch.tensor([0, 0])
    components = {"a": torch.tensor([0.0, 100.0]), "b": torch.tensor([2.0, 1.0])}
    # a: (-50, 50) / 50 = (-1, 1); b: (0.5, -0.5) / 0.5 = (1, -1); 1 x a + 3 x b = (2, -2) (the eps aside)
    advantages = weighted_advantages(components, {"a": 1.0, "b": 3.0}, groups)
    torch.testing.assert_close(advantages, torch.tensor([2.0, -2.0]), atol=1e-3, rtol=0)


def test_zero_spread_fraction_counts_groups_that_teach_nothing():
    rewards = torch.tensor([1.0, 1.0, 1.0, 2.0, 5.0, 5.0])
    assert zero_spread_fraction(rewards, torch.tensor([0, 0, 1, 1, 2, 2])) == pytest.approx(2 / 3)
    assert group_advantages(torch.tensor([4.0, 4.0]), torch.tensor([0, 0])).abs().max() == 0


def test_prompt_stats_use_the_batch_until_a_prompt_has_min_count_then_its_history():
    stats = PromptStats(buffer_size=3, min_count=3)
    first = stats.update(["x", "x", "y"], torch.tensor([1.0, 3.0, 5.0]))
    batch = torch.tensor([1.0, 3.0, 5.0])  # fewer than 3 rewards of either prompt: the batch's mean 3, std sqrt(8/3)
    torch.testing.assert_close(first, (batch - 3) / (batch.std(unbiased=False) + 1e-6))
    second = stats.update(["x"], torch.tensor([5.0]))  # x's history 1, 3, 5: mean 3, std sqrt(8/3)
    torch.testing.assert_close(second, torch.tensor([2 / (math.sqrt(8 / 3) + 1e-6)]))
    third = stats.update(["x"], torch.tensor([7.0]))  # buffer 3: history 3, 5, 7 (the 1 fell out)
    torch.testing.assert_close(third, torch.tensor([2 / (math.sqrt(8 / 3) + 1e-6)]))
    restored = PromptStats(buffer_size=3, min_count=3)
    restored.load_state_dict(stats.state_dict())
    torch.testing.assert_close(restored.update(["x"], torch.tensor([9.0])), stats.update(["x"], torch.tensor([9.0])))


def test_ppo_loss_takes_the_pessimistic_of_the_clipped_and_unclipped_ratio():
    old = torch.zeros(2)
    log_prob = torch.full((2,), math.log(1.5), requires_grad=True)  # ratio 1.5 for both
    advantages = torch.tensor([1.0, -1.0])
    loss, stats = ppo_loss(log_prob, old, advantages, clip_range=0.2, adv_clip=5.0)
    # A = +1: max(-1.5, -1.2) = -1.2 (clipped: no gradient); A = -1: max(1.5, 1.2) = 1.5. Mean 0.15.
    assert loss.item() == pytest.approx(0.15)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, 0.75]))  # d(0.5 * 1.5 e^0)/dlogp = 0.75 on the second
    assert stats["ratio"].item() == pytest.approx(1.5)
    assert stats["clip_fraction"].item() == 1.0
    assert stats["approx_kl"].item() == pytest.approx(0.5 * math.log(1.5) ** 2)


def test_ppo_loss_at_ratio_one_is_minus_the_mean_clipped_advantage():
    log_prob = torch.tensor([0.3, -0.2])
    loss, stats = ppo_loss(log_prob, log_prob.clone(), torch.tensor([9.0, -1.0]), clip_range=1e-4, adv_clip=5.0)
    assert loss.item() == pytest.approx(-(5.0 - 1.0) / 2)  # 9 clipped to 5
    assert stats["ratio"].item() == 1.0 and stats["clip_fraction"].item() == 0.0 and stats["approx_kl"].item() == 0.0


def test_kl_to_reference_is_the_mean_squared_difference_over_twice_the_variance():
    mean = torch.full((2, 3, 2, 2), 0.3)
    assert kl_to_reference(mean, torch.zeros_like(mean), 0.5).item() == pytest.approx(0.09 / 0.5)
    std = torch.tensor(0.5)
    assert kl_to_reference(mean, mean, std).item() == 0.0


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_ratio_norm_centres_the_log_ratio_and_removes_its_dependence_on_the_step_std(reduce):
    """x_next = μ_old + σε: log r = ε·Δ/σ - ||Δ||²/(2σ²); RatioNorm's (log r + b)·σ is ε·Δ exactly, whatever σ."""
    from diffalign.models import gaussian_log_prob

    generator = torch.Generator().manual_seed(0)
    old_mean = torch.randn(3, 2, 4, 4, generator=generator)
    delta = 0.05 * torch.randn(old_mean.shape, generator=generator)
    eps = torch.randn(old_mean.shape, generator=generator)
    for std in (0.02, 0.5):
        x_next = old_mean + std * eps
        log_ratio = gaussian_log_prob(x_next, old_mean + delta, std, reduce) - gaussian_log_prob(
            x_next, old_mean, std, reduce
        )
        shift, scale = ratio_norm(old_mean + delta, old_mean, torch.tensor(std), reduce)
        squared = delta.pow(2).mean(dim=(1, 2, 3)) if reduce == "mean" else delta.pow(2).sum(dim=(1, 2, 3))
        torch.testing.assert_close(shift, squared / (2 * std**2))
        dot = (eps * delta).mean(dim=(1, 2, 3)) if reduce == "mean" else (eps * delta).sum(dim=(1, 2, 3))
        torch.testing.assert_close((log_ratio + shift) * scale, dot, rtol=1e-3, atol=1e-6)


def test_ppo_loss_with_a_shift_and_scale_clips_the_normalised_ratio():
    old = torch.zeros(2)
    log_prob = torch.tensor([-0.5, -0.5])  # raw ratio e^-0.5 ~ 0.61: clipped at 0.8 for A < 0
    loss, stats = ppo_loss(log_prob, old, torch.tensor([1.0, -1.0]), 0.2, 5.0, shift=torch.tensor([0.5, 0.6]), scale=2)
    # normalised ratios exp(0 * 2) = 1 and exp(0.1 * 2) = e^0.2 ~ 1.221 (A = -1: max(1.221, 1.2) = 1.221)
    assert loss.item() == pytest.approx((-1.0 + math.exp(0.2)) / 2)
    assert stats["ratio"].item() == pytest.approx((1 + math.exp(0.2)) / 2)
    assert stats["clip_fraction"].item() == 0.5
    assert stats["approx_kl"].item() == pytest.approx(0.5 * 0.25)  # of the raw log-ratio
