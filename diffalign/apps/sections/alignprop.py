"""The demo's AlignProp section: the proxy reward toy-clip backpropagated through the sampler on the TRAINING prompts
with configs/alignprop/<toy>.yaml, the proxy AND gold validation curves on the held-out prompts during training (reward
hacking shows as the proxy rising while the gold falls), and the after-measurement with the base's seeds."""

from __future__ import annotations

import time

from diffalign.apps.demo import DemoContext, SectionResult
from diffalign.apps.sections.toy_training import reward_method_run, reward_training_charts


def truncation_text(run) -> str:
    """Through which sampling steps the run backpropagated, in words (from its saved config)."""
    from diffalign.config import read_yaml

    cfg = read_yaml(run / "config.yaml")["alignprop"]
    steps = cfg["num_steps"] or "the model's"
    kind = cfg["truncation"]
    if kind == "last_k":
        return f"through the last {cfg['k']} of {steps} sampling steps (DRaFT-K)"
    if kind == "random":
        return f"through the steps after a random cut-off (official AlignProp) of {steps} sampling steps"
    if kind == "lv":
        return f"through {cfg['lv_samples']} re-noised final steps (DRaFT-LV) of {steps} sampling steps"
    return f"through all {steps} sampling steps"


def alignprop_section(ctx: DemoContext) -> SectionResult:
    """AlignProp training with curves, after-measurement of the final LoRA (the best-by-gold one is kept too)."""
    started = time.perf_counter()
    steps = ctx.settings.size("alignprop", "steps")
    # A few dozen steps (each of 32 prompts) against the pair methods' hundreds: validate and log 5 times a run.
    result = reward_method_run(ctx, "alignprop", steps, max(1, steps // 5), [], ("reward",))
    curves, best, after, kept = (result[k] for k in ("curves", "best", "after", "kept"))
    html = [
        f"<p>{steps} LoRA steps with <code>configs/{ctx.config_name('alignprop')}</code>: images sampled from the "
        f"TRAINING prompts, the proxy reward's gradient backpropagated {truncation_text(result['run'])} into the "
        f"LoRA. The gold checker is only watched, on the held-out prompts.{kept} Measured below: the final LoRA.</p>",
        *reward_training_charts(curves, "training batches"),
    ]
    return SectionResult(
        key="alignprop",
        title="AlignProp",
        optimises="LoRA by backpropagating the proxy reward through the sampler",
        after=after,
        seconds=time.perf_counter() - started,
        curves=curves,
        facts={"steps": steps, "best": best, **result["timing"]},
        html=html,
    )
