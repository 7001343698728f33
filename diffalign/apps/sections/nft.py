"""The demo's DiffusionNFT section: online RL on the forward process with the proxy reward toy-clip on the TRAINING
prompts with configs/nft/<toy>.yaml (rollouts of the old policy's deterministic samples, group-normalised advantages,
the implicit positive/negative policy regression), the proxy AND gold validation curves on the held-out prompts during
training, and the after-measurement with the base's seeds."""

from __future__ import annotations

from diffalign.apps.demo import DemoContext, SectionResult
from diffalign.apps.sections.toy_training import rollout_method_section


def nft_section(ctx: DemoContext) -> SectionResult:
    """DiffusionNFT training with curves, after-measurement of the final LoRA (the best-by-gold one is kept too)."""
    return rollout_method_section(
        ctx, "nft", "DiffusionNFT", "LoRA by online RL on the forward process (proxy reward, no log-probabilities)",
        "with the old policy's deterministic sampler, each image's proxy reward normalised within its prompt's "
        "group, each clean sample regressed by the implicit positive and negative policies at re-noised points.",
        ("optimality",),
    )  # fmt: skip
