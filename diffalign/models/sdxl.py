"""SDXL: two CLIP text encoders (penultimate hidden states concatenated), pooled embeds from encoder 2, add_time_ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from diffalign.models.base import Cond
from diffalign.models.sd import UNetFamily


class SDXLFamily(UNetFamily):
    """SDXL (StableDiffusionXLPipeline). `cond` may carry "time_ids" [B, 6] = (orig_h, orig_w, crop_top, crop_left,
    target_h, target_w) from the data; without it the pipeline default (no crop, original = target size) is used."""

    name: ClassVar[str] = "sdxl"
    pipeline_class_name: ClassVar[str] = "StableDiffusionXLPipeline"
    text_encoder_attrs: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    default_guidance_scale: ClassVar[float] = 5.0

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def encode_negative(self, negative_prompt: str | None = None) -> Cond:
        """Zeros when no negative prompt is given and the pipeline sets force_zeros_for_empty_prompt (as the stock
        pipeline); an explicit "" is encoded like any prompt."""
        if negative_prompt is None and self.pipe.config.force_zeros_for_empty_prompt:
            cond = self.encode_prompts([""])
            return {k: torch.zeros_like(v) for k, v in cond.items()}
        return self.encode_prompts([negative_prompt or ""])

    def default_time_ids(self, x: Tensor) -> Tensor:
        """(H, W, 0, 0, H, W) in pixels for latents `x`: the pipeline's default when no crop/size info is given."""
        h, w = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=x.device).expand(x.shape[0], 6)

    def denoise(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dtype = self.dtype
        time_ids = cond.get("time_ids")
        if time_ids is None:
            time_ids = self.default_time_ids(x)
        added = {"text_embeds": cond["pooled_prompt_embeds"].to(dtype), "time_ids": time_ids.to(dtype)}
        return self.model(
            x.to(dtype),
            t,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
