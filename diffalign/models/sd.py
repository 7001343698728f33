"""Stable Diffusion 1.x / 2.x: UNet2DConditionModel, one CLIP text encoder, epsilon or v-prediction, DDIM sampler."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from diffalign.errors import UserError
from diffalign.losses.inpo import noise_from_inversion, v_from_inversion
from diffalign.models.base import Cond, Family, Schedule


class UNetFamily(Family):
    """What SD 1.x/2.x and SDXL share: discrete-time DDPM training (eps or v target) and a DDIM sampler with eta."""

    denoiser_attr: ClassVar[str] = "unet"
    stochastic_sampler: ClassVar[bool] = True

    def __init__(self, pipe):
        super().__init__(pipe)
        from diffusers import DDIMScheduler

        # A private DDIM scheduler: its alphas_cumprod serve training and sampling, and the pipeline's own scheduler
        # (which `set_timesteps` mutates) is never touched.
        self.ddim = DDIMScheduler(**ddim_settings(pipe.scheduler))
        self.alphas_cumprod = self.ddim.alphas_cumprod.to(torch.float32)
        self.num_train_timesteps = int(self.ddim.config.num_train_timesteps)

    @property
    def prediction_type(self) -> str:
        return self.ddim.config.prediction_type

    # ---------------------------------------------------------------------------------------------- training
    @property
    def num_train_positions(self) -> int:
        return self.num_train_timesteps

    def timesteps_at(self, index: Tensor) -> Tensor:
        """Uniform weighting: t ~ U{0, ..., T-1} (as the Diffusion-DPO scripts); position 0 is t = T-1."""
        return self.num_train_timesteps - 1 - index

    def sample_train_timesteps(
        self, n: int, generator: torch.Generator | None = None, weighting: str = "default", **kw
    ) -> Tensor:
        """t ~ U{0, ..., T-1} (DDPM / Diffusion-DPO) by default; see `Family.sample_train_timesteps`."""
        if weighting in ("default", "uniform"):  # t itself is the uniform draw (the long-standing stream of draws)
            return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(self.device)
        return super().sample_train_timesteps(n, generator, weighting, **kw)

    def _alpha(self, t: Tensor, like: Tensor) -> Tensor:
        alpha = self.alphas_cumprod.to(like.device)[t.long().cpu()].to(like.device)
        return alpha.reshape(-1, *([1] * (like.ndim - 1)))

    def noisy_and_target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps; target eps (epsilon), sqrt(a_t) eps - sqrt(1-a_t) x0 (v), or x0."""
        alpha = self._alpha(timesteps, latents)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
        elif self.prediction_type == "sample":
            target = latents
        else:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        return noisy, target

    def implied_target(self, latents: Tensor, noisy: Tensor, timesteps: Tensor) -> Tensor:
        """ε̂ = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t) (epsilon), (sqrt(a_t) x_t - x0) / sqrt(1 - a_t) (v), or x0."""
        alpha = self._alpha(timesteps, latents)
        if self.prediction_type == "epsilon":
            return noise_from_inversion(noisy, latents, alpha)
        if self.prediction_type == "v_prediction":
            return v_from_inversion(noisy, latents, alpha)
        if self.prediction_type == "sample":
            return latents
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    # ---------------------------------------------------------------------------------------------- sampling
    def schedule(self, num_steps: int, latents: Tensor) -> Schedule:
        """DDIM timesteps (the scheduler's own spacing) with alpha_t and alpha_{t-1} per step."""
        self.ddim.set_timesteps(num_steps)
        timesteps = self.ddim.timesteps.clone()
        prev = timesteps - self.num_train_timesteps // num_steps
        final = torch.as_tensor(self.ddim.final_alpha_cumprod, dtype=torch.float32)
        alpha_prev = torch.where(prev >= 0, self.alphas_cumprod[prev.clamp(min=0)], final)
        return Schedule(
            timesteps.to(latents.device), {"alpha": self.alphas_cumprod[timesteps], "alpha_prev": alpha_prev}
        )

    def predicted_clean(self, noisy: Tensor, pred: Tensor, timesteps: Tensor) -> Tensor:
        """x̂0 = (x_t - sqrt(1 - a_t) ε̂) / sqrt(a_t) for ε, sqrt(a_t) x_t - sqrt(1 - a_t) v̂ for v, the output itself for
        sample prediction: affine in the prediction, never clipped."""
        return self.split_prediction(noisy, pred, self._alpha(timesteps, noisy), clip=False)[0]

    def split_prediction(self, x: Tensor, pred: Tensor, alpha: Tensor, clip: bool = True) -> tuple[Tensor, Tensor]:
        """(predicted x0, predicted eps) from a model output, whatever the prediction type; x0 clipped as the
        scheduler's `clip_sample` says unless `clip` is False."""
        if self.prediction_type == "epsilon":
            x0, eps = (x - (1 - alpha).sqrt() * pred) / alpha.sqrt(), pred
        elif self.prediction_type == "v_prediction":
            x0, eps = alpha.sqrt() * x - (1 - alpha).sqrt() * pred, alpha.sqrt() * pred + (1 - alpha).sqrt() * x
        else:
            x0, eps = pred, (x - alpha.sqrt() * pred) / (1 - alpha).sqrt()
        if clip and self.ddim.config.clip_sample:
            limit = self.ddim.config.clip_sample_range
            x0 = x0.clamp(-limit, limit)
        return x0, eps

    # --------------------------------------------------------------------------------------------- inversion
    def model_timesteps(self, t: Tensor) -> Tensor:
        return t.round().long()

    def _alpha_or_one(self, t: Tensor, like: Tensor) -> Tensor:
        """alphas_cumprod at the rounded timesteps, 1 at t = 0 (the clean latent itself)."""
        t = t.round().long()
        alpha = self._alpha(t.clamp(min=0), like)
        return torch.where((t <= 0).reshape(alpha.shape), torch.ones_like(alpha), alpha)

    def walk_step(self, x: Tensor, pred: Tensor, t_a: Tensor, t_b: Tensor) -> tuple[Tensor, Tensor]:
        """Deterministic DDIM from t_a to t_b (either direction): x_b = sqrt(a_b) x0 + sqrt(1 - a_b) eps, with x0 and
        eps read from the prediction at t_a; the std is DDIM's sigma (eta = 1) of the step between the two."""
        alpha_a, alpha_b = self._alpha_or_one(t_a, x), self._alpha_or_one(t_b, x)
        x0, eps = self.split_prediction(x, pred.to(x.dtype), alpha_a)
        clean, noisy = torch.maximum(alpha_a, alpha_b), torch.minimum(alpha_a, alpha_b)
        std = ((1 - clean) / (1 - noisy).clamp(min=1e-12) * (1 - noisy / clean)).clamp(min=0).sqrt()
        return alpha_b.sqrt() * x0 + (1 - alpha_b).sqrt() * eps, std

    default_noise_level: ClassVar[float] = 1.0  # DDPO (kvablack/ddpo-pytorch config/base.py: sample.eta 1.0)

    def transition(
        self, x: Tensor, pred: Tensor, schedule: Schedule, i: int, noise_level: float, sde: str = "default"
    ) -> tuple[Tensor, Tensor]:
        """DDIM with η = `noise_level` (Song et al. 2021, eq. 12; DDPO): mean sqrt(a_prev) x0 + sqrt(1 - a_prev - s²)
        eps and std s = η sqrt((1 - a_prev)/(1 - a_t) (1 - a_t/a_prev)). UNet families have one SDE (`sde`
        "default" or "ddim")."""
        if sde not in ("default", "ddim"):
            raise UserError(f"{self.name}: sde {sde!r} is a flow-matching SDE; the UNet families step DDIM ('ddim')")
        alpha = schedule.coeffs["alpha"][i].to(x.device)
        alpha_prev = schedule.coeffs["alpha_prev"][i].to(x.device)
        x0, eps = self.split_prediction(x, pred.to(x.dtype), alpha)
        std = noise_level * ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)).sqrt()
        return alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).sqrt() * eps, std

    def flow_time_step(self, schedule: Schedule, i: int) -> Tensor:
        """s(a_t) - s(a_prev) with s(a) = sqrt(1 - a) / (sqrt(a) + sqrt(1 - a)): DDIM is the flow ODE in the variables
        x / (sqrt(a) + sqrt(1 - a)) at flow time s (both are the same probability-flow ODE, reparametrised)."""

        def flow_time(alpha: Tensor) -> Tensor:
            return (1 - alpha).sqrt() / (alpha.sqrt() + (1 - alpha).sqrt())

        return (flow_time(schedule.coeffs["alpha"][i]) - flow_time(schedule.coeffs["alpha_prev"][i])).float()

    def step(
        self, x: Tensor, pred: Tensor, schedule: Schedule, i: int, eta: float = 0.0, noise: Tensor | None = None
    ) -> Tensor:
        """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z,
        s = eta sqrt((1 - a_prev)/(1 - a_t) (1 - a_t/a_prev))."""
        out, std = self.transition(x, pred, schedule, i, eta)
        if eta > 0:
            if noise is None:
                raise ValueError("DDIM with eta > 0 needs the step noise")
            out = out + std * noise
        return out


