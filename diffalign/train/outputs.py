"""What a finished run leaves: the LoRA in diffusers format (or the full denoiser), the resolved config and
`summary.json` (steps, skipped items, every rank's weight digest)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffalign.config import TrainConfig, save_config
from diffalign.models import Family

if TYPE_CHECKING:
    from diffalign.train.checkpoint import TrainState


def weights_digest(params: list[torch.nn.Parameter]) -> str:
    """sha256 of the trainable weights' bytes (equal on every rank when data parallelism kept them in sync)."""
    import hashlib

    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int | None:
    """Steps the optimizer really took (Adam-style `step` counters), None for stateless optimizers."""
    for group_state in optimizer.state.values():
        if "step" in group_state:
            return int(group_state["step"])
    return None


def save_trainable(family: Family, cfg: TrainConfig, folder: Path, files: dict[str, str] | None = None) -> None:
    """The LoRA in diffusers format (or the full denoiser) and the text `files` (name -> text) into `folder`,
    atomically."""
    from diffalign.io import atomic_dir

    with atomic_dir(folder) as tmp:
        if cfg.lora.enabled:
            family.save_lora(tmp)
        else:
            family.denoiser.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)


def save_final(
    family: Family,
    cfg: TrainConfig,
    accelerator,
    state: TrainState,
    optimizer,
    unit: str = "items",
    extra: dict[str, Any] | None = None,
) -> Path:
    """The LoRA in diffusers format (or the full denoiser), the resolved config and `summary.json` (steps, skipped
    `unit` (e.g. pairs), every rank's weight digest, plus `extra`), written atomically by the main process."""
    from accelerate.utils import gather_object

    from diffalign.io import write_text_atomic

    digests = gather_object([weights_digest(family.trainable_parameters())])
    skipped = sum(gather_object([state.skipped]))
    final = Path(cfg.output_dir) / ("lora" if cfg.lora.enabled else "denoiser")
    if accelerator.is_main_process:
        save_trainable(family, cfg, final)
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
        summary = {
            "method": cfg.method,
            "steps": state.step,
            "optimizer_steps": optimizer_steps(optimizer),
            "processes": accelerator.num_processes,
            f"skipped_{unit}": skipped,
            "rank_weight_sha256": digests,
            "final": str(final),
            **(extra or {}),
        }
        write_text_atomic(Path(cfg.output_dir) / "summary.json", json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return final
