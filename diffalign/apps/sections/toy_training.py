"""What the demo's training sections share: a method trained with its toy config (configs/<method>/<toy>.yaml) and the
demo's settings, the model measured with a LoRA, the run and charts of a preference-pair method (DPO, InPO) and of a
method that samples while it trains (AlignProp, GRPO)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from diffalign.apps.demo import PROXY, DemoContext, SectionResult, read_curves, toy_config


def train_on_toy(ctx: DemoContext, method: str, out: Path, steps: int, extra: list[str] | None = None) -> Path:
    """Train `method` with its config for the demo's toy (`DemoContext.config_name`) and the demo's settings;
    returns the LoRA."""
    from diffalign.processes import reset_accelerate_state
    from diffalign.train import load_train_config, train

    overrides = [
        f"output_dir={out}",
        f"max_steps={steps}",
        f"validation.every={ctx.settings.validation_every}",
        f"validation.num_images={ctx.settings.validation_images}",
        f"validation.reward={PROXY}",
        "validation.heldout_reward=toy-gold",
        "report_to=none",
        "resume=none",
        "overwrite=true",  # the demo's own folder; the acceptance script re-runs into its --out
        "checkpoint_every=0",
        f"seed={ctx.seed}",
        *(extra or []),
        *ctx.train_overrides,
    ]
    cfg = load_train_config(toy_config(ctx.config_name(method)), overrides)
    reset_accelerate_state()
    try:
        return train(cfg)
    finally:
        reset_accelerate_state()


def after_lora(ctx: DemoContext, lora: Path, name: str) -> dict:
    """The evaluation of the toy model with `lora` loaded (then unloaded again)."""
    ctx.family.load_lora(lora, adapter_name=name)
    try:
        return ctx.measure()
    finally:
        ctx.family.unload_lora()


def reward_method_run(
    ctx: DemoContext, method: str, steps: int, every: int, extra: list[str], curves: tuple[str, ...]
) -> dict:
    """What AlignProp and GRPO sections share: train `method` validating and logging `every` steps (plus `extra`
    overrides), read its curves (with the training metrics `curves`) and its best record, measure its final LoRA.
    Returns run (its folder), curves, best, after, kept (the sentence saying where the best LoRA is kept, or "") and
    timing (train_seconds, train_cpu_seconds: the acceptance script compares methods at equal time with them)."""
    from diffalign.methods import METHODS

    run = ctx.work / method / f"seed{ctx.seed}"
    training, cpu = time.perf_counter(), time.process_time()
    lora = train_on_toy(ctx, method, run, steps, extra=[f"validation.every={every}", f"log_every={every}", *extra])
    timing = {
        "train_seconds": round(time.perf_counter() - training, 1),
        "train_cpu_seconds": round(time.process_time() - cpu, 1),  # robust to other processes on a shared machine
    }
    read = read_curves(run / "metrics.jsonl", extra=curves)
    best = json.loads((run / "summary.json").read_text()).get("best") or {}
    name = METHODS[method].title
    ctx.console.print(f"  measuring the {name} model on {ctx.settings.eval_samples} held-out samples (same seeds)")
    after = after_lora(ctx, lora, method)
    kept = ""
    if best:
        kept = f" The LoRA with the best held-out gold score (step {best['step']}) is kept in <code>best/</code>."
    return {"run": run, "curves": read, "best": best, "after": after, "kept": kept, "timing": timing}


def rollout_method_section(
    ctx: DemoContext, method: str, title: str, optimises: str, how: str, curves: tuple[str, ...]
) -> SectionResult:
    """What the online-RL sections (GRPO, NFT) share: train `method` on rollouts of the size the demo gives
    ({"steps", "rollout": (P, G)}), validating on rollout boundaries 5 times a run, with the proxy and gold curves
    and the after-measurement of the final LoRA (the best-by-gold one kept too). `how` says in a sentence what an
    update does with a rollout's rewards; `curves` are the training metrics charted beside the rollout reward."""
    started = time.perf_counter()
    steps = ctx.settings.size(method, "steps")
    prompts, group = ctx.settings.size(method, "rollout")
    every = max(2, steps // 5 // 2 * 2)  # validate on rollout boundaries (2 optimizer steps a rollout), 5 times a run
    rollout = [  # the toy configs' 2 optimizer steps per rollout (2 micro-batches of accumulation each)
        f"{method}.prompts_per_rollout={prompts}",
        f"{method}.group_size={group}",
        f"batch_size={max(1, prompts * group // 4)}",
    ]
    result = reward_method_run(ctx, method, steps, every, rollout, ("reward", *curves))
    read, best, after, kept = (result[k] for k in ("curves", "best", "after", "kept"))
    html = [
        f"<p>{steps} LoRA steps with <code>configs/{ctx.config_name(method)}</code>: per rollout, {prompts} groups of "
        f"{group} images sampled from the TRAINING prompts, {how} The gold checker is only watched, on the "
        f"held-out prompts.{kept} Measured below: the final LoRA.</p>",
        *reward_training_charts(read, "rollouts"),
    ]
    return SectionResult(
        key=method,
        title=title,
        optimises=optimises,
        after=after,
        seconds=time.perf_counter() - started,
        curves=read,
        facts={"steps": steps, "rollout": [prompts, group], "best": best, **result["timing"]},
        html=html,
    )


def reward_training_charts(curves: dict[str, list[tuple[int, float]]], training: str) -> list[str]:
    """The charts of a run that samples while it trains (AlignProp, GRPO): the proxy on the held-out prompts beside
    the proxy of its own samples (`training` names them), and the held-out gold accuracy."""
    from diffalign.apps import report

    return [
        report.line_chart(
            {"proxy, held-out prompts": curves["proxy"], f"proxy, {training}": curves["reward"]},
            "proxy reward (toy-clip) during training",
        ),
        report.line_chart(
            {"gold all-correct": curves["gold_all_correct"], "gold mean attributes": curves["gold_score"]},
            "held-out gold accuracy during training",
        ),
    ]


def pair_training_charts(curves: dict[str, list[tuple[int, float]]], name: str) -> list[str]:
    """The charts of a preference-pair method's run: held-out proxy and gold during training, loss, implicit
    accuracy (`name` labels the last two)."""
    from diffalign.apps import report

    return [
        report.line_chart({"proxy reward (toy-clip)": curves["proxy"]}, "held-out proxy reward during training"),
        report.line_chart(
            {"gold all-correct": curves["gold_all_correct"], "gold mean attributes": curves["gold_score"]},
            "held-out gold accuracy during training",
        ),
        report.line_chart({"loss": curves["loss"]}, f"{name} loss"),
        report.line_chart({"implicit accuracy": curves["implicit_accuracy"]}, f"{name} implicit accuracy"),
    ]


def pair_method_run(ctx: DemoContext, method: str, steps: int) -> dict:
    """What DPO and InPO sections share: train `method` on the shared pairs for `steps` (timed, wall and CPU), read
    its curves and measure its LoRA. Returns pairs, lora, curves, after, train_seconds and facts."""
    pairs = ctx.pairs()
    run = ctx.work / method / f"seed{ctx.seed}"
    training, cpu = time.perf_counter(), time.process_time()
    lora = train_on_toy(ctx, method, run, steps, [f"data.source={pairs['path']}"])
    train_seconds, train_cpu_seconds = time.perf_counter() - training, time.process_time() - cpu
    curves = read_curves(run / "metrics.jsonl", extra=("loss", "implicit_accuracy"))
    from diffalign.methods import METHODS

    name = METHODS[method].title
    ctx.console.print(f"  measuring the {name} model on {ctx.settings.eval_samples} held-out samples (same seeds)")
    facts = {
        "pairs": pairs["pairs"],
        "ties": pairs["ties"],
        "steps": steps,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),  # robust to other processes on a shared machine
    }
    after = after_lora(ctx, lora, method)
    return {
        "pairs": pairs,
        "lora": lora,
        "curves": curves,
        "after": after,
        "train_seconds": train_seconds,
        "facts": facts,
    }
