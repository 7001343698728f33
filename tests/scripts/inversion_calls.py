"""Run under `accelerate launch` with 2 CPU processes: the InPO grid inversion of a pair on each rank, rank 0 to
t = 150 and rank 1 to t = 850; every rank writes the batch size of each denoiser call to OUT/rank<r>.json."""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from diffalign.models import family_for_pipeline
from diffalign.models.tiny import build_tiny_sd
from diffalign.train.inpo import grid_counts, invert_on_grid

out = Path(sys.argv[1])
accelerator = Accelerator()
rank = accelerator.process_index
family = family_for_pipeline(build_tiny_sd(seed=0))
calls = []
denoise = family.denoise
family.denoise = lambda x, *args: calls.append(x.shape[0]) or denoise(x, *args)
t = torch.full((2,), 150.0 if rank == 0 else 850.0)
x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(rank))
invert_on_grid(family, x0, family.encode_prompts(["a red circle", "a blue square"]), t, 10, 0.1, None)
out.mkdir(parents=True, exist_ok=True)
needed = int(grid_counts(t, 10).max())
(out / f"rank{rank}.json").write_text(json.dumps({"calls": calls, "needed": needed}))
