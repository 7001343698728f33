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

The shared loop (`diffalign.train.loop.fit`) runs it unchanged: the rollout is the batch source, which samples a new
rollout when the last one is used up. Checkpoints fall on rollout boundaries (`checkpoint_every` must be a multiple of
the optimizer steps per rollout): a rollout's noise comes from a generator seeded by (seed, process, rollout index),
so a resumed run samples exactly the rollout an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from diffalign.config import OptimConfig, PromptConfig, TrainConfig, bounded
from diffalign.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from diffalign.models import Cond, Family, Schedule
    from diffalign.rewards import Reward


@dataclass
class GrpoConfig:
    """GRPO / DDPO / Flow-GRPO. "DDPO" below is kvablack/ddpo-pytorch 1958463 `config/base.py`; "Flow-GRPO" is
    yifan123/flow_grpo ac4c86e `config/base.py` and `config/grpo.py` (`pickscore_sd3`)."""

    reward: str = ""
    """Reward spec to maximise, differentiable or not (e.g. jpeg, pickscore, hpsv2=1,aesthetic=0.05)."""
    prompts_per_rollout: int = bounded(8, ge=1)
    """Prompts P sampled per rollout and process (Flow-GRPO: 48 groups per epoch over 32 GPUs)."""
    group_size: int = bounded(8, ge=1)
    """Images G per prompt (Flow-GRPO `num_image_per_prompt` 24; DDPO has no groups)."""
    inner_epochs: int = bounded(1, ge=1)
    """Passes K over each rollout (DDPO and Flow-GRPO `num_inner_epochs` 1)."""
    advantages: Literal["group", "prompt_stats"] = "group"
    """group: per prompt group within the rollout (GRPO; Flow-GRPO's tracker, cleared every epoch); prompt_stats:
    DDPO's per-prompt running history (`stats_buffer`, `stats_min_count`)."""
    global_std: bool = False
    """Divide by the std of all the rollout's rewards instead of the group's (Flow-GRPO `global_std` True)."""
    per_reward: bool = False
    """With a weighted mix, normalise each reward on its own and sum the weighted advantages (instead of the
    advantage of the weighted sum)."""
    stats_buffer: int = bounded(16, ge=1)
    """prompt_stats: rewards kept per prompt (DDPO `buffer_size` 16)."""
    stats_min_count: int = bounded(16, ge=1)
    """prompt_stats: below this many, normalise by the whole batch (DDPO `min_count` 16)."""
    num_steps: int | None = bounded(None, ge=1)
    """Sampling steps of a rollout; default: the model's (DDPO 50, Flow-GRPO 10)."""
    guidance_scale: float | None = bounded(None, ge=0)
    """CFG while sampling and training; default: the model's (DDPO 5.0, Flow-GRPO 4.5)."""
    negative_prompt: str | None = None
    """CFG negative prompt; None: the model's stock default (the empty prompt)."""
    noise_level: float | None = bounded(None, gt=0)
    """The stochastic sampler's noise: DDIM η on UNets (DDPO 1.0), the SDE's a on flow models (Flow-GRPO 0.7);
    default: the family's."""
    sde: Literal["default", "ddim", "flow_sde", "cps"] = "default"
    """The stochastic step: default (UNets: ddim; flow models: flow_sde, Flow-GRPO's), or cps on flow models
    (coefficients-preserving sampling)."""
    window_start: int = bounded(0, ge=0)
    """First stochastic step (MixGRPO / Flow-GRPO-Fast: an SDE window, the ODE elsewhere)."""
    window_size: int | None = bounded(None, ge=1)
    """Stochastic steps from `window_start` (default: all the rest)."""
    timestep_fraction: float = bounded(1.0, gt=0, le=1)
    """The first int(fraction · window) stochastic steps are trained, at least one (DDPO 1.0, Flow-GRPO 0.99)."""
    clip_range: float = bounded(1e-4, gt=0)
    """PPO ratio clip ε (DDPO and Flow-GRPO 1e-4)."""
    adv_clip: float = bounded(5.0, gt=0)
    """Advantages clipped to ±adv_clip (DDPO and Flow-GRPO `adv_clip_max` 5)."""
    kl_weight: float = bounded(0.0, ge=0)
    """β of the KL to the reference (the model without the LoRA): DDPO none, Flow-GRPO 0.01 (PickScore) / 0.04."""
    log_prob_reduce: Literal["mean", "sum"] = "mean"
    """A step's log-probability: mean over the latent's dimensions (DDPO, Flow-GRPO) or the sum."""
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


