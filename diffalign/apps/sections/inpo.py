"""The demo's DDIM-InPO section: the SAME proxy-ranked pairs as the DPO section, InPO with configs/inpo/toy.yaml,
the proxy and gold validation curves during training, and the after-measurement with the base's seeds."""

from __future__ import annotations

import time

from diffalign.apps.demo import DemoContext, SectionResult, read_curves
from diffalign.apps.sections.dpo import after_lora, pair_training_charts, train_on_toy


def inpo_section(ctx: DemoContext) -> SectionResult:
    """Pairs (shared with DPO), InPO training with curves, after-measurement."""
    started = time.perf_counter()
    pairs = ctx.pairs()
    steps = ctx.settings.inpo_steps
    run = ctx.work / "inpo" / f"seed{ctx.seed}"
    training, cpu = time.perf_counter(), time.process_time()
    lora = train_on_toy(ctx, "inpo", run, steps, [f"data.source={pairs['path']}"])
    train_seconds, train_cpu_seconds = time.perf_counter() - training, time.process_time() - cpu
    curves = read_curves(run / "metrics.jsonl", extra=("loss", "implicit_accuracy"))
    ctx.console.print(f"  measuring the InPO model on {ctx.settings.eval_samples} held-out samples (same seeds)")
    after = after_lora(ctx, lora, "inpo")
    html = [
        f"<p>The same {pairs['pairs']} preference pairs as Diffusion-DPO, then {steps} LoRA steps with "
        "<code>configs/inpo/toy.yaml</code>: each step inverts winner and loser to a shared timestep with the "
        "current model (DDIM inversion, no gradient) and applies the DPO loss at the inverted latents, whose "
        f"reparametrised noise is the target. Training took {train_seconds:.0f} s.</p>",
        *pair_training_charts(curves, "InPO"),
    ]
    return SectionResult(
        key="inpo",
        title="DDIM-InPO",
        optimises="LoRA on the same pairs, at DDIM-inverted latents",
        after=after,
        seconds=time.perf_counter() - started,
        curves=curves,
        facts={
            "pairs": pairs["pairs"],
            "ties": pairs["ties"],
            "steps": steps,
            "train_seconds": round(train_seconds, 1),
            "train_cpu_seconds": round(train_cpu_seconds, 1),  # robust to other processes on a shared machine
        },
        html=html,
    )
