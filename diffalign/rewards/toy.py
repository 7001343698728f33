"""The toy shapes world's rewards.

`toy-clip` is the `clip` reward on the bundled toy CLIP (`assets/toy/reward`, a transformers CLIPModel at 32x32 with
its tokenizer and preprocessor_config.json), a learned proxy. `toy-gold` wraps the pixel-level gold checker
`diffalign.gym.gold.gold_score`: the truth of the toy world, not differentiable.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from diffalign.errors import UserError
from diffalign.rewards.base import Reward, check_images, check_prompts
from diffalign.rewards.clip import ClipReward


def toy_reward_dir() -> Path:
    """The bundled toy reward folder (read at call time so DIFFALIGN_ASSETS / tests can move it)."""
    from diffalign import hub

    return hub.ASSETS_DIR / "toy" / "reward"


class ToyClipReward(ClipReward):
    """`clip` on the bundled toy CLIP (32x32 shapes-world images)."""

    name = "toy-clip"
    description = "toy world proxy reward: CLIP score of the bundled tiny CLIP (32x32 shapes)"
    differentiable = True
    weights_source = "bundled assets/toy/reward (built by `make assets`)"

    def __init__(self, scale: float = 100.0) -> None:
        folder = toy_reward_dir()
        if not (folder / "config.json").is_file():
            raise UserError(f"the toy assets are not built yet ({folder} is missing): run `make assets`")
        super().__init__(model=str(folder), scale=scale)


class ToyGoldReward(Reward):
    """Gold score of the toy world in [0, 1]: the fraction of the prompt's attributes the image shows."""

    name = "toy-gold"
    description = "toy world gold checker: fraction of background, colour and shape right (pixel rules)"
    differentiable = False
    weights_source = "none (pixel rules in diffalign.gym.gold)"

    def __init__(self) -> None:
        super().__init__()
        self.freeze()

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Gold scores [B] of images [B, 3, H, W] in [0, 1] against shapes-world captions (no gradient)."""
        return self.components(images, prompts)[self.label]

    @torch.no_grad()
    def components(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """The score and what it is made of, each [B] in {0, 1} (score: thirds): per attribute (background, colour,
        shape) whether the image shows the prompt's, and all_correct (all three)."""
        from diffalign.gym.gold import gold_check
        from diffalign.gym.world import ATTRIBUTES

        check_images(images)
        prompts = check_prompts(images, prompts)
        try:
            check = gold_check(images.detach().float(), prompts)
        except ValueError as e:
            raise UserError(f"toy-gold: {e}") from e
        parts = {name: check[name].float().to(images.device) for name in (*ATTRIBUTES, "all_correct")}
        score = torch.stack([parts[a] for a in ATTRIBUTES]).mean(dim=0)
        return {self.label: score, **parts}
