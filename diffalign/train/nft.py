"""Online RL recipe `method: nft`: DiffusionNFT (Zheng et al., ICLR 2026) on every family, one loop for all of them.

    diffalign train configs/nft/toy.yaml                  # CPU, minutes
    accelerate launch -m diffalign train configs/nft/sd3.yaml

A rollout samples `group_size` images for each of `prompts_per_rollout` prompts (per process) with the OLD policy and
the family's deterministic sampler (no SDE, no log-probabilities), scores them with any reward spec and normalises
the rewards per prompt group (`diffalign.train.online`, shared with `method: grpo`). For each image it then draws
the trained timesteps (a seeded permutation of the sampler's timesteps, the first int(fraction · N) of them) and their
forward-process noise, and records the noised latents and the old policy's predictions there. An update regresses
the implicit positive and negative policies of the trained model at those points (`diffalign.losses.nft`). After
each rollout's updates the old policy moves towards the trained one by the official EMA rule.

The old policy is a second copy of the trainable weights (of the LoRA, or of the whole denoiser in a full
fine-tune), swapped in while a rollout is sampled; it is registered for checkpointing, so a resumed run (on a
rollout boundary, as grpo) continues from the same old policy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from diffalign.config import OptimConfig, PromptConfig, TrainConfig, bounded
from diffalign.train.online import OnlineRecipe, RolloutSettings, rollout_generator, updates_per_rollout

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from diffalign.models import Cond


@dataclass
class NftConfig(RolloutSettings):
    """DiffusionNFT. "Official" below is NVlabs/DiffusionNFT 24af555 `config/nft.py` over `config/base.py`, and
    `scripts/train_nft_sd3.py`."""

    beta: float = bounded(1.0, gt=0)
    """β of the implicit policies v± (official `config.beta` 1.0; 0.1 for OCR and the multi-reward run)."""
    guidance_scale: float | None = bounded(None, ge=0)
    """CFG while sampling rollouts (official: 1.0, none); the updates train the conditional prediction alone."""
    global_std: bool = True
    """Divide by the std of all the rollout's rewards instead of the group's (official `sample.global_std` True)."""
    timestep_fraction: float = bounded(0.99, gt=0, le=1)
    """Each image is trained at int(fraction · N) of the sampler's N timesteps, at least one, drawn without
    replacement per image (official 0.99: 9 of 10)."""
    kl_weight: float = bounded(1e-4, ge=0)
    """Weight of mean ‖v_θ - v_ref‖² to the reference (the model without the LoRA; official `train.beta` 1e-4)."""
    old_decay_rate: float = bounded(0.001, ge=0)
    """The old policy's EMA decay grows by this per optimizer step (official `decay_type` 1: 0.001; 2: 0.0075)."""
    old_decay_max: float = bounded(0.5, ge=0, le=1)
    """... up to this (official type 1: 0.5; type 2: 0.999)."""
    old_decay_delay: int = bounded(0, ge=0)
    """... starting after this many optimizer steps, decay 0 (the old policy = the trained one) before (type 2: 75)."""


@dataclass
class Config(TrainConfig):
    """`method: nft`: the shared settings plus the rollout, the advantages, the NFT objective and the prompts.
    `batch_size` is the images per training micro-batch (and per sampling chunk of a rollout)."""

    method: Literal["nft"] = "nft"
    nft: NftConfig = field(default_factory=NftConfig)
    data: PromptConfig = field(default_factory=PromptConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=1e-4))
    """Official: AdamW, lr 3e-4, weight decay 1e-4, eps 1e-8, gradient clipping 1.0."""


def trained_slots(num_steps: int, settings: NftConfig) -> list[int]:
    """The per-image timestep slots trained: int(fraction · N), at least one."""
    return list(range(max(1, int(num_steps * settings.timestep_fraction))))


