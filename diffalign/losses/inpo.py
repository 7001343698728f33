"""DDIM-InPO (Lu et al., "InPO: Inversion Preference Optimization with Reparametrized DDIM for Efficient Diffusion
Model Alignment", CVPR 2025, arXiv 2503.18454): the reparametrised regression target of an inverted latent.

InPO treats the diffusion model as a one-step generator of x0 from a latent x_t and picks x_t by DDIM inversion of
the preference images (with the current model, no gradient) instead of forward-noising them with fresh noise. Any
latent x_t can be read as a forward-noised x0 with a *reparametrised* noise: the ε̂ for which
x_t = sqrt(ᾱ_t)·x0 + sqrt(1 - ᾱ_t)·ε̂ holds exactly. That ε̂ (or the v / velocity it implies) is the target the model
regresses at x_t, and the implicit reward of the latent is the same denoising error Diffusion-DPO uses. The paper's
equation numbers could not be checked offline; the formulas below are those of the official code
(JaydenLyh/InPO train.py: `noise = (noisy_latents - start_latents * alpha_prod_t ** 0.5) / beta_prod_t ** 0.5`,
epsilon-prediction only), extended here to v-prediction and to flow matching by the same reasoning:

  epsilon (SD 1.x, SDXL):  x_t = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε̂            =>  ε̂ = (x_t - sqrt(ᾱ)·x0) / sqrt(1-ᾱ)
  v (SD 2.x 768):          v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x0 with ε = ε̂   =>  v̂ = (sqrt(ᾱ)·x_t - x0) / sqrt(1-ᾱ)
      (substitute ε̂: sqrt(ᾱ)(x_t - sqrt(ᾱ)x0)/sqrt(1-ᾱ) - sqrt(1-ᾱ)x0 = (sqrt(ᾱ)x_t - ᾱx0 - (1-ᾱ)x0)/sqrt(1-ᾱ))
  flow (SD3, FLUX):        x_t = (1-σ)·x0 + σ·ε̂                       =>  ε̂ = (x_t - (1-σ)·x0) / σ
                           target = velocity ε̂ - x0                    =>  û = (x_t - x0) / σ
      (beyond the paper: the same reparametrisation for a rectified-flow model, whose target is ε - x0)

Each is exact: when x_t is the forward-noised latent of x0 with noise ε, the reparametrised target equals the
training target of that noise (ε, v or ε - x0), so InPO with such an x_t IS Diffusion-DPO.

The objective. Given the inverted latents of winner and loser (same t) and their reparametrised targets, InPO's loss
is the Diffusion-DPO loss of the policy's and the reference's errors against those targets — `dpo_loss` of
`diffalign.losses.dpo` with the same β convention, reused unchanged (JaydenLyh/InPO computes exactly the SF-DPO
sigmoid loss, `-logsigmoid(-β/2·(model_diff - ref_diff))`, on the inverted input and ε̂). `diffalign.train.inpo`
composes the two; the models layer picks which of the targets below a family regresses (`Family.implied_target`).
"""

from __future__ import annotations

from torch import Tensor


def noise_from_inversion(noisy: Tensor, x0: Tensor, alpha: Tensor) -> Tensor:
    """ε̂ = (x_t - sqrt(ᾱ_t)·x0) / sqrt(1 - ᾱ_t): the noise that makes `noisy` the forward-noised `x0` (DDPM
    parametrisation). `alpha` is ᾱ_t broadcastable to x0 ([B, 1, 1, 1]); it must be < 1."""
    return (noisy - alpha.sqrt() * x0) / (1 - alpha).sqrt()


def v_from_inversion(noisy: Tensor, x0: Tensor, alpha: Tensor) -> Tensor:
    """v̂ = sqrt(ᾱ_t)·ε̂ - sqrt(1 - ᾱ_t)·x0 = (sqrt(ᾱ_t)·x_t - x0) / sqrt(1 - ᾱ_t): the v-prediction target of the
    reparametrised noise (Salimans & Ho 2022, v = sqrt(ᾱ)ε - sqrt(1-ᾱ)x0)."""
    return (alpha.sqrt() * noisy - x0) / (1 - alpha).sqrt()


def velocity_from_inversion(noisy: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """û = ε̂ - x0 = (x_t - x0) / σ with ε̂ = (x_t - (1-σ)·x0) / σ: the rectified-flow velocity target of the
    reparametrised noise (x_t = (1-σ)·x0 + σ·ε, target ε - x0). `sigma` broadcastable to x0; it must be > 0."""
    return (noisy - x0) / sigma
