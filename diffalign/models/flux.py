"""FLUX.1 (dev / schnell): FluxTransformer2DModel on packed 2x2 latent patches, CLIP pooled + T5, rectified flow.

FLUX.1-dev is guidance-distilled: the guidance strength is an input of the transformer (`embedded_guidance`, default
3.5), and classifier-free guidance with a negative prompt ("true CFG") is optional. FLUX.1-schnell has no
guidance input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from diffalign.models.base import Cond
from diffalign.models.flow import FlowFamily


class FluxFamily(FlowFamily):
    """FLUX.1 (FluxPipeline). Latents stay [B, C, h, w] outside; `denoise` packs them for the transformer."""

    name: ClassVar[str] = "flux"
    pipeline_class_name: ClassVar[str] = "FluxPipeline"
    text_encoder_attrs: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    default_guidance_scale: ClassVar[float] = 1.0  # true CFG off, as in the stock pipeline
    embedded_guidance: float = 3.5
    unbatched_denoiser_inputs: ClassVar[tuple[str, ...]] = ("txt_ids", "img_ids")  # [seq, 3] position ids
    default_lora_targets: ClassVar[list[str]] = [  # diffusers' train_dreambooth_lora_flux.py default
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    ]

    @property
    def resolution_multiple(self) -> int:
        """Latents are packed in 2x2 patches."""
        return self.vae_scale_factor * 2

    @property
    def max_sequence_length(self) -> int:
        return min(512, int(self.pipe.tokenizer_2.model_max_length))

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels // 4

    @property
    def native_resolution(self) -> int:
        return int(self.pipe.default_sample_size) * self.vae_scale_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def encode_negative(self, negative_prompt: str | None = None) -> Cond:
        return self.encode_prompts([negative_prompt or ""])

    def _set_sampling_timesteps(self, scheduler, num_steps: int, latents: Tensor) -> None:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = scheduler.config
        seq_len = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        mu = calculate_shift(
            seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        scheduler.set_timesteps(num_steps if sigmas is None else None, sigmas=sigmas, mu=mu)

    def denoise(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        pipe, dtype = self.pipe, self.dtype
        b, c, h, w = x.shape
        packed = pipe._pack_latents(x.to(dtype), b, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dtype)
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=x.device, dtype=dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((b,), self.embedded_guidance, device=x.device, dtype=torch.float32)
        out = self.model(
            hidden_states=packed,
            timestep=t.to(dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return pipe._unpack_latents(out, h * self.vae_scale_factor, w * self.vae_scale_factor, self.vae_scale_factor)
