"""What the online-RL recipes share (`method: grpo`, `method: nft`): the rollout settings, the rollout as a batch
source of the shared loop, the advantages over every process, and one `train` for all of them.

A recipe samples a rollout of `group_size` images for each of `prompts_per_rollout` prompts (per process), scores
them with any reward spec (differentiable or not), turns the rewards into advantages (per prompt group over all
processes, or DDPO's per-prompt running statistics), then trains `inner_epochs` passes over the rollout in
micro-batches of `batch_size` images, one micro-batch per trained slot (a sampler step for GRPO, a forward-process
timestep for NFT). The accelerator accumulates over the trained slots and `gradient_accumulation_steps` image
micro-batches per optimizer step. What differs per recipe is `sample` (how a rollout is drawn and what is kept) and
`loss` (one micro-batch at one slot).

Checkpoints fall on rollout boundaries (`checkpoint_every` must be a multiple of the optimizer steps per rollout): a
rollout's noise comes from a generator seeded by (seed, process, rollout index), so a resumed run samples exactly the
rollout an uninterrupted one would; what a recipe carries across rollouts (DDPO's statistics, NFT's old policy) is
registered for checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from diffalign.config import bounded
from diffalign.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from diffalign.config import TrainConfig
    from diffalign.models import Cond, Family, Schedule
    from diffalign.rewards import Reward


@dataclass
class RolloutSettings:
    """The rollout and advantage settings every online-RL recipe shares. "DDPO" below is kvablack/ddpo-pytorch
    1958463 `config/base.py`; "Flow-GRPO" is yifan123/flow_grpo ac4c86e `config/base.py` and `config/grpo.py`
    (`pickscore_sd3`)."""

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
    """CFG while sampling; default: the model's (DDPO 5.0, Flow-GRPO 4.5)."""
    negative_prompt: str | None = None
    """CFG negative prompt; None: the model's stock default (the empty prompt)."""
    timestep_fraction: float = bounded(1.0, gt=0, le=1)
    """The fraction of the steps that is trained, at least one (DDPO 1.0, Flow-GRPO 0.99)."""
    adv_clip: float = bounded(5.0, gt=0)
    """Advantages clipped to ±adv_clip (DDPO and Flow-GRPO `adv_clip_max` 5)."""
    kl_weight: float = bounded(0.0, ge=0)
    """β of the KL to the reference (the model without the LoRA): DDPO none, Flow-GRPO 0.01 (PickScore) / 0.04."""


def settings_of(cfg: TrainConfig) -> RolloutSettings:
    """The recipe's own section of the config (`cfg.grpo`, `cfg.nft`)."""
    return getattr(cfg, cfg.method)


def updates_per_rollout(cfg: TrainConfig) -> int:
    """Optimizer steps per rollout; a UserError unless the rollout splits into whole optimizer steps."""
    settings = settings_of(cfg)
    images = settings.prompts_per_rollout * settings.group_size
    per_update = cfg.batch_size * cfg.gradient_accumulation_steps
    if images % per_update:
        raise UserError(
            f"a rollout of {images} images ({cfg.method}.prompts_per_rollout x {cfg.method}.group_size) does not "
            f"split into optimizer steps of {per_update} (batch_size x gradient_accumulation_steps): make it a multiple"
        )
    return settings.inner_epochs * images // per_update


def check_config(cfg: TrainConfig) -> None:
    """What can be checked before any model loads: the reward parses, the rollout splits into optimizer steps,
    checkpoints fall on rollout boundaries, the validation rewards parse."""
    from diffalign.rewards import parse_spec
    from diffalign.train import validation

    settings = settings_of(cfg)
    if not settings.reward:
        raise UserError(
            f"{cfg.method}.reward: give the reward to maximise, e.g. {cfg.method}.reward=pickscore (any reward, jpeg "
            "too)"
        )
    parse_spec(settings.reward)
    updates = updates_per_rollout(cfg)
    if cfg.checkpoint_every % updates:
        raise UserError(
            f"checkpoint_every={cfg.checkpoint_every}: {cfg.method} checkpoints fall on rollout boundaries, every "
            f"{updates} optimizer steps here: make it a multiple of that (or 0)"
        )
    validation.check_rewards(cfg)


