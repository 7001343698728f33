"""Losses: pure tensor math, one file per paper. Imports torch only."""

from diffalign.losses.dpo import DPO_LOSSES, beta_from_logit_scale, dpo_loss
from diffalign.losses.inpo import noise_from_inversion, v_from_inversion, velocity_from_inversion

__all__ = [
    "DPO_LOSSES",
    "beta_from_logit_scale",
    "dpo_loss",
    "noise_from_inversion",
    "v_from_inversion",
    "velocity_from_inversion",
]
