"""Tiny reward inputs shared by the reward and score tests: a transformers CLIP checkpoint folder, prompts and
8-bit-exact images."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WORDS = "a an photo of red green blue circle square triangle on white black grey background cat dog".split()
PROMPTS = ["a red circle on a white background", "a blue square on a black background", "a photo of a dog"]


def write_tiny_clip(
    folder: Path,
    image_size: int = 32,
    projection_dim: int = 16,
    seed: int = 0,
    mean=(0.5, 0.45, 0.4),
    std=(0.27, 0.26, 0.28),
) -> Path:
    """A transformers CLIPModel folder (save_pretrained) + CLIP BPE tokenizer + preprocessor_config.json."""
    from diffalign.models.tiny import clip_model, clip_tokenizer, save_clip_folder

    tokenizer = clip_tokenizer(WORDS)
    torch.manual_seed(seed)
    model = clip_model(
        tokenizer,
        text=(32, 2, 2),
        vision=(32, 2, 2),
        image_size=image_size,
        patch_size=8,
        projection_dim=projection_dim,
    )
    return save_clip_folder(folder, model, tokenizer, image_size, mean, std)


def quantised_images(n: int = 3, height: int = 40, width: int = 48, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1] on the 8-bit grid (so a PIL round trip is exact), larger than the 32 px input."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    images = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    images = images + 0.05 * torch.rand(n, 3, height, width, generator=g)
    return (images.clamp(0, 1) * 255).round() / 255
