"""The demo's RL-guidance section: the DPO LoRA of the DPO section (or, when that section did not run, one trained
here with its helpers) mixed with the base model at inference, v = v_base + w (v_dpo - v_base), for a sweep of w:
proxy and gold per w on the first `rlg_samples` evaluation seeds (paired with the base), a grid (a row per w, the
same seeds in every row), and the headline scale `rlg_scale` on all evaluation samples. Nothing is trained."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from diffalign.apps.demo import DemoContext, SectionResult


def first_samples(result: dict[str, Any], n: int) -> dict[str, Any]:
    """The first `n` samples of an `evaluate(..., return_images=True)` result (what `paired_gain` reads)."""
    return {
        "images": result["images"][:n],
        "prompts": list(result["prompts"])[:n],
        "gold": result["gold"][:n],
        "proxy": None if result["proxy"] is None else result["proxy"][:n],
    }


def relative(path: Path, root: Path) -> str:
    """`path` relative to the demo's folder when inside it (the folder is renamed when the demo finishes)."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def dpo_lora(ctx: DemoContext) -> Path:
    """The DPO LoRA recorded by the DPO section for this training seed, or one trained now (same settings)."""
    lora = ctx.loras.get(("dpo", ctx.seed))
    if lora is None:
        from diffalign.apps.sections.toy_training import train_on_toy

        ctx.console.print("  no DPO LoRA from the DPO section: training one (same settings)")
        pairs = ctx.pairs()
        run = ctx.work / "rlg" / f"dpo-seed{ctx.seed}"
        lora = train_on_toy(ctx, "dpo", run, ctx.settings.size("dpo", "steps"), [f"data.source={pairs['path']}"])
        ctx.loras[("dpo", ctx.seed)] = lora
    return lora


def sweep(ctx: DemoContext, scales: tuple[float, ...], n: int, headline: float) -> tuple[dict, dict]:
    """({w: evaluation on the first n seeds}, the evaluation at `headline` on all evaluation samples). w = 0 is the
    base model itself (RLG at 0 reproduces it), so its base evaluation is reused."""
    from diffalign.infer.rlg import rl_guidance

    with rl_guidance(ctx.family, headline):
        ctx.console.print(f"  w = {headline:g} on {ctx.settings.eval_samples} held-out samples")
        after = ctx.measure()
    results = {}
    for scale in scales:
        if scale == 0:
            results[scale] = first_samples(ctx.base, n)
        elif scale == headline:
            results[scale] = first_samples(after, n)
        else:
            ctx.console.print(f"  w = {scale:g} on {n} held-out samples")
            with rl_guidance(ctx.family, scale):
                results[scale] = first_samples(ctx.measure(n), n)
    return results, after


def sweep_rows(results: dict[float, dict], base: dict) -> list[dict[str, float]]:
    """Per w: gold all-correct and proxy means, and paired gains (± SE) against the base and against w = 1."""
    from diffalign.apps.toy_evaluation import paired_gain

    rows = []
    for scale, result in results.items():
        vs_base = paired_gain(base, result)
        row = {
            "scale": scale,
            "n": len(result["prompts"]),
            "all_correct": vs_base["all_correct"]["after"],
            "proxy": vs_base["proxy"]["after"],
            "gain_all_correct": vs_base["all_correct"]["gain"],
            "gain_all_correct_se": vs_base["all_correct"]["paired_se"],
        }
        if 1.0 in results:
            vs_one = paired_gain(results[1.0], result)["all_correct"]
            row |= {"vs_w1_all_correct": vs_one["gain"], "vs_w1_all_correct_se": vs_one["paired_se"]}
        rows.append(row)
    return rows


def sweep_grid(results: dict[float, dict], columns: int = 9):
    """A row of images per w (the first `columns` samples: one per held-out prompt, the same seeds in every row)."""
    import torch

    from diffalign.io import image_grid

    return image_grid(torch.cat([r["images"][:columns] for r in results.values()]), columns=columns)


def rlg_section(ctx: DemoContext) -> SectionResult:
    """The sweep over w with the DPO LoRA, its grid and curves, and the headline scale's measurement."""
    from diffalign.apps import report
    from diffalign.io import save_png

    started = time.perf_counter()
    settings = ctx.settings
    lora = dpo_lora(ctx)
    n = min(settings.size("rlg", "samples"), settings.eval_samples)
    scale = settings.size("rlg", "scale")
    ctx.family.load_lora(lora, adapter_name="rlg")
    try:
        results, after = sweep(ctx, settings.size("rlg", "scales"), n, scale)
    finally:
        ctx.family.unload_lora()
    rows = sweep_rows(results, first_samples(ctx.base, n))
    grid = sweep_grid(results)
    save_png(grid, ctx.work / "rlg" / "sweep_grid.png")
    curves = {
        "gold_all_correct": [(r["scale"], r["all_correct"]) for r in rows],
        "proxy": [(r["scale"], r["proxy"]) for r in rows],
    }
    table_rows = [
        [
            f"{r['scale']:g}", f"{r['all_correct']:.3f}",
            f"{100 * r['gain_all_correct']:+.1f} ± {100 * r['gain_all_correct_se']:.1f}",
            f"{100 * r['vs_w1_all_correct']:+.1f} ± {100 * r['vs_w1_all_correct_se']:.1f}" if "vs_w1_all_correct" in r
            else "", f"{r['proxy']:.2f}",
        ]
        for r in rows
    ]  # fmt: skip
    html = [
        "<p>No training: the DPO LoRA of the Diffusion-DPO section is mixed with the base model at every sampling "
        "step, v = v<sub>base</sub> + w (v<sub>DPO</sub> − v<sub>base</sub>), each with its own CFG (w = 0 is the "
        f"base model, 1 the DPO model, above 1 extrapolates). Sweep on the first {n} evaluation seeds (paired); "
        f"the table below the section is w = {scale:g} on all {settings.eval_samples}. RLG samples "
        "cost two denoiser passes per step (one batched call).</p>",
        report.table(
            ["w", "gold all-correct", "vs base (points ± paired SE)", "vs w = 1", "proxy (toy-clip)"], table_rows
        ),
        report.line_chart({"gold all-correct": curves["gold_all_correct"]}, "gold all-correct vs w", x_label="w"),
        report.line_chart({"proxy reward (toy-clip)": curves["proxy"]}, "proxy reward vs w", x_label="w"),
        "<p class='prompt'>A row per w (top: w = 0), one held-out prompt per column, the same seeds in every row</p>",
        f"<div class='grid'><img src='{report.png_data_uri(grid)}' alt='RLG sweep'></div>",
    ]
    return SectionResult(
        key="rlg",
        title="RL guidance (RLG)",
        optimises=f"nothing trained: base + {scale:g}·(DPO − base) at inference",
        after=after,
        seconds=time.perf_counter() - started,
        curves=curves,
        facts={"scale": scale, "lora": relative(lora, ctx.work), "sweep": rows},
        html=html,
    )