def updates_per_rollout(cfg: Config) -> int:
    """Optimizer steps per rollout; a UserError unless the rollout splits into whole optimizer steps."""
    images = cfg.grpo.prompts_per_rollout * cfg.grpo.group_size
    per_update = cfg.batch_size * cfg.gradient_accumulation_steps
    if images % per_update:
        raise UserError(
            f"a rollout of {images} images (grpo.prompts_per_rollout x grpo.group_size) does not split into optimizer "
            f"steps of {per_update} (batch_size x gradient_accumulation_steps): make it a multiple"
        )
    return cfg.grpo.inner_epochs * images // per_update


def check_config(cfg: Config) -> None:
    """What can be checked before any model loads: the reward parses, the rollout splits into optimizer steps,
    checkpoints fall on rollout boundaries, the validation rewards parse."""
    from diffalign.rewards import parse_spec
    from diffalign.train import validation

    if not cfg.grpo.reward:
        raise UserError("grpo.reward: give the reward to maximise, e.g. grpo.reward=pickscore (any reward, jpeg too)")
    parse_spec(cfg.grpo.reward)
    updates = updates_per_rollout(cfg)
    if cfg.checkpoint_every % updates:
        raise UserError(
            f"checkpoint_every={cfg.checkpoint_every}: grpo checkpoints fall on rollout boundaries, every {updates} "
            "optimizer steps here: make it a multiple of that (or 0)"
        )
    validation.check_rewards(cfg)


def trained_steps(num_steps: int, settings: GrpoConfig) -> tuple[range, list[int]]:
    """(the stochastic window, the steps of it that are trained)."""
    if settings.window_start >= num_steps:
        raise UserError(f"grpo.window_start={settings.window_start}: the sampler has {num_steps} steps")
    end = num_steps if settings.window_size is None else min(num_steps, settings.window_start + settings.window_size)
    window = range(settings.window_start, end)
    count = max(1, int(len(window) * settings.timestep_fraction))
    return window, list(window)[:count]


def rollout_generator(seed: int, rank: int, index: int) -> torch.Generator:
    """The noise of rollout `index` on process `rank`: the same in a resumed run as in an uninterrupted one."""
    import torch

    return torch.Generator().manual_seed((seed * 1000 + rank) * 1_000_003 + index)


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
    metrics: dict[str, Tensor]
    """What a user watches about the rollout (reward mean/std per reward, zero-spread groups), logged with every
    update it feeds."""


class RolloutBatches:
    """The batch source of `fit`: micro-batches (images x one trained step) of the current rollout, a new rollout
    sampled with the current policy when the last one is used up. Its position counts the prompts of the rollouts
    started (a checkpoint at a rollout boundary resumes at the next rollout)."""

    unit = "prompts"

    def __init__(self, recipe: GrpoRecipe, position: int):
        if position % recipe.settings.prompts_per_rollout:
            raise UserError(f"grpo: data position {position} is not on a rollout boundary (checkpoint mid-rollout?)")
        self.recipe = recipe
        self.index = position // recipe.settings.prompts_per_rollout
        self.prompts = recipe.prompt_source(position)
        self.queue: list[dict[str, Any]] = []

    def __iter__(self) -> RolloutBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        if not self.queue:
            self.queue = self.recipe.micro_batches(self.recipe.sample(next(self.prompts), self.index), self.index)
            self.index += 1
        return self.queue.pop(0)

    def advance(self, batch: dict[str, Any]) -> int:
        """P at the first micro-batch of a rollout, 0 after."""
        return self.recipe.settings.prompts_per_rollout if batch["first"] else 0

    def skipped(self, batch: dict[str, Any]) -> int:
        return 0


