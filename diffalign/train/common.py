"""Blocks the training loop (`loop.fit`) and the recipes share: accelerator set-up, the model with its trainable
weights, optimizer and schedule, checkpoints (atomic, resumable bit for bit), logging, validation, the final save.
Functions, not a base class.

Checkpoint folder `output_dir/checkpoints/checkpoint-<step>/`: accelerate's state (trainable weights only, optimizer,
per-process RNG), `train_state-<rank>.pt` (step, data position, the rank's noise generator, lr schedule), and
`diffalign_checkpoint.json` written last. It is written under a temporary name and renamed when complete, so a
folder without the marker (a crash, a copy in progress) is never resumed from.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffalign.config import LoraConfig, OptimConfig, TrainConfig, ValidationConfig, save_config, to_dict
from diffalign.errors import UserError
from diffalign.models import Family, load_family

log = logging.getLogger(__name__)
CHECKPOINT_MARKER = "diffalign_checkpoint.json"
TRAINABLE_FILE = "trainable.safetensors"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def stopped_at(step: int, output_dir: str | Path) -> str:
    """Where an interrupted run stands: its step and the checkpoint a re-run resumes from."""
    found = complete_checkpoints(output_dir)
    where = f"the last checkpoint is {found[-1][1]} (step {found[-1][0]})" if found else "no checkpoint was written yet"
    return f"training stopped at step {step}; {where}"


# ----------------------------------------------------------------------------------------------------- accelerator
def make_accelerator(cfg: TrainConfig, *, find_unused_parameters: bool = False, static_graph: bool = False):
    """An Accelerator for `cfg` (mixed precision, gradient accumulation, tracker), with the seed set per process.
    `find_unused_parameters` / `static_graph` go to DistributedDataParallel, for recipes whose steps leave some
    trainable weights without gradient (e.g. truncated backprop through a sampler)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        # accelerate would drop the tracker with a log line and train without it
        raise UserError(f"report_to: {cfg.report_to} is not installed (pip install {cfg.report_to}), or use 'none'")
    output = Path(cfg.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters, static_graph=static_graph)
        ],
    )
    if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError("mixed_precision: fp16 needs a GPU; use 'no' (or 'bf16') on CPU")
    half = {"fp16": "float16", "bf16": "bfloat16"}
    if cfg.mixed_precision in half and cfg.model.dtype not in ("float32", half[cfg.mixed_precision]):
        raise UserError(
            f"model.dtype {cfg.model.dtype} with mixed_precision {cfg.mixed_precision} mixes two half-precision types "
            f"(CPU kernels refuse it): use model.dtype {half[cfg.mixed_precision]} (as diffusers' scripts) or float32"
        )
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(cfg.seed)
    output_plan(cfg)  # refuse a bad output_dir now; `fit` writes to it once the data and model are known good
    return accelerator


# ------------------------------------------------------------------------------------------------------ output dir
RUN_FILE = "run.json"
"""The settings a run was started with, in output_dir: what a later command may resume, and the mark of our folder."""
CADENCE_KEYS = frozenset(
    {"max_steps", "log_every", "validation.every", "checkpoint_every", "checkpoints_keep", "resume", "overwrite"}
)
"""Settings a resumed run may change: how long it runs and how often it logs, validates and checkpoints."""


def run_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The flattened config minus the cadence keys: what must be equal for a run to be resumed."""
    return {k: v for k, v in _flat(to_dict(cfg)).items() if k not in CADENCE_KEYS}


def output_plan(cfg: TrainConfig) -> str:
    """What training does with output_dir: "fresh" (absent or empty), "resume" (our run with the same settings and a
    checkpoint to continue), "replace" (our run, replaced whole: same settings without a checkpoint, or --overwrite).
    Anything else is a one-line UserError: a folder we did not write, another run's settings, resume: none over a run.
    Read-only, so every process decides the same."""
    out = Path(cfg.output_dir)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "fresh"
    recorded = out / RUN_FILE
    if not recorded.is_file():
        what = "a file" if not out.is_dir() else "a folder this command did not write (no run.json)"
        raise UserError(f"output_dir {out} is {what}: choose a new output_dir (nothing there is replaced)")
    before = json.loads(recorded.read_text())
    now = run_settings(cfg)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed and not cfg.overwrite:
        shown = ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else "")
        raise UserError(
            f"output_dir {out} holds a run with other settings ({shown} differ): rerun with its settings to resume "
            "it, choose a new output_dir, or pass --overwrite to replace it"
        )
    if cfg.overwrite:
        return "replace"
    if cfg.resume == "none":
        raise UserError(
            f"output_dir {out} holds a run and resume: none would replace it: pass --overwrite, choose a new "
            "output_dir, or resume it (resume: auto)"
        )
    return "resume" if resolve_resume(out, cfg.resume) is not None else "replace"


def prepare_output_dir(cfg: TrainConfig, accelerator) -> None:
    """Check output_dir (`output_plan`), then (main process) empty a replaced run, record this run's settings, and
    on resume drop the metrics the interrupted run logged after its checkpoint."""
    plan = output_plan(cfg)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        if plan == "replace":
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        from diffalign.io import write_text_atomic

        write_text_atomic(out / RUN_FILE, json.dumps(run_settings(cfg), indent=2, sort_keys=True))
        if plan == "resume":
            keep_metrics_until(out / "metrics.jsonl", checkpoint_step(resolve_resume(out, cfg.resume)))
    accelerator.wait_for_everyone()


def checkpoint_step(folder: Path) -> int:
    """The optimizer step a complete checkpoint was written at."""
    return int(json.loads((folder / CHECKPOINT_MARKER).read_text())["step"])


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the records of metrics.jsonl logged after `step` (the resumed run logs them again)."""
    if path.is_file():
        from diffalign.io import write_text_atomic

        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so another `Accelerator` can be made in this process (training
    several runs in one process: the demo, the acceptance scripts, tests)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def load_model(cfg: TrainConfig, accelerator) -> tuple[Family, list[torch.nn.Parameter]]:
    """The model family of `cfg.model` on this process's device, with its trainable weights (LoRA or full) and
    gradient checkpointing as configured."""
    family = load_family(
        cfg.model.name,
        dtype=cfg.model.dtype,
        device=accelerator.device,
        revision=cfg.model.revision,
        seed=cfg.seed,
        vae=cfg.model.vae,
    )
    params = add_trainable(family, cfg.lora, cfg.seed)
    if cfg.gradient_checkpointing:
        family.denoiser.enable_gradient_checkpointing()
    return family, params


