"""The demo's DDIM-InPO section: the SAME proxy-ranked pairs as the DPO section, InPO with configs/inpo/<toy>.yaml,
the proxy and gold validation curves during training, and the after-measurement with the base's seeds."""

from __future__ import annotations

import time

from diffalign.apps.demo import DemoContext, SectionResult
from diffalign.apps.sections.toy_training import pair_method_run, pair_training_charts


def inpo_section(ctx: DemoContext) -> SectionResult:
    """Pairs (shared with DPO), InPO training with curves, after-measurement."""
    started = time.perf_counter()
    steps = ctx.settings.size("inpo", "steps")
    done = pair_method_run(ctx, "inpo", steps)
    pairs, curves = done["pairs"], done["curves"]
    html = [
        f"<p>The same {pairs['pairs']} preference pairs as Diffusion-DPO, then {steps} LoRA steps with "
        f"<code>configs/{ctx.config_name('inpo')}</code>: each step inverts winner and loser to a shared timestep "
        "with the current model (the sampler's deterministic inversion, no gradient) and applies the DPO loss at "
        "the inverted latents, whose "
        f"reparametrised noise is the target. Training took {done['train_seconds']:.0f} s.</p>",
        *pair_training_charts(curves, "InPO"),
    ]
    return SectionResult(
        key="inpo",
        title="DDIM-InPO",
        optimises="LoRA on the same pairs, at DDIM-inverted latents",
        after=done["after"],
        seconds=time.perf_counter() - started,
        curves=curves,
        facts=done["facts"],
        html=html,
    )
