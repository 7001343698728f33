"""RLG sampling-time benchmark (used by `scripts/bench.py rlg`).

The toy model with a rank-8 LoRA (the toy DPO config's rank, random non-zero weights) samples IMAGES held-out images
at its default settings (20 DDIM steps, CFG 4.5, batch 64) three ways:
  plain    CFG sampling with the LoRA on: one denoiser call per step (the reference: the work a LoRA model does anyway)
  two      RLG at w = 1.5 in two denoiser calls per step (the default)
  batched  RLG at w = 1.5, base and fine-tuned passes in one peft-routed call per step (`batched=True`)
Target: two / plain <= 2.10 (two denoiser passes per step are the floor of 2, minus the work outside the
denoiser: VAE decode, text encoding). ROUNDS interleaved rounds; per variant the fastest counts (noise only adds).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kit import alternate  # noqa: E402

IMAGES, ROUNDS, SCALE = 64, 3, 1.5


def lora_family():
    """The toy family with a rank-8 LoRA whose B matrices are small random values (a LoRA at init does nothing)."""
    import torch

    from diffalign.models import load_family

    family = load_family("toy")
    family.add_lora(rank=8, alpha=8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in family.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(0.01 * torch.randn(p.shape, generator=generator))
    family.freeze()
    return family


def main() -> None:
    import torch

    from diffalign.gym.world import heldout_prompts
    from diffalign.infer.rlg import rl_guidance
    from diffalign.infer.sample import sample_images

    family = lora_family()
    prompts = [heldout_prompts()[i % 9] for i in range(IMAGES)]
    seeds = list(range(IMAGES))

    def run(variant: str) -> float:
        started = time.perf_counter()
        if variant == "plain":
            sample_images(family, prompts, seeds, batch_size=64)
        else:
            with rl_guidance(family, SCALE, batched=variant == "batched"):
                sample_images(family, prompts, seeds, batch_size=64)
        return time.perf_counter() - started

    run("plain")  # warm-up
    times = alternate({variant: lambda v=variant: run(v) for variant in ("plain", "batched", "two")}, ROUNDS)
    best = {variant: min(values) for variant, values in times.items()}
    settings = family.sampling_defaults
    print(
        f"rlg bench: toy model + rank-8 LoRA, {IMAGES} held-out images, {settings['num_steps']} steps, CFG "
        f"{settings['guidance_scale']}, w = {SCALE}, batch 64, {torch.get_num_threads()} torch threads, "
        f"{ROUNDS} interleaved rounds (fastest counts)"
    )
    for variant, values in times.items():
        print(f"  {variant:8s} s: {', '.join(f'{v:.2f}' for v in values)}")
    print(f"  RLG two calls (default) / plain CFG: {best['two'] / best['plain']:.3f}   (target <= 2.10)")
    print(f"  RLG one batched call / plain CFG: {best['batched'] / best['plain']:.3f}")


if __name__ == "__main__":
    main()
