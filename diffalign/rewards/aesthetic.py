"""LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor).

A linear MLP head (`sac+logos+ava1-l14-linearMSE.pth`) on the L2-normalised image embedding of CLIP ViT-L/14
(`openai/clip-vit-large-patch14`: projection output, 768 wide); 224 px, bicubic, center crop rounded like
torchvision's CenterCrop (the official code preprocesses with `clip.load`'s torchvision transform), CLIP mean/std.
Scores are on the 1-10 rating scale. Prompts are ignored.

The default head comes from a third-party hub mirror of the official GitHub file, so its sha256 is pinned to the
official file's: a different file there is an error. A head given as a local file (`head=`) is used as it is.
"""

from __future__ import annotations

from torch import Tensor

from diffalign.errors import UserError
from diffalign.hub import quiet_hf_logs
from diffalign.rewards.base import Reward
from diffalign.rewards.encoders import processor_preprocess
from diffalign.rewards.heads import head_from_state_dict
from diffalign.rewards.weights import check_sha256, load_checkpoint, resolve_file, resolve_pretrained

AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD_REPO = "camenduru/improved-aesthetic-predictor"
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_HEAD_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
"""sha256 of christophschuhmann/improved-aesthetic-predictor's sac+logos+ava1-l14-linearMSE.pth."""


class AestheticReward(Reward):
    """LAION aesthetic score (1-10) of the images; prompts are ignored."""

    name = "aesthetic"
    description = "LAION improved aesthetic predictor: MLP on normalised CLIP ViT-L/14 image embeddings (1-10)"
    differentiable = True
    needs_prompts = False
    weights_source = f"hub {AESTHETIC_CLIP} + {AESTHETIC_HEAD_REPO}/{AESTHETIC_HEAD_FILE} (clip=, head=)"

    def __init__(self, clip: str = AESTHETIC_CLIP, head: str = AESTHETIC_HEAD_REPO) -> None:
        super().__init__()
        from transformers import CLIPConfig, CLIPVisionModelWithProjection

        head_path = resolve_file(head, AESTHETIC_HEAD_FILE, self.name, "head")
        if head == AESTHETIC_HEAD_REPO:
            check_sha256(head_path, AESTHETIC_HEAD_SHA256, self.name)
        self.head = head_from_state_dict(load_checkpoint(head_path, self.name), "", self.name)
        clip_path = resolve_pretrained(clip, self.name, "clip")
        with quiet_hf_logs("transformers"):  # the text tower's weights are in the file but not loaded: no report
            config = CLIPConfig.from_pretrained(clip_path)
            config.vision_config.projection_dim = config.projection_dim
            self.vision = CLIPVisionModelWithProjection.from_pretrained(clip_path, config=config.vision_config)
        if self.vision.config.projection_dim != self.head.input_width:
            raise UserError(
                f"aesthetic: the head takes {self.head.input_width}-wide embeddings but {clip} projects to "
                f"{self.vision.config.projection_dim}: use CLIP ViT-L/14"
            )
        self.preprocess = processor_preprocess(clip_path, self.vision.config.image_size, self.name, "round")
        self.freeze()

    def forward(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        """Aesthetic scores [B] of images [B, 3, H, W] in [0, 1]."""
        pixels = self.preprocess(self.prepare(images)).to(self.dtype)
        embeds = self.vision(pixel_values=pixels).image_embeds
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return self.head(embeds).float()
