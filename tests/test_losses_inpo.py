"""DDIM-InPO's reparametrised targets, checked against numbers worked out by hand."""

from __future__ import annotations

import pytest
import torch

from diffalign.losses.inpo import noise_from_inversion, v_from_inversion, velocity_from_inversion

# alpha_bar = 0.64: sqrt(alpha_bar) = 0.8, sqrt(1 - alpha_bar) = 0.6.
#   x0 = 1.0, x_t = 1.4: eps = (1.4 - 0.8 * 1.0) / 0.6 = 1.0;  v = 0.8 * 1.0 - 0.6 * 1.0 = 0.2 = (0.8 * 1.4 - 1.0) / 0.6
#   x0 = 2.0, x_t = 0.1: eps = (0.1 - 1.6) / 0.6 = -2.5;       v = 0.8 * -2.5 - 0.6 * 2.0 = -3.2 = (0.08 - 2.0) / 0.6
ALPHA = torch.tensor([0.64, 0.64]).reshape(2, 1)
X0, XT = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.4], [0.1]])


def test_noise_and_v_of_an_inverted_latent_match_hand_worked_values():
    torch.testing.assert_close(noise_from_inversion(XT, X0, ALPHA), torch.tensor([[1.0], [-2.5]]))
    torch.testing.assert_close(v_from_inversion(XT, X0, ALPHA), torch.tensor([[0.2], [-3.2]]))


def test_flow_velocity_of_an_inverted_latent_matches_hand_worked_values():
    """sigma = 0.25, x0 = 1, eps = 3: x_t = 0.75 + 0.75 = 1.5, velocity eps - x0 = 2 = (1.5 - 1) / 0.25.
    sigma = 1 (pure noise), x0 = 2, x_t = -1: eps = -1, velocity -3."""
    sigma = torch.tensor([[0.25], [1.0]])
    torch.testing.assert_close(
        velocity_from_inversion(torch.tensor([[1.5], [-1.0]]), torch.tensor([[1.0], [2.0]]), sigma),
        torch.tensor([[2.0], [-3.0]]),
    )


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_a_forward_noised_latent_gives_back_the_training_target(kind):
    """The reparametrisation is exact: for x_t made from x0 and noise eps, the target is the one of eps."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    level = torch.tensor([0.999, 0.7, 0.2, 0.005]).reshape(4, 1, 1, 1)  # alpha_bar (UNet) or 1 - sigma (flow)
    if kind == "flow":
        sigma = 1 - level
        got, want = velocity_from_inversion((1 - sigma) * x0 + sigma * eps, x0, sigma), eps - x0
    else:
        noisy = level.sqrt() * x0 + (1 - level).sqrt() * eps
        if kind == "eps":
            got, want = noise_from_inversion(noisy, x0, level), eps
        else:
            got, want = v_from_inversion(noisy, x0, level), level.sqrt() * eps - (1 - level).sqrt() * x0
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
