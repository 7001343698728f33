"""The demo's GRPO section: online RL with the proxy reward toy-clip on the TRAINING prompts with
configs/grpo/<toy>.yaml (rollouts of groups of images, group-normalised advantages, PPO-clipped updates), the proxy AND
gold validation curves on the held-out prompts during training, and the after-measurement with the base's seeds."""

from __future__ import annotations

from diffalign.apps.demo import DemoContext, SectionResult
from diffalign.apps.sections.toy_training import rollout_method_section


def grpo_section(ctx: DemoContext) -> SectionResult:
    """GRPO training with curves, after-measurement of the final LoRA (the best-by-gold one is kept too)."""
    return rollout_method_section(
        ctx, "grpo", "GRPO", "LoRA by online RL on the sampler's own steps (proxy reward, group advantages)",
        "with the stochastic sampler, each image's proxy reward normalised within its prompt's group, PPO-clipped "
        "updates.",
        ("ratio",),
    )  # fmt: skip
