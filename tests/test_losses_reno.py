"""The ReNO objective (diffalign.losses.reno): the chi_d regulariser, the weighted reward loss and per-sample gradient
clipping, against hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.losses.reno import chi_regulariser, clip_grad_rows_, reno_loss


def test_chi_regulariser_value_and_gradient_match_the_closed_form():
    # z = (3, 4): d = 2, ||z|| = 5 -> K = 25/2 - 1 * ln 5 = 10.8905621; grad = z - (d-1) z / ||z||^2 = z * 24/25
    z = torch.tensor([[3.0, 4.0]], requires_grad=True)
    value = chi_regulariser(z)
    assert value.shape == (1,) and value.item() == pytest.approx(12.5 - math.log(5), abs=1e-6)
    value.sum().backward()
    assert torch.allclose(z.grad, torch.tensor([[2.88, 3.84]]), atol=1e-6)
    # z = (1, 0, 0, 0) as [1, 2, 2]: d = 4, ||z|| = 1 -> K = 1/2 - 3 * ln 1 = 0.5; grad = z - 3 z = (-2, 0, 0, 0)
    w = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], requires_grad=True)
    value = chi_regulariser(w)
    assert value.item() == pytest.approx(0.5, abs=1e-7)
    value.sum().backward()
    assert torch.equal(w.grad, torch.tensor([[[-2.0, 0.0], [0.0, 0.0]]]))


def test_chi_regulariser_is_float32_per_sample_and_smallest_on_the_gaussian_shell():
    z = torch.tensor([[3.0, 4.0], [0.6, 0.8]], dtype=torch.float16)
    value = chi_regulariser(z)
    assert value.dtype == torch.float32
    assert value.tolist() == pytest.approx([12.5 - math.log(5), 0.5], abs=1e-3)  # ||(0.6, 0.8)|| = 1: 1/2 - ln 1
    # K(r) = r^2/2 - (d-1) ln r is minimal at r = sqrt(d - 1)
    d = 64
    radii = torch.tensor([0.5, 1.0, 1.5]) * math.sqrt(d - 1)
    values = chi_regulariser(radii[:, None] * torch.ones(1, d) / math.sqrt(d))
    assert values.argmin().item() == 1


def test_reno_loss_weights_the_rewards_and_adds_the_regulariser():
    z = torch.tensor([[3.0, 4.0]])
    loss = reno_loss({"hpsv2": torch.tensor([0.3]), "clip": torch.tensor([30.0])}, {"hpsv2": 5.0, "clip": 0.01}, z)
    # reward loss = -(5 * 0.3 + 0.01 * 30) = -1.8; total = -1.8 + 0.01 * (12.5 - ln 5)
    assert loss.reward_loss.item() == pytest.approx(-1.8, abs=1e-6)
    assert loss.regulariser.item() == pytest.approx(12.5 - math.log(5), abs=1e-6)
    assert loss.total.item() == pytest.approx(-1.8 + 0.01 * (12.5 - math.log(5)), abs=1e-6)
    with pytest.raises(ValueError, match="no weight"):
        reno_loss({"hpsv2": torch.tensor([0.3])}, {"clip": 1.0}, z)


def test_reno_loss_gradient_is_minus_the_weighted_reward_gradient_plus_the_regulariser():
    z = torch.tensor([[3.0, 4.0]], requires_grad=True)
    loss = reno_loss({"r": (z * torch.tensor([1.0, 2.0])).sum(dim=1)}, {"r": 2.0}, z, reg_weight=0.5)
    loss.total.sum().backward()
    # d/dz [-2 (z1 + 2 z2)] + 0.5 * z * 24/25 = (-2, -4) + (1.44, 1.92)
    assert torch.allclose(z.grad, torch.tensor([[-0.56, -2.08]]), atol=1e-6)


def test_clip_grad_rows_clips_each_sample_like_clip_grad_norm():
    grad = torch.tensor([[3.0, 4.0], [0.03, 0.04]])
    norms = clip_grad_rows_(grad, 0.1)
    assert norms.tolist() == pytest.approx([5.0, 0.05])
    assert torch.linalg.vector_norm(grad[0]).item() == pytest.approx(0.1, rel=1e-5)  # clipped, same direction
    assert torch.allclose(grad[0] / grad[0].norm(), torch.tensor([0.6, 0.8]))
    assert torch.equal(grad[1], torch.tensor([0.03, 0.04]))  # under the limit: untouched
    # row 0 exactly as torch's clip_grad_norm_ on that sample alone
    param = torch.zeros(2, requires_grad=True)
    param.grad = torch.tensor([3.0, 4.0])
    torch.nn.utils.clip_grad_norm_([param], 0.1)
    assert torch.equal(grad[0], param.grad)
