"""The interface every model family offers, and the parts that are the same for all of them.

A `Family` wraps a stock diffusers pipeline and is the only object that knows whether the denoiser is a UNet or a
transformer. Methods (DPO, InPO, AlignProp, ReNO, RLG) and rewards only use this interface:

    family.encode_prompts(prompts) -> Cond              per-prompt conditioning, a dict of [B, ...] tensors (cacheable)
    family.encode_negative(negative_prompt) -> Cond     the unconditional/negative conditioning for CFG, batch 1
    family.sample_train_timesteps(n) -> t               timesteps for the denoising loss (on the model's 0..1000 scale)
    family.noisy_and_target(x0, noise, t)               model input x_t and the regression target (eps, v or velocity)
    family.implied_target(x0, x_t, t)                   the target of the noise that makes x_t a noised x0 (InPO)
    family.predict(x_t, t, cond, uncond, cfg_scale)     denoiser prediction, with optional classifier-free guidance
    family.schedule(num_steps, latents) / .step(...)    differentiable sampler (DDIM+eta for UNets, flow Euler)
    family.sample(cond, ..., checkpoint, detach_before, predict) full differentiable sampling loop
    family.transition(x, pred, schedule, i, noise_level, sde)  the Gaussian (mean, std) of a stochastic sampler step
    family.rollout(cond, ..., noise_level, window) -> Trajectory  sampling that records latents and log-probs (RL)
    family.invert(x0, cond, t_end, num_steps, eta)     DDIM inversion (UNet) / reverse Euler (flow) to timesteps t_end
    family.encode_images(images) / .decode(latents)     images in [0, 1] <-> latents (scaling and shift applied)
    family.add_lora / save_lora / load_lora             peft LoRA on the denoiser, saved in the diffusers LoRA format
    family.load_denoiser(folder)                        a second denoiser of the same class (e.g. a full fine-tune)

Latents are always [B, C, h, w] here; families that pack latents (FLUX) pack and unpack inside `predict`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from diffalign.errors import UserError, error_text
from diffalign.hub import check_denoiser_folder, check_lora_folder, quiet_hf_logs

Cond = dict[str, Tensor]
PredictAt = Literal["start", "destination"]
"""Where an inversion step a -> b asks the model: at t_a or at t_b (see `Family.walk`)."""
PredictFn = Callable[..., Tensor]
"""predict(x, t, cond, uncond, guidance_scale) -> prediction, the signature of `Family.predict`."""


# ------------------------------------------------------------------------------------------------ conditioning helpers
def cond_select(cond: Cond, index: Tensor | slice | Sequence[int]) -> Cond:
    """Rows `index` of every tensor in `cond`."""
    return {k: v[index] for k, v in cond.items()}


def cond_cat(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditionings along the batch dimension; they must hold the same keys."""
    keys = set(conds[0])
    for cond in conds[1:]:
        if set(cond) != keys:
            raise ValueError(f"cond_cat: conditionings with different keys ({sorted(keys)} vs {sorted(cond)})")
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_expand(cond: Cond, batch_size: int) -> Cond:
    """Broadcast a batch-1 conditioning to `batch_size` rows (no copy)."""
    return {k: v.expand(batch_size, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in cond.items()}


def cond_to(cond: Cond, device: torch.device | str, dtype: torch.dtype | None = None) -> Cond:
    """Move (and for floating tensors cast) every tensor of `cond`."""
    return {
        k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
        for k, v in cond.items()
    }


@dataclass
class Schedule:
    """Timesteps of a sampling run plus the per-step coefficients the family's `step` needs."""

    timesteps: Tensor
    """[N] timesteps passed to the denoiser, on the 0..1000 scale."""
    coeffs: dict[str, Tensor] = field(default_factory=dict)
    """DDIM: alpha_t, alpha_prev ([N] each). Flow: sigmas ([N+1])."""

    def __len__(self) -> int:
        return len(self.timesteps)


@dataclass
class Trajectory:
    """A recorded sampling run (`Family.rollout`)."""

    latents: Tensor
    """[B, N+1, C, h, w]: the initial noise x_0, then the latent after each of the N steps (x_N the sample)."""
    log_probs: Tensor
    """[B, N] float32: log p(x_{i+1} | x_i) of each stochastic step (0 for a deterministic one)."""
    timesteps: Tensor
    """[N] the timesteps of the steps (0..1000 scale)."""
    stochastic: Tensor
    """[N] bool: which steps were drawn from the transition Gaussian (the ones RL can train on)."""
    means: Tensor
    """[B, N, C, h, w] float32: the mean each step's x_{i+1} was drawn around (x_{i+1} itself for a deterministic
    step): the rollout policy's means, which GRPO-Guard's ratio normalisation compares the current policy's with."""


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor | float, reduce: str = "mean") -> Tensor:
    """log N(x; mean, std² I) per sample [B], in float32: the mean over dimensions (DDPO, Flow-GRPO: the ratio of
    a step stays O(1) whatever the image size) or the sum (the true log-density of the whole latent)."""
    x, mean = x.float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    per_dim = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    dims = tuple(range(1, x.ndim))
    if reduce == "mean":
        return per_dim.mean(dim=dims)
    if reduce == "sum":
        return per_dim.sum(dim=dims)
    raise ValueError(f"gaussian_log_prob: reduce {reduce!r} is not mean or sum")


