"""Losses: pure tensor math, one file per paper. Imports torch only."""

from diffalign.losses.dpo import DPO_LOSSES, beta_from_logit_scale, dpo_loss

__all__ = ["DPO_LOSSES", "beta_from_logit_scale", "dpo_loss"]
