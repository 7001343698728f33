"""Training on preference pairs: what Diffusion-DPO and DDIM-InPO share. The pairs of `data:` (Pick-a-Pic schema,
optionally cached), the timestep weighting, the preference loss of the policy's and the reference's errors, and the
shared loop; the methods differ only in the model input and target of a pair step (`PairStep`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from diffalign.config import DataConfig, TimestepConfig, TrainConfig, bounded

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from torch import Tensor

    from diffalign.models import Cond, Family

    PairStep = Callable[[Family, Tensor, Cond, Tensor, torch.Generator], tuple[Tensor, dict[str, Tensor]]]
    """pair_step(family, latents, cond, preference, generator) -> (loss, metrics); latents and cond hold winners
    then losers ([2B])."""


@dataclass
class PreferenceLossConfig:
    """The Diffusion-DPO loss (Wallace et al. 2023) of a pair method. β in the paper's convention: inside =
    -(β/2)·(Δpolicy - Δreference)."""

    beta: float = bounded(5000.0, gt=0)
    """β of inside = -(β/2)·((e_w - e_l) - (r_w - r_l)): the paper's 2000 (SD 1.5) and 5000 (SDXL); diffusers' SD 1.5
    script's `beta_dpo` 2500 is 5000 here (diffalign/losses/dpo.py)."""
    loss: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    """-log σ(inside) (the paper's), hinge max(0, 1 - inside), or IPO (inside - 1/(2β))² on the β-scaled margin."""
    label_smoothing: float = bounded(0.0, ge=0, le=0.5)
    """Conservative DPO label smoothing for the sigmoid loss (0 = off)."""


@dataclass
class PairTrainConfig(TrainConfig):
    """The settings of a preference-pair method: the shared ones plus the pairs and the timestep weighting."""

    data: DataConfig = field(default_factory=DataConfig)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)


def preference_loss(
    family: Family, noisy: Tensor, t: Tensor, cond: Cond, target: Tensor, preference: Tensor, cfg: PreferenceLossConfig
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


def train_on_pairs(cfg: PairTrainConfig, pair_step: PairStep) -> Path:
    """Train on the preference pairs of `cfg.data` with `pair_step`: the same data, cache, loop, checkpoints and
    logging for every pair method. Returns the folder of the final LoRA (or full denoiser)."""
    from diffalign.data.loader import PairBatches, pair_model_inputs
    from diffalign.data.pairs import open_pairs
    from diffalign.train import setup, validation
    from diffalign.train.loop import fit

    accelerator = setup.make_accelerator(cfg)
    table = open_pairs(cfg.data)  # a bad source or a missing column fails here, before any model loads
    validation.check_rewards(cfg)  # so does a bad validation reward spec
    family, params = setup.load_model(cfg, accelerator)
    resolution = setup.resolution_of(cfg, family)

    def make_batches(position: int) -> PairBatches:
        return PairBatches(
            cfg.data,
            family,
            model_name=cfg.model.name,
            model_path=setup.model_path(cfg),
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
