"""AlignProp recipe (Prabhudesai et al. 2023; DRaFT, Clark et al. 2023): backpropagate a differentiable reward through
the sampler into a LoRA (or the full denoiser) of any family.

    diffalign train configs/alignprop/toy.yaml                # CPU, minutes
    accelerate launch -m diffalign train configs/alignprop/sd15.yaml

Per step: fresh noise from the process's generator, the family's sampler (DDIM with η for UNets, Euler for flow) with
CFG, every denoiser call gradient-checkpointed and the steps before the truncation cut-off detached, a checkpointed VAE
decode, the reward, loss = -scale · reward (+ kl_weight · the prediction drift from the base model over the steps that
carry gradient). Memory does not grow with the number of sampling steps: only the latents entering the steps that
carry gradient are kept for the backward pass.

Reward-hacking guards: `validation.heldout_reward` (a second reward logged beside the optimised one), `kl_weight`, and
`validation.best_by` / `validation.early_stop` (keep the best weights by the held-out reward; stop when it falls).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from diffalign.config import OptimConfig, PromptConfig, TrainConfig, bounded
from diffalign.train.sampler import Sampler, checkpointed, resolve_sampler

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from diffalign.models import Cond, Family
    from diffalign.rewards import Reward


@dataclass
class AlignPropConfig:
    """AlignProp / DRaFT: the optimised reward, the sampler, where the gradient is truncated, the regulariser.

    "Official" below is the AlignProp code at its HEAD, mihirp1998/AlignProp b22918a (2024-10-06):
    `config/alignprop_config.py` and the run scripts `hps.sh`, `hps_k1.sh`, `aesthetic.sh`, `aesthetic_k1.sh`. The
    March 2024 code (7f4503f, `config/align_prop.py`) differed: CFG 7.5, η 0, and for the aesthetic run clip 5.0 and
    weight decay 0.1."""

    reward: str = ""
    """Differentiable reward spec to maximise (mixes allowed, e.g. hpsv2=1,aesthetic=0.05; see `diffalign rewards`).
    Official: HPS v2.0 (`HPS_v2_compressed.pt`, hpsv2:version=2.0; diffalign's hpsv2 defaults to v2.1) or the LAION
    aesthetic predictor."""
    reward_scale: float = bounded(1.0, gt=0)
    """loss = -reward_scale · reward (official `loss_coeff` 0.01)."""
    num_steps: int | None = bounded(None, ge=1)
    """Sampling steps N; default: the model's (official `sample_num_steps` 50)."""
    guidance_scale: float | None = bounded(None, ge=0)
    """CFG scale while sampling for training; default: the model's (official `sample_guidance_scale` 5.0; the March
    2024 code 7.5)."""
    negative_prompt: str | None = None
    """The CFG negative prompt while sampling for training (official `negative_prompts`, default none = the empty
    prompt); None: the model's stock default (the empty prompt; zeros on SDXL, as its pipeline)."""
    eta: float | None = bounded(None, ge=0)
    """DDIM η of the UNet families (official `sample_eta` 1.0; the March 2024 code 0); default: the model's. The flow
    families (SD3, FLUX) sample with the deterministic Euler sampler: η must be 0 there."""
    truncation: Literal["last_k", "random", "full", "lv"] = "last_k"
    """Which steps carry gradient: last_k (DRaFT-K, the last `k`; K = 1 is the official `*_k1` runs' `fixed` 49 of
    50), random (official `backprop_strategy` of `hps.sh` / `aesthetic.sh`: one cut-off per batch from
    `random_distribution`), full (all N), lv (DRaFT-LV: none of the chain; `lv_samples` re-noised final steps)."""
    k: int = bounded(1, ge=1)
    """K of last_k (official `*_k1` runs: 1)."""
    random_distribution: Literal["gaussian", "uniform"] = "gaussian"
    """Cut-off of `random`: gaussian (mean `random_mean`·N, std `random_std`·N) or uniform in [random_min·N,
    random_max·N); redrawn until 1 <= cut-off <= N-1."""
    random_mean: float = bounded(0.84, ge=0, le=1)
    """Official gaussian: mean step 42 of 50."""
    random_std: float = bounded(0.1, ge=0)
    """Official gaussian: std 5 of 50 steps."""
    random_min: float = bounded(0.0, ge=0, le=1)
    """Official uniform: `randint(0, 50)`, i.e. [0, N), redrawn to 1..N-1 (commit b576ae7 drew 30..49)."""
    random_max: float = bounded(1.0, ge=0, le=1)
    """End (exclusive) of the uniform cut-off range, as a fraction of N (official 50 of 50)."""
    lv_samples: int = bounded(2, ge=1)
    """DRaFT-LV: how many times the final sample is re-noised to the last step's noise level and denoised again with
    gradient (the reward is averaged over them)."""
    kl_weight: float = bounded(0.0, ge=0)
    """Weight of the KL-style regulariser: mean ||pred_policy - pred_reference||² / (C·H·W) over the steps that carry
    gradient, reference = the model without the LoRA (0 = off; the official code has none)."""
    checkpoint: bool = True
    """Gradient checkpointing of every denoiser call and of the VAE decode (off: faster, memory grows with the steps
    that carry gradient; official: every UNet call checkpointed)."""


@dataclass
class Config(TrainConfig):
    """`method: alignprop`: the shared settings plus the reward, the sampler, the truncation and the prompts."""

    method: Literal["alignprop"] = "alignprop"
    alignprop: AlignPropConfig = field(default_factory=AlignPropConfig)
    data: PromptConfig = field(default_factory=PromptConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=1e-4))
    """Official AlignProp (HEAD b22918a): AdamW, lr 1e-3, weight decay 1e-4, eps 1e-8, gradient clipping 1.0."""


