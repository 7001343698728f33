"""Diffusion-DPO loss variants, checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.losses.dpo import beta_from_logit_scale, dpo_loss, per_sample_error

# Two pairs. With beta = 100 (so beta/2 = 50):
#   pair 1: e_w=0.10, e_l=0.12, r_w=r_l=0.11: model_diff = -0.02, ref_diff = 0 -> inside = -50 * (-0.02) = +1
#   pair 2: e_w=0.12, e_l=0.10, r_w=r_l=0.10: model_diff = +0.02, ref_diff = 0 -> inside = -1
ERR_W, ERR_L = torch.tensor([0.10, 0.12]), torch.tensor([0.12, 0.10])
REF_W, REF_L = torch.tensor([0.11, 0.10]), torch.tensor([0.11, 0.10])
SOFTPLUS_1 = math.log(1 + math.exp(-1))  # -log sigmoid(1)  = 0.31326
SOFTPLUS_M1 = math.log(1 + math.exp(1))  # -log sigmoid(-1) = 1.31326


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("sigmoid", (SOFTPLUS_1 + SOFTPLUS_M1) / 2),  # 0.81326
        ("hinge", (0.0 + 2.0) / 2),  # max(0, 1-1) = 0, max(0, 1+1) = 2
        ("ipo", ((1 - 0.5) ** 2 + (-1 - 0.5) ** 2) / 2),  # 0.25, 2.25 -> 1.25
    ],
)
def test_variants_match_hand_worked_values(kind, expected):
    loss, metrics = dpo_loss(ERR_W, ERR_L, REF_W, REF_L, beta=100.0, kind=kind)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert metrics["implicit_accuracy"].item() == pytest.approx(0.5)
    assert metrics["reward_margin"].item() == pytest.approx(0.0, abs=1e-5)  # (+1 - 1) / 2
    assert metrics["err_w"].item() == pytest.approx(0.11) and metrics["ref_err_l"].item() == pytest.approx(0.105)


def test_sigmoid_is_mean_of_logsigmoid_not_logsigmoid_of_mean():
    """diffusers issue 6702: -logsigmoid(mean(inside)) would be log 2 = 0.693 here, not 0.813."""
    loss, _ = dpo_loss(ERR_W, ERR_L, REF_W, REF_L, beta=100.0)
    assert abs(loss.item() - math.log(2)) > 0.1


def test_diffusers_sd15_convention_converts_by_a_factor_two():
    """diffusers' SD1.5 script: loss = -logsigmoid(beta_dpo * (ref_diff - model_diff)).mean(), default beta_dpo 2500."""
    g = torch.Generator().manual_seed(0)
    errs = [torch.rand(8, generator=g) * 1e-3 + 0.1 for _ in range(4)]
    beta_dpo = 2500.0
    model_diff, ref_diff = errs[0] - errs[1], errs[2] - errs[3]
    theirs = -torch.nn.functional.logsigmoid(beta_dpo * (ref_diff - model_diff)).mean()
    ours, _ = dpo_loss(*errs, beta=beta_from_logit_scale(beta_dpo))
    assert beta_from_logit_scale(beta_dpo) == 5000.0
    torch.testing.assert_close(ours, theirs)


def test_label_smoothing_and_soft_preferences():
    """A single pair with inside = +1: smoothing 0.1 gives 0.9 * softplus(-1) + 0.1 * softplus(1)."""
    args = (ERR_W[:1], ERR_L[:1], REF_W[:1], REF_L[:1])
    smoothed, _ = dpo_loss(*args, beta=100.0, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * SOFTPLUS_1 + 0.1 * SOFTPLUS_M1, abs=1e-5)
    tie, _ = dpo_loss(*args, beta=100.0, preference=torch.tensor([0.5]))
    assert tie.item() == pytest.approx(0.5 * SOFTPLUS_1 + 0.5 * SOFTPLUS_M1, abs=1e-5)
    flipped, _ = dpo_loss(*args, beta=100.0, preference=torch.tensor([0.0]))
    assert flipped.item() == pytest.approx(SOFTPLUS_M1, abs=1e-5)


def test_gradient_lowers_the_winner_error_relative_to_the_loser():
    err_w, err_l = torch.tensor([0.1], requires_grad=True), torch.tensor([0.1], requires_grad=True)
    loss, metrics = dpo_loss(err_w, err_l, torch.tensor([0.1]), torch.tensor([0.1]), beta=5000.0)
    loss.backward()
    assert err_w.grad.item() > 0 > err_l.grad.item()  # descent decreases e_w and increases e_l
    assert metrics["implicit_accuracy"].item() == 0.5  # inside == 0 counts as half


def test_unknown_variant_and_per_sample_error():
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo"):
        dpo_loss(ERR_W, ERR_L, REF_W, REF_L, beta=1.0, kind="kto")
    pred, target = torch.zeros(2, 3, 2, 2), torch.ones(2, 3, 2, 2)
    target[1] *= 2
    assert per_sample_error(pred, target).tolist() == [1.0, 4.0]
