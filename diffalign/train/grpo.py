"""Online RL recipe `method: grpo`: DDPO / GRPO on the UNet families (DDIM with η > 0), Flow-GRPO on the flow families
(an SDE with the flow's marginals), one loop for all of them.

    diffalign train configs/grpo/toy.yaml                 # CPU, minutes
    accelerate launch -m diffalign train configs/grpo/sd3.yaml

A rollout samples `group_size` images for each of `prompts_per_rollout` prompts (per process) with the current policy,
recording every latent and the log-probability of each stochastic step (`Family.rollout`), and scores the images with
any reward spec (differentiable or not: `jpeg` works). Advantages are the rewards normalised per prompt group (over
all processes: the rewards are gathered) or by DDPO's per-prompt running statistics. Then `inner_epochs` passes over
the rollout in micro-batches of `batch_size` images, one micro-batch per trained step (the accelerator accumulates
over the trained steps and `gradient_accumulation_steps` image micro-batches per optimizer step), each with the
PPO-clipped ratio loss and the KL to the reference (`diffalign.losses.grpo`).

The rollout settings, the advantages, the batch source and the run are shared with `method: nft`
(`diffalign.train.online`); the shared loop (`diffalign.train.loop.fit`) runs it unchanged, checkpoints on rollout
boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from diffalign.config import OptimConfig, PromptConfig, TrainConfig, bounded
from diffalign.errors import UserError
from diffalign.train.online import OnlineRecipe, RolloutSettings, rollout_generator

if TYPE_CHECKING:
    from torch import Tensor

    from diffalign.models import Cond


@dataclass
class GrpoConfig(RolloutSettings):
    """GRPO / DDPO / Flow-GRPO. "DDPO" below is kvablack/ddpo-pytorch 1958463 `config/base.py`; "Flow-GRPO" is
    yifan123/flow_grpo ac4c86e `config/base.py` and `config/grpo.py` (`pickscore_sd3`)."""

    guidance_scale: float | None = bounded(None, ge=0)
    """CFG while sampling and training; default: the model's (DDPO 5.0, Flow-GRPO 4.5)."""
    noise_level: float | None = bounded(None, gt=0)
    """The stochastic sampler's noise: DDIM η on UNets (DDPO 1.0), the SDE's a on flow models (Flow-GRPO 0.7);
    default: the family's."""
    sde: Literal["default", "ddim", "flow_sde", "cps"] = "default"
    """The stochastic step: default (UNets: ddim; flow models: flow_sde, Flow-GRPO's), or cps on flow models
    (coefficients-preserving sampling)."""
    same_noise: bool = False
    """Every image of a prompt's group starts from the same initial noise, so the group's rewards differ only by
    the sampler's own noise (DanceGRPO `--init_same_noise`, on in all its scripts; DDPO, Flow-GRPO: off)."""
    window_start: int = bounded(0, ge=0)
    """First stochastic step (MixGRPO / Flow-GRPO-Fast: an SDE window, the ODE elsewhere)."""
    window_size: int | None = bounded(None, ge=1)
    """Stochastic steps from `window_start` (default: all the rest)."""
    timestep_fraction: float = bounded(1.0, gt=0, le=1)
    """The first int(fraction · window) stochastic steps are trained, at least one (DDPO 1.0, Flow-GRPO 0.99)."""
    clip_range: float = bounded(1e-4, gt=0)
    """PPO ratio clip ε (DDPO and Flow-GRPO 1e-4)."""
    log_prob_reduce: Literal["mean", "sum"] = "mean"
    """A step's log-probability: mean over the latent's dimensions (DDPO, Flow-GRPO) or the sum."""
    guard: bool = False
    """GRPO-Guard (Wang et al. 2025, arXiv 2510.22319; verl-omni `grpo_guard`): the log-ratio normalised per step
    (centred, the same spread at every step: `diffalign.losses.grpo.ratio_norm`) and each step's loss weighted by
    1 / (its size in flow time), against the over-optimisation plain clipping lets through. Keeps the rollout's
    means (one more latent per step)."""
    train_cfg: bool = True
    """Train through CFG, the unconditional branch detached (Flow-GRPO `train.cfg`); off: the conditional
    prediction alone in the update (the rollout keeps its CFG, so the first ratio is then not 1)."""


@dataclass
class Config(TrainConfig):
    """`method: grpo`: the shared settings plus the rollout, the advantages, the PPO objective and the prompts.
    `batch_size` is the images per training micro-batch (and per sampling chunk of a rollout)."""

    method: Literal["grpo"] = "grpo"
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    data: PromptConfig = field(default_factory=PromptConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=1e-4))
    """DDPO and Flow-GRPO: AdamW, lr 3e-4, weight decay 1e-4, eps 1e-8, gradient clipping 1.0."""


def trained_steps(num_steps: int, settings: GrpoConfig) -> tuple[range, list[int]]:
    """(the stochastic window, the steps of it that are trained)."""
    if settings.window_start >= num_steps:
        raise UserError(f"grpo.window_start={settings.window_start}: the sampler has {num_steps} steps")
    end = num_steps if settings.window_size is None else min(num_steps, settings.window_start + settings.window_size)
    window = range(settings.window_start, end)
    count = max(1, int(len(window) * settings.timestep_fraction))
    return window, list(window)[:count]


