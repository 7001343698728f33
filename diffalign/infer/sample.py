"""Sampling images from any family, batched, one seed per image (so results do not depend on the batch size)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffalign.models import Family, cond_select


def initial_latents(family: Family, seeds: Sequence[int], resolution: int | None = None) -> Tensor:
    """x_T for each seed: image i's noise depends only on seeds[i]."""
    res = resolution or family.sampling_defaults["resolution"]
    return torch.cat([family.initial_noise(1, res, torch.Generator().manual_seed(int(s))) for s in seeds])


def sampling_settings(
    family: Family, num_steps: int | None = None, guidance_scale: float | None = None, eta: float | None = None
) -> dict:
    """The family's sampling defaults with the given values overriding them."""
    given = {"num_steps": num_steps, "guidance_scale": guidance_scale, "eta": eta}
    return {**family.sampling_defaults, **{k: v for k, v in given.items() if v is not None}}


@torch.no_grad()
def sample_images(
    family: Family,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    eta: float | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
    description: str = "sampling",
) -> Tensor:
    """Images [N,3,H,W] in [0,1] for prompts[i] with seeds[i], using the family's sampler and its default settings
    unless overridden. The family sampler is DDIM (UNet families) or flow-matching Euler (SD3/FLUX): at eta = 0 it
    gives the stock pipeline's images when the pipeline's scheduler is DDIM / FlowMatchEuler; with another stock
    scheduler (SD 1.5's PNDM, SDXL's Euler, a DPM-Solver) it is another discretisation of the same model."""
    if len(prompts) != len(seeds):
        raise ValueError("sample_images: one seed per prompt")
    settings = sampling_settings(family, num_steps, guidance_scale, eta)
    unique = list(dict.fromkeys(prompts))
    cond_all = family.encode_prompts(unique)
    position = {p: i for i, p in enumerate(unique)}
    use_cfg = settings["guidance_scale"] != 1.0
    uncond = family.encode_negative(negative_prompt) if use_cfg else None
    chunks = []
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        # advanced at every sampler step (not per batch: a batch of 64 images can take a minute on a CPU)
        task = bar.add_task(description, total=len(prompts) * settings["num_steps"])

        def predict(x: Tensor, *args) -> Tensor:
            bar.advance(task, x.shape[0])
            return family.predict(x, *args)

        for start in range(0, len(prompts), batch_size):
            batch_prompts = prompts[start : start + batch_size]
            batch_seeds = seeds[start : start + batch_size]
            cond = cond_select(cond_all, torch.tensor([position[p] for p in batch_prompts]))
            generator = torch.Generator().manual_seed(int(batch_seeds[0]) + 7919)
            latents = initial_latents(family, batch_seeds, settings["resolution"])
            hook = predict if progress else None
            chunks.append(sample_batch(family, cond, uncond, latents, settings, generator, hook))
    return torch.cat(chunks)


def sample_batch(family: Family, cond, uncond, latents: Tensor, settings: dict, generator=None, predict=None) -> Tensor:
    """Images [B,3,H,W] in [0,1] (on the CPU) from the initial `latents` with the family's sampler and `settings`
    (`sampling_settings`: num_steps, guidance_scale, eta)."""
    out = family.sample(
        cond, uncond, latents=latents, num_steps=settings["num_steps"], guidance_scale=settings["guidance_scale"],
        eta=settings["eta"], generator=generator, predict=predict,
    )  # fmt: skip
    return family.decode(out).cpu()


@torch.no_grad()
def sample_from_noise(
    family: Family,
    prompts: Sequence[str],
    noise: Tensor,
    *,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 16,
) -> Tensor:
    """Images [N,3,H,W] in [0,1] for prompts[i] from the initial noise `noise[i]` ([N, C, h, w], unit variance as
    `initial_latents` draws it) with the family's deterministic sampler (eta 0) and its defaults unless overridden:
    e.g. ReNO's optimised noise rendered by a multi-step model. A noise of another shape than the family's latents
    is a one-line UserError."""
    from diffalign.errors import UserError

    expected = family.latent_shape(1, noise.shape[-1] * family.vae_scale_factor)[1:]
    if tuple(noise.shape[1:]) != tuple(expected):
        raise UserError(
            f"the noise has shape {tuple(noise.shape[1:])} but this {family.name} model's latents are {tuple(expected)}"
            ": render it with a model of the same latent space (channels and VAE factor)"
        )
    settings = sampling_settings(family, num_steps, guidance_scale, 0.0)
    uncond = family.encode_negative(negative_prompt) if settings["guidance_scale"] != 1.0 else None
    chunks = []
    for start in range(0, len(prompts), batch_size):
        cond = family.encode_prompts(list(prompts[start : start + batch_size]))
        latents = noise[start : start + batch_size].to(family.device, torch.float32)
        chunks.append(sample_batch(family, cond, uncond, latents, settings))
    return torch.cat(chunks)
