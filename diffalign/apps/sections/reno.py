"""The demo's ReNO section: the toy model sampled with few steps (4 steps at its own CFG: `apps.reno.reno_defaults`),
ReNO with the proxy toy-clip on HELD-OUT prompts, measured against the same seeds at the same few steps without
ReNO (its own baseline: ReNO optimises images, not a model, so its after-measurement is the optimised images).

The images are the first `reno_samples` of the base evaluation (same prompts, same seeds), so the section also
reports the 20-step base model on exactly those samples for reference. Curves: the proxy and the gold checker
(toy-gold, monitored on every iterate, never optimised) by iteration, for the current iterate and for the image kept
so far (the best proxy up to that iteration; its last point is the after-measurement).
"""

from __future__ import annotations

import time
from typing import Any

from diffalign.apps.demo import PROXY, DemoContext, SectionResult, save_grid

SECTION_LR = 5.0
"""The paper's learning rate (SGD, Nesterov momentum 0.9, gradient norm clipped to 0.1, lambda_reg 0.01)."""


def measured(images, prompts: list[str], proxy) -> dict[str, Any]:
    """`summarize` of given images, with the images and prompts kept (what `paired_gain` and the report read)."""
    from diffalign.apps.toy_evaluation import summarize

    return {**summarize(images, prompts, proxy), "images": images, "prompts": prompts}


def base_subset(base: dict[str, Any], count: int) -> dict[str, Any]:
    """The first `count` samples of the base evaluation (same prompts and seeds as the ReNO section's images)."""
    from diffalign.apps.toy_evaluation import mean_and_se

    gold = base["gold"][:count]
    subset = {"prompts": base["prompts"][:count], "gold": gold, "proxy": base["proxy"][:count]}
    subset["all_correct"], subset["all_correct_se"] = mean_and_se((gold > 1 - 1e-6).double())
    return subset


def reno_section(ctx: DemoContext) -> SectionResult:
    """ReNO on the held-out prompts with the evaluation seeds, before/after with the same few steps, curves."""
    from diffalign.apps import report
    from diffalign.apps.reno import reno_defaults
    from diffalign.apps.toy_evaluation import image_seeds, paired_gain, repeat_prompts
    from diffalign.infer.reno import reno
    from diffalign.rewards import load_reward

    started = time.perf_counter()
    count, iters = ctx.settings.size("reno", "samples"), ctx.settings.size("reno", "iters")
    prompts = repeat_prompts(ctx.heldout, count)
    defaults = reno_defaults(ctx.model)
    steps, guidance = defaults["num_steps"], defaults["guidance_scale"]
    ctx.console.print(f"  ReNO on {count} held-out images, {iters} iterations each, {steps} steps, CFG {guidance}")
    result = reno(
        ctx.family, prompts, ctx.proxy, seeds=image_seeds(ctx.eval_seed, count), iters=iters, lr=SECTION_LR,
        num_steps=steps, guidance_scale=guidance, checkpoint=False, batch_size=32, monitor=load_reward("toy-gold"),
    )  # fmt: skip
    before = measured(result.initial_images, prompts, ctx.proxy)
    after = measured(result.images, prompts, ctx.proxy)
    curves = {
        "proxy": series(result.curve("reward")),
        "proxy_kept": series(result.kept_curve("reward")),
        "gold_all_correct": series(result.curve("all_correct")),
        "gold_all_correct_kept": series(result.kept_curve("all_correct")),
        "gold_score": series(result.curve("toy-gold")),
    }
    folder = ctx.work / "reno"
    save_grid(before, folder / "before_grid.png")
    reference = base_subset(ctx.base, count) if ctx.base is not None and len(ctx.base["prompts"]) >= count else None
    facts: dict[str, Any] = {"images": count, "iters": iters, "num_steps": steps, "guidance_scale": guidance}
    if reference is not None:
        facts["base_20_steps_same_seeds"] = {
            "all_correct": reference["all_correct"], "gain_vs_reno": paired_gain(reference, after)["all_correct"],
        }  # fmt: skip
    html = [
        f"<p>ReNO optimises the initial noise of each image, not the model: {count} held-out images (the first "
        f"evaluation seeds), the toy model sampled with {steps} steps and CFG {guidance}, {iters} iterations "
        f"each against the proxy {PROXY} (SGD lr {SECTION_LR}, Nesterov momentum 0.9, gradient norm clipped to 0.1, "
        "chi-norm regulariser 0.01). Its baseline is the same seeds at the same few steps without ReNO (below); "
        "the gain in the summary table is measured against it, not against the 20-step base model.</p>",
        *reference_note(reference, after),
        report.line_chart(
            {"current iterate": curves["proxy"], "kept image": curves["proxy_kept"]},
            "proxy reward (toy-clip) by ReNO iteration", x_label="iteration",
        ),
        report.line_chart(
            {"all-correct, current": curves["gold_all_correct"], "all-correct, kept": curves["gold_all_correct_kept"],
             "mean attributes, current": curves["gold_score"]},
            "gold (toy-gold, never optimised) by ReNO iteration", x_label="iteration",
        ),
        f"<p class='prompt'>Before ReNO: {steps} steps, same seeds</p>",
        report.sample_gallery(before["images"], prompts, before["gold"].tolist(), before["proxy"].tolist()),
    ]  # fmt: skip
    return SectionResult(
        key="reno",
        title="ReNO",
        optimises="the initial noise of each image (no training)",
        after=after,
        before=before,
        seconds=time.perf_counter() - started,
        curves=curves,
        facts=facts,
        html=html,
    )


def series(curve) -> list[tuple[int, float]]:
    """(iteration, mean over images) points of a [iterations, B] curve."""
    return [(i, float(row.nanmean())) for i, row in enumerate(curve)]


def reference_note(reference: dict[str, Any] | None, after: dict[str, Any]) -> list[str]:
    """One sentence comparing the ReNO images with the 20-step base model on the same samples."""
    if reference is None:
        return []
    return [
        f"<p class='note'>For reference, the 20-step base model on the same {len(reference['prompts'])} samples: gold "
        f"all-correct {reference['all_correct']:.3f}; ReNO at few steps: {after['all_correct']:.3f}.</p>"
    ]