def check_rewards(cfg: TrainConfig) -> None:
    """Parse the validation reward specs and check `best_by` / `early_stop` against them (a bad one is a UserError
    before any model loads)."""
    from diffalign.rewards import parse_spec

    for spec in (cfg.validation.reward, cfg.validation.heldout_reward):
        if spec:
            parse_spec(spec)
    check_best_by(cfg.validation)


def check_best_by(validation: ValidationConfig) -> None:
    """`best_by` names a metric the validation logs (val/reward... or val/heldout...), and `early_stop` needs it."""
    if validation.early_stop and not validation.best_by:
        raise UserError("validation.early_stop needs validation.best_by (the metric to watch, e.g. val/heldout)")
    if not validation.best_by:
        return
    specs = {"val/reward": validation.reward, "val/heldout": validation.heldout_reward}
    root = "/".join(validation.best_by.split("/")[:2])
    if root not in specs:
        raise UserError(
            f"validation.best_by: {validation.best_by!r} is not a validation metric; use val/reward or val/heldout "
            "(or one of their components, e.g. val/heldout/all_correct)"
        )
    if not validation.prompts or not specs[root]:
        key = "reward" if root == "val/reward" else "heldout_reward"
        raise UserError(f"validation.best_by: {validation.best_by} needs validation.prompts and validation.{key}")
    if validation.early_stop and validation.every == 0:
        raise UserError("validation.early_stop needs validation.every > 0 (validation runs only at the end otherwise)")


def model_path(cfg: TrainConfig) -> str:
    """What `cfg.model` resolves to (local folder or hub id), e.g. to key a cache on."""
    from diffalign.hub import resolve_model

    return resolve_model(cfg.model.name, cfg.model.revision)


def resolution_of(cfg: TrainConfig, family: Family) -> int:
    """The training/sampling resolution: the config's, else the model's default, checked against the model."""
    return family.check_resolution(
        cfg.model.resolution or family.sampling_defaults["resolution"] or family.native_resolution
    )


def add_trainable(family: Family, lora: LoraConfig, seed: int) -> list[torch.nn.Parameter]:
    """LoRA adapter (default) or full fine-tune of the denoiser; VAE and text encoders frozen either way."""
    torch.manual_seed(seed)  # the LoRA A init is the same on every process
    if lora.enabled:
        return family.add_lora(rank=lora.rank, alpha=lora.alpha, targets=lora.targets, dropout=lora.dropout)
    return family.enable_full_finetune()


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW (default), Adafactor (SF-DPO's full fine-tune choice) or SGD."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=cfg.weight_decay
        )
    return torch.optim.SGD(params, lr=lr, weight_decay=cfg.weight_decay)


def build_lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """diffusers' schedules, stepped once per optimizer step on every process (not prepared by accelerate, which
    would step it once per process)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.optim.lr_scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=cfg.max_steps
    )


def effective_lr(cfg: TrainConfig, num_processes: int) -> float:
    """cfg.optim.lr, times batch x accumulation x processes when optim.scale_lr is on."""
    scale = cfg.batch_size * cfg.gradient_accumulation_steps * num_processes if cfg.optim.scale_lr else 1
    return cfg.optim.lr * scale


# ----------------------------------------------------------------------------------------------------- train state
@dataclass
class BestTracker:
    """Watches one validation metric, higher is better (`validation.best_by`, e.g. a held-out reward): its best value
    and the step it was reached at, and for how many validations in a row it has fallen (`validation.early_stop`)."""

    metric: str | None = None
    best: float | None = None
    best_step: int | None = None
    previous: float | None = None
    falls: int = 0

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Record the validation `metrics` of `step`; True when the watched metric reached a new best."""
        if self.metric not in metrics:
            logged = ", ".join(sorted(metrics)) or "none"
            raise UserError(f"validation.best_by: {self.metric!r} is not among the validation metrics ({logged})")
        value = float(metrics[self.metric])
        self.falls = self.falls + 1 if self.previous is not None and value < self.previous else 0
        self.previous = value
        if self.best is None or value > self.best:
            self.best, self.best_step = value, step
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "previous": self.previous, "falls": self.falls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.previous, self.falls = state["previous"], state["falls"]


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


