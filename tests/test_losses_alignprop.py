"""AlignProp / DRaFT tensor math, checked against numbers worked out by hand."""

from __future__ import annotations

import pytest
import torch

from diffalign.losses.alignprop import prediction_drift, reward_loss, truncation_cutoff


def test_reward_loss_is_minus_scale_times_the_mean_reward():
    rewards = torch.tensor([1.0, 2.0, 6.0])  # mean 3
    assert reward_loss(rewards, scale=0.5).item() == pytest.approx(-1.5)
    assert reward_loss(rewards).item() == pytest.approx(-3.0)


def test_prediction_drift_is_the_mean_squared_difference_over_steps_with_its_gradient():
    # step 1: differences 0, 2, 0, 4 -> squares 0, 4, 0, 16 -> mean 5; step 2: all differences 1 -> 1. Mean (5+1)/2 = 3.
    first = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    second = torch.full((2, 2), 2.0, requires_grad=True)
    reference = [torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.ones(2, 2)]
    drift = prediction_drift([first, second], reference)
    assert drift.item() == pytest.approx(3.0)
    drift.backward()
    # d/dp of mean_steps mean_elements (p - r)^2 = 2 (p - r) / (4 elements * 2 steps)
    torch.testing.assert_close(first.grad, torch.tensor([[0.0, 0.5], [0.0, 1.0]]))
    torch.testing.assert_close(second.grad, torch.full((2, 2), 0.25))
    assert prediction_drift([], []).item() == 0.0
    with pytest.raises(ValueError, match="2 policy predictions but 1"):
        prediction_drift([first, second], reference[:1])


@pytest.mark.parametrize(
    ("kind", "k", "expected"),
    [("full", 1, 0), ("last_k", 1, 49), ("last_k", 5, 45), ("last_k", 80, 0), ("lv", 1, 50)],
)
def test_fixed_cutoffs(kind, k, expected):
    assert truncation_cutoff(kind, 50, k=k) == expected


def test_random_cutoff_follows_the_official_draws():
    # std 0: the gaussian draw is exactly mean * N = 0.84 * 50 = 42 (the official default's centre)
    assert truncation_cutoff("random", 50, mean=0.84, std=0.0) == 42
    # a one-value uniform range [round(0.6 * 50), round(0.62 * 50)) = [30, 31)
    assert truncation_cutoff("random", 50, distribution="uniform", low=0.6, high=0.62) == 30
    generator = torch.Generator().manual_seed(0)
    gaussian = [truncation_cutoff("random", 50, generator=generator) for _ in range(2000)]
    assert min(gaussian) >= 1 and max(gaussian) <= 49  # redrawn until the last step carries gradient
    assert 40.5 < sum(gaussian) / len(gaussian) < 42.5  # int() of N(42, 5): mean ~41.5
    uniform = {truncation_cutoff("random", 50, distribution="uniform", generator=generator) for _ in range(2000)}
    assert uniform == set(range(1, 50))  # official HEAD uniform: randint(0, 50), redrawn while 0
    earlier = {truncation_cutoff("random", 50, distribution="uniform", low=0.6, generator=generator) for _ in range(99)}
    assert earlier == set(range(30, 50))  # commit b576ae7: randint(30, 50)
    assert truncation_cutoff("random", 1) == 0  # one step: it carries the gradient


def test_random_cutoff_is_reproducible_from_the_generator_and_impossible_ranges_fail():
    draws = [
        [truncation_cutoff("random", 20, generator=g) for _ in range(10)]
        for g in (torch.Generator().manual_seed(3), torch.Generator().manual_seed(3))
    ]
    assert draws[0] == draws[1]
    with pytest.raises(ValueError, match="no cut-off in"):
        truncation_cutoff("random", 50, mean=1.0, std=0.0, max_draws=5)  # always 50: the last step never detaches
    with pytest.raises(ValueError, match="unknown truncation"):
        truncation_cutoff("sometimes", 50)
