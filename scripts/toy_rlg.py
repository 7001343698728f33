"""Does RL guidance interpolate and extrapolate on the toy world? The RLG acceptance experiment, on CPU.

    python scripts/toy_rlg.py [--seeds 0 1 2] [--scales 0,0.5,1,1.5,2,3] [--eval-samples 256] [--out runs/toy-rlg]
                              [--pairs-repeats 24] [--images-per-prompt 8] [--steps 300] [key=value ...]

1. Pairs on the TRAINING prompts ranked by the PROXY reward toy-clip (the demo's `pairs`, made once, resumable).
2. Per DPO training seed: a DPO LoRA with configs/dpo/toy.yaml (the demo's `train_on_toy`; reused when
   `<out>/dpo/seed<S>/lora` exists).
3. Per LoRA and scale w: `--eval-samples` samples on HELD-OUT prompts with RLG at w, the SAME sampling seeds for every
   w and every LoRA (seed 10000, as scripts/toy_alignment.py), gold checker and proxy. w = 0 is the base model.
   Per-image scores are kept in `<out>/evals/` (a re-run skips what is done).
4. Per w: gold all-correct and proxy per seed, mean over seeds, and paired gains against w = 1 (per-image
   differences within a seed; pooled paired SE = sqrt(sum of per-seed SE^2) / seeds, and the SE across seeds).
   Where gold peaks, and whether some w > 1 beats w = 1 by >= 2 points with pooled paired SE < 1 point.
   Results in <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffalign.apps.demo import PROXY, DemoContext, DemoSettings
from diffalign.apps.sections.toy_training import train_on_toy
from diffalign.apps.toy_evaluation import evaluate, mean_and_se, over_seeds
from diffalign.gym.world import heldout_prompts, train_prompts
from diffalign.infer.rlg import parse_scales, rl_guidance
from diffalign.models import load_family
from diffalign.rewards import load_reward

EVAL_SEED = 10_000
KEYS = ("all_correct", "gold_score", "proxy")


def per_image(result: dict) -> dict[str, list[float]]:
    """The per-image numbers of an evaluation: all-correct (0/1), gold score (mean attributes), proxy."""
    gold = result["gold"].double()
    return {"all_correct": (gold > 1 - 1e-6).double().tolist(), "gold_score": gold.tolist(),
            "proxy": result["proxy"].double().tolist()}  # fmt: skip


def evaluation(ctx: DemoContext, cache: Path, n: int) -> dict[str, list[float]]:
    """Per-image numbers of the family as it is now on the first n evaluation seeds (cached in `cache`)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    result = evaluate(
        ctx.family, ctx.heldout, n, EVAL_SEED, proxy=ctx.proxy, batch_size=64, return_images=True, progress=True
    )
    numbers = per_image(result)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(numbers))
    return numbers


def mean_se(values: list[float]) -> tuple[float, float]:
    return mean_and_se(torch.tensor(values, dtype=torch.float64))


def summarize(per_seed: dict[int, dict[float, dict]], scales: list[float]) -> dict:
    """Per w: per-seed means, mean over seeds, and gains vs w = 1 (per-seed paired, pooled, across seeds)."""
    seeds = list(per_seed)
    summary = {}
    for scale in scales:
        row = {}
        for key in KEYS:
            means = [mean_se(per_seed[s][scale][key])[0] for s in seeds]
            entry = {"per_seed": means, "mean": sum(means) / len(means)}
            if 1.0 in scales:
                gains, ses = [], []
                for s in seeds:
                    diff = [a - b for a, b in zip(per_seed[s][scale][key], per_seed[s][1.0][key], strict=True)]
                    gain, se = mean_se(diff)
                    gains.append(gain)
                    ses.append(se)
                pooled = over_seeds(gains, ses)
                entry |= {
                    "vs_w1_per_seed": gains,
                    "vs_w1": pooled["mean"],
                    "vs_w1_paired_se_pooled": pooled["se_paired_pooled"],
                    "vs_w1_se_across_seeds": pooled["se_across_seeds"],
                }
            row[key] = entry
        summary[f"{scale:g}"] = row
    return summary


