"""Validation during training: fixed prompts and seeds sampled every `validation.every` steps and scored with the
validation and held-out rewards, and the guard built on it — `validation.best_by` keeps the best weights,
`validation.early_stop` stops a run whose metric keeps falling."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffalign.config import TrainConfig, ValidationConfig
from diffalign.errors import UserError
from diffalign.models import Family
from diffalign.train.outputs import save_trainable


def check_rewards(cfg: TrainConfig) -> None:
    """Parse the validation reward specs and check `best_by` / `early_stop` against them (a bad one is a UserError
    before any model loads)."""
    from diffalign.rewards import parse_spec

    for spec in (cfg.validation.reward, cfg.validation.heldout_reward):
        if spec:
            parse_spec(spec)
    check_best_by(cfg.validation)


def like_training(cfg: TrainConfig, reward: str, negative_prompt: str | None) -> TrainConfig:
    """`cfg` with the validation reward and negative prompt, where unset, those of training: the reward a method
    optimises and the negative prompt it samples with (methods that sample while they train)."""
    import dataclasses

    validation = cfg.validation
    if validation.prompts and not validation.reward:
        validation = dataclasses.replace(validation, reward=reward)
    if validation.negative_prompt is None:
        validation = dataclasses.replace(validation, negative_prompt=negative_prompt)
    return dataclasses.replace(cfg, validation=validation)


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
        from diffalign.io import image_grid, save_png

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


def best_record(best: BestTracker) -> dict[str, Any]:
    """What `diffalign_best.json` and summary.json say of the best weights: metric, value, step."""
    return {"metric": best.metric, "value": best.best, "step": best.best_step}


BEST_DIR, BEST_MARKER = "best", "diffalign_best.json"


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
