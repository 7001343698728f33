"""InPO step-time benchmark (used by `scripts/bench.py inpo`), at 1 and at 4 pairs a step.

Per batch size, two variants on the same batch (the toy model at RESOLUTION px, LoRA rank 8, cached latents), each in
its own process:
  dpo   the real Diffusion-DPO recipe (`diffalign.train.dpo.train`)
  inpo  the real DDIM-InPO recipe (`diffalign.train.inpo.train`, 10 inversion steps); the time spent inside the
        inversion (`invert_pairs`) is summed and its denoiser calls counted (samples per call), so its share of the
        step and its cost in sample-forwards are known. Then, in the same process, the bare work the inversion
        needs, in plain torch: the no-grad forwards of the LoRA denoiser the grid needs for the very timesteps the
        timed steps drew (ceil(t/100) forwards per sample, in max(ceil(t/100)) calls of the samples still moving).
        Both in one process: between processes this 2-core machine's speed varies by up to a third.
The official code (JaydenLyh/InPO train.py) inverts each pair with `DDIMInverseScheduler` over the grid points below
t: its sample-forwards for the same timesteps are counted beside ours. Recipe step time = (T(n2 steps) - T(n1
steps)) / (n2 - n1) (start-up, model load and cache build cancel out); each variant runs in ROUNDS interleaved
rounds. Target: InPO step <= 1.10 x (DPO step + bare inversion), per round (DPO of the same round).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dpo import RESOLUTION, STEPS, _train, _write_pairs  # noqa: E402
from bench_kit import bench_model, interleaved_rounds  # noqa: E402

INVERSION_STEPS = 10  # the paper's, configs/inpo/*.yaml
BATCHES = (1, 4)
ROUNDS = 3


def recipe(folder: Path, method: str, batch: int) -> tuple[dict, list]:
    """The real recipe with the cache, timed at two lengths; for InPO also the seconds inside the inversion
    (`diffalign.train.inpo.invert_pairs`: the paper's grid, `Family.walk` steps) and its sample-forwards."""
    from diffalign.train import inpo as inpo_recipe

    spent, seen, forwards = [0.0], [], [0]
    invert = inpo_recipe.invert_pairs

    def timed(family, latents, cond, t, *args, **kwargs):
        seen.append(t.clone())
        predict = family.predict

        def counted(x, *a, **k):
            forwards[0] += x.shape[0]
            return predict(x, *a, **k)

        family.predict = counted
        started = time.perf_counter()
        try:
            return invert(family, latents, cond, t, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started
            del family.predict

    inpo_recipe.invert_pairs = timed
    pairs = _write_pairs(folder)
    cache = folder / "cache"
    _train(pairs, folder / "warm", 1, cache, method, batch)  # builds the cache, untimed
    seconds, inverting, counts = [], [], []
    for steps in STEPS:
        spent[0], seen[:], forwards[0] = 0.0, [], 0
        seconds.append(_train(pairs, folder / f"run{steps}", steps, cache, method, batch))
        inverting.append(spent[0])
        counts.append(forwards[0])
    span = STEPS[1] - STEPS[0]
    figures = {
        "step_s": (seconds[1] - seconds[0]) / span,
        "invert_s": (inverting[1] - inverting[0]) / span,
        "forwards_per_pair": counts[1] / (STEPS[1] * batch),
    }
    return figures, seen


def official_forwards_per_pair(timesteps: list, offset: int) -> float:
    """Sample-forwards per pair of the official inversion for these timesteps: both images of a pair, one forward
    per grid point 100·k + offset below t (its `inverse_scheduler.timesteps < timesteps[0]`)."""
    points = [100 * k + offset for k in range(INVERSION_STEPS)]
    pairs = [float(t_pair) for t in timesteps for t_pair in t[: len(t) // 2]]
    return 2 * sum(sum(p < t for p in points) for t in pairs) / len(pairs)


def bare_inversion(timesteps: list, batch: int) -> dict:
    """The no-grad forwards of the LoRA denoiser (adapters on) the InPO inversion grid needs for exactly the
    `timesteps` the recipe inverted to, in plain torch."""
    import torch

    from diffalign.models import load_family
    from diffalign.train.inpo import grid_counts

    family = load_family(bench_model())
    family.add_lora(rank=8)
    unet = family.denoiser
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2 * batch, *family.latent_shape(1, RESOLUTION)[1:], generator=g)
    cond = family.encode_prompts(["a red circle on a black background"] * (2 * batch))["prompt_embeds"]

    def step(t):
        """One step's inversion forwards: a sample at t takes ceil(t/100) steps of the grid, in lockstep."""
        counts = grid_counts(t, INVERSION_STEPS)
        with torch.no_grad():
            for j in range(1, int(counts.max()) + 1):
                moving = (counts >= j).nonzero().squeeze(1)
                unet(latents[moving], t[moving].round().long(), encoder_hidden_states=cond[moving])

    for t in timesteps[:2]:
        step(t)
    started = time.perf_counter()
    for t in timesteps:
        step(t)
    return {"step_s": (time.perf_counter() - started) / len(timesteps)}


def run_variant(name: str, batch: int) -> dict:
    from diffalign.models import load_family

    with tempfile.TemporaryDirectory() as tmp:
        figures, timesteps = recipe(Path(tmp), name, batch)
    if name == "inpo":
        span = STEPS[1] - STEPS[0]
        figures["bare_s"] = bare_inversion(timesteps[-span:], batch)["step_s"]
        offset = int(getattr(load_family(bench_model()).pipe.scheduler.config, "steps_offset", 0))
        figures["official_forwards_per_pair"] = official_forwards_per_pair(timesteps, offset)
    return figures


def ms(runs: list[dict], key: str) -> str:
    """The rounds' `key` figures in milliseconds, comma-separated."""
    return ", ".join(f"{r[key] * 1000:.1f}" for r in runs)


def main() -> None:
    """Per batch size, the two variants in subprocesses (interleaved rounds); their figures and ratios."""
    print(
        f"inpo bench ({bench_model()} at {RESOLUTION}px, LoRA rank 8, cached latents, {INVERSION_STEPS} inversion "
        f"steps, {ROUNDS} rounds per batch size)"
    )
    for batch in BATCHES:
        found = interleaved_rounds(__file__, [["dpo", str(batch)], ["inpo", str(batch)]], ROUNDS)
        rounds = {name: found[(name, str(batch))] for name in ("dpo", "inpo")}
        inpo = rounds["inpo"]
        per_round = [i["step_s"] / (d["step_s"] + i["bare_s"]) for d, i in zip(rounds["dpo"], inpo, strict=True)]
        ours = sum(r["forwards_per_pair"] for r in inpo) / len(inpo)
        official = sum(r["official_forwards_per_pair"] for r in inpo) / len(inpo)
        print(f"  {batch} pair{'s' if batch > 1 else ''} a step:")
        print(f"    DPO step rounds:                 {ms(rounds['dpo'], 'step_s')} ms")
        print(f"    InPO step rounds:                {ms(inpo, 'step_s')} ms")
        print(f"    inversion inside InPO, rounds:   {ms(inpo, 'invert_s')} ms")
        print(f"    bare inversion forwards, rounds: {ms(inpo, 'bare_s')} ms (same process as InPO)")
        print(f"    inversion sample-forwards per pair: {ours:.2f} (official grid, same timesteps: {official:.2f};")
        print(f"      ratio {ours / official:.3f})")
        print("    inversion inside InPO / bare forwards, rounds: " + ", ".join(
            f"{r['invert_s'] / r['bare_s']:.3f}" for r in inpo))  # fmt: skip
        print("    InPO / (DPO + bare inversion), rounds: " + ", ".join(f"{r:.3f}" for r in per_round)
              + "   (target <= 1.10)")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(run_variant(sys.argv[1], int(sys.argv[2]))))
    else:
        main()
