"""PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic; score = exp(logit_scale) * cosine.

Model `yuvalkirstain/PickScore_v1` (a transformers CLIPModel) with the tokenizer and image preprocessing of
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (224 px, CLIP mean/std, text max 77 tokens).
"""

from __future__ import annotations

from torch import Tensor

from diffalign.rewards.base import Reward, check_prompts
from diffalign.rewards.encoders import HFClip, cosine

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScoreReward(Reward):
    """PickScore: `exp(logit_scale) * cosine(image, prompt)` (about 20-23 for typical images)."""

    name = "pickscore"
    description = "PickScore: CLIP-H fine-tuned on Pick-a-Pic, exp(logit_scale) * cosine"
    differentiable = True
    weights_source = f"hub {PICKSCORE_MODEL} + processor {PICKSCORE_PROCESSOR} (model=, processor=)"

    def __init__(self, model: str = PICKSCORE_MODEL, processor: str = PICKSCORE_PROCESSOR) -> None:
        super().__init__()
        self.encoder = HFClip(model, processor, what=self.name)
        self.freeze()

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        """PickScore [B] of images [B, 3, H, W] in [0, 1] and their prompts."""
        prompts = check_prompts(images, prompts)
        images = self.prepare(images)
        similarity = cosine(self.encoder.embed_images(images), self.encoder.embed_texts(prompts))
        return self.encoder.logit_scale().float() * similarity
