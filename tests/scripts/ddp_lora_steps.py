"""Run under `accelerate launch` with 2 CPU processes: 3 LoRA training steps of the tiny SD pipeline, each rank on its
own data; every rank writes its final LoRA weights and its losses to OUT/rank<r>.* for the test to compare."""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import save_file

from diffalign.models import family_for_pipeline
from diffalign.models.tiny import build_tiny_sd

out = Path(sys.argv[1])
accelerator = Accelerator()
rank = accelerator.process_index
family = family_for_pipeline(build_tiny_sd(seed=0))
torch.manual_seed(0)
params = family.add_lora(rank=4, alpha=4)
optimizer = torch.optim.AdamW(params, lr=1e-2)
model, optimizer = accelerator.prepare(family.denoiser, optimizer)
generator = torch.Generator().manual_seed(100 + rank)  # different data on every rank
cond = family.encode_prompts([f"a red circle {rank}", f"a blue square {rank}"])
losses = []
with family.calling(model):
    for _ in range(3):
        x0 = torch.randn(2, 4, 16, 16, generator=generator)
        noise = torch.randn(2, 4, 16, 16, generator=generator)
        t = family.sample_train_timesteps(2, generator)
        noisy, target = family.noisy_and_target(x0, noise, t)
        loss = F.mse_loss(family.predict(noisy, t, cond), target)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
out.mkdir(parents=True, exist_ok=True)
save_file({k: v.contiguous() for k, v in family.lora_state_dict().items()}, out / f"rank{rank}.safetensors")
(out / f"rank{rank}.json").write_text(json.dumps({"losses": losses, "world_size": accelerator.num_processes}))