def rollout_generator(seed: int, rank: int, index: int) -> torch.Generator:
    """The noise of rollout `index` on process `rank`: the same in a resumed run as in an uninterrupted one."""
    import torch

    return torch.Generator().manual_seed((seed * 1000 + rank) * 1_000_003 + index)


class RolloutBatches:
    """The batch source of `fit`: micro-batches (images x one trained slot) of the current rollout, a new rollout
    sampled when the last one is used up. Its position counts the prompts of the rollouts started (a checkpoint at a
    rollout boundary resumes at the next rollout)."""

    unit = "prompts"

    def __init__(self, recipe: OnlineRecipe, position: int):
        if position % recipe.settings.prompts_per_rollout:
            raise UserError(
                f"{recipe.cfg.method}: data position {position} is not on a rollout boundary (checkpoint mid-rollout?)"
            )
        self.recipe = recipe
        self.index = position // recipe.settings.prompts_per_rollout
        self.prompts = recipe.prompt_source(position)
        self.queue: list[dict[str, Any]] = []

    def __iter__(self) -> RolloutBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        if not self.queue:
            rollout = self.recipe.sample(next(self.prompts), self.index)
            self.queue = self.recipe.micro_batches(rollout, self.index)
            self.index += 1
        return self.queue.pop(0)

    def advance(self, batch: dict[str, Any]) -> int:
        """P at the first micro-batch of a rollout, 0 after."""
        return self.recipe.settings.prompts_per_rollout if batch["first"] else 0

    def skipped(self, batch: dict[str, Any]) -> int:
        return 0


