"""Does Diffusion-DPO align the toy model? The acceptance experiment of the DPO recipe, on CPU.

    python scripts/toy_dpo_alignment.py [--seeds 0 1 2] [--eval-samples 256] [--out runs/toy-align] [key=value ...]

1. `pairs` on the TRAINING prompts with the PROXY reward toy-clip (never the gold checker).
2. The base model measured on HELD-OUT prompts: `--eval-samples` samples, gold checker and proxy.
3. For each training seed: DPO with configs/dpo/toy.yaml (+ overrides), then the same measurement with the same
   sampling seeds (a paired comparison).
4. Gain in gold all-correct and in mean attributes correct, per seed and over seeds, with two standard errors: across
   training seeds (std/sqrt(k)) and of the paired per-image differences (pooled). Results in <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from diffalign.config import TrainConfig, load_config
from diffalign.data.make_pairs import make_pairs
from diffalign.gym.demo import PROXY, TOY_DPO_CONFIG
from diffalign.gym.evaluate import evaluate, paired_gain
from diffalign.gym.world import heldout_prompts, train_prompts
from diffalign.models import load_family
from diffalign.rewards import load_reward
from diffalign.train.dpo import train

EVAL_SEED = 10_000


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, (sum((v - m) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--pairs-repeats", type=int, default=24)
    parser.add_argument("--images-per-prompt", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/toy-align"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides of configs/dpo/toy.yaml")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    pairs_file = args.out / "pairs.parquet"
    if not pairs_file.is_file():
        make_pairs(
            "toy",
            train_prompts() * args.pairs_repeats,
            PROXY,
            pairs_file,
            images_per_prompt=args.images_per_prompt,
            seed=1,
        )
    reset_accelerate()
    family = load_family("toy")
    proxy = load_reward(PROXY)
    heldout = heldout_prompts()
    base = evaluate(family, heldout, args.eval_samples, EVAL_SEED, proxy=proxy, return_images=True)
    runs = []
    for seed in args.seeds:
        cfg = load_config(
            TrainConfig,
            TOY_DPO_CONFIG,
            [
                f"data.source={pairs_file}",
                f"output_dir={args.out}/seed{seed}",
                f"seed={seed}",
                "report_to=none",
                "resume=none",
                "checkpoint_every=0",
                *args.overrides,
            ],
        )
        lora = train(cfg)
        reset_accelerate()
        family.load_lora(lora, adapter_name=f"seed{seed}")
        after = evaluate(family, heldout, args.eval_samples, EVAL_SEED, proxy=proxy, return_images=True)
        family.pipe.unload_lora_weights()
        run = {"seed": seed, **paired_gain(base, after)}
        runs.append(run)
        print(json.dumps(run), flush=True)

    summary = {
        "settings": vars(args) | {"out": str(args.out)},
        "n_eval": args.eval_samples,
        "pairs": str(pairs_file),
        "runs": runs,
    }
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
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    for key in ("all_correct", "gold_score", "proxy"):
        s = summary[key]
        print(
            f"{key:12s} before {s['before']:.3f}  after {s['after_mean']:.3f} ± {s['after_std']:.3f} (std over "
            f"seeds)  gain {s['gain_mean']:+.3f}  SE across seeds {s['se_across_seeds']:.3f}  paired SE "
            f"{s['se_paired_pooled']:.3f}  gain > 2 SE: {s['gain_over_2se']}"
        )


if __name__ == "__main__":
    main()
