"""What a finished run leaves: the LoRA in diffusers format (or the full denoiser) with a model card (README.md, as
diffusers' training scripts write one), the resolved config and `summary.json` (steps, skipped items, every rank's
weight digest); with `push_to_hub`, the folder uploaded to the hub."""

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


def save_trainable(
    family: Family, cfg: TrainConfig, folder: Path, files: dict[str, str] | None = None, copies: dict | None = None
) -> None:
    """The LoRA in diffusers format (or the full denoiser), the text `files` (name -> text) and the files `copies`
    (name -> source path) into `folder`, atomically."""
    import shutil

    from diffalign.io import atomic_dir

    with atomic_dir(folder) as tmp:
        if cfg.lora.enabled:
            family.save_lora(tmp)
        else:
            family.denoiser.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        for name, source in (copies or {}).items():
            shutil.copyfile(source, tmp / name)


def save_final(
    family: Family,
    cfg: TrainConfig,
    accelerator,
    state: TrainState,
    optimizer,
    unit: str = "items",
    extra: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
) -> Path:
    """The LoRA in diffusers format (or the full denoiser) with its model card (`model_card`: `metrics` are the last
    logged ones), the resolved config and `summary.json` (steps, skipped `unit` (e.g. pairs), every rank's weight
    digest, plus `extra`), written atomically by the main process; then, with `push_to_hub`, uploaded."""
    from accelerate.utils import gather_object

    from diffalign.io import write_text_atomic

    digests = gather_object([weights_digest(family.trainable_parameters())])
    skipped = sum(gather_object([state.skipped]))
    final = Path(cfg.output_dir) / ("lora" if cfg.lora.enabled else "denoiser")
    if accelerator.is_main_process:
        grids = sorted((Path(cfg.output_dir) / "validation").glob("step-*.png"))
        card = model_card(cfg, state.step, metrics or {}, grid=VALIDATION_GRID if grids else None)
        copies = {VALIDATION_GRID: grids[-1]} if grids else {}
        save_trainable(family, cfg, final, {"README.md": card}, copies)
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
        if cfg.push_to_hub:
            push_to_hub(final, cfg.hub_model_id)
    accelerator.wait_for_everyone()
    return final


VALIDATION_GRID = "validation.png"
"""The last validation grid, copied beside the weights for the model card."""


def is_hub_id(name: str) -> bool:
    """Whether a model name is a hub repository id (owner/name), not a local folder or a built-in name."""
    return name.count("/") == 1 and not Path(name).exists()


def model_card(cfg: TrainConfig, steps: int, metrics: dict[str, float], grid: str | None = None) -> str:
    """README.md of a trained LoRA (or denoiser) folder: hub metadata (library, base model, tags) and what a user of
    it needs — the base model and how to load it, the method, data and reward, the final metrics, the last
    validation grid and the resolved config."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    from diffalign.config import to_dict
    from diffalign.methods import METHODS

    kind = "LoRA" if cfg.lora.enabled else "full fine-tune"
    title = METHODS[cfg.method].title if cfg.method in METHODS else cfg.method
    base = cfg.model.name
    data = to_dict(cfg).get("data", {})
    source = data.get("source") or (f"{len(data['prompts'])} prompts in the config" if data.get("prompts") else "")
    rewards = sorted({str(v) for k, v in flat_items(to_dict(cfg)) if k.endswith("reward") and v})
    load = (
        'pipe.load_lora_weights("<this folder or repo id>")'
        if cfg.lora.enabled
        else 'denoiser = <its class>.from_pretrained("<this folder or repo id>")  # the pipeline\'s unet/transformer'
    )
    lines = [
        f"# {title} {kind} of {base}",
        "",
        f"Trained with [diffalign](https://github.com/)'s `{cfg.method}` recipe for {steps} optimizer steps.",
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{base}")',
        load,
        "```",
        "",
        "## Training",
        "",
        f"- base model: `{base}`" + (f" (revision `{cfg.model.revision}`)" if cfg.model.revision else ""),
        f"- method: {title} (`method: {cfg.method}`), {kind}" + (f" rank {cfg.lora.rank}" if cfg.lora.enabled else ""),
        *([f"- data: `{source}`"] if source else []),
        *([f"- rewards: {', '.join(f'`{r}`' for r in rewards)}"] if rewards else []),
        f"- optimizer: {cfg.optim.optimizer}, lr {cfg.optim.lr:g}, batch {cfg.batch_size} x "
        f"{cfg.gradient_accumulation_steps} accumulation per process, seed {cfg.seed}",
    ]
    if metrics:
        lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.6g} |" for name, value in sorted(metrics.items())]
    if grid:
        lines += ["", "## Validation", "", f"The last validation grid: ![validation]({grid})"]
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "```", ""]
    card_data = ModelCardData(
        library_name="diffusers",
        base_model=base if is_hub_id(base) else None,
        tags=["diffalign", cfg.method, "lora" if cfg.lora.enabled else "full-fine-tune", "text-to-image"],
    )
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def flat_items(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested dict."""
    items = []
    for key, value in tree.items():
        if isinstance(value, dict):
            items += flat_items(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def check_push(cfg: TrainConfig) -> None:
    """With `push_to_hub`, what the upload at the end needs, before any training: a repository id, a token and the
    hub reachable; a one-line UserError naming the fix otherwise."""
    if not cfg.push_to_hub:
        return
    from diffalign.errors import UserError
    from diffalign.hub import hub_unreachable

    if not cfg.hub_model_id:
        raise UserError("push_to_hub: give hub_model_id (e.g. hub_model_id=your-name/my-lora), or push_to_hub=false")
    why = hub_unreachable()
    if why is not None:
        raise UserError(
            f"push_to_hub: the hub cannot be reached ({why}): unset HF_HUB_OFFLINE where there is network, or train "
            "with push_to_hub=false and upload the folder later with huggingface_hub.upload_folder"
        )
    from huggingface_hub import get_token

    if get_token() is None:
        raise UserError("push_to_hub: no Hugging Face token: run `hf auth login` or set HF_TOKEN, then rerun")


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload `folder` (weights, model card, validation grid) to the hub model repository `repo_id`, creating it
    if needed; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    return str(api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="diffalign training"))
