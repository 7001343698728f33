"""DiffusionNFT's loss by hand (diffalign/losses/nft.py): the optimality map, the implicit policies, the adaptive
weight, the loss of a worked example, its gradient direction, and the old policy's decay schedule."""

from __future__ import annotations

import pytest
import torch

from diffalign.losses.nft import (
    adaptive_mse,
    implicit_policies,
    nft_loss,
    old_policy_decay,
    optimality,
    prediction_kl,
)


def test_optimality_maps_clipped_advantages_onto_zero_one():
    a = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 7.0])
    assert optimality(a, 5.0).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_implicit_policies_by_hand():
    pred, old = torch.tensor([2.0]), torch.tensor([1.0])
    positive, negative = implicit_policies(pred, old, 0.5)
    assert positive.item() == 1.5  # 0.5 * 2 + 0.5 * 1
    assert negative.item() == 0.5  # 1.5 * 1 - 0.5 * 2
    positive, negative = implicit_policies(pred, old, 1.0)
    assert (positive.item(), negative.item()) == (2.0, 0.0)  # beta 1: v+ is the model, v- its mirror in the old one


def test_adaptive_mse_divides_by_the_mean_absolute_residual_without_its_gradient():
    x0 = torch.zeros(1, 2)
    pred = torch.tensor([[1.0, 3.0]], requires_grad=True)
    value = adaptive_mse(pred, x0)
    assert value.item() == pytest.approx((1 + 9) / 2 / 2)  # mean square 5 over mean |.| 2
    value.sum().backward()
    assert pred.grad.tolist() == [[0.5, 1.5]]  # d/dp of p^2 / (2 * 2) = p / 2: the weight carries no gradient
    assert adaptive_mse(torch.zeros(1, 2), x0).item() == 0.0  # a perfect prediction: the 1e-5 floor, no 0/0


def test_nft_loss_of_a_worked_example():
    x0 = torch.zeros(2, 1)
    x0_pred = torch.tensor([[1.0], [2.0]])
    x0_old = torch.tensor([[0.0], [1.0]])
    advantages = torch.tensor([5.0, -2.5])  # r = 1 and 0.25
    loss, stats = nft_loss(x0_pred, x0_old, x0, advantages, beta=0.5, adv_clip=5.0)
    # sample 0: x+ = 0.5, x- = -0.5; one dimension, so each adaptive term is |residual|: 0.5 and 0.5
    # sample 1: x+ = 1.5, x- = 0.5: terms 1.5 and 0.5; r = 0.25 -> 0.25 * 1.5 + 0.75 * 0.5 = 0.75
    expected = ((1.0 * 0.5 + 0.0 * 0.5) / 0.5 * 5 + (0.75) / 0.5 * 5) / 2
    assert loss.item() == pytest.approx(expected)
    assert stats["optimality"].item() == pytest.approx(0.625)
    assert stats["old_deviation"].item() == pytest.approx(1.0)


def test_at_the_old_policy_the_gradient_pulls_positives_to_their_sample_and_pushes_negatives_away():
    """With v_θ = v_old the gradient is A-weighted regression: towards x0 for A > 0, away for A < 0, none at A = 0."""
    x0 = torch.zeros(3, 4)
    old = torch.ones(3, 4)
    pred = old.clone().requires_grad_(True)
    loss, _ = nft_loss(pred, old, x0, torch.tensor([2.0, 0.0, -2.0]), beta=1.0, adv_clip=5.0)
    loss.backward()
    assert (pred.grad[0] > 0).all()  # descent lowers x̂0 towards x0 = 0
    assert torch.allclose(pred.grad[1], torch.zeros(4), atol=1e-7)
    assert (pred.grad[2] < 0).all()
    torch.testing.assert_close(pred.grad[0], -pred.grad[2])


def test_prediction_kl_and_the_old_policy_decay_schedule():
    assert prediction_kl(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(2.5)
    assert [old_policy_decay(s, 0.001, 0.5) for s in (0, 100, 500, 900)] == [0.0, 0.1, 0.5, 0.5]  # official type 1
    assert old_policy_decay(50, 0.0075, 0.999, delay=75) == 0.0  # official type 2: flat for 75 steps
    assert old_policy_decay(175, 0.0075, 0.999, delay=75) == pytest.approx(0.75)
    assert old_policy_decay(1000, 0.0075, 0.999, delay=75) == 0.999
