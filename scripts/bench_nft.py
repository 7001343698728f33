"""DiffusionNFT benchmark (used by `scripts/bench.py nft`): the recipe's own work against the bare torch work it needs.

The toy model with a rank-8 LoRA (random non-zero B), configs/nft/toy.yaml's rollout (10 deterministic DDIM steps,
CFG 4.5, 9 trained timesteps per image):
  rollout  what `NftRecipe.sample` runs besides the reward: the sampler with the old policy swapped in, then
           `NftRecipe.forward_points` (each image's timesteps and noise drawn, x_t, the old policy's x̂0 there), against
           the bare work: the same sampler and one conditional forward per image and timestep on the same x_t.
           Target <= 1.05.
  update   `NftRecipe.loss` + backward of one micro-batch (16 images) at each trained timestep, the KL term on,
           against the bare work: the conditional forward, a plain loss on it, its backward, the reference forward
           (LoRA off, no grad). Target <= 1.10.
ROUNDS interleaved rounds; per variant the fastest counts (noise only adds).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kit import alternate, rollout_bench_setup  # noqa: E402

IMAGES, CHUNK, STEPS, ROUNDS = 64, 16, 10, 3


def main() -> None:
    import torch

    from diffalign.models import cond_select
    from diffalign.train.nft import Config, NftConfig, NftRecipe, OldPolicy, Rollout, trained_slots

    family, prompts, cond, uncond, guidance, chunks = rollout_bench_setup(IMAGES, CHUNK)
    settings = NftConfig()
    slots = trained_slots(STEPS, settings)
    shape = family.initial_noise(1, 32)
    recipe = NftRecipe(
        cfg=Config(nft=settings), accelerator=None, family=family, reward=None, uncond=uncond,
        schedule=family.schedule(STEPS, shape), trained=slots, guidance_scale=guidance, resolution=32, prompts=[],
        old=OldPolicy([p for p in family.denoiser.parameters() if p.requires_grad]),
    )  # fmt: skip

    def sample(chunk: torch.Tensor, index: int) -> torch.Tensor:
        latents = family.initial_noise(CHUNK, 32, torch.Generator().manual_seed(index))
        return family.sample(
            cond_select(cond, chunk), uncond, latents=latents, num_steps=STEPS, guidance_scale=guidance
        )

    recorded = {}

    def rollout() -> float:
        started = time.perf_counter()
        with torch.no_grad(), recipe.old.active():
            for index, chunk in enumerate(chunks):
                clean = sample(chunk, index)
                points = recipe.forward_points(clean, cond_select(cond, chunk), torch.Generator().manual_seed(index))
                recorded[index] = (clean, *points)
        return time.perf_counter() - started

    def bare_rollout() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for index, chunk in enumerate(chunks):
                sample(chunk, index)
                _, timesteps, noisy, _ = recorded[index]
                for s in range(len(slots)):
                    family.predict(noisy[:, s], timesteps[:, s], cond_select(cond, chunk))
        return time.perf_counter() - started

    rollout()
    clean, timesteps, noisy, old_clean = recorded[0]
    buffer = Rollout(
        prompts[:CHUNK], cond_select(cond, chunks[0]), clean, timesteps, noisy, old_clean,
        torch.randn(CHUNK), {},
    )  # fmt: skip
    images = torch.arange(CHUNK)

    def update() -> float:
        started = time.perf_counter()
        for s in slots:
            loss, _ = recipe.loss({"rollout": buffer, "images": images, "step": s, "first": False})
            loss.backward()
        return time.perf_counter() - started

    def bare_update() -> float:
        started = time.perf_counter()
        for s in slots:
            x, t = buffer.noisy[:, s], buffer.timesteps[:, s]
            pred = family.predict(x, t, buffer.cond)
            with family.reference():
                family.predict(x, t, buffer.cond)
            pred.float().pow(2).mean().backward()
        return time.perf_counter() - started

    runs = {"rollout": rollout, "bare rollout": bare_rollout, "update": update, "bare update": bare_update}
    for run in runs.values():  # warm-up
        run()
    times = alternate(runs, ROUNDS)
    best = {name: min(values) for name, values in times.items()}
    print(
        f"nft bench: toy model + rank-8 LoRA, {IMAGES} images in chunks of {CHUNK}, {STEPS} DDIM steps, CFG "
        f"{guidance}, {len(slots)} trained timesteps per image; update: {CHUNK} images x {len(slots)} timesteps, KL "
        f"on; {torch.get_num_threads()} torch threads, {ROUNDS} interleaved rounds (fastest counts)"
    )
    for name, values in times.items():
        print(f"  {name:12s} s: {', '.join(f'{v:.2f}' for v in values)}")
    print(f"  rollout / bare sampler + old forwards: {best['rollout'] / best['bare rollout']:.3f}   (target <= 1.05)")
    print(f"  update / bare forward+backward + reference forward: {best['update'] / best['bare update']:.3f}   "
          "(target <= 1.10)")  # fmt: skip


if __name__ == "__main__":
    main()
