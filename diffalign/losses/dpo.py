"""Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908), with the sigmoid (paper), hinge and IPO variants.

β convention (the paper's, SalesforceAIResearch/DiffusionDPO and diffusers' SDXL script): with per-sample denoising
errors e = mean_{C,H,W} ||prediction - target||² of the policy (e_w, e_l) and of the reference (r_w, r_l),

    inside = -(β / 2) · ((e_w - e_l) - (r_w - r_l))          (paper eq. 14, with T·ω(λ_t) folded into β)

Paper values: β = 2000 (SD 1.5), 5000 (SDXL). diffusers' SD 1.5 script writes `logsigmoid(beta_dpo · (ref_diff -
model_diff))` with default `beta_dpo = 2500`: that is the same loss with β = 2 · beta_dpo = 5000 — see
`beta_from_logit_scale`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _sigmoid(inside: Tensor) -> Tensor:
    """Paper eq. 14: -log σ(inside)."""
    return -F.logsigmoid(inside)


def _hinge(inside: Tensor) -> Tensor:
    """SLiC-style hinge: max(0, 1 - inside)."""
    return torch.relu(1 - inside)


def _ipo(inside: Tensor) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17) with τ = β/2: (h - 1/(2τ))² where inside = τ·h, multiplied by τ² so that its
    gradient scale matches the sigmoid loss: (inside - 1/2)²."""
    return (inside - 0.5) ** 2


DPO_LOSSES: dict[str, Callable[[Tensor], Tensor]] = {"sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo}


def beta_from_logit_scale(logit_scale: float) -> float:
    """Our β for a loss written as `f(logit_scale · (ref_diff - model_diff))` (diffusers' SD 1.5 `beta_dpo`): 2x."""
    return 2.0 * logit_scale


def dpo_loss(
    err_w: Tensor,
    err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    *,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    preference: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO loss of a batch of pairs, and its metrics.

    err_* are per-pair errors [B] (policy) and ref_err_* the reference's, for the first ("w") and second ("l") image.
    `preference` [B] is the probability that the first image is preferred (1 for ordinary pairs, 0.5 for ties kept as
    soft labels); with label smoothing ε a pair's preference p becomes p(1-ε) + (1-p)ε. Each variant f is applied
    symmetrically: loss = mean(p·f(inside) + (1-p)·f(-inside)).

    Metrics (all detached): implicit_accuracy = mean(inside > 0) (ties in `inside` count 1/2), reward_margin =
    mean(inside), and the mean errors err_w, err_l, ref_err_w, ref_err_l.
    """
    if kind not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {kind!r}; choose one of {', '.join(DPO_LOSSES)}")
    inside = -(beta / 2) * ((err_w - err_l) - (ref_err_w - ref_err_l))
    p = torch.ones_like(inside) if preference is None else preference.to(inside)
    p = p * (1 - label_smoothing) + (1 - p) * label_smoothing
    f = DPO_LOSSES[kind]
    loss = (p * f(inside) + (1 - p) * f(-inside)).mean()
    with torch.no_grad():
        metrics = {
            "implicit_accuracy": ((inside > 0).float() + 0.5 * (inside == 0).float()).mean(),
            "reward_margin": inside.mean(),
            "err_w": err_w.mean(),
            "err_l": err_l.mean(),
            "ref_err_w": ref_err_w.mean(),
            "ref_err_l": ref_err_l.mean(),
        }
    return loss, metrics


def per_sample_error(prediction: Tensor, target: Tensor) -> Tensor:
    """e = mean over all but the batch dimension of (prediction - target)², in float32."""
    return (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))