@dataclass
class Rollout:
    """One rollout of this process: what its updates read."""

    prompts: list[str]
    cond: Cond
    latents: Tensor
    """[n, N+1, ...] every latent of every trajectory."""
    log_probs: Tensor
    """[n, N] the rollout policy's log-probabilities."""
    advantages: Tensor
    """[n]"""
    means: Tensor | None
    """[n, N, ...] the rollout policy's step means (GRPO-Guard), else None."""
    metrics: dict[str, Tensor]
    """What a user watches about the rollout (reward mean/std per reward, zero-spread groups), logged with every
    update it feeds."""


@dataclass
class GrpoRecipe(OnlineRecipe):
    """What a GRPO run holds between its rollouts and updates: the shared rollout state plus the stochastic window
    and its noise level."""

    window: range = range(0)
    noise_level: float = 0.0

    def sample(self, prompts: list[str], index: int) -> Rollout:
        """Sample G images per prompt with the current policy, score them, and compute the advantages."""
        import torch

        from diffalign.models import cond_select

        family, settings = self.family, self.settings
        generator = rollout_generator(self.cfg.seed, self.accelerator.process_index, index)
        images_prompts, cond = self.group_cond(prompts)
        latents, log_probs, means, components = [], [], [], []
        with torch.no_grad(), self.accelerator.autocast():
            for chunk, noise in self.rollout_noise(len(images_prompts), generator, settings.same_noise):
                trajectory = family.rollout(
                    cond_select(cond, chunk), self.uncond, latents=noise, num_steps=len(self.schedule),
                    guidance_scale=self.guidance_scale, noise_level=self.noise_level, sde=settings.sde,
                    window=self.window, generator=generator, reduce=settings.log_prob_reduce,
                )  # fmt: skip
                images = family.decode(trajectory.latents[:, -1])
                components.append(self.score(images, [images_prompts[i] for i in chunk]))
                latents.append(trajectory.latents)
                log_probs.append(trajectory.log_probs)
                means.append(trajectory.means if settings.guard else None)
        advantages, metrics = self.advantages(components, images_prompts)
        kept_means = torch.cat(means) if settings.guard else None
        return Rollout(images_prompts, cond, torch.cat(latents), torch.cat(log_probs), advantages, kept_means, metrics)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The PPO-clipped loss (+ β KL to the reference) of one micro-batch at one trained step."""
        from diffalign.losses.grpo import kl_to_reference, ppo_loss, ratio_norm
        from diffalign.models import cond_select

        family, settings, rollout, i = self.family, self.settings, batch["rollout"], batch["step"]
        images = batch["images"].to(rollout.latents.device)
        x = rollout.latents[images, i].to(family.device)
        x_next = rollout.latents[images, i + 1].to(family.device)
        cond = cond_select(rollout.cond, images)
        t = self.schedule.timesteps[i]
        uncond = self.uncond if settings.train_cfg else None

        def transition(detach_uncond: bool) -> tuple[Tensor, Tensor, Tensor]:
            pred = family.predict(x, t, cond, uncond, self.guidance_scale, detach_uncond=detach_uncond)
            return family.transition_log_prob(
                x, x_next, pred, self.schedule, i, self.noise_level, settings.sde, settings.log_prob_reduce
            )

        log_prob, mean, std = transition(detach_uncond=True)
        old = rollout.log_probs[images, i].to(log_prob.device)
        advantages = rollout.advantages[images].to(log_prob.device)
        shift, scale, weight = 0.0, 1.0, 1.0
        if settings.guard:
            old_mean = rollout.means[images, i].to(mean.device)
            shift, scale = ratio_norm(mean, old_mean, std, settings.log_prob_reduce)
            weight = 1 / family.flow_time_step(self.schedule, i).to(mean.device)
        loss, metrics = ppo_loss(
            log_prob, old, advantages, settings.clip_range, settings.adv_clip, shift=shift, scale=scale
        )
        loss = loss * weight
        metrics["policy_loss"] = loss.detach()
        if settings.kl_weight > 0:
            with family.reference():
                _, reference_mean, _ = transition(detach_uncond=False)
            kl = kl_to_reference(mean, reference_mean, std)
            loss = loss + settings.kl_weight * kl
            metrics["kl"] = kl.detach()
        return loss, {**metrics, **self.metrics_of(rollout, log_prob.device)}


def train(cfg: Config) -> Path:
    """Run the recipe; returns the folder of the final LoRA (or full denoiser)."""
    from diffalign.train import online

    def build(setup: online.Setup) -> GrpoRecipe:
        settings = setup.cfg.grpo
        window, trained = trained_steps(setup.sampler.num_steps, settings)
        noise_level = settings.noise_level if settings.noise_level is not None else setup.family.default_noise_level
        return GrpoRecipe(**setup.common, trained=trained, window=window, noise_level=noise_level)

    return online.train(cfg, build)
