"""The demo's GRPO section: online RL with the proxy reward toy-clip on the TRAINING prompts with
configs/grpo/<toy>.yaml (rollouts of groups of images, group-normalised advantages, PPO-clipped updates), the proxy AND
gold validation curves on the held-out prompts during training, and the after-measurement with the base's seeds."""

from __future__ import annotations

import time

from diffalign.apps.demo import DemoContext, SectionResult
from diffalign.apps.sections.toy_training import reward_method_run, reward_training_charts


def grpo_section(ctx: DemoContext) -> SectionResult:
    """GRPO training with curves, after-measurement of the final LoRA (the best-by-gold one is kept too)."""
    started = time.perf_counter()
    steps = ctx.settings.size("grpo", "steps")
    prompts, group = ctx.settings.size("grpo", "rollout")
    every = max(2, steps // 5 // 2 * 2)  # validate on rollout boundaries (2 optimizer steps a rollout), 5 times a run
    rollout = [  # the toy configs' 2 optimizer steps per rollout (2 micro-batches of accumulation each)
        f"grpo.prompts_per_rollout={prompts}",
        f"grpo.group_size={group}",
        f"batch_size={max(1, prompts * group // 4)}",
    ]
    result = reward_method_run(ctx, "grpo", steps, every, rollout, ("reward", "ratio"))
    curves, best, after, kept = (result[k] for k in ("curves", "best", "after", "kept"))
    html = [
        f"<p>{steps} LoRA steps with <code>configs/{ctx.config_name('grpo')}</code>: per rollout, {prompts} groups of "
        f"{group} images sampled with the stochastic sampler from the TRAINING prompts, each image's proxy reward "
        f"normalised within its prompt's group, PPO-clipped updates. The gold checker is only watched, on the "
        f"held-out prompts.{kept} Measured below: the final LoRA.</p>",
        *reward_training_charts(curves, "rollouts"),
    ]
    return SectionResult(
        key="grpo",
        title="GRPO",
        optimises="LoRA by online RL on the sampler's own steps (proxy reward, group advantages)",
        after=after,
        seconds=time.perf_counter() - started,
        curves=curves,
        facts={"steps": steps, "rollout": [prompts, group], "best": best},
        html=html,
    )
