"""InPO step-time benchmark (used by `scripts/bench.py inpo`).

Two variants on the same batch (BATCH pairs of the toy model at RESOLUTION px, LoRA rank 8, cached latents), each
in its own process:
  dpo   the real Diffusion-DPO recipe (`diffalign.train.dpo.train`)
  inpo  the real DDIM-InPO recipe (`diffalign.train.inpo.train`, 10 inversion steps); the time spent inside the
        inversion (`invert_pairs`) is summed, so its share of the step is known. Then, in the same process, the bare
        work the inversion adds, in plain torch: the no-grad forwards of the LoRA denoiser the grid needs for the
        very timesteps the timed steps drew (ceil(t/100) forwards per sample, in 10 calls of the samples still
        moving). Both in one process: between processes this 2-core machine's speed varies by up to a third.
Recipe step time = (T(n2 steps) - T(n1 steps)) / (n2 - n1) (start-up, model load and cache build cancel out); each
variant runs in ROUNDS interleaved rounds. Target: InPO step <= 1.10 x (DPO step + bare inversion), per round (DPO
of the same round) and with each figure's fastest round.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dpo import BATCH, RESOLUTION, STEPS, _model, _train, _write_pairs  # noqa: E402

INVERSION_STEPS = 10  # the paper's, configs/inpo/*.yaml
ROUNDS = 4


def recipe(folder: Path, method: str) -> dict:
    """The real recipe with the cache, timed at two lengths; for InPO also the seconds inside the inversion
    (`diffalign.train.inpo.invert_pairs`: the paper's grid, `Family.walk` steps)."""
    from diffalign.train import inpo as inpo_recipe

    spent, seen = [0.0], []
    invert = inpo_recipe.invert_pairs

    def timed(family, latents, cond, t, *args, **kwargs):
        seen.append(t.clone())
        started = time.perf_counter()
        try:
            return invert(family, latents, cond, t, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    inpo_recipe.invert_pairs = timed
    pairs = _write_pairs(folder)
    cache = folder / "cache"
    _train(pairs, folder / "warm", 1, cache, method)  # builds the cache, untimed
    seconds, inverting = [], []
    for steps in STEPS:
        spent[0], seen[:] = 0.0, []
        seconds.append(_train(pairs, folder / f"run{steps}", steps, cache, method))
        inverting.append(spent[0])
    span = STEPS[1] - STEPS[0]
    figures = {"step_s": (seconds[1] - seconds[0]) / span, "invert_s": (inverting[1] - inverting[0]) / span}
    return figures, seen[-span:]  # the timesteps the timed span inverted to


def bare_inversion(timesteps: list) -> dict:
    """The no-grad forwards of the LoRA denoiser (adapters on) the InPO inversion grid needs for exactly the
    `timesteps` the recipe inverted to, in plain torch."""
    import torch

    from diffalign.models import load_family
    from diffalign.train.inpo import grid_counts

    family = load_family(_model())
    family.add_lora(rank=8)
    unet = family.denoiser
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2 * BATCH, *family.latent_shape(1, RESOLUTION)[1:], generator=g)
    cond = family.encode_prompts(["a red circle on a black background"] * (2 * BATCH))["prompt_embeds"]

    def step(t):
        """One step's inversion forwards: a sample at t takes ceil(t/100) steps of the grid, in lockstep."""
        counts = grid_counts(t, INVERSION_STEPS)
        with torch.no_grad():
            for j in range(1, INVERSION_STEPS + 1):
                moving = (counts >= j).nonzero().squeeze(1)
                if len(moving) == 0:
                    moving = moving.new_zeros(1)
                unet(latents[moving], t[moving].round().long(), encoder_hidden_states=cond[moving])

    for t in timesteps[:2]:
        step(t)
    started = time.perf_counter()
    for t in timesteps:
        step(t)
    return {"step_s": (time.perf_counter() - started) / len(timesteps)}


def run_variant(name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        figures, timesteps = recipe(Path(tmp), name)
    if name == "inpo":
        figures["bare_s"] = bare_inversion(timesteps)["step_s"]
    return figures


def ms(runs: list[dict], key: str) -> str:
    """The rounds' `key` figures in milliseconds, comma-separated."""
    return ", ".join(f"{r[key] * 1000:.1f}" for r in runs)


def main() -> None:
    """Run the two variants in subprocesses (interleaved rounds) and print their figures and ratios."""
    rounds: dict[str, list[dict]] = {"dpo": [], "inpo": []}
    for _ in range(ROUNDS):
        for name in rounds:
            out = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, check=True)
            rounds[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    dpo = min(r["step_s"] for r in rounds["dpo"])
    inpo = min(r["step_s"] for r in rounds["inpo"])
    invert = min(r["invert_s"] for r in rounds["inpo"])
    bare = min(r["bare_s"] for r in rounds["inpo"])
    per_round = [i["step_s"] / (d["step_s"] + i["bare_s"]) for d, i in zip(rounds["dpo"], rounds["inpo"], strict=True)]
    print(
        f"inpo bench ({_model()}, {BATCH} pairs/step at {RESOLUTION}px, LoRA rank 8, cached latents, "
        f"{INVERSION_STEPS} inversion steps, {ROUNDS} rounds)"
    )
    print(f"  DPO step rounds:                 {ms(rounds['dpo'], 'step_s')} ms")
    print(f"  InPO step rounds:                {ms(rounds['inpo'], 'step_s')} ms")
    print(f"  inversion inside InPO, rounds:   {ms(rounds['inpo'], 'invert_s')} ms")
    print(f"  bare inversion forwards, rounds: {ms(rounds['inpo'], 'bare_s')} ms (same process as InPO)")
    print(
        f"  fastest: DPO {dpo * 1000:.1f} ms, InPO {inpo * 1000:.1f} ms ({inpo / dpo:.2f} x DPO), inversion inside "
        f"InPO {invert * 1000:.1f} ms ({invert / inpo:.0%} of the step), bare inversion {bare * 1000:.1f} ms"
    )
    print(f"  inversion inside InPO / bare inversion forwards: {invert / bare:.3f}")
    print(f"  InPO / (DPO + bare inversion), fastest rounds: {inpo / (dpo + bare):.3f}   (target <= 1.10)")
    print("  the same per round: " + ", ".join(f"{r:.3f}" for r in per_round))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(run_variant(sys.argv[1])))
    else:
        main()
