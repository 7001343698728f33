"""What the flow-matching transformer families (SD3/3.5, FLUX.1) share: rectified-flow training and an Euler sampler."""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from torch import Tensor

from diffalign.errors import UserError
from diffalign.losses.inpo import velocity_from_inversion
from diffalign.models.base import Family, Schedule


class FlowFamily(Family):
    """x_t = (1 - sigma) x0 + sigma eps, the model predicts the velocity eps - x0; timestep = 1000 sigma."""

    denoiser_attr: ClassVar[str] = "transformer"
    default_num_steps: ClassVar[int] = 28

    def __init__(self, pipe):
        super().__init__(pipe)
        # A fresh copy of the scheduler holds the training timesteps/sigmas (with the model's shift applied);
        # `set_timesteps` on the pipeline's own scheduler would change them.
        train = type(pipe.scheduler).from_config(pipe.scheduler.config)
        self.train_scheduler = train
        self.train_timesteps = train.timesteps.to(torch.float32)
        self.train_sigmas = train.sigmas[: len(train.timesteps)].to(torch.float32)

    # ---------------------------------------------------------------------------------------------- training
    @property
    def num_train_positions(self) -> int:
        return len(self.train_timesteps)

    def timesteps_at(self, index: Tensor) -> Tensor:
        """The scheduler's training timesteps (shift applied, noisiest first), indexed as diffusers' SD3/FLUX training
        scripts do: `timesteps[(u * num_train_timesteps).long()]`."""
        return self.train_timesteps[index]

    def sigmas_for(self, timesteps: Tensor) -> Tensor:
        """sigma of each training timestep (looked up in the scheduler's table)."""
        index = (self.train_timesteps[None, :] - timesteps.detach().float().cpu()[:, None]).abs().argmin(dim=1)
        return self.train_sigmas[index].to(timesteps.device)

    def noisy_and_target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        sigma = self.sigmas_for(timesteps).reshape(-1, *([1] * (latents.ndim - 1))).to(latents)
        return (1 - sigma) * latents + sigma * noise, noise - latents

    def implied_target(self, latents: Tensor, noisy: Tensor, timesteps: Tensor) -> Tensor:
        """The velocity ε̂ - x0 = (x_t - x0) / sigma of the noise ε̂ with x_t = (1 - sigma) x0 + sigma ε̂."""
        sigma = self.sigmas_for(timesteps).reshape(-1, *([1] * (latents.ndim - 1))).to(latents)
        return velocity_from_inversion(noisy, latents, sigma)

    def predicted_clean(self, noisy: Tensor, pred: Tensor, timesteps: Tensor) -> Tensor:
        """x̂0 = x_t - sigma v̂: affine in the velocity."""
        sigma = self.sigmas_for(timesteps).reshape(-1, *([1] * (noisy.ndim - 1))).to(noisy)
        return noisy - sigma * pred.to(noisy.dtype)

    # ---------------------------------------------------------------------------------------------- sampling
    def _set_sampling_timesteps(self, scheduler, num_steps: int, latents: Tensor) -> None:
        """Family hook: call scheduler.set_timesteps exactly as the stock pipeline does."""
        scheduler.set_timesteps(num_steps)

    def schedule(self, num_steps: int, latents: Tensor) -> Schedule:
        scheduler = copy.deepcopy(self.train_scheduler)
        self._set_sampling_timesteps(scheduler, num_steps, latents)
        return Schedule(scheduler.timesteps.to(latents.device), {"sigmas": scheduler.sigmas.to(torch.float32)})

    def step(
        self, x: Tensor, pred: Tensor, schedule: Schedule, i: int, eta: float = 0.0, noise: Tensor | None = None
    ) -> Tensor:
        """Euler step of the probability-flow ODE: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v. Deterministic: eta > 0 is
        an error (it belongs to DDIM), never silently ignored."""
        if eta > 0:
            raise ValueError(f"{self.name}: the flow-matching Euler sampler is deterministic; eta={eta} needs eta=0")
        sigmas = schedule.coeffs["sigmas"].to(x.device)
        return x + (sigmas[i + 1] - sigmas[i]) * pred.to(x.dtype)

    default_noise_level: ClassVar[float] = 0.7  # Flow-GRPO (yifan123/flow_grpo ac4c86e config/base.py: noise_level)

    def transition(
        self, x: Tensor, pred: Tensor, schedule: Schedule, i: int, noise_level: float, sde: str = "default"
    ) -> tuple[Tensor, Tensor]:
        """The Gaussian of step i of a stochastic sampler with the same marginals as the flow ODE (sigma from s to
        s' < s, dt = s' - s, noise level a = `noise_level`; a = 0 is the Euler step):

        - "flow_sde" (the default; Flow-GRPO, Liu et al. 2025, eq. 9 and flow_grpo's `sde_step_with_logprob`):
          g = a sqrt(s / (1 - s)) (s = 1 replaced by sigmas[1] there, as the official code, to stay finite), mean
          x (1 + g² dt / 2s) + v (1 + g² (1 - s) / 2s) dt, std g sqrt(-dt);
        - "cps" (coefficients-preserving sampling, Wang & Yu 2025): std s' sin(a pi / 2), mean
          x̂0 (1 - s') + ε̂ sqrt(s'² - std²) with x̂0 = x - s v, ε̂ = x + (1 - s) v.

        Computed in float32."""
        sigmas = schedule.coeffs["sigmas"].to(x.device)
        x, v = x.float(), pred.float()
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sde in ("default", "flow_sde"):
            dt = sigma_next - sigma
            finite = torch.where(sigma == 1, sigmas[1], sigma)
            g = noise_level * (sigma / (1 - finite)).sqrt()
            mean = x * (1 + g**2 / (2 * sigma) * dt) + v * (1 + g**2 * (1 - sigma) / (2 * sigma)) * dt
            return mean, g * (-dt).sqrt()
        if sde == "cps":
            std = sigma_next * torch.sin(torch.as_tensor(noise_level * torch.pi / 2))
            x0, eps = x - sigma * v, x + (1 - sigma) * v
            return x0 * (1 - sigma_next) + eps * (sigma_next**2 - std**2).clamp(min=0).sqrt(), std
        raise UserError(f"{self.name}: unknown sde {sde!r}: flow_sde (Flow-GRPO) or cps")

    def flow_time_step(self, schedule: Schedule, i: int) -> Tensor:
        """sigma_i - sigma_{i+1}."""
        sigmas = schedule.coeffs["sigmas"]
        return (sigmas[i] - sigmas[i + 1]).float()

    # --------------------------------------------------------------------------------------------- inversion
    def walk_step(self, x: Tensor, pred: Tensor, t_a: Tensor, t_b: Tensor) -> tuple[Tensor, Tensor]:
        """Euler on the flow between sigma = t/1000 values (either direction): x_b = x_a + (sigma_b - sigma_a) v(x_a);
        the std of the step's noise is sqrt(|sigma_b² - sigma_a²|)."""
        shape = (-1, *([1] * (x.ndim - 1)))
        sigma_a, sigma_b = (t_a / 1000).reshape(shape).to(x), (t_b / 1000).reshape(shape).to(x)
        return x + (sigma_b - sigma_a) * pred.to(x.dtype), (sigma_b**2 - sigma_a**2).abs().sqrt()
