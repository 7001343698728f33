"""How many steps each training section of the full demo needs: its held-out gain against its steps, on the demo's
own default seed and evaluation samples (the sizes of `diffalign demo` come from this; docs/results/demo.md).

    python scripts/demo_sizes.py --method inpo --steps 100 150 200 300 [--eval-samples 384] [--out runs/demo-sizes]

The demo's context (the full demo's pairs, eval seed 0, training seed 0), the base measured once; then the method's
section trained to the first count of steps, measured, and resumed to each next count (a resumed run ends bit for bit
where a straight one would, so each row is what a demo of that many steps gives), measured again. Each measurement
also reports the gain on its first 256 and 128 samples, for choosing fewer evaluation samples. The seconds of each
leg are its training time on this machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffalign.apps.demo import FULL, PROXY, DemoContext
from diffalign.apps.sections.toy_training import after_lora, train_on_toy
from diffalign.apps.toy_evaluation import paired_gain
from diffalign.gym.world import heldout_prompts, train_prompts
from diffalign.models import load_family
from diffalign.rewards import load_reward


def first(result: dict, n: int) -> dict:
    """The first `n` samples of a measurement (what a demo with `n` evaluation samples measures)."""
    return {
        key: (value[:n] if key in ("prompts", "gold", "proxy") and value is not None else value)
        for key, value in result.items()
    }


def gains(base: dict, after: dict, sizes: list[int]) -> dict:
    """All-correct gain ± paired SE (points) on the first n samples, per n."""
    out = {}
    for n in sizes:
        gain = paired_gain(first(base, n), first(after, n))["all_correct"]
        out[n] = {"gain": 100 * gain["gain"], "paired_se": 100 * gain["paired_se"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, help="a training method with a demo section: dpo, inpo, alignprop")
    parser.add_argument("--steps", type=int, nargs="+", required=True, help="step counts, increasing")
    parser.add_argument("--eval-samples", type=int, default=FULL.eval_samples)
    parser.add_argument("--out", type=Path, default=Path("runs/demo-sizes"))
    args = parser.parse_args()
    settings = FULL
    ctx = DemoContext(
        family=load_family("toy"), proxy=load_reward(PROXY), heldout=heldout_prompts(), train=train_prompts(),
        settings=settings, work=args.out, seed=0, eval_seed=0, pairs_seed=1,
    )  # fmt: skip
    ctx.base = ctx.measure(args.eval_samples)
    sizes = sorted({n for n in (args.eval_samples, 256, 128) if n <= args.eval_samples}, reverse=True)
    run = args.out / args.method / "seed0"
    data = [f"data.source={ctx.pairs()['path']}"] if args.method in ("dpo", "inpo") else []
    every = 50 if args.method in ("dpo", "inpo") else 5
    rows = []
    for steps in args.steps:
        started = time.perf_counter()
        extra = [*data, "resume=auto", "overwrite=false", f"checkpoint_every={every}", "checkpoints_keep=0"]
        if args.method == "alignprop":
            extra += [f"validation.every={every}", f"log_every={every}"]
        lora = train_on_toy(ctx, args.method, run, steps, extra)
        seconds = time.perf_counter() - started
        after = after_lora(ctx, lora, args.method)
        row = {"steps": steps, "leg_seconds": round(seconds, 1), "gains": gains(ctx.base, after, sizes)}
        rows.append(row)
        shown = ", ".join(f"n={n}: {g['gain']:+.1f} ± {g['paired_se']:.1f}" for n, g in row["gains"].items())
        print(f"{args.method} {steps} steps ({seconds:.0f} s this leg): {shown}", flush=True)
    (args.out / f"{args.method}.json").write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)},
                                                              "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
