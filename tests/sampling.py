"""Sampling helpers shared by the model-layer and RLG tests: the stock pipeline's images, the family sampler's, and a
perturbed LoRA."""

from __future__ import annotations

import torch


def perturb_lora(family, seed: int = 0, scale: float = 0.1) -> None:
    """Give the LoRA B matrices non-zero values (they start at zero, i.e. LoRA = identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in family.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def stock_images(
    pipe, prompt: str, seed: int, steps: int, family, guidance: float | None = None, resolution: int = 32
) -> torch.Tensor:
    """Images from the stock pipeline __call__ for one prompt, as [1,3,H,W] in [0,1]. FLUX: `guidance` is true CFG
    (with the empty negative prompt) on top of the embedded guidance; other families: CFG with the default negative."""
    kwargs = {
        "num_inference_steps": steps,
        "height": resolution,
        "width": resolution,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(seed),
    }
    if family.name == "flux":
        kwargs.update(guidance_scale=family.embedded_guidance, max_sequence_length=family.max_sequence_length)
        if guidance is not None and guidance != 1.0:
            kwargs.update(true_cfg_scale=guidance, negative_prompt="")
    else:
        kwargs.update(guidance_scale=3.0 if guidance is None else guidance)
    if family.name == "sd3":
        kwargs.update(max_sequence_length=family.max_sequence_length)
    return pipe(prompt, **kwargs).images


def family_sampler_images(family, prompt: str, seed: int, steps: int, guidance: float, resolution: int = 32):
    """The family's own sampler + decode for one prompt, with the stock pipeline's default negative for CFG."""
    latents = family.initial_noise(1, resolution, torch.Generator().manual_seed(seed))
    uncond = None
    if guidance != 1.0:
        uncond = family.encode_prompts([""]) if family.name == "flux" else family.encode_negative()
    with torch.no_grad():
        return family.decode(
            family.sample(
                family.encode_prompts([prompt]), uncond, latents=latents, num_steps=steps, guidance_scale=guidance
            )
        )


def with_family_scheduler(family):
    """The family's pipeline with the family sampler's scheduler swapped in where the stock one differs (PNDM,
    Euler, Euler-Ancestral): DDIM with the family's explicit settings. DDIM / flow-match pipelines are unchanged."""
    from diffusers import DDIMScheduler

    if hasattr(family, "ddim") and type(family.pipe.scheduler).__name__ != "DDIMScheduler":
        family.pipe.scheduler = DDIMScheduler.from_config(family.ddim.config)
    return family.pipe


# ------------------------------------------------------------------------------------------------------ building