def check_config(cfg: Config) -> None:
    """What can be checked before any model loads: the optimised reward is differentiable (a one-line UserError
    naming it otherwise), the validation rewards parse."""
    from diffalign.errors import UserError
    from diffalign.rewards import parse_differentiable_spec
    from diffalign.train import validation

    if not cfg.alignprop.reward:
        raise UserError("alignprop.reward: give the differentiable reward to maximise, e.g. alignprop.reward=hpsv2")
    parse_differentiable_spec(cfg.alignprop.reward, "alignprop.reward")
    if cfg.alignprop.random_min >= cfg.alignprop.random_max:
        raise UserError("alignprop.random_min must be below alignprop.random_max")
    validation.check_rewards(cfg)


class PredictionRecorder:
    """A `predict` hook for `Family.sample` that records the predictions made with gradient (the steps that carry
    it), so they can be compared with the reference model's at the same inputs afterwards. Recording stops before
    the backward pass, whose checkpoint recomputation calls the hook again."""

    def __init__(self, family: Family):
        self.family = family
        self.recording = True
        self.calls: list[tuple[Tensor, Any, Cond, Cond | None, float, Tensor]] = []

    def __call__(self, x: Tensor, t: Any, cond: Cond, uncond: Cond | None, guidance_scale: float) -> Tensor:
        pred = self.family.predict(x, t, cond, uncond, guidance_scale)
        if self.recording and pred.requires_grad:
            self.calls.append((x.detach(), t, cond, uncond, guidance_scale, pred))
        return pred

    def drift(self) -> Tensor:
        """`prediction_drift` of the recorded predictions from the reference's (LoRA off) at the same inputs."""
        from diffalign.losses.alignprop import prediction_drift

        self.recording = False
        with self.family.reference():
            reference = [self.family.predict(x, t, c, u, g) for x, t, c, u, g, _ in self.calls]
        drift = prediction_drift([call[-1] for call in self.calls], reference)
        self.calls = []
        return drift.to(self.family.device)


def score(family: Family, reward: Reward, latents: Tensor, prompts: list[str], checkpoint: bool) -> dict[str, Tensor]:
    """The reward's components ({label: [B]}) of the decoded `latents`; the VAE decode is checkpointed."""
    images = checkpointed(family.decode, latents, enabled=checkpoint)
    return reward.components(images.to(reward.device), prompts)


