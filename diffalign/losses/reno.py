"""ReNO: reward-based noise optimisation (Eyring et al., NeurIPS 2024, arXiv 2406.04312).

The initial noise z of a one- or few-step generator G is optimised, nothing else. The objective (paper Sec. 3, the
weighted multi-reward criterion with the noise regulariser):

    L(z) = sum_k lambda_k * (C_k - R_k(G(z, c), c))  +  lambda_reg * K(z),     K(z) = 1/2 ||z||^2 - (d - 1) log ||z||

K is the negative log-likelihood of the norm of a d-dimensional standard Gaussian (the chi_d density
p(r) ∝ r^(d-1) exp(-r^2 / 2)): it keeps z on the shell ||z|| ≈ sqrt(d - 1) where the generator was trained, instead of
letting the reward push the noise out of distribution. The constants C_k (the official code's 1 for HPS, 2 for
ImageReward, 100 for CLIP, 30 for PickScore) move neither the gradient nor which iterate is best, so they are left out
here: the reward loss is -sum_k lambda_k R_k. Each sample of a batch has its own z, its own loss and its own gradient
clipping (`clip_grad_rows_`), so a batch optimises its prompts independently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


def chi_regulariser(noise: Tensor) -> Tensor:
    """K(z) = 1/2 ||z||^2 - (d - 1) log ||z|| per sample, in float32: noise [B, ...] -> [B] (d = numel of one sample).

    Its gradient is z - (d - 1) z / ||z||^2 (zero on the shell ||z||^2 = d - 1)."""
    flat = noise.float().flatten(1)
    norm = torch.linalg.vector_norm(flat, dim=1)
    return 0.5 * norm**2 - (flat.shape[1] - 1) * torch.log(norm)


@dataclass
class RenoLoss:
    """The per-sample parts of the ReNO objective, each [B]."""

    total: Tensor
    """reward_loss + reg_weight * regulariser: what is minimised (sum it over the batch for backward)."""
    reward_loss: Tensor
    """-sum_k lambda_k R_k: the loss that picks the best iterate (regulariser excluded)."""
    regulariser: Tensor
    """K(z), unweighted, float32."""


def reno_loss(
    rewards: Mapping[str, Tensor], weights: Mapping[str, float], noise: Tensor, reg_weight: float = 0.01
) -> RenoLoss:
    """The ReNO objective per sample: -sum_k weights[k] * rewards[k] + reg_weight * K(noise).

    `rewards` are the unweighted reward components ({name: [B]}), `weights` their lambda_k (every component needs
    one), `noise` the optimised initial noise [B, ...]. Paper defaults: lambda_reg = 0.01 and, with diffalign's reward
    definitions, hpsv2 5.0, imagereward 1.0, clip 0.01, pickscore 0.05."""
    missing = set(rewards) - set(weights)
    if missing:
        raise ValueError(f"reno_loss: no weight for the reward components {sorted(missing)}")
    parts = [weights[name] * value.float() for name, value in rewards.items()]
    reward_loss = -sum(parts[1:], parts[0])
    regulariser = chi_regulariser(noise)
    return RenoLoss(total=reward_loss + reg_weight * regulariser, reward_loss=reward_loss, regulariser=regulariser)


@torch.no_grad()
def clip_grad_rows_(grad: Tensor, max_norm: float, eps: float = 1e-6) -> Tensor:
    """Clip each sample's gradient (row of `grad` [B, ...]) to L2 norm `max_norm`, in place, exactly as
    `torch.nn.utils.clip_grad_norm_` does for one sample (scale by max_norm / (norm + eps) when that is below 1).
    Returns the norms before clipping [B] (float32)."""
    norms = torch.linalg.vector_norm(grad.float().flatten(1), dim=1)
    scale = (max_norm / (norms + eps)).clamp(max=1.0)
    grad.mul_(scale.to(grad.dtype).reshape(-1, *([1] * (grad.ndim - 1))))
    return norms
