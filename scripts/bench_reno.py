"""ReNO iteration-time benchmark (used by `scripts/bench.py reno`).

On the toy model with the toy's ReNO settings (4 DDIM steps, CFG 4.5, toy-clip, the 9 held-out prompts as one batch):
  bare   the irreducible work of one iteration in plain torch: generator forward+backward (the same sampler and
         checkpointing) + VAE decode + reward forward+backward, on a noise tensor that requires grad
  reno   `diffalign.infer.reno.reno(iters=N)`: the same work plus the objective, per-sample clipping, the optimiser
         step, best-image tracking and the history, timed per iteration (total / N, start-up included)
Each checkpoint setting (on: the default for more than one step; off) runs in its own process, with bare and reno
timed in ROUNDS alternating rounds (the fastest counts: noise only adds). Peak memory is the process's peak RSS.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kit import alternate, memory_mb, run_variant  # noqa: E402

ITERS, ROUNDS, DEFAULT_ITERS = 6, 3, 50


def variant(checkpoint: bool) -> dict:
    """Time bare and ReNO iterations in alternating rounds; returns seconds per iteration and memory."""
    import torch

    from diffalign.apps.reno import reno_defaults
    from diffalign.gym.world import heldout_prompts
    from diffalign.infer.reno import reno
    from diffalign.infer.sample import initial_latents
    from diffalign.models import load_family
    from diffalign.rewards import load_reward

    family, reward = load_family("toy"), load_reward("toy-clip")
    family.freeze()
    prompts = heldout_prompts()
    seeds = list(range(len(prompts)))
    defaults = reno_defaults("toy")
    steps, guidance = defaults["num_steps"], defaults["guidance_scale"]
    loaded_mb = memory_mb()
    cond, uncond = family.encode_prompts(prompts), family.encode_negative()

    def bare(n: int) -> float:
        noise = initial_latents(family, seeds).requires_grad_(True)
        started = time.perf_counter()
        for _ in range(n):
            noise.grad = None
            latents = family.sample(
                cond, uncond, latents=noise, num_steps=steps, guidance_scale=guidance, checkpoint=checkpoint
            )
            reward(family.decode(latents), prompts).sum().backward()
        return (time.perf_counter() - started) / n

    def optimised(n: int) -> float:
        started = time.perf_counter()
        reno(family, prompts, reward, seeds=seeds, iters=n, num_steps=steps, guidance_scale=guidance,
             checkpoint=checkpoint, batch_size=len(prompts))  # fmt: skip
        return (time.perf_counter() - started) / n

    bare(1), optimised(1)  # warm-up
    times = alternate({"bare": lambda: bare(ITERS), "reno": lambda: optimised(ITERS)}, ROUNDS)
    bare_times, reno_times = times["bare"], times["reno"]
    return {
        "checkpoint": checkpoint,
        "batch": len(prompts),
        "bare": min(bare_times),
        "reno": min(reno_times),
        "ratios": sorted(r / b for r, b in zip(reno_times, bare_times, strict=True)),
        "loaded_mb": loaded_mb,
        "peak_mb": memory_mb("VmHWM"),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    """Run each checkpoint setting in its own process and print the figures."""
    results = [run_variant(__file__, str(checkpoint)) for checkpoint in (True, False)]
    first = results[0]
    print(
        f"reno bench: toy model, {first['batch']} held-out prompts per batch, 4 DDIM steps, CFG 4.5, toy-clip; "
        f"{ITERS} iterations x {ROUNDS} alternating rounds, {first['threads']} torch threads"
    )
    for r in results:
        name = "checkpoint on (default, steps > 1)" if r["checkpoint"] else "checkpoint off"
        images_per_minute = 60 * r["batch"] / (DEFAULT_ITERS * r["reno"])
        ratios = ", ".join(f"{x:.3f}" for x in r["ratios"])
        print(f"  {name}:")
        print(f"    bare generator+decode+reward fwd+bwd {r['bare']:.3f} s/iteration, ReNO {r['reno']:.3f} s/iteration")
        print(f"    ratio ReNO / bare: best {r['reno'] / r['bare']:.3f} (per round: {ratios})   (target <= 1.15)")
        print(f"    peak RSS {r['peak_mb']:.0f} MB ({r['peak_mb'] - r['loaded_mb']:+.0f} MB over the loaded model)")
        print(f"    images/minute at {DEFAULT_ITERS} iterations: {images_per_minute:.1f}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(variant(sys.argv[1] == "True")))
    else:
        main()