def lv_rewards(
    family: Family,
    x0: Tensor,
    cond: Cond,
    uncond: Cond | None,
    sampler: Sampler,
    predict,
    reward: Reward,
    prompts: list[str],
    cfg: AlignPropConfig,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """DRaFT-LV (Clark et al. 2023, Sec. 4): the final sample x0 (no gradient) re-noised `lv_samples` times to the
    noise level of the last sampling step with the model's forward process, each denoised by that last step with
    gradient; the reward components averaged over them."""
    import torch

    schedule = family.schedule(sampler.num_steps, x0)
    last = len(schedule) - 1
    t = schedule.timesteps[last]
    x0 = x0.detach()
    draws: list[dict[str, Tensor]] = []
    for _ in range(cfg.lv_samples):
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        noisy, _ = family.noisy_and_target(x0, noise, t.reshape(1).expand(x0.shape[0]))
        step_noise = None
        if sampler.eta > 0 and family.stochastic_sampler:
            step_noise = torch.randn(x0.shape, generator=generator).to(x0)
        pred = checkpointed(predict, noisy, t, cond, uncond, sampler.guidance_scale, enabled=cfg.checkpoint)
        x = family.step(noisy, pred, schedule, last, eta=sampler.eta, noise=step_noise)
        draws.append(score(family, reward, x, prompts, cfg.checkpoint))
    return {label: torch.stack([d[label] for d in draws]).mean(dim=0) for label in draws[0]}


def alignprop_step(
    family: Family,
    prompts: list[str],
    reward: Reward,
    cfg: AlignPropConfig,
    sampler: Sampler,
    generator: torch.Generator,
    uncond: Cond | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss and metrics of one batch of prompts: sample from fresh noise (drawn from `generator`, as are the sampler
    noise and the random cut-off), decode, score, loss = -scale · reward (+ kl_weight · drift)."""
    import torch

    from diffalign.losses.alignprop import reward_loss, truncation_cutoff

    with torch.no_grad():
        cond = family.encode_prompts(prompts)
    latents = family.initial_noise(len(prompts), sampler.resolution, generator)
    cut = truncation_cutoff(
        cfg.truncation,
        sampler.num_steps,
        k=cfg.k,
        distribution=cfg.random_distribution,
        mean=cfg.random_mean,
        std=cfg.random_std,
        low=cfg.random_min,
        high=cfg.random_max,
        generator=generator,
    )
    recorder = PredictionRecorder(family)
    uncond = uncond if sampler.guidance_scale != 1.0 else None
    x0 = family.sample(
        cond,
        uncond,
        latents=latents,
        num_steps=sampler.num_steps,
        guidance_scale=sampler.guidance_scale,
        eta=sampler.eta,
        generator=generator,
        detach_before=cut,
        checkpoint=cfg.checkpoint,
        predict=recorder,
    )
    if cfg.truncation == "lv":
        components = lv_rewards(family, x0, cond, uncond, sampler, recorder, reward, prompts, cfg, generator)
    else:
        components = score(family, reward, x0, prompts, cfg.checkpoint)
    rewards = reward.combine(components)
    loss = reward_loss(rewards, cfg.reward_scale)
    grad_steps = len(recorder.calls)
    metrics: dict[str, Tensor] = {"reward": rewards.detach().float().mean(), "grad_steps": torch.tensor(grad_steps)}
    for label, values in components.items():
        if label != reward.label:
            metrics[f"reward/{label}"] = values.detach().float().mean()
    if cfg.kl_weight > 0:
        drift = recorder.drift()
        loss = loss + cfg.kl_weight * drift
        metrics["drift"] = drift.detach()
    recorder.recording = False
    return loss, metrics


def train(cfg: Config) -> Path:
    """Run the recipe; returns the folder of the final LoRA (or full denoiser)."""
    import torch

    from diffalign.data.loader import PromptBatches
    from diffalign.data.prompts import load_prompts
    from diffalign.rewards import load_reward
    from diffalign.train import setup, validation
    from diffalign.train.loop import fit

    cfg = validation.like_training(cfg, cfg.alignprop.reward, cfg.alignprop.negative_prompt)
    check_config(cfg)  # a non-differentiable or unknown reward fails here, before any model loads
    prompts = load_prompts(cfg.data)  # so does a missing prompt file
    accelerator = setup.make_accelerator(cfg)
    family, params = setup.load_model(cfg, accelerator)
    settings = cfg.alignprop
    sampler = resolve_sampler(
        family, setup.resolution_of(cfg, family), num_steps=settings.num_steps,
        guidance_scale=settings.guidance_scale, eta=settings.eta, section="alignprop",
    )  # fmt: skip
    reward = load_reward(cfg.alignprop.reward, device=family.device)
    with torch.no_grad():
        uncond = family.encode_negative(cfg.alignprop.negative_prompt) if sampler.guidance_scale != 1.0 else None

    def make_batches(position: int) -> PromptBatches:
        return PromptBatches(
            prompts,
            cfg.batch_size,
            cfg.seed,
            position=position,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            shuffle=cfg.data.shuffle,
        )

    def step(batch: list[str], generator):
        return alignprop_step(family, batch, reward, cfg.alignprop, sampler, generator, uncond)

    return fit(cfg, accelerator, family, params, make_batches, step, bar_metric="reward")
