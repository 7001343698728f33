"""DDIM-InPO recipe (Lu et al., CVPR 2025): Diffusion-DPO on DDIM-inverted latents with reparametrised targets.

    accelerate launch -m diffalign train configs/inpo/sd15.yaml       # or: diffalign train configs/inpo/toy.yaml

Per step: winner and loser share one timestep t; with no gradient, each clean latent is inverted to t by the CURRENT
policy (adapters on; `inverter: reference` uses the reference instead) with `Family.invert` (DDIM for the UNet
families, reverse Euler on the flow for SD3/FLUX) in `inversion_steps` steps, adding eta·σ_i·N(0, I) after each
step; the family's reparametrised target of the inverted latent (`Family.implied_target`: ε̂, v̂ or the flow
velocity, `diffalign.losses.inpo`) is then regressed at the inverted latent by policy and reference, and the
Diffusion-DPO loss of their errors (`diffalign.losses.dpo.dpo_loss`, same β convention) is the loss. Data, cache,
loop, checkpoints and logging are shared with DPO (`diffalign.train.pair_training`).

The inversion grid. The official code (JaydenLyh/InPO train.py) walks the global DDIM grid of 10 steps (stride 100)
up to the last grid point below t — 0 to 10 steps, about 5 on average — and reparametrises with ᾱ_t anyway. Here a
sample at t takes the same number of steps, ceil(t/100) for 10 steps, evenly spaced from 0 to t, so it lands exactly
on t (`invert_on_grid`): the official cost, without the mismatch. The samples of a batch step in lockstep, and a
process makes as many denoiser calls as its slowest sample needs (the most over all processes, so collectives stay
matched). Each step asks the model at its start timestep; the official code's `DDIMInverseScheduler` asks at the
destination (`inversion_timestep`, measured in docs/results/inpo.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from diffalign.config import TimestepConfig, bounded
from diffalign.train.pair_training import PairTrainConfig, PreferenceLossConfig

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from diffalign.models import Cond, Family, PredictAt


@dataclass
class InPOConfig(PreferenceLossConfig):
    """DDIM-InPO (Lu et al. 2025): the DPO loss and β (inside = -(β/2)·(Δpolicy - Δref)) on inverted latents.

    Paper: β 2000 (SD 1.5), 5000 (SDXL); 10 inversion steps, eta 0.1, the policy inverts."""

    inversion_steps: int = bounded(10, ge=1)
    """Inversion grid (DDIM for UNets, reverse Euler on the flow; no gradient): steps of at most 1000/N timesteps,
    so a sample at t takes ceil(t·N/1000) steps from its clean latent to t (the paper's 10: stride 100)."""
    eta: float = bounded(0.1, ge=0)
    """After each inversion step add eta·σ_i·N(0, I), σ_i the DDIM step std (flow: sqrt(σ_b² - σ_a²)); 0 = plain
    deterministic inversion."""
    inverter: Literal["policy", "reference"] = "policy"
    """Which model inverts: the current policy with its adapters (the paper and its code) or the frozen reference."""
    inversion_timestep: Literal["start", "destination"] = "start"
    """Where each inversion step a -> b asks the model, with the latent at a: at t_a ("start", the sampler's rule)
    or at t_b ("destination", the official code through diffusers' DDIMInverseScheduler). Destination reconstructs
    x0 better but on the toy world trained 10 points worse (-5.2 against +5.1 held-out gold, 3 seeds:
    docs/results/inpo.md), so start is the default."""


@dataclass
class Config(PairTrainConfig):
    """`method: inpo`: the shared settings plus the InPO loss and inversion, the preference pairs and the timestep
    weighting."""

    method: Literal["inpo"] = "inpo"
    """The training method (this recipe)."""
    inpo: InPOConfig = field(default_factory=InPOConfig)


def invert_pairs(
    family: Family, latents: Tensor, cond: Cond, t: Tensor, cfg: InPOConfig, generator: torch.Generator
) -> Tensor:
    """The clean `latents` ([2B]) inverted to `t` without gradient by the policy (adapters on) or the reference."""
    import contextlib

    with family.reference() if cfg.inverter == "reference" else contextlib.nullcontext():
        return invert_on_grid(
            family, latents, cond, t, cfg.inversion_steps, cfg.eta, generator, predict_at=cfg.inversion_timestep
        )


def grid_counts(t: Tensor, grid_steps: int) -> Tensor:
    """How many grid steps a sample at `t` (0..1000 scale) takes: ceil(t·grid_steps/1000), at least 1."""
    import torch

    return torch.ceil(t.float() * grid_steps / 1000).clamp(1, grid_steps)


def invert_on_grid(
    family: Family,
    x0: Tensor,
    cond: Cond,
    t: Tensor,
    grid_steps: int,
    eta: float,
    generator: torch.Generator | None,
    predict_at: PredictAt = "start",
) -> Tensor:
    """`Family.invert` along the paper's grid: steps of at most 1000/`grid_steps` timesteps, so a sample at t takes
    n = ceil(t·grid_steps/1000) of them (1 to grid_steps; on average about half of grid_steps), evenly spaced from
    0 to its own t, where it lands exactly. The samples step in lockstep: call j moves those with n >= j, one
    `Family.walk` step each (eta noise included), so a batch costs max(n) denoiser calls, what its slowest sample
    needs. Under several processes every process makes the most calls any of them needs (DDP buffer syncs and FSDP
    all-gathers are collectives and must stay matched); a process whose samples have all arrived makes one-sample
    calls that are discarded, and a single process never does."""
    import torch

    from diffalign.models import cond_select

    counts = grid_counts(t, grid_steps)
    calls = most_over_processes(int(counts.max()), x0.device)
    x = x0.clone()
    with torch.no_grad():
        for j in range(1, calls + 1):
            moving = (counts >= j).nonzero().squeeze(1)
            if len(moving) == 0:
                family.predict(x[:1], family.model_timesteps(t[:1]), cond_select(cond, slice(0, 1)))
                continue
            t_end, n = t[moving].float(), counts[moving]
            x[moving] = family.walk(
                x[moving], cond_select(cond, moving), t_end * (j - 1) / n, t_end * j / n, 1, eta, generator,
                predict_at=predict_at,
            )  # fmt: skip
    return x


def most_over_processes(value: int, device: torch.device) -> int:
    """The largest `value` of all processes of the default process group (`value` itself in a single process):
    one all-reduce, a collective every process must call."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    most = torch.tensor([value], device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item())


def inpo_step(
    family: Family,
    latents: Tensor,
    cond: Cond,
    preference: Tensor,
    cfg: InPOConfig,
    generator: torch.Generator,
    timesteps: TimestepConfig | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss and metrics of one batch: latents/cond hold winners then losers ([2B]); t shared per pair; the model
    input is the inverted latent and the target its reparametrisation (then exactly DPO's loss)."""
    import torch

    from diffalign.train.pair_training import preference_loss

    half = latents.shape[0] // 2
    t = family.sample_train_timesteps(half, generator, **asdict(timesteps or TimestepConfig()))
    t = torch.cat([t, t])
    inverted = invert_pairs(family, latents, cond, t, cfg, generator)
    target = family.implied_target(latents, inverted, t)
    return preference_loss(family, inverted, t, cond, target, preference, cfg)


def train(cfg: Config) -> Path:
    """Run the recipe; returns the folder of the final LoRA (or full denoiser)."""
    from diffalign.train.pair_training import train_on_pairs

    def step(family: Family, latents: Tensor, cond: Cond, preference: Tensor, generator: torch.Generator):
        return inpo_step(family, latents, cond, preference, cfg.inpo, generator, cfg.timesteps)

    return train_on_pairs(cfg, step)