# ------------------------------------------------------------------------------------------------------ checkpoints
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


# ---------------------------------------------------------------------------------------------------------- logging
class RunLog:
    """Metrics to the accelerate trackers and to `metrics.jsonl` (main process), one record per log call."""

    def __init__(self, accelerator, cfg: TrainConfig):
        self.accelerator = accelerator
        self.path = Path(cfg.output_dir) / "metrics.jsonl"
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.report_to != "none":
            accelerator.init_trackers("diffalign", config=_flat(to_dict(cfg)))

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


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


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


# ------------------------------------------------------------------------------------------------------- validation
def image_grid(images: Tensor, columns: int | None = None) -> Tensor:
    """[N,3,H,W] -> one [3, rows*H, columns*W] grid image."""
    n = images.shape[0]
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    pad = torch.zeros(rows * columns - n, *images.shape[1:], dtype=images.dtype)
    full = torch.cat([images, pad]).reshape(rows, columns, *images.shape[1:])
    return full.permute(2, 0, 3, 1, 4).reshape(images.shape[1], rows * images.shape[2], columns * images.shape[3])


class Validator:
    """Samples fixed prompts with fixed seeds every `validation.every` steps, scores them with the validation reward
    and the held-out reward (each with its components, e.g. toy-gold's per-attribute accuracies), logs the numbers
    and saves a grid (main process only)."""

    def __init__(self, cfg: TrainConfig, family: Family):
        self.cfg, self.family = cfg.validation, family
        self.output = Path(cfg.output_dir) / "validation"
        self.prompts = list(self.cfg.prompts) if self.cfg.enabled else []
        self.rewards = {}
        if self.prompts:
            from diffalign.rewards import load_reward

            for name, spec in (("reward", self.cfg.reward), ("heldout", self.cfg.heldout_reward)):
                if spec:
                    self.rewards[name] = load_reward(spec, device=family.device)

    @property
    def enabled(self) -> bool:
        return bool(self.prompts)

    def due(self, step: int, last: bool) -> bool:
        """Whether to validate after optimizer step `step` (0 = before training)."""
        return self.enabled and (last or (self.cfg.every > 0 and step % self.cfg.every == 0))

    @torch.no_grad()
    def run(self, step: int) -> dict[str, float]:
        from diffalign.infer.sample import sample_images
        from diffalign.io import save_png

        prompts = [p for p in self.prompts for _ in range(self.cfg.num_images)]
        seeds = [self.cfg.seed + i for i in range(len(prompts))]
        with self.family.calling(self.family.denoiser):  # never the DDP wrapper: only the main process samples
            images = sample_images(
                self.family,
                prompts,
                seeds,
                num_steps=self.cfg.num_steps,
                guidance_scale=self.cfg.guidance_scale,
                negative_prompt=self.cfg.negative_prompt,
                batch_size=32,
                progress=True,
                description=f"validation at step {step}",
            )
        metrics: dict[str, float] = {}
        for name, reward in self.rewards.items():
            metrics.update(reward_metrics(f"val/{name}", reward, images.to(reward.device), prompts))
        save_png(image_grid(images), self.output / f"step-{step:06d}.png")
        return metrics


def reward_metrics(prefix: str, reward, images: Tensor, prompts: list[str]) -> dict[str, float]:
    """{prefix: mean score, prefix/<component>: mean of each other component} of `reward` on `images`."""
    components = reward.components(images, prompts)
    metrics = {prefix: reward.combine(components).float().mean().item()}
    for label, values in components.items():
        if label != reward.label:
            metrics[f"{prefix}/{label}"] = values.float().mean().item()
    return metrics


# ------------------------------------------------------------------------------------------------------------ final
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


BEST_DIR, BEST_MARKER = "best", "diffalign_best.json"


def best_record(best: BestTracker) -> dict[str, Any]:
    """What `diffalign_best.json` and summary.json say of the best weights: metric, value, step."""
    return {"metric": best.metric, "value": best.best, "step": best.best_step}


def save_best(family: Family, cfg: TrainConfig, best: BestTracker) -> Path:
    """The trainable weights now (a new best of `best.metric`) into output_dir/best, with `diffalign_best.json`
    (metric, value, step) inside the folder; main process only."""
    folder = Path(cfg.output_dir) / BEST_DIR
    save_trainable(family, cfg, folder, {BEST_MARKER: json.dumps(best_record(best))})
    return folder


def agree(accelerator, decision: bool) -> bool:
    """The main process's `decision`, on every process (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return decision
    from accelerate.utils import broadcast_object_list

    return bool(broadcast_object_list([decision], from_process=0)[0])


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
