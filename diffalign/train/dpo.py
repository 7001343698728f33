"""Diffusion-DPO recipe (Wallace et al. 2023): LoRA (or full fine-tune) of any family on preference pairs.

    accelerate launch -m diffalign train configs/dpo/sd15.yaml        # or: diffalign train configs/dpo/toy.yaml

Per step: winner and loser share one noise and one timestep; the policy (adapters on) and the reference (adapters
off, no grad) predict the family's target; `dpo_loss` turns the four errors into the loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from diffalign.config import TimestepConfig
from diffalign.train.pair_training import PairTrainConfig, PreferenceLossConfig

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from diffalign.models import Cond, Family


@dataclass
class DPOConfig(PreferenceLossConfig):
    """Diffusion-DPO (Wallace et al. 2023). β in the paper's convention: inside = -(β/2)·(Δpolicy - Δreference)."""


@dataclass
class Config(PairTrainConfig):
    """`method: dpo`: the shared settings plus the DPO loss, the preference pairs and the timestep weighting."""

    method: Literal["dpo"] = "dpo"
    """The training method (this recipe)."""
    dpo: DPOConfig = field(default_factory=DPOConfig)


def dpo_step(
    family: Family,
    latents: Tensor,
    cond: Cond,
    preference: Tensor,
    cfg: DPOConfig,
    generator: torch.Generator,
    timesteps: TimestepConfig | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss and metrics of one batch: latents/cond hold winners then losers ([2B]); noise and t shared per pair."""
    import torch

    half = latents.shape[0] // 2
    noise = torch.randn(latents[:half].shape, generator=generator).to(latents)
    t = family.sample_train_timesteps(half, generator, **asdict(timesteps or TimestepConfig()))
    noise, t = torch.cat([noise, noise]), torch.cat([t, t])
    noisy, target = family.noisy_and_target(latents, noise, t)
    from diffalign.train.pair_training import preference_loss

    return preference_loss(family, noisy, t, cond, target, preference, cfg)


def train(cfg: Config) -> Path:
    """Run the recipe; returns the folder of the final LoRA (or full denoiser)."""
    from diffalign.train.pair_training import train_on_pairs

    def step(family: Family, latents: Tensor, cond: Cond, preference: Tensor, generator: torch.Generator):
        return dpo_step(family, latents, cond, preference, cfg.dpo, generator, cfg.timesteps)

    return train_on_pairs(cfg, step)
