"""The demo's AlignProp section: the proxy reward toy-clip backpropagated through the sampler on the TRAINING prompts
with configs/alignprop/<toy>.yaml, the proxy AND gold validation curves on the held-out prompts during training (reward
hacking shows as the proxy rising while the gold falls), and the after-measurement with the base's seeds."""

from __future__ import annotations

import json
import time

from diffalign.apps.demo import DemoContext, SectionResult, read_curves
from diffalign.apps.sections.toy_training import after_lora, reward_training_charts, train_on_toy


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
    run = ctx.work / "alignprop" / f"seed{ctx.seed}"
    # A few dozen steps (each of 32 prompts) against the pair methods' hundreds: validate and log 5 times a run.
    every = max(1, steps // 5)
    lora = train_on_toy(ctx, "alignprop", run, steps, extra=[f"validation.every={every}", f"log_every={every}"])
    curves = read_curves(run / "metrics.jsonl", extra=("reward",))
    best = json.loads((run / "summary.json").read_text()).get("best") or {}
    ctx.console.print(f"  measuring the AlignProp model on {ctx.settings.eval_samples} held-out samples (same seeds)")
    after = after_lora(ctx, lora, "alignprop")
    kept = ""
    if best:
        kept = f" The LoRA with the best held-out gold score (step {best['step']}) is kept in <code>best/</code>."
    html = [
        f"<p>{steps} LoRA steps with <code>configs/{ctx.config_name('alignprop')}</code>: images sampled from the "
        "TRAINING prompts, "
        f"the proxy reward's gradient backpropagated {truncation_text(run)} into the LoRA. The gold checker is only "
        f"watched, on the held-out prompts.{kept} Measured below: the final LoRA.</p>",
        *reward_training_charts(curves, "training batches"),
    ]
    return SectionResult(
        key="alignprop",
        title="AlignProp",
        optimises="LoRA by backpropagating the proxy reward through the sampler",
        after=after,
        seconds=time.perf_counter() - started,
        curves=curves,
        facts={"steps": steps, "best": best},
        html=html,
    )
