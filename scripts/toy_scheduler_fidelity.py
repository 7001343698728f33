"""The toy model under each real checkpoint's published scheduler: gold accuracy of the stock pipeline (its own
scheduler) vs the family sampler (`diffalign generate`, `pairs`, validation and evaluation all use it).

    python scripts/toy_scheduler_fidelity.py [--samples 96] [--out docs/results/toy_scheduler_fidelity.json]

The toy keeps its own noise schedule and prediction type; only the scheduler class and its step grid (timestep
spacing, offset) come from the published config. Same prompts (training prompts, cycled) and seeds everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "diffalign" / "models" / "published"
GRID_KEYS = ("timestep_spacing", "steps_offset", "use_karras_sigmas", "interpolation_type", "set_alpha_to_one")


def swapped_pipeline(name: str):
    """The toy pipeline with the scheduler class and step grid of published config `name` (or DPM-Solver)."""
    import diffusers

    from diffalign.models import load_family

    pipe = load_family("toy").pipe
    toy = dict(pipe.scheduler.config)
    if name == "dpm-solver":  # as real DPM-Solver configs: no clip_sample key
        config = {k: v for k, v in toy.items() if not k.startswith("clip_sample")}
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(config)
        return pipe
    config = json.loads((PUBLISHED / f"{name}.json").read_text())["scheduler"]
    grid = {k: config[k] for k in GRID_KEYS if k in config}
    pipe.scheduler = getattr(diffusers, config["_class_name"]).from_config({**toy, **grid})
    return pipe


def stock_images(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int = 32):
    import torch

    chunks = []
    for i in range(0, len(prompts), batch):
        generators = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        out = pipe(prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                   output_type="pt", height=32, width=32)  # fmt: skip
        chunks.append(out.images.float().cpu())
    return torch.cat(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from diffalign.apps.toy_evaluation import repeat_prompts, summarize
    from diffalign.gym.world import train_prompts
    from diffalign.infer.sample import sample_images
    from diffalign.models import family_for_pipeline

    prompts = repeat_prompts(train_prompts(), args.samples)
    seeds = list(range(args.samples))
    steps, guidance = 20, 4.5
    rows = {}
    for name in ("sd15", "sdxl", "sd-turbo", "sdxl-turbo", "dpm-solver"):
        pipe = swapped_pipeline(name)
        scheduler = type(pipe.scheduler).__name__
        stock = summarize(stock_images(pipe, prompts, seeds, steps, guidance), prompts)
        family = family_for_pipeline(pipe)
        ours = summarize(sample_images(family, prompts, seeds, num_steps=steps, guidance_scale=guidance), prompts)
        rows[name] = {
            "scheduler": scheduler,
            "stock_all_correct": round(stock["all_correct"], 3),
            "stock_se": round(stock["all_correct_se"], 3),
            "family_all_correct": round(ours["all_correct"], 3),
            "family_se": round(ours["all_correct_se"], 3),
        }
        print(f"{name:11s} {scheduler:32s} stock {stock['all_correct']:.3f} ± {stock['all_correct_se']:.3f}   "
              f"family sampler {ours['all_correct']:.3f} ± {ours['all_correct_se']:.3f}", flush=True)  # fmt: skip
    if args.out:
        record = {"samples": args.samples, "steps": steps, "guidance": guidance, **rows}
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
