"""User rewards (given by dotted path in a reward spec) for the AlignProp and training-loop tests."""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.rewards.base import Reward


class Scripted(Reward):
    """A held-out 'reward' whose value at its n-th call is VALUES[n] for every image: it rises, then falls."""

    name = "scripted"
    differentiable = False
    needs_prompts = False
    VALUES = (1.0, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0)

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        value = self.VALUES[min(self.calls, len(self.VALUES) - 1)]
        self.calls += 1
        return torch.full((images.shape[0],), value)


class Brightness(Reward):
    """Mean pixel value: a cheap differentiable reward."""

    name = "brightness"
    needs_prompts = False

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return images.float().mean(dim=(1, 2, 3))