@dataclass
class GrpoRecipe:
    """What a GRPO run holds between its rollouts and updates."""

    cfg: Config
    accelerator: Any
    family: Family
    reward: Reward
    uncond: Cond | None
    schedule: Schedule
    window: range
    trained: list[int]
    noise_level: float
    guidance_scale: float
    resolution: int
    prompts: list[str]
    stats: Any = None
    """The PromptStats of `advantages: prompt_stats` (registered for checkpointing)."""

    @property
    def settings(self) -> GrpoConfig:
        return self.cfg.grpo

    def prompt_source(self, position: int):
        """Batches of P prompts of this process, from `position`."""
        from diffalign.data.loader import PromptBatches

        return PromptBatches(
            self.prompts, self.settings.prompts_per_rollout, self.cfg.seed, position=position,
            rank=self.accelerator.process_index, world=self.accelerator.num_processes, shuffle=self.cfg.data.shuffle,
        )  # fmt: skip

    def sample(self, prompts: list[str], index: int) -> Rollout:
        """Sample G images per prompt with the current policy, score them, and compute the advantages."""
        import torch

        from diffalign.models import cond_select

        family, settings = self.family, self.settings
        generator = rollout_generator(self.cfg.seed, self.accelerator.process_index, index)
        images_prompts = [p for p in prompts for _ in range(settings.group_size)]
        with torch.no_grad():  # each prompt once, its rows repeated for its group
            cond = cond_select(
                family.encode_prompts(prompts), torch.arange(len(prompts)).repeat_interleave(settings.group_size)
            )
        latents, log_probs, components = [], [], []
        with torch.no_grad(), self.accelerator.autocast():
            for chunk in torch.arange(len(images_prompts)).split(self.cfg.batch_size):
                noise = family.initial_noise(len(chunk), self.resolution, generator)
                trajectory = family.rollout(
                    cond_select(cond, chunk), self.uncond, latents=noise, num_steps=len(self.schedule),
                    guidance_scale=self.guidance_scale, noise_level=self.noise_level, sde=settings.sde,
                    window=self.window, generator=generator, reduce=settings.log_prob_reduce,
                )  # fmt: skip
                images = family.decode(trajectory.latents[:, -1])
                chunk_prompts = [images_prompts[i] for i in chunk]
                components.append(self.reward.components(images.to(self.reward.device), chunk_prompts))
                latents.append(trajectory.latents)
                log_probs.append(trajectory.log_probs)
        scores = {k: torch.cat([c[k] for c in components]).float() for k in components[0]}
        advantages, metrics = self.advantages(scores, images_prompts)
        return Rollout(images_prompts, cond, torch.cat(latents), torch.cat(log_probs), advantages, metrics)

    def advantages(self, scores: dict[str, Tensor], prompts: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """This process's advantages from the rewards of every process (gathered, each image counted once), and
        the rollout's metrics."""
        import torch
        from accelerate.utils import gather_object

        from diffalign.losses.grpo import group_advantages, weighted_advantages, zero_spread_fraction

        settings, accelerator = self.settings, self.accelerator
        device = accelerator.device
        gathered = {k: accelerator.gather(v.to(device)).cpu() for k, v in scores.items()}
        total = self.reward.combine(gathered).float().cpu()
        n, rank = len(prompts), accelerator.process_index
        groups = torch.arange(len(total) // settings.group_size).repeat_interleave(settings.group_size)
        if settings.advantages == "prompt_stats":
            all_prompts = gather_object(prompts) if accelerator.num_processes > 1 else prompts
            advantages = self.stats.update(all_prompts, total)
        elif settings.per_reward:
            weights = self.reward.weights_by_label()
            advantages = weighted_advantages(gathered, weights, groups, global_std=settings.global_std)
        else:
            advantages = group_advantages(total, groups, global_std=settings.global_std)
        metrics = {
            "reward": total.mean(),
            "reward_std": total.std(unbiased=False),
            "zero_spread_groups": torch.tensor(zero_spread_fraction(total, groups)),
        }
        for label, values in gathered.items():
            if label != self.reward.label:
                metrics[f"reward/{label}"] = values.mean()
                metrics[f"reward_std/{label}"] = values.std(unbiased=False)
        return advantages[rank * n : (rank + 1) * n], {k: v.float() for k, v in metrics.items()}

    def micro_batches(self, rollout: Rollout, index: int) -> list[dict[str, Any]]:
        """The rollout's micro-batches in training order: per inner epoch a seeded shuffle of the images, per
        image micro-batch every trained step."""
        import torch

        generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + index)
        batches = []
        for _ in range(self.settings.inner_epochs):
            order = torch.randperm(len(rollout.prompts), generator=generator)
            for chunk in order.split(self.cfg.batch_size):
                for i in self.trained:
                    batches.append({"rollout": rollout, "images": chunk, "step": i, "first": not batches})
        return batches

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The PPO-clipped loss (+ β KL to the reference) of one micro-batch at one trained step."""
        from diffalign.losses.grpo import kl_to_reference, ppo_loss
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
        loss, metrics = ppo_loss(log_prob, old, advantages, settings.clip_range, settings.adv_clip)
        metrics["policy_loss"] = loss.detach()
        if settings.kl_weight > 0:
            with family.reference():
                _, reference_mean, _ = transition(detach_uncond=False)
            kl = kl_to_reference(mean, reference_mean, std)
            loss = loss + settings.kl_weight * kl
            metrics["kl"] = kl.detach()
        return loss, {**metrics, **{k: v.to(log_prob.device) for k, v in rollout.metrics.items()}}


def train(cfg: Config) -> Path:
    """Run the recipe; returns the folder of the final LoRA (or full denoiser)."""
    import torch

    from diffalign.data.prompts import load_prompts
    from diffalign.losses.grpo import PromptStats
    from diffalign.rewards import load_reward
    from diffalign.train import setup, validation
    from diffalign.train.loop import fit
    from diffalign.train.sampler import resolve_sampler

    cfg = validation.like_training(cfg, cfg.grpo.reward, cfg.grpo.negative_prompt)
    check_config(cfg)
    prompts = load_prompts(cfg.data)
    settings = cfg.grpo
    accelerator = setup.make_accelerator(cfg)
    family, params = setup.load_model(cfg, accelerator)
    sampler = resolve_sampler(
        family, setup.resolution_of(cfg, family), num_steps=settings.num_steps,
        guidance_scale=settings.guidance_scale, eta=0.0, section="grpo",
    )  # fmt: skip
    window, trained = trained_steps(sampler.num_steps, settings)
    # one optimizer step: every trained step of `gradient_accumulation_steps` image micro-batches (as both peers)
    accelerator.gradient_accumulation_steps = cfg.gradient_accumulation_steps * len(trained)
    with torch.no_grad():
        uncond = family.encode_negative(settings.negative_prompt) if sampler.guidance_scale != 1.0 else None
    stats = None
    if settings.advantages == "prompt_stats":
        stats = PromptStats(settings.stats_buffer, settings.stats_min_count)
        accelerator.register_for_checkpointing(stats)
    shape_only = torch.zeros(family.latent_shape(1, sampler.resolution), device=family.device)  # the grid needs a shape
    recipe = GrpoRecipe(
        cfg=cfg, accelerator=accelerator, family=family, reward=load_reward(settings.reward, device=family.device),
        uncond=uncond, schedule=family.schedule(sampler.num_steps, shape_only),
        window=window, trained=trained,
        noise_level=settings.noise_level if settings.noise_level is not None else family.default_noise_level,
        guidance_scale=sampler.guidance_scale, resolution=sampler.resolution, prompts=prompts, stats=stats,
    )  # fmt: skip

    def step(batch: dict[str, Any], generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        return recipe.loss(batch)

    def make_batches(position: int) -> RolloutBatches:
        return RolloutBatches(recipe, position)

    return fit(cfg, accelerator, family, params, make_batches, step, bar_metric="reward")
