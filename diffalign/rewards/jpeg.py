"""JPEG compressibility (as in DDPO): minus the size in kB (1000 bytes) of the image saved as JPEG at quality 95.

Not differentiable. Images are quantised to 8 bits (round) before encoding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.io import encode_image
from diffalign.rewards.base import Reward, check_images

JPEG_QUALITY = 95


def jpeg_kilobytes(image: Tensor, quality: int = JPEG_QUALITY) -> float:
    """Size in kB (1000 bytes) of one image [3, H, W] in [0, 1] saved as JPEG at `quality`."""
    return len(encode_image(image, "JPEG", quality=quality)) / 1000.0


class JpegReward(Reward):
    """-(JPEG size in kB at quality 95): higher means more compressible. Prompts are ignored."""

    name = "jpeg"
    description = "JPEG compressibility: minus the kB of the image saved as JPEG at quality 95"
    differentiable = False
    needs_prompts = False
    weights_source = "none"

    def __init__(self, quality: int = JPEG_QUALITY) -> None:
        super().__init__()
        self.quality = int(quality)
        self.freeze()

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        """Minus the JPEG size in kB [B] of images [B, 3, H, W] in [0, 1] (no gradient)."""
        check_images(images)
        sizes = [jpeg_kilobytes(image, self.quality) for image in images]
        return -torch.tensor(sizes, dtype=torch.float32, device=images.device)