@dataclass
class LoraSpec:
    """What `add_lora` was asked for (kept to save the adapter with its metadata)."""

    rank: int
    alpha: float
    targets: list[str]
    dropout: float = 0.0


class Family:
    """Base class of the model families. Subclasses implement the few methods that differ (marked below)."""

    name: ClassVar[str]
    pipeline_class_name: ClassVar[str]
    denoiser_attr: ClassVar[str]  # "unet" or "transformer": the attribute of the pipeline and the LoRA key prefix
    default_lora_targets: ClassVar[list[str]] = ["to_k", "to_q", "to_v", "to_out.0"]
    text_encoder_attrs: ClassVar[tuple[str, ...]] = ("text_encoder",)
    default_num_steps: ClassVar[int] = 50
    default_guidance_scale: ClassVar[float] = 7.5
    unbatched_denoiser_inputs: ClassVar[tuple[str, ...]] = ()
    """Keyword inputs of the denoiser (as `denoise` and the stock pipeline call it) that carry no batch dimension,
    e.g. FLUX's position ids: a wrapper that stacks two batches in one call (RLG) must not stack these."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self._call_module: nn.Module | None = None  # e.g. the DDP-wrapped denoiser during training
        self._reference_module: nn.Module | None = None  # frozen copy for full fine-tune
        self.lora: LoraSpec | None = None
        self._adapter_layers: list[nn.Module] | None = None  # the peft LoRA layers, found once (see `reference`)
        # How this model samples by default; a `diffalign.json` next to model_index.json may override them (the toy).
        self.sampling_defaults: dict[str, Any] = {
            "num_steps": self.default_num_steps,
            "eta": 0.0,
            "guidance_scale": self.default_guidance_scale,
            "resolution": None,
        }
        pipe.set_progress_bar_config(disable=True)
        self._upcast_vae_if_needed()

    # ---------------------------------------------------------------------------------------------- components
    @property
    def denoiser(self) -> nn.Module:
        """The UNet or transformer (the raw module, never a DDP wrapper)."""
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def vae(self) -> nn.Module:
        return self.pipe.vae

    # The denoiser's first weight, not diffusers' `ModelMixin.device/.dtype`: those walk every module (offload-hook
    # search) on each call, ~10 ms per call for a small UNet on CPU, and training asks several times per step.
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the module `denoise` calls (the frozen reference copy may differ from the trained one)."""
        return next(self.model.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def native_resolution(self) -> int:
        """The resolution the denoiser was configured for (its sample_size in latent pixels x VAE factor)."""
        return int(self.denoiser.config.sample_size) * self.vae_scale_factor

    @property
    def resolution_multiple(self) -> int:
        """Image sides must be a multiple of this (the VAE factor; x2 where the denoiser patches or packs latents)."""
        return self.vae_scale_factor

    def check_resolution(self, resolution: int) -> int:
        """`resolution` if the model can take it, else a one-line UserError naming the nearest ones that work."""
        step = self.resolution_multiple
        if resolution % step:
            low, high = resolution // step * step, (resolution // step + 1) * step
            nearest = f"{low} or {high}" if low > 0 else str(high)
            raise UserError(f"resolution {resolution} is not a multiple of {step} for {self.name}: use {nearest}")
        return resolution

    def latent_shape(self, batch_size: int, resolution: int | None = None) -> tuple[int, int, int, int]:
        """Shape of the latents for `batch_size` images of `resolution` (default native) pixels."""
        side = self.check_resolution(resolution or self.native_resolution) // self.vae_scale_factor
        return (batch_size, self.latent_channels, side, side)

    def text_encoders(self) -> list[nn.Module]:
        return [m for m in (getattr(self.pipe, a, None) for a in self.text_encoder_attrs) if m is not None]

    def to(self, device: torch.device | str) -> Family:
        """Move the whole pipeline to `device`."""
        self.pipe.to(device)
        if self._reference_module is not None:
            self._reference_module.to(device)
        return self

    def freeze(self) -> None:
        """Freeze every weight of the pipeline (VAE, text encoders, denoiser) and put them in eval mode."""
        for module in [self.vae, self.denoiser, *self.text_encoders()]:
            module.requires_grad_(False)
            module.eval()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------------ prompts
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:  # family-specific
        """Conditioning for `prompts`: a dict of float tensors with batch dimension len(prompts)."""
        raise NotImplementedError

    def encode_negative(self, negative_prompt: str | None = None) -> Cond:  # family-specific
        """The conditioning that the stock pipeline uses as the CFG negative for `negative_prompt` (batch 1)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------- training
    default_timestep_weighting: ClassVar[str] = "uniform"
    """What the reference training scripts of this family draw timesteps from (see `sample_train_timesteps`)."""

    def sample_train_timesteps(
        self,
        n: int,
        generator: torch.Generator | None = None,
        weighting: str = "default",
        *,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
    ) -> Tensor:
        """n training timesteps (0..1000 scale) drawn with `weighting`: "uniform" over the training timesteps,
        "logit_normal" (u = sigmoid(N(logit_mean, logit_std))) or "mode" (Esser et al. 2024, eq. 20, `mode_scale`),
        via diffusers' `compute_density_for_timestep_sampling` as its SD3 scripts do; "default" is the family's choice
        (`default_timestep_weighting`). u in [0, 1) picks a position from the noisiest timestep (u = 0) to the
        cleanest, so the non-uniform schemes mean the same on every family. All draws come from `generator`."""
        if weighting == "default":
            weighting = self.default_timestep_weighting
        count = self.num_train_positions
        if weighting == "uniform":
            index = torch.randint(0, count, (n,), generator=generator)
        else:
            from diffusers.training_utils import compute_density_for_timestep_sampling

            if weighting not in ("logit_normal", "mode"):
                raise ValueError(f"unknown timestep weighting {weighting!r}: uniform, logit_normal or mode")
            u = compute_density_for_timestep_sampling(
                weighting, n, logit_mean, logit_std, mode_scale, device="cpu", generator=generator
            )
            index = (u * count).long().clamp(0, count - 1)
        return self.timesteps_at(index).to(self.device)

    @property
    def num_train_positions(self) -> int:  # family-specific
        """How many training timesteps there are to draw from."""
        raise NotImplementedError

    def timesteps_at(self, index: Tensor) -> Tensor:  # family-specific
        """The training timesteps at positions `index` (0 = the noisiest)."""
        raise NotImplementedError

    def noisy_and_target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """Model input x_t and the regression target for clean `latents`, `noise` and `timesteps` ([B])."""
        raise NotImplementedError  # family-specific

    def implied_target(self, latents: Tensor, noisy: Tensor, timesteps: Tensor) -> Tensor:
        """The regression target that makes `noisy` the forward-noised `latents` at `timesteps`: the target
        `noisy_and_target` returns for the noise ε̂ with noisy_and_target(latents, ε̂, timesteps)[0] == noisy (the
        reparametrisation of DDIM-InPO, `diffalign.losses.inpo`: ε̂, v̂ or the flow velocity ε̂ - x0)."""
        raise NotImplementedError  # family-specific

    def predicted_clean(self, noisy: Tensor, pred: Tensor, timesteps: Tensor) -> Tensor:  # family-specific
        """The clean latent x̂0 that a prediction at `noisy` x_t and `timesteps` ([B]) implies, in the family's
        parametrisation (ε, v or the flow velocity): an affine map of `pred`, so a combination of predictions whose
        weights sum to 1 maps to the same combination of their x̂0 (DiffusionNFT's implicit policies)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- prediction
    def denoise(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:  # family-specific
        """One denoiser call: x [B,C,h,w], t [B] (0..1000 scale), cond with batch B -> prediction [B,C,h,w]."""
        raise NotImplementedError

    @property
    def model(self) -> nn.Module:
        """The module `denoise` calls: the (possibly DDP-wrapped) denoiser, or the frozen reference."""
        return self._call_module if self._call_module is not None else self.denoiser

    @contextlib.contextmanager
    def calling(self, module: nn.Module) -> Iterator[None]:
        """Within the block `denoise` calls `module` (a DDP/FSDP wrapper of the denoiser, or a guidance wrapper)."""
        previous, self._call_module = self._call_module, module
        try:
            yield
        finally:
            self._call_module = previous

    def predict(
        self,
        x: Tensor,
        t: Tensor | float,
        cond: Cond,
        uncond: Cond | None = None,
        guidance_scale: float = 1.0,
        *,
        detach_uncond: bool = False,
    ) -> Tensor:
        """Denoiser prediction at x_t; with `uncond` and guidance_scale != 1, classifier-free guidance in one batch.
        `detach_uncond`: no gradient through the unconditional branch (Flow-GRPO's training forward)."""
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(batch)
        if uncond is None or guidance_scale == 1.0:
            return self.denoise(x, t, cond_expand(cond, batch))
        both = cond_cat([cond_expand(uncond, batch), cond_expand(cond, batch)])
        pred_uncond, pred_cond = self.denoise(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        if detach_uncond:
            pred_uncond = pred_uncond.detach()
        return pred_uncond + guidance_scale * (pred_cond - pred_uncond)

    # ------------------------------------------------------------------------------------------------ sampling
    stochastic_sampler: ClassVar[bool] = False  # True when `step` uses noise (DDIM with eta > 0)

    def schedule(self, num_steps: int, latents: Tensor) -> Schedule:  # family-specific
        raise NotImplementedError

    def step(
        self, x: Tensor, pred: Tensor, schedule: Schedule, i: int, eta: float = 0.0, noise: Tensor | None = None
    ) -> Tensor:  # family-specific
        """Sampler step i (x_t -> x_{t-1}); plain tensor math, so gradients flow through it."""
        raise NotImplementedError

    default_noise_level: ClassVar[float] = 0.0
    """The noise level of `transition` that the family's online-RL recipe defaults to (DDPO's η, Flow-GRPO's a)."""

    def transition(
        self, x: Tensor, pred: Tensor, schedule: Schedule, i: int, noise_level: float, sde: str = "default"
    ) -> tuple[Tensor, Tensor]:  # family-specific
        """(mean, std) of the Gaussian that sampler step i draws x_{i+1} from, given x_i and the prediction there:
        DDIM with η = noise_level for UNets, a flow SDE (`sde`) for flow families. noise_level 0 is the family's
        deterministic sampler step (`step` with eta 0)."""
        raise NotImplementedError

    def flow_time_step(self, schedule: Schedule, i: int) -> Tensor:  # family-specific
        """The size of sampler step i in flow-matching time (s from 1, noise, to 0, data): what GRPO-Guard weights
        a step's loss by (1/ds). A flow family's s is its sigma; a UNet's is that of the same ODE in flow variables."""
        raise NotImplementedError

    def transition_log_prob(
        self,
        x: Tensor,
        x_next: Tensor,
        pred: Tensor,
        schedule: Schedule,
        i: int,
        noise_level: float,
        sde: str = "default",
        reduce: str = "mean",
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(log p(x_next | x_i) [B], mean, std) of step i in float32 (see `gaussian_log_prob` for `reduce`)."""
        mean, std = self.transition(x, pred, schedule, i, noise_level, sde)
        mean = mean.float()
        return gaussian_log_prob(x_next.detach().float(), mean, std, reduce), mean, std

    @torch.no_grad()
    def rollout(
        self,
        cond: Cond,
        uncond: Cond | None = None,
        *,
        latents: Tensor,
        num_steps: int,
        guidance_scale: float = 1.0,
        noise_level: float,
        sde: str = "default",
        window: range | None = None,
        generator: torch.Generator | None = None,
        reduce: str = "mean",
    ) -> Trajectory:
        """Sample from `latents` recording what online RL trains on: every latent and, for the steps in `window`
        (default: all), drawn from the `transition` Gaussian with `noise_level`, the log-probability of the step taken;
        the other steps are the deterministic sampler (noise level 0). The step noise comes from `generator`."""
        schedule = self.schedule(num_steps, latents)
        window = range(len(schedule)) if window is None else window
        stochastic = torch.tensor([i in window and noise_level > 0 for i in range(len(schedule))])
        xs, means, log_probs = [latents], [], torch.zeros(latents.shape[0], len(schedule), device=latents.device)
        for i, t in enumerate(schedule.timesteps):
            x = xs[-1]
            pred = self.predict(x, t, cond, uncond, guidance_scale)
            if stochastic[i]:
                mean, std = self.transition(x, pred, schedule, i, noise_level, sde)
                mean = mean.float()
                x_next = mean + std * torch.randn(x.shape, generator=generator).to(x.device)
                log_probs[:, i] = gaussian_log_prob(x_next, mean, std, reduce)
            else:
                x_next = mean = self.step(x, pred, schedule, i).float()
            xs.append(x_next)
            means.append(mean)
        latents, means = torch.stack(xs, dim=1), torch.stack(means, dim=1)
        return Trajectory(latents, log_probs, schedule.timesteps, stochastic, means)

    def initial_noise(
        self, batch_size: int, resolution: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Initial latents x_T ~ N(0, I) for the family's own sampler (DDIM and flow Euler start at unit variance).

        Never scaled by the pipeline scheduler's `init_noise_sigma`: an Euler-type scheduler (SDXL, the Turbos) keeps
        x = x0 + sigma * eps and starts at sigma ~ 14.6, which is not the variable the family's sampler steps."""
        noise = torch.randn(self.latent_shape(batch_size, resolution), generator=generator, dtype=torch.float32)
        return noise.to(self.device)

    def sample(
        self,
        cond: Cond,
        uncond: Cond | None = None,
        *,
        latents: Tensor,
        num_steps: int | None = None,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        detach_before: int = 0,
        checkpoint: bool = True,
        predict: PredictFn | None = None,
    ) -> Tensor:
        """Run the sampler from `latents` and return the final clean latents.

        Differentiable when grad is enabled: steps i < `detach_before` run without gradient (their result is detached,
        AlignProp/DRaFT truncation), later steps keep the graph, and with `checkpoint` each denoiser call is recomputed
        in the backward pass instead of storing its activations. Sampler noise (eta > 0) is drawn up front from
        `generator`, so checkpointed and plain runs see the same noise. `predict(x, t, cond, uncond, guidance_scale)`
        replaces `self.predict` for every step: the hook for guidance that mixes predictions (e.g. RLG).
        """
        predict = predict or self.predict
        schedule = self.schedule(num_steps or self.sampling_defaults["num_steps"], latents)
        noises = None
        if eta > 0 and self.stochastic_sampler:
            noises = [torch.randn(latents.shape, generator=generator).to(latents) for _ in range(len(schedule))]
        grad = torch.is_grad_enabled()
        x = latents
        for i, t in enumerate(schedule.timesteps):
            with torch.set_grad_enabled(grad and i >= detach_before):
                if torch.is_grad_enabled() and checkpoint:
                    pred = torch.utils.checkpoint.checkpoint(
                        predict, x, t, cond, uncond, guidance_scale, use_reentrant=False
                    )
                else:
                    pred = predict(x, t, cond, uncond, guidance_scale)
                x = self.step(x, pred, schedule, i, eta=eta, noise=None if noises is None else noises[i])
        return x

    # ----------------------------------------------------------------------------------------------- inversion
    @torch.no_grad()
    def invert(
        self,
        x0: Tensor,
        cond: Cond,
        t_end: Tensor | float,
        num_steps: int = 10,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        predict_at: PredictAt = "start",
    ) -> Tensor:
        """DDIM inversion (UNet families) / reverse Euler on the flow (SD3, FLUX) of clean latents `x0` to timesteps
        `t_end` ([B] or one number, 0..1000 scale) in `num_steps` steps, without gradient, with the model as it is
        now (adapters on). The grid is t_i = i·t_end/num_steps per sample; each step asks the model at its start
        timestep, or at its destination (`predict_at`, see `walk`).

        With a perfect model (one that returns the true target) the result is exactly the forward-noised latent
        `noisy_and_target(x0, noise, t_end)[0]`; asking at the destination it is exact for ε-prediction and flow
        models (whose true target does not depend on t), not for v-prediction. With `eta` > 0, after each step
        N(0, I)·eta·σ_i is added (InPO, Lu et al. 2025): σ_i is the DDIM step std of that step (UNet) or
        sqrt(σ_{i+1}² - σ_i²) on the flow.
        """
        t_end = torch.as_tensor(t_end, dtype=torch.float32, device=x0.device).reshape(-1).expand(x0.shape[0])
        zero = torch.zeros_like(t_end)
        return self.walk(x0, cond, zero, t_end, num_steps, eta=eta, generator=generator, predict_at=predict_at)

    def walk(
        self,
        x: Tensor,
        cond: Cond,
        t_from: Tensor,
        t_to: Tensor,
        num_steps: int,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        predict_at: PredictAt = "start",
    ) -> Tensor:
        """Move latents `x` at timesteps `t_from` to `t_to` ([B] each, 0 = clean) in `num_steps` deterministic steps
        along the linear grid (DDIM for UNets, Euler for flow; the same update both ways): t_to > t_from inverts,
        t_to < t_from denoises. `eta` > 0 adds noise after each step (inversion only).

        `predict_at`: where each step a -> b asks the model, with the latent at a. "start": at t_a, the sampler's
        rule (a denoising walk is the DDIM / Euler sampler). "destination": at t_b, as diffusers'
        `DDIMInverseScheduler` inverts (the first step never asks for the noise of a clean latent at t = 0); the
        prediction is read with t_a's coefficients either way, as that scheduler does (for v-prediction an
        approximation even of a perfect model)."""
        for i in range(num_steps):
            t_a = t_from + (t_to - t_from) * (i / num_steps)
            t_b = t_from + (t_to - t_from) * ((i + 1) / num_steps)
            pred = self.predict(x, self.model_timesteps(t_a if predict_at == "start" else t_b), cond)
            x, std = self.walk_step(x, pred, t_a, t_b)
            if eta > 0:
                x = x + eta * std * torch.randn(x.shape, generator=generator).to(x)
        return x

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Timesteps as the denoiser takes them (the UNet families round to the discrete training grid)."""
        return t

    def walk_step(self, x: Tensor, pred: Tensor, t_a: Tensor, t_b: Tensor) -> tuple[Tensor, Tensor]:
        """(x at t_b from x at t_a and the prediction made there, the std of the DDIM/flow noise of that step)."""
        raise NotImplementedError  # family-specific

    # ---------------------------------------------------------------------------------------------------- VAE
    def _upcast_vae_if_needed(self) -> None:
        """A float16 VAE whose config sets `force_upcast` (SDXL's, SD3's, FLUX's) runs in float32, as the stock SDXL
        pipeline does and diffusers' SDXL DPO script keeps it ("to avoid NaN losses"); an fp16-fix VAE
        (force_upcast false) stays in float16."""
        if self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            with quiet_hf_logs("diffusers"):  # "cast with to(): modules kept in float32: []" (there are none)
                self.vae.to(torch.float32)

    def set_vae(self, vae: nn.Module) -> None:
        """Replace the pipeline's VAE (e.g. madebyollin/sdxl-vae-fp16-fix), frozen, on the pipeline's device."""
        vae = vae.to(self.vae.device).requires_grad_(False).eval()
        self.pipe.register_modules(vae=vae)
        self._upcast_vae_if_needed()

    @property
    def _vae_scale_shift(self) -> tuple[float, float]:
        cfg = self.vae.config
        return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Images [B,3,H,W] in [0,1] -> latents (posterior sample, or its mode if not `sample`), scaled and shifted."""
        scale, shift = self._vae_scale_shift
        dist = self.vae.encode((images * 2 - 1).to(self.vae.device, self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return ((z - shift) * scale).float()

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images [B,3,H,W] in [0,1] (float32), differentiable."""
        scale, shift = self._vae_scale_shift
        images = self.vae.decode((latents / scale + shift).to(self.vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # --------------------------------------------------------------------------------------------------- LoRA
    def add_lora(
        self, rank: int = 4, alpha: float | None = None, targets: Sequence[str] | None = None, dropout: float = 0.0
    ) -> list[nn.Parameter]:
        """Freeze the pipeline and add a peft LoRA adapter to the denoiser; returns the (only) trainable parameters.

        B is initialised to zero (LoRA starts as the identity), A gaussian, as diffusers' training scripts do.
        """
        from peft import LoraConfig

        self.freeze()
        spec = LoraSpec(
            rank=rank,
            alpha=float(alpha if alpha is not None else rank),
            targets=list(targets or self.default_lora_targets),
            dropout=dropout,
        )
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            target_modules=spec.targets,
            lora_dropout=dropout,
            init_lora_weights="gaussian",
        )
        self.denoiser.add_adapter(config)
        self.lora, self._adapter_layers = spec, None
        params = self.trainable_parameters()
        for p in params:  # LoRA weights train in float32 even when the base weights are half precision
            p.data = p.data.float()
        return params

    def enable_full_finetune(self) -> list[nn.Parameter]:
        """Freeze VAE and text encoders, keep a frozen reference copy (in the load dtype) and make every denoiser
        weight trainable in float32: half-precision weights would lose most small updates (one AdamW step at lr
        1e-5 changed 6.9% of bf16 weights); mixed precision autocasts the compute, not the weights."""
        self.freeze()
        self._reference_module = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
        self.denoiser.to(torch.float32).requires_grad_(True)
        return self.trainable_parameters()

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within the block `denoise` is the reference model (LoRA disabled, or the frozen copy) under no_grad."""
        with torch.no_grad():
            if self._reference_module is not None:
                with self.calling(self._reference_module):
                    yield
            elif self.lora is not None:
                # Same (possibly DDP/FSDP-wrapped) module, adapters off: sharded weights stay reachable. The layers
                # are found once: diffusers' disable_adapters() walks every module of the denoiser on each call
                # (~32 ms of a 440 ms toy DPO step).
                layers = self.adapter_layers()
                for layer in layers:
                    layer.enable_adapters(False)
                try:
                    yield
                finally:
                    for layer in layers:
                        layer.enable_adapters(True)
            else:
                yield

    def adapter_layers(self) -> list[nn.Module]:
        """The denoiser's peft adapter layers (found once after each add/load/unload of a LoRA)."""
        if self._adapter_layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._adapter_layers = [m for m in self.denoiser.modules() if isinstance(m, BaseTunerLayer)]
        return self._adapter_layers

    def lora_state_dict(self) -> dict[str, Tensor]:
        """LoRA weights of the denoiser with peft's key names (`...to_q.lora_A.weight`, no 'unet.' prefix).

        Saved as they are, like diffusers' SD3 and FLUX LoRA scripts do. NOT through
        `convert_state_dict_to_diffusers`, which renames only to_q/to_k/to_v/to_out.0 keys: with any other target
        the file mixes two formats, and the stock loader (which picks the format from the first key) silently drops
        the adapters of one of them (SD3 with add_*_proj targets: 15 modules -> 7)."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.denoiser)

    def save_lora(self, folder: str | Path) -> Path:
        """Save the adapter as `pytorch_lora_weights.safetensors` with its config metadata (rank, alpha, targets), so
        stock `pipe.load_lora_weights(folder)` restores every adapted module exactly."""
        if self.lora is None:
            raise RuntimeError("save_lora: this model has no LoRA adapter (call add_lora first)")
        folder = Path(folder)
        metadata = self.denoiser.peft_config["default"].to_dict()
        type(self.pipe).save_lora_weights(
            folder,
            **{
                f"{self.denoiser_attr}_lora_layers": self.lora_state_dict(),
                f"{self.denoiser_attr}_lora_adapter_metadata": metadata,
            },
            safe_serialization=True,
        )
        return folder

    def load_lora(self, folder: str | Path, adapter_name: str | None = None) -> None:
        """Load a diffusers-format LoRA folder (ours or any other) into the pipeline with the stock loader.

        A folder that is not a LoRA of this model is a one-line UserError naming it."""
        import warnings

        from diffusers.utils import logging as diffusers_logging

        check_lora_folder(folder)
        before = set(getattr(self.denoiser, "peft_config", None) or {})
        # "no LoRA keys for the text encoder" is true of every denoiser-only LoRA; a failed load's own reports
        # (a logged error, peft's warnings) become the one-line error below, a successful load's warnings are shown.
        with quiet_hf_logs("diffusers"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
            try:
                self.pipe.load_lora_weights(str(folder), adapter_name=adapter_name)
            except (OSError, ValueError, KeyError, RuntimeError) as e:  # corrupt file, another model's shapes/keys
                raise UserError(f"LoRA {folder} does not load into this {self.name} model: {error_text(e)}") from e
        for warning in caught:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        added = [name for name in getattr(self.denoiser, "peft_config", None) or {} if name not in before]
        if not added:
            raise UserError(f"LoRA {folder} has no weights for this model's {self.denoiser_attr}: is it a LoRA of it?")
        config = self.denoiser.peft_config[adapter_name or added[-1]]
        self.lora = LoraSpec(rank=config.r, alpha=float(config.lora_alpha), targets=sorted(config.target_modules or []))
        self._adapter_layers = None

    def load_denoiser(self, folder: str | Path) -> nn.Module:
        """A second denoiser of this model's class from `folder` (written by `save_pretrained`, e.g. a full
        fine-tune's `output_dir/denoiser`), frozen, in eval mode, on this model's device and in its dtype."""
        check_denoiser_folder(folder)
        try:
            with quiet_hf_logs("diffusers"):
                module = type(self.denoiser).from_pretrained(str(folder), torch_dtype=self.denoiser.dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(
                f"denoiser {folder} does not load as this {self.name} model's denoiser: {error_text(e)}"
            ) from e
        return module.to(self.device).requires_grad_(False).eval()

    def unload_lora(self) -> None:
        """Remove every LoRA adapter from the denoiser (added or loaded): back to the base model."""
        if getattr(self.denoiser, "peft_config", None):
            self.pipe.unload_lora_weights()
            if getattr(self.denoiser, "peft_config", None):  # an adapter added by add_lora is not the pipeline's
                self.denoiser.delete_adapters(list(self.denoiser.peft_config))
        self.lora, self._adapter_layers = None, None
