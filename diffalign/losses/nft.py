"""DiffusionNFT (Zheng et al., ICLR 2026; NVlabs/DiffusionNFT 24af555 `scripts/train_nft_sd3.py`) as pure tensor math:
online RL on the forward (noising) process, with no log-probabilities and any sampler.

A rollout samples G images per prompt with the old policy v_old and a deterministic solver; each clean latent x0 gets
an advantage A (group-normalised reward), mapped to an optimality probability

    r = clip(clip(A, ±adv_clip) / adv_clip / 2 + 1/2, 0, 1).

An update noises x0 by the forward process, x_t = (1 - t) x0 + t ε (flow), and regresses two implicit policies
built from the trained model v_θ and the old one:

    v⁺ = β v_θ + (1 - β) v_old        v⁻ = (1 + β) v_old - β v_θ

    L = [r ‖x̂0(v⁺) - x0‖² / w⁺ + (1 - r) ‖x̂0(v⁻) - x0‖² / w⁻] / β · adv_clip

with x̂0(v) = x_t - t v and the paper's adaptive weights w = mean |x̂0 - x0| (per sample, no gradient, at least
1e-5): positives pull v_θ towards the clean sample, negatives push it away, the old policy anchors both. Plus
kl_weight · mean ‖v_θ - v_ref‖², the reference being the model without the LoRA.

**Any parametrisation (beyond the paper, which is flow-only).** For a fixed x_t and t the clean prediction is an
affine map of the model output in every family: x̂0 = x_t - σ v (flow), (x_t - √(1-ᾱ) ε̂) / √ᾱ (ε), √ᾱ x_t - √(1-ᾱ) v̂
(v). An affine map f(p) = a + b·p carries a combination whose weights sum to 1 to the same combination of images:
f(β p_θ + (1-β) p_old) = β f(p_θ) + (1-β) f(p_old), and likewise for v⁻ (weights 1 + β and -β). So the loss below
takes the two models' clean predictions x̂0_θ, x̂0_old and forms x̂0⁺ = β x̂0_θ + (1-β) x̂0_old and x̂0⁻ = (1+β) x̂0_old
- β x̂0_θ: on a flow model exactly the paper's loss, on a UNet the same objective in x0 space, where ‖x̂0 - x0‖² =
(1-ᾱ)/ᾱ ‖ε̂ - ε‖² for ε-prediction. That factor is large at high noise; the adaptive weight (an L1 norm of the same
residual) divides most of it out, so the update weighs the noise levels as on a flow model. The KL stays in the
family's own output space (‖ε̂_θ - ε̂_ref‖² on a UNet).
"""

from __future__ import annotations

import torch
from torch import Tensor

WEIGHT_FLOOR = 1e-5
"""The adaptive weight's lower bound (official: `.clip(min=0.00001)`)."""


def optimality(advantages: Tensor, adv_clip: float) -> Tensor:
    """r = clip(clip(A, ±adv_clip) / adv_clip / 2 + 1/2, 0, 1): A = 0 is r = 1/2, A = ±adv_clip is r = 1 / 0."""
    clipped = advantages.clamp(-adv_clip, adv_clip)
    return (clipped / adv_clip / 2 + 0.5).clamp(0, 1)


def implicit_policies(pred: Tensor, old_pred: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(v⁺, v⁻) = (β v_θ + (1 - β) v_old, (1 + β) v_old - β v_θ), the old prediction detached: for model outputs
    or, equally (see the module), for their clean predictions x̂0."""
    old_pred = old_pred.detach()
    return beta * pred + (1 - beta) * old_pred, (1 + beta) * old_pred - beta * pred


def adaptive_mse(x0_pred: Tensor, x0: Tensor) -> Tensor:
    """‖x̂0 - x0‖² / w per sample [B] (the mean over dimensions), w = mean |x̂0 - x0| without gradient, ≥ 1e-5."""
    dims = tuple(range(1, x0.ndim))
    residual = x0_pred.float() - x0.float()
    with torch.no_grad():
        weight = residual.double().abs().mean(dim=dims, keepdim=True).clamp(min=WEIGHT_FLOOR).float()
    return (residual**2 / weight).mean(dim=dims)


def nft_loss(
    x0_pred: Tensor, x0_old: Tensor, x0: Tensor, advantages: Tensor, beta: float, adv_clip: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT's policy loss of one micro-batch [B] from the trained and old models' clean predictions at the
    same x_t, and its statistics: r's mean, the positive and negative terms, and how far the trained model has moved
    from the old one (mean squared difference of the clean predictions)."""
    r = optimality(advantages.float(), adv_clip)
    positive, negative = implicit_policies(x0_pred.float(), x0_old.float(), beta)
    positive_loss, negative_loss = adaptive_mse(positive, x0), adaptive_mse(negative, x0)
    loss = ((r * positive_loss + (1 - r) * negative_loss) / beta * adv_clip).mean()
    stats = {
        "optimality": r.mean(),
        "positive_loss": positive_loss.detach().mean(),
        "negative_loss": negative_loss.detach().mean(),
        "old_deviation": ((x0_pred.detach().float() - x0_old.float()) ** 2).mean(),
    }
    return loss, stats


def prediction_kl(pred: Tensor, reference_pred: Tensor) -> Tensor:
    """mean ‖v_θ - v_ref‖² over dimensions and batch (official `kl_div_loss`, weighted by `train.beta`)."""
    return ((pred.float() - reference_pred.float()) ** 2).mean()


def old_policy_decay(step: int, rate: float, cap: float, delay: int = 0) -> float:
    """The old policy's EMA decay after optimizer step `step`: 0 before `delay`, then (step - delay) · rate, at most
    `cap` (official `return_decay`: type 1 rate 0.001 cap 0.5; type 2 delay 75, rate 0.0075, cap 0.999). The old
    weights become decay · old + (1 - decay) · θ after every rollout's updates."""
    if step < delay:
        return 0.0
    return min((step - delay) * rate, cap)
