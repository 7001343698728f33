"""Online RL on the sampler's own transitions (DDPO, Black et al. 2024; Flow-GRPO, Liu et al. 2025), as pure tensor
math: advantages from rewards, the PPO-clipped ratio objective, the closed-form KL to the reference policy.

A rollout samples G images for each of P prompts with the current policy, recording every step's log-probability
log p_old(x_{i+1} | x_i) (`diffalign.models.Family.rollout`). An image's advantage A is its reward normalised within
its prompt's group (GRPO) or against a per-prompt running history (DDPO's tracker); every trained step of the image
gets the same A. An update recomputes log p_θ of the recorded step and minimises

    max(-A · r, -A · clip(r, 1 - ε, 1 + ε)),   r = exp(log p_θ - log p_old)

plus β · KL(p_θ || p_ref): both Gaussians share the step's std σ, so the KL is ||μ_θ - μ_ref||² / (2σ²) (per
dimension, averaged), with p_ref the same denoiser with the LoRA disabled. GRPO-Guard (an option) normalises the
ratio per step (`ratio_norm`) and weights each step's loss by 1 / (its size in flow time).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

STD_EPS = 1e-4
"""Added to a group's reward std (flow_grpo ac4c86e flow_grpo/stat_tracking.py: `np.std(...) + 1e-4`)."""


def group_advantages(rewards: Tensor, groups: Tensor, *, global_std: bool = False, eps: float = STD_EPS) -> Tensor:
    """(r - mean of r's group) / (std + eps) for rewards [n] and integer group ids [n]; the std is the group's, or
    with `global_std` that of all n rewards (Flow-GRPO's `sample.global_std`). Population std (numpy's, as the
    peers)."""
    rewards = rewards.double()
    advantages = torch.empty_like(rewards)
    spread = rewards.std(unbiased=False) if global_std else None
    for group in groups.unique():
        members = groups == group
        values = rewards[members]
        std = spread if global_std else values.std(unbiased=False)
        advantages[members] = (values - values.mean()) / (std + eps)
    return advantages.float()


def weighted_advantages(
    components: dict[str, Tensor], weights: dict[str, float], groups: Tensor, *, global_std: bool = False
) -> Tensor:
    """Σ_k w_k · group_advantages(r_k): each reward normalised on its own before the weighted sum (so a reward on
    a large scale cannot drown the others), rather than the advantage of the weighted sum."""
    parts = [w * group_advantages(components[label], groups, global_std=global_std) for label, w in weights.items()]
    return torch.stack(parts).sum(dim=0)


def zero_spread_fraction(rewards: Tensor, groups: Tensor) -> float:
    """The fraction of groups whose rewards are all equal (they teach nothing: every advantage is 0)."""
    ids = groups.unique()
    flat = sum(bool((rewards[groups == g] == rewards[groups == g][0]).all()) for g in ids)
    return flat / len(ids)


class PromptStats:
    """DDPO's per-prompt running statistics (kvablack/ddpo-pytorch 1958463 ddpo_pytorch/stat_tracking.py): each
    prompt keeps its last `buffer_size` rewards; an image is normalised by its prompt's history once that holds
    `min_count` rewards, by the whole batch's before. Checkpointed with the run (`state_dict`)."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16, eps: float = 1e-6):
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.history: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: Tensor) -> Tensor:
        """Add the batch to the histories and return its advantages [n]."""
        rewards = rewards.double().cpu()
        advantages = torch.empty_like(rewards)
        for prompt in sorted(set(prompts)):
            members = torch.tensor([p == prompt for p in prompts])
            history = self.history.setdefault(prompt, deque(maxlen=self.buffer_size))
            history.extend(rewards[members].tolist())
            pool = torch.tensor(list(history), dtype=torch.float64) if len(history) >= self.min_count else rewards
            advantages[members] = (rewards[members] - pool.mean()) / (pool.std(unbiased=False) + self.eps)
        return advantages.float()

    def state_dict(self) -> dict[str, Any]:
        return {"history": {prompt: list(values) for prompt, values in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {p: deque(v, maxlen=self.buffer_size) for p, v in state["history"].items()}


def ppo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float,
    adv_clip: float,
    *,
    shift: Tensor | float = 0.0,
    scale: Tensor | float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO-clipped policy loss of one step's log-probs [B] and its statistics: the ratio's mean, the fraction
    clipped, and the approximate KL ½ E[(log p_θ - log p_old)²] (DDPO's and Flow-GRPO's `approx_kl`, of the raw
    log-ratio). Advantages are clipped to ±adv_clip first (both peers: `adv_clip_max` 5). The ratio is
    exp((log p_θ - log p_old + shift) · scale): shift 0, scale 1 is PPO's; `ratio_norm` gives GRPO-Guard's."""
    advantages = advantages.clamp(-adv_clip, adv_clip)
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp((log_ratio + shift) * scale)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {
        "ratio": ratio.detach().mean(),
        "clip_fraction": ((ratio.detach() - 1).abs() > clip_range).float().mean(),
        "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
    }
    return loss, stats


def ratio_norm(mean: Tensor, old_mean: Tensor, std: Tensor | float, reduce: str = "mean") -> tuple[Tensor, Tensor]:
    """GRPO-Guard's RatioNorm (Wang et al. 2025, arXiv 2510.22319; as verl-project/verl-omni a1139ba
    `GRPOGuardLoss`): the (shift, scale) of `ppo_loss` that centre a step's log-ratio and give it the same spread at
    every step.

    Both Gaussians share the step's std σ; with x_next = μ_old + σε and Δ = μ_θ - μ_old, the log-ratio is
    ε·Δ/σ - ||Δ||²/(2σ²) (each term reduced over the dimensions as the log-probs are, mean or sum): its mean is
    shifted left by b = ||Δ||²/(2σ²), so positive-advantage samples rarely reach the upper clip, and its spread
    scales as 1/σ, so one clip range means something else at each step. (log r + b) · σ = ε·Δ is centred at 0 with
    a spread that no longer depends on σ. Returns (b [B], σ)."""
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device).reshape(-1)
    squared = (mean.float() - old_mean.float()) ** 2
    dims = tuple(range(1, mean.ndim))
    squared = squared.mean(dim=dims) if reduce == "mean" else squared.sum(dim=dims)
    return squared / (2 * std**2), std


def kl_to_reference(mean: Tensor, reference_mean: Tensor, std: Tensor | float) -> Tensor:
    """KL between two Gaussians of the same std σ: ||μ - μ_ref||² / (2σ²), the squared difference averaged over the
    dimensions of each sample and then over the batch (Flow-GRPO's `kl_loss`)."""
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    squared = ((mean.float() - reference_mean.float()) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    return (squared / (2 * std.reshape(-1) ** 2)).mean()
