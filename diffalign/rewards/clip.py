"""CLIP score: `scale * cosine(image embedding, prompt embedding)` with any CLIP.

Exactly: `scale * cos` with scale 100 by default and no clamping (a negative cosine gives a negative score), embeddings
L2-normalised, prompts truncated to the text tower's length; default model `openai/clip-vit-large-patch14`. This is
the form ReNO and AlignProp optimise. It is NOT CLIPScore as published (Hessel et al. 2021: 2.5 * max(cos, 0)) nor
torchmetrics' CLIPScore (100 * max(cos, 0)): for cos > 0 those are `scale=2.5` / `scale=100` here.

`model` is a transformers CLIP (hub id such as openai/clip-vit-large-patch14, or a save_pretrained folder whose
preprocessor_config.json sets the image preprocessing), or an open_clip model: a built-in name with `pretrained`
(tag such as laion2b_s34b_b79k, or a weights file), `hf-hub:org/repo`, or `local-dir:/folder`.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from diffalign.errors import UserError
from diffalign.rewards.base import Reward, check_prompts
from diffalign.rewards.encoders import HFClip, OpenClip, cosine, is_open_clip_name

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def build_clip_encoder(model: str, pretrained: str, what: str) -> HFClip | OpenClip:
    """The transformers or open_clip encoder that `model` / `pretrained` name (see the module docstring)."""
    if pretrained or is_open_clip_name(model):
        if model.startswith("local-dir:"):
            folder = Path(model.removeprefix("local-dir:")).expanduser()
            if not any(p.suffix in WEIGHT_SUFFIXES for p in folder.glob("*")):
                raise UserError(f"{what}: {folder} has no open_clip weights file (open_clip_model.safetensors)")
        elif not model.startswith("hf-hub:") and not pretrained:
            raise UserError(f"{what}: open_clip model {model!r} needs weights: add pretrained=<tag or file>")
        return OpenClip(model, pretrained or None, what=what)
    return HFClip(model, what=what)


class ClipReward(Reward):
    """CLIP score: `scale * cosine(image, prompt)` (scale 100 by default, as in CLIPScore and ReNO)."""

    name = "clip"
    description = "CLIP score: scale * cosine(image, prompt), any transformers or open_clip CLIP"
    differentiable = True
    weights_source = f"hub {DEFAULT_CLIP} (model=<hub id | folder | open_clip name>, pretrained=<tag | file>)"

    def __init__(self, model: str = DEFAULT_CLIP, pretrained: str = "", scale: float = 100.0) -> None:
        super().__init__()
        self.encoder = build_clip_encoder(model, pretrained, what=self.name)
        self.scale = float(scale)
        self.freeze()

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        """`scale * cosine` [B] of images [B, 3, H, W] in [0, 1] and their prompts."""
        prompts = check_prompts(images, prompts)
        images = self.prepare(images)
        return self.scale * cosine(self.encoder.embed_images(images), self.encoder.embed_texts(prompts))
