"""Do the methods align the toy model? The acceptance experiment, on CPU, run with the demo's own method sections.

    python scripts/toy_alignment.py [--methods dpo,inpo] [--seeds 0 1 2] [--eval-samples 256] [--steps 300]
                                    [--equal-time] [--out runs/toy-align] [key=value ...]
    python scripts/toy_alignment.py --run start inpo inpo.inversion_timestep=start \
                                    --run destination inpo inpo.inversion_timestep=destination

`--run LABEL METHOD [key=value ...]` (repeatable, instead of or after --methods) runs METHOD under the name LABEL
with its own overrides (after the common ones), so two settings of one method compare paired on the same samples.

1. The base model measured on HELD-OUT prompts: `--eval-samples` samples, gold checker and proxy, seed 10000 (with
   `--measure-on train`: on the TRAINING prompts, seed 20000, for choosing settings without the held-out ones).
2. For each method and training seed: the demo's section for it (DPO: pairs on the TRAINING prompts ranked by the
   PROXY reward toy-clip, never the gold checker, made once and shared — or reused from an earlier run with
   `--pairs`; training with configs/<method>/toy.yaml plus the overrides), then the same measurement with the same
   sampling seeds (a paired comparison).
3. Per method, the gain in gold all-correct, mean attributes and proxy, per seed and over seeds, with two standard
   errors: across training seeds (std/sqrt(k)) and of the paired per-image differences (pooled), and the wall time.
   Every training method runs the same number of optimizer steps (`--steps`); its training time is reported, wall
   and CPU (this process's CPU seconds: on a shared machine the wall time depends on everyone else's load), with
   the gain per 100 steps and per CPU minute.
4. `--equal-time`: every method after the first is trained again, with its steps scaled so that its training time
   matches the first method's mean (steps x first's CPU seconds per step / its CPU seconds per step, from the runs
   above), and measured the same way: the comparison at equal compute. Results under "<method>@equal-time".
5. Every later method (and equal-time run) minus the first, per training seed, on the same held-out samples
   (paired SE). Results in <out>/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from diffalign.apps.demo import PROXY, DemoContext, DemoSettings
from diffalign.apps.toy_evaluation import over_seeds, paired_gain
from diffalign.gym.world import heldout_prompts, train_prompts
from diffalign.methods import METHODS, training_methods
from diffalign.models import load_family
from diffalign.rewards import load_reward

EVAL_SEED = 10_000
CHOOSING_SEED = 20_000
"""The sampling seed of `--measure-on train`: settings are chosen on the training prompts with other noise."""
TIMING = ("steps", "train_seconds", "train_cpu_seconds")
"""What a section reports about its training run: optimizer steps, wall and CPU seconds (this process's CPU time:
what matters on a shared machine, where the wall time depends on everyone else's load)."""


def summarize(runs: list[dict]) -> dict:
    """Gains over seeds: mean, std, SE across seeds, pooled paired SE, and whether the gain exceeds 2 SE."""
    summary = {}
    for key in ("all_correct", "gold_score", "proxy"):
        gains = over_seeds([r[key]["gain"] for r in runs], [r[key]["paired_se"] for r in runs])
        afters = over_seeds([r[key]["after"] for r in runs])
        across, pooled = gains["se_across_seeds"], gains["se_paired_pooled"]
        summary[key] = {
            "before": runs[0][key]["before"],
            "after_mean": afters["mean"],
            "after_std": 0.0 if len(runs) == 1 else afters["std"],
            "gain_mean": gains["mean"],
            "gain_std": 0.0 if len(runs) == 1 else gains["std"],
            "se_across_seeds": across,
            "se_paired_pooled": pooled,
            "gain_over_2se": gains["mean"] > 2 * max(across if not math.isnan(across) else 0.0, pooled),
        }
    summary["seconds_mean"] = sum(r["seconds"] for r in runs) / len(runs)
    if all(key in r for r in runs for key in TIMING):
        steps = runs[0]["steps"]
        summary["steps"] = steps
        summary["train_seconds_mean"] = sum(r["train_seconds"] for r in runs) / len(runs)
        summary["train_cpu_seconds_mean"] = sum(r["train_cpu_seconds"] for r in runs) / len(runs)
        summary["cpu_seconds_per_step"] = summary["train_cpu_seconds_mean"] / steps
        summary["all_correct"]["gain_per_100_steps"] = 100 * summary["all_correct"]["gain_mean"] / steps
        summary["all_correct"]["gain_per_cpu_minute"] = (
            60 * summary["all_correct"]["gain_mean"] / summary["train_cpu_seconds_mean"]
        )
    return summary


def run_method(ctx: DemoContext, method: str, seeds: list[int], label: str, afters: dict) -> dict:
    """The method's section for every training seed, measured against the base; its summary over seeds. The
    per-image scores of each after-measurement go to `afters[(label, seed)]`."""
    runs = []
    for seed in seeds:
        result = METHODS[method].section_function()(ctx.with_seed(seed))
        run = {"seed": seed, "seconds": round(result.seconds, 1), **paired_gain(ctx.base, result.after)}
        run |= {key: result.facts[key] for key in TIMING if key in result.facts}
        runs.append(run)
        afters[label, seed] = {key: result.after[key] for key in ("prompts", "gold", "proxy")}
        print(json.dumps({"method": label, **run}), flush=True)
    return {"runs": runs, **summarize(runs)}


def versus(afters: dict, label: str, first: str, seeds: list[int]) -> dict:
    """`label` minus `first` on the same held-out samples, per training seed (paired: the same sampling seeds)."""
    per_seed = [paired_gain(afters[first, seed], afters[label, seed]) for seed in seeds]
    mean = {key: sum(p[key]["gain"] for p in per_seed) / len(per_seed) for key in per_seed[0]}
    return {key: {"difference_mean": mean[key], "per_seed": [p[key] for p in per_seed]} for key in per_seed[0]}


def reuse_pairs(ctx: DemoContext, path: Path) -> DemoContext:
    """`ctx` with the pairs of `path` (best vs worst: one pair per prompt, the prompts without one tied)."""
    import pyarrow.parquet as pq

    pairs = pq.read_metadata(path).num_rows
    prompts = len(ctx.train) * ctx.settings.pairs_repeats
    return dataclasses.replace(ctx, shared_pairs={"path": path.resolve(), "pairs": pairs, "ties": prompts - pairs})


def variant(ctx: DemoContext, label: str, overrides: list[str], named: bool) -> DemoContext:
    """The context of one run: the common overrides plus its own; a named run (--run) trains in its own folder."""
    if not named:
        return ctx
    return dataclasses.replace(ctx, work=ctx.work / label, train_overrides=[*ctx.train_overrides, *overrides])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="dpo", help=f"comma-separated, of {', '.join(training_methods())}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--pairs-repeats", type=int, default=24)
    parser.add_argument("--images-per-prompt", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every training method")
    parser.add_argument(
        "--equal-time", action="store_true", help="also train every later method for the first one's training time"
    )
    parser.add_argument(
        "--pairs",
        type=Path,
        help="reuse the pairs of an earlier run with the same --pairs-repeats/--images-per-prompt (its "
        "<out>/pairs.parquet) instead of making them again",
    )
    parser.add_argument(
        "--run",
        nargs="+",
        action="append",
        default=[],
        metavar="LABEL METHOD [key=value ...]",
        help="a method under its own name with its own overrides (repeatable)",
    )
    parser.add_argument("--model", default="toy", choices=("toy", "toy-flow"), help="the bundled toy to align")
    parser.add_argument(
        "--measure-on", default="heldout", choices=("heldout", "train"),
        help="the prompts measured: the held-out ones (acceptance) or the training ones (choosing settings, with "
        "other sampling seeds)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("runs/toy-align"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides of every method's toy config")
    args = parser.parse_args()
    runs = [(m.strip(), m.strip(), []) for m in args.methods.split(",") if m.strip() and not args.run]
    runs += [(label, method, overrides) for label, method, *overrides in args.run]
    methods = [label for label, _, _ in runs]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    settings = DemoSettings(
        eval_samples=args.eval_samples, pairs_repeats=args.pairs_repeats, images_per_prompt=args.images_per_prompt,
        validation_every=100, validation_images=1,
        sizes={m: {**METHODS[m].full, "steps": args.steps} for m in training_methods()},
    )  # fmt: skip
    ctx = DemoContext(
        family=load_family(args.model), proxy=load_reward(PROXY), train=train_prompts(),
        heldout=heldout_prompts() if args.measure_on == "heldout" else train_prompts(),
        settings=settings, work=args.out, model=args.model, pairs_seed=1,
        eval_seed=EVAL_SEED if args.measure_on == "heldout" else CHOOSING_SEED,
        train_overrides=list(args.overrides),
    )  # fmt: skip
    if args.pairs is not None:
        ctx = reuse_pairs(ctx, args.pairs)
    ctx.base = ctx.measure()
    afters: dict = {}
    contexts = {label: variant(ctx, label, overrides, args.run) for label, _, overrides in runs}
    results = {label: run_method(contexts[label], method, args.seeds, label, afters) for label, method, _ in runs}
    if args.equal_time:
        first = results[methods[0]]
        for label, method, _ in runs[1:]:
            ratio = first["cpu_seconds_per_step"] / results[label]["cpu_seconds_per_step"]
            steps = max(1, round(args.steps * ratio))
            timed = dataclasses.replace(
                contexts[label], settings=settings.with_size(method, steps=steps), work=args.out / "equal-time" / label
            )
            results[f"{label}@equal-time"] = run_method(timed, method, args.seeds, f"{label}@equal-time", afters)
    for label, result in results.items():
        if label != methods[0]:
            result["versus_" + methods[0]] = versus(afters, label, methods[0], args.seeds)
    summary = {
        "settings": vars(args) | {"out": str(args.out)},
        "n_eval": args.eval_samples,
        "methods": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2, default=str))  # paths as text
    for method, result in results.items():
        if "steps" in result:
            gold = result["all_correct"]
            print(
                f"{method:10s} {result['steps']} steps, training {result['train_seconds_mean']:.0f} s wall, "
                f"{result['train_cpu_seconds_mean']:.0f} s CPU ({result['cpu_seconds_per_step']:.2f} CPU s/step): "
                f"all-correct gain {100 * gold['gain_per_100_steps']:+.2f} points per 100 steps, "
                f"{100 * gold['gain_per_cpu_minute']:+.2f} points per CPU minute"
            )
        if f"versus_{methods[0]}" in result:
            diffs = result[f"versus_{methods[0]}"]["all_correct"]
            print(
                f"{method:10s} minus {methods[0]}, all-correct on the same samples: "
                + ", ".join(f"{100 * d['gain']:+.1f} ± {100 * d['paired_se']:.1f}" for d in diffs["per_seed"])
                + f" points per seed (paired SE); mean {100 * diffs['difference_mean']:+.1f}"
            )
        for key in ("all_correct", "gold_score", "proxy"):
            s = result[key]
            print(
                f"{method:10s} {key:12s} before {s['before']:.3f}  after {s['after_mean']:.3f} ± {s['after_std']:.3f} "
                f"(std over seeds)  gain {s['gain_mean']:+.3f}  SE across seeds {s['se_across_seeds']:.3f}  paired "
                f"SE {s['se_paired_pooled']:.3f}  gain > 2 SE: {s['gain_over_2se']}"
            )


if __name__ == "__main__":
    main()
