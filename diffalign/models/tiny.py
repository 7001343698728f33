"""Tiny same-class pipelines for every family, built from configs with locally written tokenizers (no downloads).

The classes are exactly those of the real checkpoints (UNet2DConditionModel, SD3Transformer2DModel,
FluxTransformer2DModel, AutoencoderKL, CLIPTextModel(WithProjection), T5EncoderModel), only narrow. Building is
deterministic in `seed`. Used by the tests and as the starting point of the toy world's model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable

import torch

TINY_WORDS = (
    "a an the photo of on in with and red green blue yellow white black gray purple orange circle square triangle "
    "background small large big cat dog tree house car sky"
)
TINY_RESOLUTION = 32
TINY_SAMPLING = {"num_steps": 4, "guidance_scale": 3.0, "eta": 0.0, "resolution": TINY_RESOLUTION}


def clip_tokenizer(words: Iterable[str] = (TINY_WORDS,), model_max_length: int = 77):
    """A CLIPTokenizer whose vocabulary has each of `words` as one token (plus single-character fallback)."""
    from transformers import CLIPTokenizer

    from diffalign.models.tokenizers import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer(folder, words, model_max_length)
        return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)


def t5_tokenizer(words: Iterable[str] = (TINY_WORDS,), model_max_length: int = 32):
    """A T5 tokenizer (Unigram) with each of `words` as one piece."""
    from transformers import T5TokenizerFast

    from diffalign.models.tokenizers import write_t5_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_t5_tokenizer(folder, words, model_max_length)
        return T5TokenizerFast.from_pretrained(folder)


def clip_text_model(tokenizer, hidden: int = 32, layers: int = 2, projection: int | None = None, heads: int = 4):
    """A CLIP text encoder for `tokenizer` (CLIPTextModelWithProjection when `projection` is given)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
        **({"projection_dim": projection} if projection else {}),
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def clip_model(
    tokenizer,
    *,
    text: tuple[int, int, int],
    vision: tuple[int, int, int],
    image_size: int,
    patch_size: int,
    projection_dim: int,
    mlp_ratio: int = 2,
    hidden_act: str = "quick_gelu",
):
    """A transformers CLIPModel for `tokenizer`; `text` and `vision` give each tower's (width, layers, heads)."""
    from transformers import CLIPConfig, CLIPModel

    def tower(width: int, layers: int, heads: int) -> dict:
        return {
            "hidden_size": width,
            "intermediate_size": width * mlp_ratio,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "hidden_act": hidden_act,
        }

    text_config = tower(*text) | {
        "vocab_size": len(tokenizer),
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = tower(*vision) | {"image_size": image_size, "patch_size": patch_size, "num_channels": 3}
    return CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim))


def save_clip_folder(folder, model, tokenizer, image_size: int, mean: Iterable[float], std: Iterable[float]):
    """Save a CLIPModel like a hub repository: weights, tokenizer and the preprocessor_config.json of a
    CLIPImageProcessor (bicubic resize of the shortest edge to `image_size`, centre crop, normalise by mean/std)."""
    from pathlib import Path

    from transformers import CLIPImageProcessor

    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(mean),
        image_std=list(std),
    ).save_pretrained(folder)
    return folder


def t5_encoder(tokenizer, d_model: int = 64, layers: int = 2):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=d_model * 2,
        num_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def vae(
    latent_channels: int = 4,
    block_out_channels=(32, 64),
    scaling_factor: float = 0.18215,
    shift_factor: float | None = None,
    quant_conv: bool = True,
    norm_num_groups: int | None = None,
    mid_attention: bool = True,
    sample_size: int = TINY_RESOLUTION,
):
    """An AutoencoderKL with one resnet per block; `len(block_out_channels) - 1` halvings of the resolution."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        sample_size=sample_size,
        norm_num_groups=norm_num_groups or min(32, block_out_channels[0]),
        mid_block_add_attention=mid_attention,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )


def ddim_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def unet(
    cross_attention_dim: int,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    latent_channels: int = 4,
    sample_size: int = TINY_RESOLUTION // 2,
    attention_head_dim=8,
    **extra,
):
    """A UNet2DConditionModel with one layer per block (SD-style; `extra` adds e.g. SDXL's text_time embedding)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        layers_per_block=1,
        block_out_channels=block_out_channels,
        down_block_types=down_block_types,
        up_block_types=up_block_types,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=32,
        **extra,
    )


def build_tiny_sd(seed: int = 0, prediction_type: str = "epsilon"):
    """StableDiffusionPipeline: UNet (32, 64), VAE (32, 64), 2-layer CLIP text encoder, DDIM."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    denoiser = unet(cross_attention_dim=32)
    return StableDiffusionPipeline(
        vae=vae(),
        text_encoder=clip_text_model(tokenizer),
        tokenizer=tokenizer,
        unet=denoiser,
        scheduler=ddim_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd_v(seed: int = 0):
    """The tiny SD pipeline with v-prediction (as SD 2.x 768)."""
    return build_tiny_sd(seed, prediction_type="v_prediction")


def build_tiny_sdxl(seed: int = 0):
    """StableDiffusionXLPipeline: two CLIP encoders (32 + 32 -> cross-attention 64), text_time embedding."""
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    denoiser = unet(
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    return StableDiffusionXLPipeline(
        vae=vae(scaling_factor=0.13025),
        text_encoder=clip_text_model(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=clip_text_model(tokenizer, projection=32),
        tokenizer_2=tokenizer,
        unet=denoiser,
        scheduler=ddim_scheduler(),
    )


def flow_scheduler(**kwargs):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, **kwargs)


def build_tiny_sd3(seed: int = 0):
    """StableDiffusion3Pipeline: SD3Transformer2DModel (2 joint blocks), 2 CLIPs with projection + T5, flow matching."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tokenizer, tokenizer_t5 = clip_tokenizer(), t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=TINY_RESOLUTION // 2,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=32,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=flow_scheduler(),
        vae=vae(scaling_factor=1.5305, shift_factor=0.0609, quant_conv=False),
        text_encoder=clip_text_model(tokenizer, projection=32),
        tokenizer=tokenizer,
        text_encoder_2=clip_text_model(tokenizer, projection=32),
        tokenizer_2=tokenizer,
        text_encoder_3=t5_encoder(tokenizer_t5),
        tokenizer_3=tokenizer_t5,
    )


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True):
    """FluxPipeline: FluxTransformer2DModel (1 double + 1 single block), CLIP pooled + T5, packed latents.
    guidance_embeds=True is FLUX.1-dev-like, False schnell-like."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_t5 = clip_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    scheduler = flow_scheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae(scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False),
        text_encoder=clip_text_model(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=t5_encoder(tokenizer_t5),
        tokenizer_2=tokenizer_t5,
    )


def build_tiny_flux_schnell(seed: int = 0):
    return build_tiny_flux(seed, guidance_embeds=False)


def _eval(builder: Callable[..., object]) -> Callable[..., object]:
    """Wrap a builder so every component is in eval mode, as `from_pretrained` leaves it (T5 has dropout)."""

    def build(seed: int = 0):
        pipe = builder(seed)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        return pipe

    build.__doc__ = builder.__doc__
    return build


TINY_BUILDERS: dict[str, Callable[..., object]] = {
    "sd": build_tiny_sd,
    "sd-v": build_tiny_sd_v,
    "sdxl": build_tiny_sdxl,
    "sd3": build_tiny_sd3,
    "flux": build_tiny_flux,
    "flux-schnell": build_tiny_flux_schnell,
}
TINY_BUILDERS = {name: _eval(builder) for name, builder in TINY_BUILDERS.items()}
