"""HPSv2 / HPSv2.1 (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on human preferences; score = cosine.

The checkpoint (`HPS_v2_compressed.pt` or `HPS_v2.1_compressed.pt` in hub repo xswu/HPSv2) is a dict whose
'state_dict' is a full open_clip CLIP state dict, loaded into the `arch` architecture built without pretrained weights
(the reference code builds ViT-H-14 with laion weights and then overwrites all of them with the checkpoint).
"""

from __future__ import annotations

from torch import Tensor

from diffalign.errors import UserError
from diffalign.rewards.base import Reward, check_prompts
from diffalign.rewards.encoders import OpenClip, cosine
from diffalign.rewards.weights import load_checkpoint, resolve_file

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}


def hps_filename(version: str) -> str:
    """The checkpoint file name of HPS `version` ('2.0', '2.1', also written 'v2.1' or '2')."""
    key = version.lower().removeprefix("v")
    key = {"2": "2.0"}.get(key, key)
    if key not in HPS_FILES:
        raise UserError(f"hpsv2: unknown version {version!r}: use version=2.0 or version=2.1")
    return HPS_FILES[key]


class HPSv2Reward(Reward):
    """HPSv2 score: cosine(image, prompt) of the HPS-tuned open_clip ViT-H-14 (about 0.2-0.35)."""

    name = "hpsv2"
    description = "HPSv2 / v2.1 human preference score: cosine of an HPS-tuned open_clip ViT-H-14"
    differentiable = True
    weights_source = f"hub {HPS_REPO} ({HPS_FILES['2.1']}; version=2.0, checkpoint=<file>, arch=ViT-H-14)"

    def __init__(self, version: str = "2.1", checkpoint: str = HPS_REPO, arch: str = "ViT-H-14") -> None:
        super().__init__()
        path = resolve_file(checkpoint, hps_filename(version), self.name, "checkpoint")
        state = load_checkpoint(path, self.name)
        self.encoder = OpenClip(arch, None, what=self.name)
        self.encoder.load_weights(state.get("state_dict", state), self.name)
        self.freeze()

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        """HPS [B] of images [B, 3, H, W] in [0, 1] and their prompts."""
        prompts = check_prompts(images, prompts)
        images = self.prepare(images)
        return cosine(self.encoder.embed_images(images), self.encoder.embed_texts(prompts))