class OldPolicy:
    """A copy of the trainable weights that lags behind them: what rollouts are sampled with and what the implicit
    policies are built on. Checkpointed with the run (`state_dict`)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.weights = [p.detach().clone() for p in params]

    def follow(self, decay: float) -> None:
        """old ← decay · old + (1 - decay) · θ."""
        import torch

        with torch.no_grad():
            for old, param in zip(self.weights, self.params, strict=True):
                old.mul_(decay).add_(param.detach(), alpha=1 - decay)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within the block the model runs with the old weights (swapped in, not copied; no gradient)."""
        import torch

        with torch.no_grad():
            saved = [p.data for p in self.params]
            for param, old in zip(self.params, self.weights, strict=True):
                param.data = old
            try:
                yield
            finally:
                for param, data in zip(self.params, saved, strict=True):
                    param.data = data

    def state_dict(self) -> dict[str, Any]:
        return {"weights": [w.cpu() for w in self.weights]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for old, saved in zip(self.weights, state["weights"], strict=True):
            old.copy_(saved)


@dataclass
class Rollout:
    """One rollout of this process: what its updates read."""

    prompts: list[str]
    cond: Cond
    clean: Tensor
    """[n, ...] the sampled clean latents x0."""
    timesteps: Tensor
    """[n, S] the trained timesteps of each image (0..1000 scale)."""
    noisy: Tensor
    """[n, S, ...] x0 noised by the forward process at those timesteps."""
    old_clean: Tensor
    """[n, S, ...] the old policy's clean prediction x̂0 there."""
    advantages: Tensor
    """[n]"""
    metrics: dict[str, Tensor]


@dataclass
class NftRecipe(OnlineRecipe):
    """What an NFT run holds between its rollouts and updates: the shared rollout state plus the old policy."""

    old: OldPolicy | None = None
    updates_per_rollout: int = 1

    def sample(self, prompts: list[str], index: int) -> Rollout:
        """Move the old policy (after the first rollout), sample G images per prompt with it, score them, and record
        the forward-process points the updates train at with the old policy's predictions there."""
        import torch

        from diffalign.losses.nft import old_policy_decay
        from diffalign.models import cond_select

        family, settings = self.family, self.settings
        if index > 0:
            step = index * self.updates_per_rollout
            rate, cap, delay = settings.old_decay_rate, settings.old_decay_max, settings.old_decay_delay
            self.old.follow(old_policy_decay(step, rate, cap, delay))
        generator = rollout_generator(self.cfg.seed, self.accelerator.process_index, index)
        images_prompts, cond = self.group_cond(prompts)
        parts: dict[str, list[Tensor]] = {"clean": [], "timesteps": [], "noisy": [], "old_clean": []}
        components = []
        with torch.no_grad(), self.accelerator.autocast(), self.old.active():
            for chunk, noise in self.rollout_noise(len(images_prompts), generator):
                chunk_cond = cond_select(cond, chunk)
                clean = family.sample(
                    chunk_cond, self.uncond, latents=noise, num_steps=len(self.schedule),
                    guidance_scale=self.guidance_scale,
                ).float()  # fmt: skip
                components.append(self.score(family.decode(clean), [images_prompts[i] for i in chunk]))
                timesteps, noisy, old_clean = self.forward_points(clean, chunk_cond, generator)
                for key, value in zip(parts, (clean, timesteps, noisy, old_clean), strict=True):
                    parts[key].append(value)
        advantages, metrics = self.advantages(components, images_prompts)
        recorded = {k: torch.cat(v) for k, v in parts.items()}
        return Rollout(images_prompts, cond, **recorded, advantages=advantages, metrics=metrics)

    def forward_points(self, clean: Tensor, cond: Cond, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """For each clean latent: its trained timesteps [b, S], the noised latents there [b, S, ...], and the
        (current: the old policy is active) model's clean predictions at them [b, S, ...]."""
        import torch

        family, slots = self.family, len(self.trained)
        steps = torch.stack([torch.randperm(len(self.schedule), generator=generator)[:slots] for _ in clean])
        timesteps = self.schedule.timesteps.cpu()[steps].to(family.device)
        eps = torch.randn((len(clean), slots, *clean.shape[1:]), generator=generator).to(clean)
        noisy, old_clean = torch.empty_like(eps), torch.empty_like(eps)
        for s in range(slots):
            noisy[:, s] = family.noisy_and_target(clean, eps[:, s], timesteps[:, s])[0]
            pred = family.predict(noisy[:, s], timesteps[:, s], cond)
            old_clean[:, s] = family.predicted_clean(noisy[:, s], pred, timesteps[:, s]).float()
        return timesteps, noisy, old_clean

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The NFT loss (+ the KL to the reference) of one micro-batch at one trained slot."""
        from diffalign.losses.nft import nft_loss, prediction_kl
        from diffalign.models import cond_select

        family, settings, rollout, s = self.family, self.settings, batch["rollout"], batch["step"]
        images = batch["images"].to(rollout.clean.device)
        x, t = rollout.noisy[images, s].to(family.device), rollout.timesteps[images, s].to(family.device)
        cond = cond_select(rollout.cond, images)
        pred = family.predict(x, t, cond)
        x0_pred = family.predicted_clean(x, pred, t)
        loss, metrics = nft_loss(
            x0_pred, rollout.old_clean[images, s].to(x0_pred.device), rollout.clean[images].to(x0_pred.device),
            rollout.advantages[images].to(x0_pred.device), settings.beta, settings.adv_clip,
        )  # fmt: skip
        metrics["policy_loss"] = loss.detach()
        if settings.kl_weight > 0:
            with family.reference():
                reference = family.predict(x, t, cond)
            kl = prediction_kl(pred, reference)
            loss = loss + settings.kl_weight * kl
            metrics["kl"] = kl.detach()
        return loss, {**metrics, **self.metrics_of(rollout, loss.device)}


def train(cfg: Config) -> Path:
    """Run the recipe; returns the folder of the final LoRA (or full denoiser)."""
    from diffalign.train import online

    def build(setup: online.Setup) -> NftRecipe:
        old = OldPolicy(setup.params)
        setup.accelerator.register_for_checkpointing(old)
        trained = trained_slots(setup.sampler.num_steps, setup.cfg.nft)
        return NftRecipe(**setup.common, trained=trained, old=old, updates_per_rollout=updates_per_rollout(setup.cfg))

    return online.train(cfg, build)
