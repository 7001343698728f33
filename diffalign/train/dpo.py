"""Diffusion-DPO recipe (Wallace et al. 2023): LoRA (or full fine-tune) of any family on preference pairs.

    accelerate launch -m diffalign train configs/dpo/sd15.yaml        # or: diffalign train configs/dpo/toy.yaml

Per step: winner and loser share one noise and one timestep; the policy (adapters on) and the reference (adapters
off, no grad) predict the family's target; `dpo_loss` turns the four errors into the loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from diffalign.config import DataConfig, TimestepConfig, TrainConfig, bounded

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from torch import Tensor

    from diffalign.models import Cond, Family

    PairStep = Callable[[Family, Tensor, Cond, Tensor, torch.Generator], tuple[Tensor, dict[str, Tensor]]]


@dataclass
class DPOConfig:
    """Diffusion-DPO (Wallace et al. 2023). β in the paper's convention: inside = -(β/2)·(Δpolicy - Δreference)."""

    beta: float = bounded(5000.0, gt=0)
    loss: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    label_smoothing: float = bounded(0.0, ge=0, le=0.5)
    """Conservative DPO label smoothing for the sigmoid loss (0 = off)."""


@dataclass
class Config(TrainConfig):
    """`method: dpo`: the shared settings plus the DPO loss, the preference pairs and the timestep weighting."""

    method: Literal["dpo"] = "dpo"
    dpo: DPOConfig = field(default_factory=DPOConfig)
    data: DataConfig = field(default_factory=DataConfig)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)


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
    return preference_loss(family, noisy, t, cond, target, preference, cfg)


def preference_loss(
    family: Family, noisy: Tensor, t: Tensor, cond: Cond, target: Tensor, preference: Tensor, cfg: DPOConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """The Diffusion-DPO loss of the policy's and the reference's errors at model input `noisy` ([2B], winners then
    losers) against `target`: the part of the step DPO and InPO share (they differ only in input and target)."""
    from diffalign.losses.dpo import dpo_loss, per_sample_error

    err = per_sample_error(family.predict(noisy, t, cond), target)
    with family.reference():
        ref_err = per_sample_error(family.predict(noisy, t, cond), target)
    return dpo_loss(
        *err.chunk(2),
        *ref_err.chunk(2),
        beta=cfg.beta,
        kind=cfg.loss,
        label_smoothing=cfg.label_smoothing,
        preference=preference,
    )


def train(cfg: Config) -> Path:
    """Run the recipe; returns the folder of the final LoRA (or full denoiser)."""

    def step(family: Family, latents: Tensor, cond: Cond, preference: Tensor, generator: torch.Generator):
        return dpo_step(family, latents, cond, preference, cfg.dpo, generator, cfg.timesteps)

    return train_on_pairs(cfg, step)


def train_on_pairs(cfg: TrainConfig, pair_step: PairStep) -> Path:
    """Train on the preference pairs of `cfg.data` with `pair_step(family, latents, cond, preference, generator) ->
    (loss, metrics)` (latents and cond hold winners then losers, [2B]; DPO's or InPO's step): the same data, cache,
    loop, checkpoints and logging for every pair method. Returns the folder of the final LoRA (or full denoiser)."""
    from diffalign.data.loader import PairBatches, pair_model_inputs
    from diffalign.data.pairs import open_pairs
    from diffalign.train import common
    from diffalign.train.loop import fit

    accelerator = common.make_accelerator(cfg)
    table = open_pairs(cfg.data)  # a bad source or a missing column fails here, before any model loads
    common.check_rewards(cfg)  # so does a bad validation reward spec
    family, params = common.load_model(cfg, accelerator)
    resolution = common.resolution_of(cfg, family)

    def make_batches(position: int) -> PairBatches:
        return PairBatches(
            cfg.data,
            family,
            model_name=cfg.model.name,
            model_path=common.model_path(cfg),
            resolution=resolution,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            position=position,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            accelerator=accelerator,
            table=table,
        )

    def step(batch, generator):
        latents, cond, preference = pair_model_inputs(family, batch)
        return pair_step(family, latents, cond, preference, generator)

    return fit(cfg, accelerator, family, params, make_batches, step, bar_metric="implicit_accuracy")
