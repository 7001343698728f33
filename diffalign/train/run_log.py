"""What a run logs: metrics to the accelerate trackers and `metrics.jsonl`, reduced over processes, and the stop on a
NaN or infinite loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from diffalign.config import TrainConfig, to_dict
from diffalign.errors import UserError
from diffalign.train.checkpoint import complete_checkpoints
from diffalign.train.run_dir import flat_config


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class RunLog:
    """Metrics to the accelerate trackers and to `metrics.jsonl` (main process), one record per log call."""

    def __init__(self, accelerator, cfg: TrainConfig):
        self.accelerator = accelerator
        self.path = Path(cfg.output_dir) / "metrics.jsonl"
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.report_to != "none":
            accelerator.init_trackers("diffalign", config=flat_config(to_dict(cfg)))

    def log(self, values: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in values.items()}
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")

    def log_images(self, name: str, grid: Tensor, step: int) -> None:
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(name, grid, step)
            elif tracker.name == "wandb":
                import wandb

                tracker.log({name: wandb.Image(grid.permute(1, 2, 0).numpy())}, step=step)

    def close(self) -> None:
        self.accelerator.end_training()


def reduce_mean(accelerator, values: dict[str, Tensor]) -> dict[str, float]:
    """Mean of each metric over processes (a collective: every process must call it)."""
    if not values:
        return {}
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()]).to(accelerator.device)
    mean = accelerator.reduce(stacked, reduction="mean")
    return dict(zip(values, mean.tolist(), strict=True))


def check_finite(value: float, step: int, output_dir: str | Path) -> None:
    """Stop with a clear error on a NaN/inf loss; the last good checkpoint stays as it is."""
    if math.isfinite(value):
        return
    found = complete_checkpoints(output_dir)
    keep = f"the last good checkpoint is {found[-1][1]}" if found else "no checkpoint was written yet"
    raise TrainingDiverged(
        f"the loss became {value} at step {step + 1}; training stopped ({keep}). "
        "Lower optim.lr or the method's beta, or enable gradient clipping"
    )
