"""Does ReNO align the toy model's images, does multi-start help at equal compute, and does ReNO beat best-of-N
random noises at equal reward evaluations? The acceptance experiment.

    python scripts/toy_reno.py [--seeds 8] [--iters 50] [--steps 4] [--guidance G] [--lr 5] [--starts 1 4]
                               [--start-fraction 0.5] [--imageselect] [--model toy]
                               [--out runs/toy-reno]

1. Images: every HELD-OUT prompt x `--seeds` noise seeds (the evaluation seeds of scripts/toy_alignment.py), the toy
   model (`--model`: toy or toy-flow) sampled with `--steps` steps and CFG `--guidance` (default its own): the
   baseline, without ReNO.
2. For each value of `--starts`: ReNO on those images with the proxy toy-clip (the gold checker is only monitored,
   never optimised), `--iters` generator passes per image whatever the number of starts (equal compute).
3. Paired gains (same prompts and seeds): gold all-correct, mean attributes, each attribute and the proxy, mean +-
   paired SE over all images and the spread over seeds; per prompt; where the proxy rose and the gold did not; the
   reward and gold curves by iteration; multi-start vs one start on the same images. Results in <out>/results.json.
4. `--imageselect`: the paper's control, best of `--iters` random noises by the proxy (iteration 0 the same noise as
   ReNO's), and ReNO (one start) minus it on the same images: equal reward evaluations, without ReNO's backward.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffalign.apps.toy_evaluation import image_seeds, mean_and_se, over_seeds, paired_gain, summarize
from diffalign.gym.world import ATTRIBUTES, heldout_prompts
from diffalign.infer.reno import reno
from diffalign.models import load_family
from diffalign.rewards import load_reward

EVAL_SEED = 10_000


def measured(images: torch.Tensor, prompts: list[str], proxy) -> dict:
    """Gold (per attribute too) and proxy of given images, with per-image values for paired comparisons."""
    from diffalign.gym.gold import gold_check

    result = {**summarize(images, prompts, proxy), "prompts": prompts}
    check = gold_check(images, prompts)
    result["per_attribute"] = {a: check[a].double() for a in ATTRIBUTES}
    return result


def attribute_gains(before: dict, after: dict) -> dict:
    """Per attribute: before, after, paired gain and SE."""
    out = {}
    for name in ATTRIBUTES:
        b, a = before["per_attribute"][name], after["per_attribute"][name]
        gain, se = mean_and_se(a - b)
        out[name] = {"before": b.mean().item(), "after": a.mean().item(), "gain": gain, "paired_se": se}
    return out


def per_seed(before: dict, after: dict, count: int, prompts_per_seed: int) -> dict:
    """Gold all-correct gain per noise seed (each seed covers every held-out prompt once), and their spread."""
    correct = lambda r: (r["gold"].double() > 1 - 1e-6).double()  # noqa: E731
    gains = []
    for k in range(count):
        span = slice(k * prompts_per_seed, (k + 1) * prompts_per_seed)
        gains.append((correct(after)[span] - correct(before)[span]).mean().item())
    summary = over_seeds(gains)
    return {"gains": gains, "mean": summary["mean"], "se_across_seeds": summary["se_across_seeds"]}


def per_prompt(before: dict, after: dict, prompts: list[str]) -> dict:
    """Per held-out prompt: proxy gain, gold all-correct before/after and the attribute accuracies after."""
    rows = {}
    for prompt in dict.fromkeys(prompts):
        idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
        row = {
            "proxy_gain": (after["proxy"][idx] - before["proxy"][idx]).double().mean().item(),
            "all_correct_before": (before["gold"][idx] > 1 - 1e-6).double().mean().item(),
            "all_correct_after": (after["gold"][idx] > 1 - 1e-6).double().mean().item(),
        }
        for name in ATTRIBUTES:
            row[f"{name}_before"] = before["per_attribute"][name][idx].mean().item()
            row[f"{name}_after"] = after["per_attribute"][name][idx].mean().item()
        rows[prompt] = row
    return rows


def divergence(before: dict, after: dict) -> dict:
    """How often the proxy rose while the gold did not: counts over images."""
    proxy_up = after["proxy"] > before["proxy"]
    gold_b, gold_a = before["gold"], after["gold"]
    return {
        "images": len(gold_b),
        "proxy_up": int(proxy_up.sum()),
        "proxy_up_gold_up": int((proxy_up & (gold_a > gold_b)).sum()),
        "proxy_up_gold_same": int((proxy_up & (gold_a == gold_b)).sum()),
        "proxy_up_gold_down": int((proxy_up & (gold_a < gold_b)).sum()),
        "proxy_up_not_all_correct_after": int((proxy_up & (gold_a < 1 - 1e-6)).sum()),
    }


def curves(result) -> dict:
    """Mean proxy and gold (current iterate, and the image kept so far) by iteration."""
    mean = lambda c: [round(float(row.nanmean()), 4) for row in c]  # noqa: E731
    return {
        "proxy": mean(result.curve("reward")),
        "proxy_kept": mean(result.kept_curve("reward")),
        "gold_all_correct": mean(result.curve("all_correct")),
        "gold_all_correct_kept": mean(result.kept_curve("all_correct")),
        "gold_score": mean(result.curve("toy-gold")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8, help="noise seeds per held-out prompt")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the toy's own)")
    parser.add_argument("--lr", type=float, default=5.0)
    parser.add_argument("--starts", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--start-fraction", type=float, default=0.5)
    parser.add_argument("--imageselect", action="store_true", help="also best-of-N random noises (the control)")
    parser.add_argument("--batch-size", type=int, default=36)
    parser.add_argument("--model", default="toy", choices=("toy", "toy-flow"), help="the bundled toy")
    parser.add_argument("--out", type=Path, default=Path("runs/toy-reno"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    family, proxy, monitor = load_family(args.model), load_reward("toy-clip"), load_reward("toy-gold")
    if args.guidance is None:
        args.guidance = family.sampling_defaults["guidance_scale"]
    heldout = heldout_prompts()
    prompts = heldout * args.seeds  # seed k covers every prompt once: images k*9 .. k*9+8
    seeds = image_seeds(EVAL_SEED, len(prompts))
    runs, afters = {}, {}
    variants = [(str(starts), {"starts": starts}) for starts in args.starts]
    variants += [("imageselect", {"imageselect": True})] if args.imageselect else []
    for name, variant in variants:
        t0 = time.perf_counter()
        result = reno(
            family, prompts, proxy, seeds=seeds, iters=args.iters, lr=args.lr, num_steps=args.steps,
            guidance_scale=args.guidance, start_fraction=args.start_fraction, checkpoint=False,
            batch_size=args.batch_size, monitor=monitor, **variant,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        before = measured(result.initial_images, prompts, proxy)
        after = measured(result.images, prompts, proxy)
        afters[name] = after
        runs[name] = {
            **variant,
            "seconds": round(seconds, 1),
            "seconds_per_image": round(seconds / len(prompts), 2),
            "gain": paired_gain(before, after),
            "attributes": attribute_gains(before, after),
            "per_seed": per_seed(before, after, args.seeds, len(heldout)),
            "per_prompt": per_prompt(before, after, prompts),
            "proxy_vs_gold": divergence(before, after),
            "curves": curves(result),
            "mean_best_iteration": sum(result.best_iteration) / len(prompts),
        }
        gold, gained = runs[name]["gain"]["all_correct"], runs[name]["gain"]["proxy"]
        print(
            f"{name}: gold all-correct {gold['before']:.3f} -> {gold['after']:.3f} ({100 * gold['gain']:+.1f} "
            f"± {100 * gold['paired_se']:.1f} points), proxy {gained['before']:.1f} -> {gained['after']:.1f}, "
            f"{seconds:.0f} s",
            flush=True,
        )
    comparisons = {}
    if "1" in afters:
        for name, after in afters.items():
            if name != "1":
                comparisons[f"{name}_vs_1"] = paired_gain(afters["1"], after)
                comparisons[f"{name}_vs_1"]["per_seed"] = per_seed(afters["1"], after, args.seeds, len(heldout))
    results = {
        "settings": vars(args) | {"out": str(args.out), "images": len(prompts), "eval_seed": EVAL_SEED},
        "runs": runs,
        "versus_one_start": comparisons,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    for name, comparison in comparisons.items():
        c = comparison["all_correct"]
        print(
            f"{name} (same images): gold all-correct {c['before']:.3f} -> {c['after']:.3f} "
            f"({100 * c['gain']:+.1f} ± {100 * c['paired_se']:.1f}), proxy {comparison['proxy']['gain']:+.2f} ± "
            f"{comparison['proxy']['paired_se']:.2f}"
        )


if __name__ == "__main__":
    main()
