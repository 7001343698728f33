"""Checkpoints: the state a resumed run needs, written atomically and resumed bit for bit.

Checkpoint folder `output_dir/checkpoints/checkpoint-<step>/`: accelerate's state (trainable weights only, optimizer,
per-process RNG), `train_state-<rank>.pt` (step, data position, the rank's noise generator, lr schedule, the watched
validation metric), and `diffalign_checkpoint.json` written last. It is written under a temporary name and renamed
when complete, so a folder without the marker (a crash, a copy in progress) is never resumed from."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffalign.errors import UserError
from diffalign.models import Family
from diffalign.train.validation import BestTracker

CHECKPOINT_MARKER = "diffalign_checkpoint.json"

TRAINABLE_FILE = "trainable.safetensors"


@dataclass
class TrainState:
    """What a resumed run needs beyond accelerate's state: position in training and in the data, noise RNG."""

    step: int = 0
    """Optimizer steps done."""
    data_position: int = 0
    """Where this process's batch source resumes (e.g. pairs consumed, undecodable ones included)."""
    skipped: int = 0
    """Items the batch source skipped (e.g. undecodable pairs)."""
    generator: torch.Generator = field(default_factory=torch.Generator)
    schedule: Any = None
    best: BestTracker = field(default_factory=BestTracker)
    """The watched validation metric (main process)."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "data_position": self.data_position,
            "skipped": self.skipped,
            "generator": self.generator.get_state(),
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "best": self.best.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.data_position = state["step"], state["data_position"]
        self.skipped = state["skipped"] if "skipped" in state else state["skipped_pairs"]  # earlier checkpoints
        self.generator.set_state(state["generator"])
        if self.schedule is not None and state["schedule"] is not None:
            self.schedule.load_state_dict(state["schedule"])
        if "best" in state:  # earlier checkpoints have none
            self.best.load_state_dict(state["best"])


def noise_generator(seed: int, rank: int) -> torch.Generator:
    """The CPU generator of a process's training noise and timesteps (different data on every rank)."""
    return torch.Generator().manual_seed(seed * 1000 + rank)


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    found = []
    root = checkpoints_dir(output_dir)
    for folder in root.glob("checkpoint-*") if root.is_dir() else []:
        marker = folder / CHECKPOINT_MARKER
        if folder.is_dir() and marker.is_file():
            try:
                found.append((int(json.loads(marker.read_text())["step"]), folder))
            except (ValueError, KeyError, json.JSONDecodeError):
                continue
    return sorted(found)


def checkpoint_step(folder: Path) -> int:
    """The optimizer step a complete checkpoint was written at."""
    return int(json.loads((folder / CHECKPOINT_MARKER).read_text())["step"])


def resolve_resume(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: 'auto' = newest complete one (or none), 'none', or an explicit folder."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / CHECKPOINT_MARKER).is_file():
        raise UserError(f"resume: {path} is not a complete diffalign checkpoint (no {CHECKPOINT_MARKER})")
    return path


def stopped_at(step: int, output_dir: str | Path) -> str:
    """Where an interrupted run stands: its step and the checkpoint a re-run resumes from."""
    found = complete_checkpoints(output_dir)
    where = f"the last checkpoint is {found[-1][1]} (step {found[-1][0]})" if found else "no checkpoint was written yet"
    return f"training stopped at step {step}; {where}"


def register_trainable_hooks(accelerator, family: Family) -> None:
    """Make accelerate's save/load_state store only the trainable weights (LoRA: a few MB, not the whole UNet)."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            trainable = {
                n: p.detach().cpu().contiguous() for n, p in family.denoiser.named_parameters() if p.requires_grad
            }
            save_file(trainable, os.path.join(output_dir, TRAINABLE_FILE))
        weights.clear()

    def load_hook(models, input_dir):
        state = load_file(os.path.join(input_dir, TRAINABLE_FILE))
        params = dict(family.denoiser.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        mismatch = sorted(trainable ^ state.keys()) or [n for n in state if state[n].shape != params[n].shape]
        if mismatch:
            raise UserError(
                f"checkpoint {input_dir} holds other trainable weights than this run ({mismatch[0]} differs): "
                "was it written with another model or lora/full fine-tune setting? Resume with those, or use a new "
                "output_dir"
            )
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir: str | Path, state: TrainState, keep: int) -> Path:
    """Write checkpoint-<step> atomically (temp folder, marker last, rename) and keep the newest `keep`."""
    root = checkpoints_dir(output_dir)
    final = root / f"checkpoint-{state.step}"
    tmp = root / f".tmp-checkpoint-{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save(state.state_dict(), tmp / f"train_state-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from diffalign.io import apply_umask

        apply_umask(tmp)  # accelerate and safetensors write some files private (0600)
        (tmp / CHECKPOINT_MARKER).write_text(
            json.dumps({"step": state.step, "time": time.time(), "processes": accelerator.num_processes})
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, folder: Path, state: TrainState) -> None:
    """Restore accelerate's state (trainable weights, optimizer, RNG) and this process's TrainState."""
    marker = json.loads((folder / CHECKPOINT_MARKER).read_text())
    if marker.get("processes", 1) != accelerator.num_processes:
        raise UserError(
            f"checkpoint {folder} was written by {marker['processes']} processes; resume it with the "
            f"same number (now {accelerator.num_processes})"
        )
    accelerator.load_state(str(folder))
    state.load_state_dict(torch.load(folder / f"train_state-{accelerator.process_index}.pt", weights_only=True))
