"""GRPO benchmark (used by `scripts/bench.py grpo`): the recipe's own work against the bare torch work it needs.

The toy model with a rank-8 LoRA (random non-zero B), 10 DDIM steps, every one at η 1 (configs/grpo/toy.yaml makes
only its first 3 stochastic: this is the recipe's largest rollout), CFG 4.5, the first 5 steps trained:
  rollout  `Family.rollout` of IMAGES training-prompt images in chunks of 16, recording latents and log-probs,
           against the bare stochastic sampler `Family.sample(eta=1)` on the same noise (the same denoiser calls).
           Target <= 1.10.
  update   `GrpoRecipe.loss` + backward of one micro-batch (16 images) at each trained step, with the KL term on,
           against the bare work: the same CFG forward, a plain loss on the prediction, its backward, and the
           reference forward (LoRA off, no grad). Target <= 1.10.
  memory   peak RSS of one whole `diffalign train` rollout + its updates (the same sampler and trained steps, 2 prompts
           x G images, micro-batches of 16) in a fresh process per G in GROUPS, against the smallest G: flat in G
           at a fixed micro-batch (sampling is chunked; the rollout buffer keeps latents, log-probs and advantages
           only: 11 latents of 8x8x8 floats, 22 KiB, per image on the toy).
ROUNDS interleaved rounds; per variant the fastest counts (noise only adds).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kit import alternate, bench_model, memory_mb, rollout_bench_setup, run_variant, train_seconds  # noqa: E402

IMAGES, CHUNK, STEPS, ROUNDS = 64, 16, 10, 3
GROUPS = (16, 64, 128)
"""Group sizes of the memory figure (2 prompts each: rollouts of 32 to 256 images)."""


def rollout_peak(group: int, folder: str) -> dict:
    """Peak RSS (MB) of a fresh process that trains one whole GRPO rollout of 2 prompts x `group` images."""
    overrides = [
        "method=grpo", f"model.name={bench_model()}", "grpo.reward=toy-clip", "grpo.prompts_per_rollout=2",
        f"grpo.group_size={group}", f"grpo.num_steps={STEPS}", "grpo.timestep_fraction=0.5", f"batch_size={CHUNK}",
        "gradient_accumulation_steps=1", f"max_steps={2 * group // CHUNK}", "checkpoint_every=0",
        "data.source=toy:train", "validation.every=0", "report_to=none", "log_every=1000", f"output_dir={folder}",
    ]  # fmt: skip
    seconds = train_seconds(overrides)
    return {"peak_mb": memory_mb("VmHWM"), "seconds": seconds}


def memory_figures() -> dict[int, dict]:
    """{G: the figures of `rollout_peak`}, each in a fresh process."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return {g: run_variant(__file__, "--memory", str(g), f"{folder}/g{g}") for g in GROUPS}


def main() -> None:
    import torch

    from diffalign.models import cond_select
    from diffalign.train.grpo import Config, GrpoConfig, GrpoRecipe, Rollout

    family, prompts, cond, uncond, guidance, chunks = rollout_bench_setup(IMAGES, CHUNK)

    def noise(index: int) -> tuple[torch.Tensor, torch.Generator]:
        generator = torch.Generator().manual_seed(index)
        return family.initial_noise(CHUNK, 32, generator), generator

    def sampling(recorded: bool) -> float:
        """Seconds of sampling every chunk: the recorded rollout, or the bare stochastic sampler on the same noise."""
        started = time.perf_counter()
        with torch.no_grad():
            for index, chunk in enumerate(chunks):
                latents, generator = noise(index)
                run = family.rollout if recorded else family.sample
                noise_key = {"noise_level": 1.0} if recorded else {"eta": 1.0}
                run(
                    cond_select(cond, chunk), uncond, latents=latents, num_steps=STEPS, guidance_scale=guidance,
                    generator=generator, **noise_key,
                )  # fmt: skip
        return time.perf_counter() - started

    latents, generator = noise(0)
    trajectory = family.rollout(
        cond_select(cond, chunks[0]), uncond, latents=latents, num_steps=STEPS, guidance_scale=guidance,
        noise_level=1.0, generator=generator,
    )  # fmt: skip
    buffer = Rollout(
        prompts[:CHUNK], cond_select(cond, chunks[0]), trajectory.latents, trajectory.log_probs,
        torch.randn(CHUNK), None, {},
    )  # fmt: skip
    settings = GrpoConfig(kl_weight=0.04, clip_range=0.2)
    config = Config(grpo=settings)
    schedule = family.schedule(STEPS, latents)
    trained = list(range(STEPS // 2))
    recipe = GrpoRecipe(
        cfg=config, accelerator=None, family=family, reward=None, uncond=uncond, schedule=schedule,
        window=range(STEPS), trained=trained, noise_level=1.0, guidance_scale=guidance, resolution=32, prompts=[],
    )  # fmt: skip
    images = torch.arange(CHUNK)

    def update() -> float:
        started = time.perf_counter()
        for i in trained:
            loss, _ = recipe.loss({"rollout": buffer, "images": images, "step": i, "first": False})
            loss.backward()
        return time.perf_counter() - started

    def bare_update() -> float:
        started = time.perf_counter()
        for i in trained:
            x, t = buffer.latents[:, i], schedule.timesteps[i]
            pred = family.predict(x, t, buffer.cond, uncond, guidance, detach_uncond=True)
            with family.reference():
                family.predict(x, t, buffer.cond, uncond, guidance)
            pred.float().pow(2).mean().backward()
        return time.perf_counter() - started

    runs = {"rollout": lambda: sampling(True), "sampler": lambda: sampling(False)}
    runs |= {"update": update, "bare update": bare_update}
    for run in runs.values():  # warm-up
        run()
    times = alternate(runs, ROUNDS)
    best = {name: min(values) for name, values in times.items()}
    print(
        f"grpo bench: toy model + rank-8 LoRA, {IMAGES} images in chunks of {CHUNK}, {STEPS} DDIM steps at eta 1, "
        f"CFG {guidance}; update: {CHUNK} images x {len(trained)} trained steps, KL on; {torch.get_num_threads()} "
        f"torch threads, {ROUNDS} interleaved rounds (fastest counts)"
    )
    for name, values in times.items():
        print(f"  {name:12s} s: {', '.join(f'{v:.2f}' for v in values)}")
    print(f"  rollout with log-probs / bare stochastic sampler: {best['rollout'] / best['sampler']:.3f}   "
          "(target <= 1.10)")  # fmt: skip
    print(f"  update / bare forward+backward + reference forward: {best['update'] / best['bare update']:.3f}   "
          "(target <= 1.10)")  # fmt: skip
    figures = memory_figures()
    smallest = figures[GROUPS[0]]["peak_mb"]
    for group, figure in figures.items():
        print(
            f"  memory G={group:3d} (2 prompts, micro-batch {CHUNK}): peak RSS {figure['peak_mb']:.0f} MB, "
            f"{figure['peak_mb'] / smallest:.3f} of G={GROUPS[0]}'s   (target: flat, <= 1.10)"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--memory"]:
        import json

        print(json.dumps(rollout_peak(int(sys.argv[2]), sys.argv[3])))
    else:
        main()
