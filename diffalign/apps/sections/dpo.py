"""The demo's Diffusion-DPO section: proxy-ranked pairs on the training prompts, DPO with configs/dpo/<toy>.yaml,
the proxy and gold validation curves during training, and the after-measurement with the base's seeds."""

from __future__ import annotations

import time

from diffalign.apps.demo import DemoContext, SectionResult
from diffalign.apps.sections.toy_training import pair_method_run, pair_training_charts


def dpo_section(ctx: DemoContext) -> SectionResult:
    """Pairs (shared), DPO training with curves, after-measurement."""
    started = time.perf_counter()
    steps = ctx.settings.size("dpo", "steps")
    done = pair_method_run(ctx, "dpo", steps)
    pairs, curves = done["pairs"], done["curves"]
    ctx.loras[("dpo", ctx.seed)] = done["lora"]
    html = [
        f"<p>{pairs['pairs']} preference pairs (best vs worst of {ctx.settings.images_per_prompt} images per "
        f"training prompt, ranked by the proxy; {pairs['ties']} prompts tied), then {steps} LoRA steps with "
        f"<code>configs/{ctx.config_name('dpo')}</code>.</p>",
        *pair_training_charts(curves, "DPO"),
    ]
    return SectionResult(
        key="dpo",
        title="Diffusion-DPO",
        optimises="LoRA on proxy-ranked preference pairs",
        after=done["after"],
        seconds=time.perf_counter() - started,
        curves=curves,
        facts=done["facts"],
        html=html,
    )