def verdict(summary: dict, scales: list[float]) -> dict:
    """Where gold all-correct peaks, and whether a w > 1 beats w = 1 by >= 2 points with pooled paired SE < 1."""
    gold = {s: summary[f"{s:g}"]["all_correct"] for s in scales}
    peak = max(scales, key=lambda s: gold[s]["mean"])
    above = [s for s in scales if s > 1]
    best = max(above, key=lambda s: gold[s]["vs_w1"]) if above and 1.0 in scales else None
    result = {"gold_peak_scale": peak, "gold_peak": gold[peak]["mean"]}
    if best is not None:
        gain, se = gold[best]["vs_w1"], gold[best]["vs_w1_paired_se_pooled"]
        result |= {"best_above_1": best, "gain_vs_w1": gain, "paired_se": se, "target_met": gain >= 0.02 and se < 0.01}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="DPO training seeds")
    parser.add_argument("--scales", default="0,0.5,1,1.5,2,3")
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--pairs-repeats", type=int, default=24)
    parser.add_argument("--images-per-prompt", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300, help="DPO optimizer steps")
    parser.add_argument("--model", default="toy", choices=("toy", "toy-flow"), help="the bundled toy to align")
    parser.add_argument("--out", type=Path, default=Path("runs/toy-rlg"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides of configs/dpo/toy.yaml")
    args = parser.parse_args()
    scales = parse_scales(args.scales)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = DemoSettings(
        eval_samples=args.eval_samples, pairs_repeats=args.pairs_repeats, images_per_prompt=args.images_per_prompt,
        validation_every=100, validation_images=1, sizes={"dpo": {"steps": args.steps}},
    )  # fmt: skip
    ctx = DemoContext(
        family=load_family(args.model), proxy=load_reward(PROXY), heldout=heldout_prompts(), train=train_prompts(),
        settings=settings, work=args.out, model=args.model, eval_seed=EVAL_SEED, pairs_seed=1,
        train_overrides=list(args.overrides),
    )  # fmt: skip
    n = args.eval_samples
    base = evaluation(ctx, args.out / "evals" / f"base-n{n}.json", n)
    per_seed: dict[int, dict[float, dict]] = {}
    for seed in args.seeds:
        lora = args.out / "dpo" / f"seed{seed}" / "lora"
        if not (lora / "pytorch_lora_weights.safetensors").is_file():
            pairs = ctx.pairs()
            lora = train_on_toy(ctx.with_seed(seed), "dpo", lora.parent, args.steps, [f"data.source={pairs['path']}"])
        ctx.family.load_lora(lora, adapter_name="rlg")
        try:
            per_seed[seed] = {}
            for scale in scales:
                if scale == 0:
                    per_seed[seed][scale] = base
                    continue
                with rl_guidance(ctx.family, scale):
                    per_seed[seed][scale] = evaluation(ctx, args.out / "evals" / f"seed{seed}-w{scale:g}-n{n}.json", n)
                gold = mean_se(per_seed[seed][scale]["all_correct"])
                print(f"seed {seed} w {scale:g}: gold all-correct {gold[0]:.3f} ± {gold[1]:.3f}", flush=True)
        finally:
            ctx.family.unload_lora()
    summary = summarize(per_seed, scales)
    results = {
        "settings": vars(args) | {"out": str(args.out), "scales": scales, "eval_seed": EVAL_SEED},
        "seeds_meaning": "DPO training seeds; every seed and scale uses the same sampling seeds (paired)",
        "scales": summary,
        "verdict": verdict(summary, scales),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{'w':>4}  {'gold all-correct':>18}  {'vs w=1 (pooled paired SE, SE across seeds)':>44}  {'proxy':>6}")
    for scale in scales:
        gold, proxy = summary[f"{scale:g}"]["all_correct"], summary[f"{scale:g}"]["proxy"]
        versus = (
            f"{100 * gold['vs_w1']:+.1f} ± {100 * gold['vs_w1_paired_se_pooled']:.1f} "
            f"({100 * gold['vs_w1_se_across_seeds']:.1f}) points"
            if "vs_w1" in gold
            else ""
        )
        seeds = " ".join(f"{v:.3f}" for v in gold["per_seed"])
        print(f"{scale:>4g}  {gold['mean']:.3f} [{seeds}]  {versus:>30}  {proxy['mean']:6.2f}")
    print(json.dumps(results["verdict"]))


if __name__ == "__main__":
    main()
