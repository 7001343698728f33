"""Rewards: image + prompt -> score, as frozen torch modules (differentiable unless they say otherwise).

    from diffalign.rewards import load_reward
    reward = load_reward("hpsv2=5,pickscore=0.05", device="cuda")
    scores = reward(images, prompts)              # [B], differentiable w.r.t. images in [0, 1]
    parts = reward.components(images, prompts)    # {"hpsv2": [B], "pickscore": [B]}

Rewards never import diffusers. See `registry.py` for the spec language and `base.py` for the protocol.
"""

from diffalign.rewards.base import Preprocess, Reward, center_crop, image_to_tensor, normalize, resize
from diffalign.rewards.mix import WeightedSum
from diffalign.rewards.registry import (
    REWARDS,
    RewardTerm,
    describe_rewards,
    load_reward,
    parse_differentiable_spec,
    parse_spec,
)

__all__ = [
    "REWARDS",
    "Preprocess",
    "Reward",
    "RewardTerm",
    "WeightedSum",
    "center_crop",
    "describe_rewards",
    "image_to_tensor",
    "load_reward",
    "normalize",
    "parse_differentiable_spec",
    "parse_spec",
    "resize",
]
