"""Do the methods align the toy model? The acceptance experiment, on CPU, run with the demo's own method sections.

    python scripts/toy_alignment.py [--methods dpo] [--seeds 0 1 2] [--eval-samples 256] [--out runs/toy-align]
                                    [key=value ...]

1. The base model measured on HELD-OUT prompts: `--eval-samples` samples, gold checker and proxy, seed 10000.
2. For each method and training seed: the demo's section for it (DPO: pairs on the TRAINING prompts ranked by the
   PROXY reward toy-clip, never the gold checker, made once and shared; training with configs/<method>/toy.yaml plus
   the overrides), then the same measurement with the same sampling seeds (a paired comparison).
3. Per method, the gain in gold all-correct, mean attributes and proxy, per seed and over seeds, with two standard
   errors: across training seeds (std/sqrt(k)) and of the paired per-image differences (pooled), and the wall time.
   Results in <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from diffalign.apps.demo import PROXY, DemoContext, DemoSettings
from diffalign.apps.evaluate import paired_gain
from diffalign.apps.sections import SECTIONS, section
from diffalign.gym.world import heldout_prompts, train_prompts
from diffalign.models import load_family
from diffalign.rewards import load_reward

EVAL_SEED = 10_000


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, (sum((v - m) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


def summarize(runs: list[dict]) -> dict:
    """Gains over seeds: mean, std, SE across seeds, pooled paired SE, and whether the gain exceeds 2 SE."""
    summary = {}
    for key in ("all_correct", "gold_score", "proxy"):
        gains = [r[key]["gain"] for r in runs]
        after_mean, after_std = mean_std([r[key]["after"] for r in runs])
        gain_mean, gain_std = mean_std(gains)
        across = gain_std / math.sqrt(len(gains)) if len(gains) > 1 else float("nan")
        pooled = math.sqrt(sum(r[key]["paired_se"] ** 2 for r in runs)) / len(runs)
        summary[key] = {
            "before": runs[0][key]["before"],
            "after_mean": after_mean,
            "after_std": after_std,
            "gain_mean": gain_mean,
            "gain_std": gain_std,
            "se_across_seeds": across,
            "se_paired_pooled": pooled,
            "gain_over_2se": gain_mean > 2 * max(across if not math.isnan(across) else 0.0, pooled),
        }
    summary["seconds_mean"] = sum(r["seconds"] for r in runs) / len(runs)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="dpo", help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--pairs-repeats", type=int, default=24)
    parser.add_argument("--images-per-prompt", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every training method")
    parser.add_argument("--out", type=Path, default=Path("runs/toy-align"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides of every method's toy config")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    settings = DemoSettings(
        eval_samples=args.eval_samples, pairs_repeats=args.pairs_repeats, images_per_prompt=args.images_per_prompt,
        dpo_steps=args.steps, validation_every=100, validation_images=1, alignprop_steps=args.steps,
    )  # fmt: skip
    ctx = DemoContext(
        family=load_family("toy"), proxy=load_reward(PROXY), heldout=heldout_prompts(), train=train_prompts(),
        settings=settings, work=args.out, eval_seed=EVAL_SEED, pairs_seed=1, train_overrides=list(args.overrides),
    )  # fmt: skip
    ctx.base = ctx.measure()
    results = {}
    for method in methods:
        runs = []
        for seed in args.seeds:
            result = section(method)(ctx.with_seed(seed))
            run = {"seed": seed, "seconds": round(result.seconds, 1), **paired_gain(ctx.base, result.after)}
            runs.append(run)
            print(json.dumps({"method": method, **run}), flush=True)
        results[method] = {"runs": runs, **summarize(runs)}
    summary = {
        "settings": vars(args) | {"out": str(args.out)},
        "n_eval": args.eval_samples,
        "methods": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    for method, result in results.items():
        for key in ("all_correct", "gold_score", "proxy"):
            s = result[key]
            print(
                f"{method:10s} {key:12s} before {s['before']:.3f}  after {s['after_mean']:.3f} ± {s['after_std']:.3f} "
                f"(std over seeds)  gain {s['gain_mean']:+.3f}  SE across seeds {s['se_across_seeds']:.3f}  paired "
                f"SE {s['se_paired_pooled']:.3f}  gain > 2 SE: {s['gain_over_2se']}"
            )


if __name__ == "__main__":
    main()
