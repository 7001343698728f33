"""SD3 / SD3.5: SD3Transformer2DModel (MMDiT), two CLIPs + T5, rectified flow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from diffalign.models.base import Cond
from diffalign.models.flow import FlowFamily


class SD3Family(FlowFamily):
    """SD3 / SD3.5 (StableDiffusion3Pipeline)."""

    name: ClassVar[str] = "sd3"
    pipeline_class_name: ClassVar[str] = "StableDiffusion3Pipeline"
    text_encoder_attrs: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2", "text_encoder_3")
    default_guidance_scale: ClassVar[float] = 7.0
    default_timestep_weighting: ClassVar[str] = "logit_normal"  # diffusers' SD3 training scripts' default
    default_lora_targets: ClassVar[list[str]] = [  # diffusers' train_dreambooth_lora_sd3.py default
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    ]

    @property
    def resolution_multiple(self) -> int:
        return self.vae_scale_factor * int(self.denoiser.config.patch_size)

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens: the pipeline default 256, or fewer if the T5 tokenizer is shorter."""
        tokenizer = self.pipe.tokenizer_3
        return 256 if tokenizer is None else min(256, int(tokenizer.model_max_length))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def encode_negative(self, negative_prompt: str | None = None) -> Cond:
        # The SD3 pipeline encodes its negative ("" by default) exactly like a prompt.
        return self.encode_prompts([negative_prompt or ""])

    def _set_sampling_timesteps(self, scheduler, num_steps: int, latents: Tensor) -> None:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = self.denoiser.config.patch_size
            seq_len = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
            cfg = scheduler.config
            kwargs["mu"] = calculate_shift(
                seq_len,
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(num_steps, **kwargs)

    def denoise(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dtype = self.dtype
        return self.model(
            hidden_states=x.to(dtype),
            timestep=t,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]