@dataclass
class OnlineRecipe:
    """What an online-RL run holds between its rollouts and updates. A recipe subclasses it with `sample(prompts,
    index)` (returning a rollout object with `prompts`, `advantages` [n] and `metrics`) and `loss(batch)`."""

    cfg: Any
    accelerator: Any
    family: Family
    reward: Reward
    uncond: Cond | None
    schedule: Schedule
    """The rollout sampler's schedule."""
    trained: list[int]
    """The slots each image of a rollout is trained on (one micro-batch per slot)."""
    guidance_scale: float
    resolution: int
    prompts: list[str]
    stats: Any = None
    """The PromptStats of `advantages: prompt_stats` (registered for checkpointing)."""

    @property
    def settings(self) -> Any:
        return settings_of(self.cfg)

    def prompt_source(self, position: int):
        """Batches of P prompts of this process, from `position`."""
        from diffalign.data.loader import PromptBatches

        return PromptBatches(
            self.prompts, self.settings.prompts_per_rollout, self.cfg.seed, position=position,
            rank=self.accelerator.process_index, world=self.accelerator.num_processes, shuffle=self.cfg.data.shuffle,
        )  # fmt: skip

    def group_cond(self, prompts: list[str]) -> tuple[list[str], Cond]:
        """Each prompt repeated for its group, and the conditioning of those rows (each prompt encoded once)."""
        import torch

        from diffalign.models import cond_select

        group = self.settings.group_size
        with torch.no_grad():
            cond = self.family.encode_prompts(prompts)
        rows = torch.arange(len(prompts)).repeat_interleave(group)
        return [p for p in prompts for _ in range(group)], cond_select(cond, rows)

    def rollout_noise(
        self, images: int, generator: torch.Generator, same_noise: bool = False
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(image indices, their initial noise) per sampling chunk of `batch_size` images of a rollout of `images`.
        Each image draws its own noise, chunk by chunk as the chunks are sampled, or with `same_noise` its group's,
        drawn once for the rollout."""
        import torch

        group = self.settings.group_size
        shared = None
        if same_noise:
            shared = self.family.initial_noise(images // group, self.resolution, generator)
        for chunk in torch.arange(images).split(self.cfg.batch_size):
            if shared is None:
                yield chunk, self.family.initial_noise(len(chunk), self.resolution, generator)
            else:
                yield chunk, shared[chunk.to(shared.device) // group]

    def score(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """Every component of the reward of decoded `images`."""
        return self.reward.components(images.to(self.reward.device), prompts)

    def advantages(self, components: list[dict[str, Tensor]], prompts: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """This process's advantages from the rewards of every process (gathered, each image counted once), and
        the rollout's metrics. `components` are the reward components of this process's chunks, in order."""
        import torch
        from accelerate.utils import gather_object

        from diffalign.losses.grpo import group_advantages, weighted_advantages, zero_spread_fraction

        settings, accelerator = self.settings, self.accelerator
        scores = {k: torch.cat([c[k] for c in components]).float() for k in components[0]}
        gathered = {k: accelerator.gather(v.to(accelerator.device)).cpu() for k, v in scores.items()}
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

    def micro_batches(self, rollout: Any, index: int) -> list[dict[str, Any]]:
        """The rollout's micro-batches in training order: per inner epoch a seeded shuffle of the images, per
        image micro-batch every trained slot."""
        import torch

        generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + index)
        batches = []
        for _ in range(self.settings.inner_epochs):
            order = torch.randperm(len(rollout.prompts), generator=generator)
            for chunk in order.split(self.cfg.batch_size):
                for i in self.trained:
                    batches.append({"rollout": rollout, "images": chunk, "step": i, "first": not batches})
        return batches

    def metrics_of(self, rollout: Any, device: torch.device) -> dict[str, Tensor]:
        """The rollout's metrics, logged with every update it feeds."""
        return {k: v.to(device) for k, v in rollout.metrics.items()}


@dataclass
class Setup:
    """What `train` has loaded before a recipe is built: the pieces every recipe's constructor takes."""

    cfg: Any
    accelerator: Any
    family: Family
    params: list
    sampler: Any
    """The resolved rollout sampler (`diffalign.train.sampler.resolve_sampler`)."""
    common: dict[str, Any]
    """The `OnlineRecipe` fields except `trained` (and a recipe's own)."""


def train(cfg: TrainConfig, build: Callable[[Setup], OnlineRecipe]) -> Path:
    """Run an online-RL recipe: load the model and reward, build the recipe with `build`, and train it in the shared
    loop. Returns the folder of the final LoRA (or full denoiser)."""
    import torch

    from diffalign.data.prompts import load_prompts
    from diffalign.losses.grpo import PromptStats
    from diffalign.rewards import load_reward
    from diffalign.train import setup, validation
    from diffalign.train.loop import fit
    from diffalign.train.sampler import resolve_sampler

    settings = settings_of(cfg)
    cfg = validation.like_training(cfg, settings.reward, settings.negative_prompt)
    settings = settings_of(cfg)
    check_config(cfg)
    prompts = load_prompts(cfg.data)
    accelerator = setup.make_accelerator(cfg)
    family, params = setup.load_model(cfg, accelerator)
    sampler = resolve_sampler(
        family, setup.resolution_of(cfg, family), num_steps=settings.num_steps,
        guidance_scale=settings.guidance_scale, eta=0.0, section=cfg.method,
    )  # fmt: skip
    with torch.no_grad():
        uncond = family.encode_negative(settings.negative_prompt) if sampler.guidance_scale != 1.0 else None
    stats = None
    if settings.advantages == "prompt_stats":
        stats = PromptStats(settings.stats_buffer, settings.stats_min_count)
        accelerator.register_for_checkpointing(stats)
    shape_only = torch.zeros(family.latent_shape(1, sampler.resolution), device=family.device)  # the grid needs a shape
    common = dict(
        cfg=cfg, accelerator=accelerator, family=family, reward=load_reward(settings.reward, device=family.device),
        uncond=uncond, schedule=family.schedule(sampler.num_steps, shape_only),
        guidance_scale=sampler.guidance_scale, resolution=sampler.resolution, prompts=prompts, stats=stats,
    )  # fmt: skip
    recipe = build(Setup(cfg, accelerator, family, params, sampler, common))
    # one optimizer step: every trained slot of `gradient_accumulation_steps` image micro-batches (as the peers)
    accelerator.gradient_accumulation_steps = cfg.gradient_accumulation_steps * len(recipe.trained)

    def step(batch: dict[str, Any], generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        return recipe.loss(batch)

    def make_batches(position: int) -> RolloutBatches:
        return RolloutBatches(recipe, position)

    return fit(cfg, accelerator, family, params, make_batches, step, bar_metric="reward")
