"""InPO step-time benchmark (used by `scripts/bench.py inpo`).

Three variants on the same batch (BATCH pairs of the toy model at RESOLUTION px, LoRA rank 8, cached latents), each
in its own process:
  dpo        the real Diffusion-DPO recipe (`diffalign.train.dpo.train`)
  inpo       the real DDIM-InPO recipe (`diffalign.train.inpo.train`, 10 inversion steps); the time spent inside
             the inversion (`invert_pairs`) is summed, so its share of the step is known
  inversion  the bare work the inversion adds, in plain torch: the no-grad forwards of the LoRA denoiser the grid
             needs (pairs at t ~ U{0..999}: ceil(t/100) forwards each, in 10 calls of the samples still moving)
Recipe step time = (T(n2 steps) - T(n1 steps)) / (n2 - n1) (start-up, model load and cache build cancel out); each
variant runs in ROUNDS interleaved rounds and the fastest counts. Target: InPO step <= 1.10 x (DPO step + inversion).
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
ROUNDS = 3


def recipe(folder: Path, method: str) -> dict:
    """The real recipe with the cache, timed at two lengths; for InPO also the seconds inside the inversion
    (`diffalign.train.inpo.invert_pairs`: the paper's grid, `Family.walk` steps)."""
    from diffalign.train import inpo as inpo_recipe

    spent = [0.0]
    invert = inpo_recipe.invert_pairs

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return invert(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    inpo_recipe.invert_pairs = timed
    pairs = _write_pairs(folder)
    cache = folder / "cache"
    _train(pairs, folder / "warm", 1, cache, method)  # builds the cache, untimed
    seconds, inverting = [], []
    for steps in STEPS:
        spent[0] = 0.0
        seconds.append(_train(pairs, folder / f"run{steps}", steps, cache, method))
        inverting.append(spent[0])
    span = STEPS[1] - STEPS[0]
    return {"step_s": (seconds[1] - seconds[0]) / span, "invert_s": (inverting[1] - inverting[0]) / span}


def bare_inversion() -> dict:
    """The no-grad forwards of the LoRA denoiser (adapters on) the InPO inversion grid needs, plain torch."""
    import torch

    from diffalign.models import load_family

    family = load_family(_model())
    family.add_lora(rank=8)
    unet = family.denoiser
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2 * BATCH, *family.latent_shape(1, RESOLUTION)[1:], generator=g)
    cond = family.encode_prompts(["a red circle on a black background"] * (2 * BATCH))["prompt_embeds"]

    def step():
        """One step's inversion forwards: pairs at t ~ U{0..999} take ceil(t/100) steps of the grid, in lockstep."""
        t = torch.randint(0, 1000, (BATCH,), generator=g).repeat(2)
        counts = torch.ceil(t * INVERSION_STEPS / 1000).clamp(1, INVERSION_STEPS)
        with torch.no_grad():
            for j in range(1, INVERSION_STEPS + 1):
                moving = (counts >= j).nonzero().squeeze(1)
                if len(moving) == 0:
                    moving = moving.new_zeros(1)
                unet(latents[moving], t[moving], encoder_hidden_states=cond[moving])

    for _ in range(2):
        step()
    span = STEPS[1] - STEPS[0]
    started = time.perf_counter()
    for _ in range(span):
        step()
    return {"step_s": (time.perf_counter() - started) / span}


def run_variant(name: str) -> dict:
    if name == "inversion":
        return bare_inversion()
    with tempfile.TemporaryDirectory() as tmp:
        return recipe(Path(tmp), name)


def main() -> None:
    """Run the three variants in subprocesses (interleaved rounds) and print their figures and ratios."""
    rounds: dict[str, list[dict]] = {"dpo": [], "inpo": [], "inversion": []}
    for _ in range(ROUNDS):
        for name in rounds:
            out = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, check=True)
            rounds[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {name: min(runs, key=lambda r: r["step_s"]) for name, runs in rounds.items()}
    dpo, inpo, inversion = (best[name]["step_s"] for name in ("dpo", "inpo", "inversion"))
    print(
        f"inpo bench ({_model()}, {BATCH} pairs/step at {RESOLUTION}px, LoRA rank 8, cached latents, "
        f"{INVERSION_STEPS} inversion steps)"
    )
    for name, runs in rounds.items():
        print(f"  {name:9s} rounds: " + ", ".join(f"{r['step_s'] * 1000:.1f}" for r in runs) + " ms/step")
    print(f"  DPO step                          {dpo * 1000:8.1f} ms")
    print(f"  InPO step                         {inpo * 1000:8.1f} ms   ({inpo / dpo:.2f} x DPO)")
    print(
        f"  of which inside the inversion     {best['inpo']['invert_s'] * 1000:8.1f} ms   "
        f"({best['inpo']['invert_s'] / inpo:.0%} of the InPO step)"
    )
    print(f"  bare no-grad inversion forwards   {inversion * 1000:8.1f} ms")
    print(f"  InPO / (DPO + bare inversion): {inpo / (dpo + inversion):.3f}   (target <= 1.10)")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(run_variant(sys.argv[1])))
    else:
        main()
