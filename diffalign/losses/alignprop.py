"""AlignProp (Prabhudesai et al. 2023, arXiv 2310.03739) and DRaFT (Clark et al. 2023, arXiv 2309.17400): reward
backpropagation through the sampler. The tensor math only: the objective, where the gradient is cut, and the
KL-style regulariser to the base model.

The sampler x_T -> x_0 is a differentiable function of the adapter weights θ; the image is decode(x_0). AlignProp
(Sec. 4, the alignment loss) maximises the reward of the sampled images:

    L(θ) = -scale · mean_b R(decode(x_0^b(θ)), c_b)

Truncated backpropagation (AlignProp Sec. 4 "randomized truncated backpropagation"; DRaFT-K, Clark et al. Sec. 4):
the predictions of steps i < cut are detached, so the gradient flows through the last N - cut steps only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Truncation = Literal["last_k", "random", "full", "lv"]


def reward_loss(rewards: Tensor, scale: float = 1.0) -> Tensor:
    """AlignProp's loss (Prabhudesai et al. 2023, Sec. 4: L_align = -mean_c R(π_θ(c))) times `scale` (the official
    code's `loss_coeff`, 0.01 for HPS and aesthetic): -scale · mean(rewards), rewards [B]."""
    return -scale * rewards.float().mean()


def prediction_drift(policy: Sequence[Tensor], reference: Sequence[Tensor]) -> Tensor:
    """The KL-style regulariser to the base model: mean over the sampling steps that carry gradient, and over the
    batch, of mean_{C,H,W} (pred_policy - pred_reference)², i.e. ||·||² / (C·H·W) per sample. For two Gaussian
    sampler transitions with the same variance σ_i² the per-step KL is ||μ_policy - μ_reference||² / (2σ_i²), and the
    means differ by a step-dependent multiple of the prediction difference: this is the form of DPOK's KL bound (Fan et
    al. 2023) with the step weights dropped. The reference predictions are constants. Zero when there are no steps."""
    if len(policy) != len(reference):
        raise ValueError(f"prediction_drift: {len(policy)} policy predictions but {len(reference)} reference ones")
    if not policy:
        return torch.zeros(())
    per_step = [(p.float() - r.float().detach()).pow(2).mean() for p, r in zip(policy, reference, strict=True)]
    return torch.stack(per_step).mean()


def truncation_cutoff(
    kind: Truncation,
    num_steps: int,
    *,
    k: int = 1,
    distribution: Literal["gaussian", "uniform"] = "gaussian",
    mean: float = 0.84,
    std: float = 0.1,
    low: float = 0.0,
    high: float = 1.0,
    generator: torch.Generator | None = None,
    max_draws: int = 1000,
) -> int:
    """The index of the first sampling step whose prediction keeps its gradient (`Family.sample(detach_before=...)`);
    the steps before it are detached. Of N = `num_steps`:

    - "full": 0, backpropagation through every step.
    - "last_k": N - k (DRaFT-K; k = 1 is the low-memory default), 0 if k >= N.
    - "random": one cut-off per batch, as the official AlignProp code draws it (mihirp1998/AlignProp b22918a,
      `sd_pipeline.py`): from a gaussian with mean `mean`·N and std `std`·N (official 42 and 5 of 50 steps), or
      uniform in [round(low·N), round(high·N)) (official [0, 50); commit b576ae7 used [30, 50)), truncated to an
      integer and drawn again until 1 <= cut <= N - 1 (the first step never, the last always carries
      gradient). With N = 1 the one step carries it.
    - "lv": N, no step of the chain carries gradient (DRaFT-LV re-noises the final sample and backpropagates through
      extra final steps instead).
    Random draws come from `generator`, so the cut-off of a resumed run is the same.
    """
    if num_steps < 1:
        raise ValueError(f"truncation_cutoff: num_steps must be >= 1, got {num_steps}")
    if kind == "full":
        return 0
    if kind == "last_k":
        if k < 1:
            raise ValueError(f"truncation_cutoff: k must be >= 1, got {k}")
        return max(0, num_steps - k)
    if kind == "lv":
        return num_steps
    if kind != "random":
        raise ValueError(f"unknown truncation {kind!r}: last_k, random, full or lv")
    if num_steps == 1:
        return 0
    for _ in range(max_draws):
        if distribution == "gaussian":
            draw = mean * num_steps + std * num_steps * torch.randn((), generator=generator).item()
            cut = int(draw)  # towards zero, as int() in the official code
        elif distribution == "uniform":
            start, stop = round(low * num_steps), round(high * num_steps)
            if stop <= start:
                raise ValueError(f"truncation_cutoff: empty uniform range [{start}, {stop}) of {num_steps} steps")
            cut = int(torch.randint(start, stop, (), generator=generator).item())
        else:
            raise ValueError(f"unknown cut-off distribution {distribution!r}: gaussian or uniform")
        if 1 <= cut <= num_steps - 1:
            return cut
    raise ValueError(
        f"truncation_cutoff: no cut-off in [1, {num_steps - 1}] after {max_draws} draws; check the distribution"
    )
