"""Which InPO inversion reconstructs x0 better on the toy model: asking the model at each step's start or destination
timestep (`inpo.inversion_timestep`)?

    python scripts/toy_inversion.py [--images 64] [--out docs/results/toy_inversion.json]

Clean latents of toy-world images (the gold world's own renderings, held-out and training scenes alike) are inverted
to t on InPO's grid (10 steps of at most 100 timesteps: ceil(t/100) steps, `diffalign.train.inpo.invert_on_grid`,
eta 0, the base model), then denoised back to 0 along the same per-sample grid with the DDIM sampler's rule. Per t
the relative error |x0' - x0| / |x0| (mean and SE over images) for each rule, and their paired difference.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from diffalign.gym.world import generate
from diffalign.models import load_family
from diffalign.train.inpo import grid_counts, invert_on_grid

TIMESTEPS = (100, 300, 500, 700, 900, 999)
GRID = 10


def reconstruction_errors(family, x0, cond, t: float, predict_at: str) -> torch.Tensor:
    """Per image: invert to t on the grid with `predict_at`, walk back to 0 with the sampler's rule; relative error."""
    ts = torch.full((x0.shape[0],), float(t))
    inverted = invert_on_grid(family, x0, cond, ts, GRID, 0.0, None, predict_at=predict_at)
    steps = int(grid_counts(ts, GRID)[0])
    with torch.no_grad():
        back = family.walk(inverted, cond, ts, torch.zeros_like(ts), steps)
    return (back - x0).flatten(1).norm(dim=1) / x0.flatten(1).norm(dim=1)


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/results/toy_inversion.json"))
    args = parser.parse_args()
    family = load_family("toy")
    images, prompts = generate(args.images, seed=args.seed)
    x0 = family.encode_images(images, sample=False)
    cond = family.encode_prompts(prompts)
    rows = []
    for t in TIMESTEPS:
        errors = {rule: reconstruction_errors(family, x0, cond, t, rule) for rule in ("start", "destination")}
        row = {"t": t, **{rule: mean_se(e) for rule, e in errors.items()}}
        row["destination_minus_start"] = mean_se(errors["destination"] - errors["start"])
        rows.append(row)
        print(
            f"t={t:4d}  start {row['start'][0]:.4f} ± {row['start'][1]:.4f}  destination {row['destination'][0]:.4f}"
            f" ± {row['destination'][1]:.4f}  difference {row['destination_minus_start'][0]:+.4f} ± "
            f"{row['destination_minus_start'][1]:.4f}",
            flush=True,
        )
    result = {
        "command": f"python scripts/toy_inversion.py --images {args.images} --seed {args.seed}",
        "what": "relative error |x0' - x0| / |x0| after inverting to t on InPO's 10-step grid and walking back "
        "(mean, SE over images; paired difference destination - start)",
        "images": args.images,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
