"""Setting a run up: the accelerator (mixed precision, accumulation, tracker, seed), the model with its trainable
weights (LoRA or the full denoiser), the optimizer and the learning-rate schedule."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from diffalign.config import LoraConfig, OptimConfig, TrainConfig
from diffalign.errors import UserError
from diffalign.models import Family, load_family
from diffalign.train import outputs
from diffalign.train.run_dir import output_plan


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
    if cfg.attention == "xformers":
        check_xformers(accelerator.device)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(cfg.seed)
    output_plan(cfg)  # refuse a bad output_dir now; `fit` writes to it once the data and model are known good
    outputs.check_push(cfg)  # and a push_to_hub that could not upload at the end
    return accelerator


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
    if cfg.attention == "xformers":
        family.denoiser.enable_xformers_memory_efficient_attention()
    if cfg.gradient_checkpointing:
        family.denoiser.enable_gradient_checkpointing()
    return family, params


def check_xformers(device: torch.device) -> None:
    """A UserError unless xformers can run here: a CUDA device and the package importable."""
    if device.type != "cuda":
        raise UserError(f"attention: xformers needs a CUDA GPU (this process runs on {device.type}); use sdpa")
    if importlib.util.find_spec("xformers") is None:
        raise UserError('attention: xformers is not installed (pip install "diffalign[xformers]"); or use sdpa')


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


def model_path(cfg: TrainConfig) -> str:
    """What `cfg.model` resolves to (local folder or hub id), e.g. to key a cache on."""
    from diffalign.hub import resolve_model

    return resolve_model(cfg.model.name, cfg.model.revision)


def resolution_of(cfg: TrainConfig, family: Family) -> int:
    """The training/sampling resolution: the config's, else the model's default, checked against the model."""
    return family.check_resolution(
        cfg.model.resolution or family.sampling_defaults["resolution"] or family.native_resolution
    )