class SDFamily(UNetFamily):
    """SD 1.x / 2.x (StableDiffusionPipeline)."""

    name: ClassVar[str] = "sd"
    pipeline_class_name: ClassVar[str] = "StableDiffusionPipeline"

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        return {"prompt_embeds": embeds}

    def encode_negative(self, negative_prompt: str | None = None) -> Cond:
        # The SD pipeline's default negative is the empty prompt, encoded like any prompt.
        return self.encode_prompts([negative_prompt or ""])

    def denoise(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dtype = self.dtype
        return self.model(x.to(dtype), t, encoder_hidden_states=cond["prompt_embeds"].to(dtype), return_dict=False)[0]


DDIM_LIKE = ("DDIMScheduler", "PNDMScheduler")
"""Schedulers whose last step lands on alphas_cumprod[0] unless `set_alpha_to_one` (all others end at sigma 0)."""


def ddim_settings(scheduler) -> dict:
    """The family sampler's DDIM settings for a pipeline whose scheduler is `scheduler`, every one explicit.

    Kept from the pipeline scheduler (they define the model or the stock step grid): the training noise schedule
    (num_train_timesteps, betas, rescale_betas_zero_snr), prediction_type, timestep_spacing and steps_offset (so a
    Turbo's 'trailing' 1-step grid starts at t = 999). Set here, never inherited from DDIM's own defaults:
    clip_sample and thresholding only where the pipeline itself runs DDIM (DDIM's default clip_sample=True would
    clamp x0 in latent space); set_alpha_to_one from DDIM/PNDM configs, True for every other scheduler (Euler, DPM,
    ...) whose last step lands on the clean sample. DDIM is exact for the model's forward process; with a non-DDIM
    stock scheduler (PNDM, Euler, DPM-Solver) the family sampler is a different discretisation of the same model,
    not a copy of the stock pipeline's output.
    """
    cfg = scheduler.config
    if cfg.get("thresholding", False):
        raise UserError(f"{type(scheduler).__name__} with thresholding=True is not supported by the family sampler")
    ddim_like = type(scheduler).__name__ in DDIM_LIKE
    is_ddim = type(scheduler).__name__ == "DDIMScheduler"
    return {
        "num_train_timesteps": cfg.get("num_train_timesteps", 1000),
        "beta_start": cfg.get("beta_start", 0.0001),
        "beta_end": cfg.get("beta_end", 0.02),
        "beta_schedule": cfg.get("beta_schedule", "linear"),
        "trained_betas": cfg.get("trained_betas"),
        "rescale_betas_zero_snr": cfg.get("rescale_betas_zero_snr", False),
        "prediction_type": cfg.get("prediction_type", "epsilon"),
        "timestep_spacing": cfg.get("timestep_spacing", "leading"),
        "steps_offset": cfg.get("steps_offset", 0),
        "set_alpha_to_one": cfg.get("set_alpha_to_one", True) if ddim_like else True,
        "clip_sample": cfg.get("clip_sample", True) if is_ddim else False,
        "clip_sample_range": cfg.get("clip_sample_range", 1.0),
    }
