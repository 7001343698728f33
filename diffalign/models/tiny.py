"""Tiny same-class pipelines for every family, built from configs with locally written tokenizers (no downloads).

The classes are exactly those of the real checkpoints (UNet2DConditionModel, SD3Transformer2DModel,
FluxTransformer2DModel, AutoencoderKL, CLIPTextModel(WithProjection), T5EncoderModel), only narrow, and each tiny
pipeline carries the scheduler and VAE settings PUBLISHED with a real checkpoint (`published/*.json`, source named in
each): SD 1.5's PNDM, SD 2.1's v-prediction DDIM, SDXL's Euler and force_upcast VAE, the Turbos' trailing Euler, SD3.5's
shifted flow matching, FLUX's dynamic shifting. A bug that only a real scheduler or VAE shows is then visible on CPU.
Building is deterministic in `seed`. Used by the tests and as the starting point of the toy world's model.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

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
    force_upcast: bool = True,
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
        force_upcast=force_upcast,
    )


def ddim_scheduler(prediction_type: str = "epsilon"):
    """The toy world's DDIM (SD-1.5 betas, leading spacing, no clipping)."""
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


# ------------------------------------------------------------------------------------ the real models' settings
PUBLISHED_DIR = Path(__file__).resolve().parent / "published"
"""JSON files holding the scheduler and VAE settings published with real checkpoints (each names its source)."""


def published(name: str) -> dict:
    """The published settings of a real checkpoint (`sd15`, `sd21`, `sd-turbo`, `sdxl`, `sdxl-turbo`, `sd35`,
    `flux-dev`, `flux-schnell`): {"source", "family", "scheduler": scheduler_config.json, "vae": VAE settings}."""
    return json.loads((PUBLISHED_DIR / f"{name}.json").read_text())


def published_scheduler(config: dict):
    """The diffusers scheduler of a published scheduler_config.json (its `_class_name`, built with from_config)."""
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(config)


def published_vae(settings: dict, **extra):
    """A tiny AutoencoderKL carrying a real VAE's scaling/shift factors, latent channels, quant convs and
    force_upcast."""
    return vae(
        latent_channels=settings["latent_channels"],
        scaling_factor=settings["scaling_factor"],
        shift_factor=settings.get("shift_factor"),
        quant_conv=settings.get("use_quant_conv", True),
        force_upcast=settings.get("force_upcast", True),
        **extra,
    )


# ------------------------------------------------------------------------------------------------- pipelines
def in_eval_mode(pipe):
    """Every component in eval mode, as `from_pretrained` leaves it (T5 has dropout). Returns `pipe`."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def build_tiny_sd(seed: int = 0, real: str = "sd15"):
    """StableDiffusionPipeline: UNet (32, 64), VAE (32, 64), 2-layer CLIP text encoder; the scheduler and VAE
    settings of the real checkpoint `real` (sd15: PNDM; sd21: DDIM v-prediction; sd-turbo: Euler trailing)."""
    from diffusers import StableDiffusionPipeline

    spec = published(real)
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    latent_channels = spec["vae"]["latent_channels"]
    denoiser = unet(cross_attention_dim=32, latent_channels=latent_channels)
    return in_eval_mode(
        StableDiffusionPipeline(
            vae=published_vae(spec["vae"]),
            text_encoder=clip_text_model(tokenizer),
            tokenizer=tokenizer,
            unet=denoiser,
            scheduler=published_scheduler(spec["scheduler"]),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    )


def build_tiny_sdxl(seed: int = 0, real: str = "sdxl"):
    """StableDiffusionXLPipeline: two CLIP encoders (32 + 32 -> cross-attention 64), text_time embedding; the
    scheduler and VAE settings of `real` (sdxl: Euler, VAE force_upcast; sdxl-turbo: Euler-Ancestral trailing)."""
    from diffusers import StableDiffusionXLPipeline

    spec = published(real)
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
        latent_channels=spec["vae"]["latent_channels"],
    )
    return in_eval_mode(
        StableDiffusionXLPipeline(
            vae=published_vae(spec["vae"]),
            text_encoder=clip_text_model(tokenizer),
            tokenizer=tokenizer,
            text_encoder_2=clip_text_model(tokenizer, projection=32),
            tokenizer_2=tokenizer,
            unet=denoiser,
            scheduler=published_scheduler(spec["scheduler"]),
        )
    )


def build_tiny_sd3(seed: int = 0, real: str = "sd35"):
    """StableDiffusion3Pipeline: SD3Transformer2DModel (2 joint blocks), 2 CLIPs with projection + T5; SD3.5's
    flow-matching scheduler (shift 3) and VAE settings (16 latent channels, scale and shift)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    spec = published(real)
    torch.manual_seed(seed)
    tokenizer, tokenizer_t5 = clip_tokenizer(), t5_tokenizer()
    latent_channels = spec["vae"]["latent_channels"]
    transformer = SD3Transformer2DModel(
        sample_size=TINY_RESOLUTION // 2,
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=32,
    )
    return in_eval_mode(
        StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=published_scheduler(spec["scheduler"]),
            vae=published_vae(spec["vae"]),
            text_encoder=clip_text_model(tokenizer, projection=32),
            tokenizer=tokenizer,
            text_encoder_2=clip_text_model(tokenizer, projection=32),
            tokenizer_2=tokenizer,
            text_encoder_3=t5_encoder(tokenizer_t5),
            tokenizer_3=tokenizer_t5,
        )
    )


def build_tiny_flux(seed: int = 0, real: str = "flux-dev"):
    """FluxPipeline: FluxTransformer2DModel (1 double + 1 single block), CLIP pooled + T5, packed latents; the
    scheduler and VAE settings of `real` (flux-dev: guidance embedding, dynamic shifting; flux-schnell: neither)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    spec = published(real)
    torch.manual_seed(seed)
    tokenizer, tokenizer_t5 = clip_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=spec["vae"]["latent_channels"] * 4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        guidance_embeds=real == "flux-dev",
        axes_dims_rope=(4, 4, 8),
    )
    return in_eval_mode(
        FluxPipeline(
            transformer=transformer,
            scheduler=published_scheduler(spec["scheduler"]),
            vae=published_vae(spec["vae"]),
            text_encoder=clip_text_model(tokenizer),
            tokenizer=tokenizer,
            text_encoder_2=t5_encoder(tokenizer_t5),
            tokenizer_2=tokenizer_t5,
        )
    )


TINY_MODELS: dict[str, tuple[Callable[..., object], str]] = {
    "sd": (build_tiny_sd, "sd15"),
    "sd-v": (build_tiny_sd, "sd21"),
    "sd-turbo": (build_tiny_sd, "sd-turbo"),
    "sdxl": (build_tiny_sdxl, "sdxl"),
    "sdxl-turbo": (build_tiny_sdxl, "sdxl-turbo"),
    "sd3": (build_tiny_sd3, "sd35"),
    "flux": (build_tiny_flux, "flux-dev"),
    "flux-schnell": (build_tiny_flux, "flux-schnell"),
}
"""`tiny-<kind>` -> (builder, the real checkpoint whose scheduler and VAE settings it carries)."""


def build_tiny(kind: str, seed: int = 0):
    """The tiny pipeline `tiny-<kind>` (see TINY_MODELS), deterministic in `seed`."""
    builder, real = TINY_MODELS[kind]
    return builder(seed, real=real)


TINY_BUILDERS: dict[str, Callable[..., object]] = {
    kind: functools.partial(builder, real=real) for kind, (builder, real) in TINY_MODELS.items()
}
"""`tiny-<kind>` -> builder(seed)."""
