"""ImageReward v1.0 (Xu et al. 2023) on transformers' BLIP classes, loaded from the published checkpoint.

The published `ImageReward.pt` (hub THUDM/ImageReward) is the state dict of `ImageReward.blip` (BLIP_Pretrain: a
timm-style ViT-L/16 `visual_encoder` and a BERT `text_encoder` with cross-attention, both from salesforce/BLIP) and
`ImageReward.mlp` (a linear MLP head). The `image-reward` package itself does not install beside our pins (it pins
timm==0.6.13 and fairscale, and imports diffusers), so this module maps its keys onto `BlipVisionModel` /
`BlipTextModel`, whose layers are the same computation:

    blip.visual_encoder.patch_embed.proj   -> vision.embeddings.patch_embedding
    blip.visual_encoder.cls_token / pos_embed -> vision.embeddings.class_embedding / position_embedding
    blip.visual_encoder.blocks.i.norm1/norm2  -> vision.encoder.layers.i.layer_norm1/layer_norm2
    blip.visual_encoder.blocks.i.attn.qkv/proj -> vision.encoder.layers.i.self_attn.qkv/projection
    blip.visual_encoder.blocks.i.mlp.fc1/fc2  -> vision.encoder.layers.i.mlp.fc1/fc2
    blip.visual_encoder.norm                  -> vision.post_layernorm
    blip.text_encoder.*                       -> text.* (same names; the position_ids buffer is dropped)
    mlp.layers.*                              -> head.layers.*

The ViT shape (width, depth, patch, image size) is read from the checkpoint; heads = width / 64 (ViT-L: 16); BLIP's
ViT LayerNorm eps is 1e-6. The text encoder's shape comes from `med_config.json` beside the checkpoint.
Score (ImageReward.score): text tokens (bert-base-uncased, max 35, padded) attend to the image tokens; the MLP reads
the [CLS] output; reward = (mlp - 0.16717362830052426) / 1.0333394966054072. Preprocessing: 224 bicubic resize of the
shorter side, center crop, CLIP mean/std.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import Tensor

from diffalign.errors import UserError
from diffalign.rewards.base import Preprocess, Reward, check_prompts
from diffalign.rewards.heads import head_from_state_dict
from diffalign.rewards.weights import load_checkpoint, looks_local, read_json, resolve_file, resolve_pretrained

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
IMAGEREWARD_TOKENIZER = "bert-base-uncased"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
TEXT_MAX_LENGTH = 35
VIT_HEAD_WIDTH = 64
VIT_LAYER_NORM_EPS = 1e-6
VISION_PREFIX, TEXT_PREFIX, HEAD_PREFIX = "blip.visual_encoder.", "blip.text_encoder.", "mlp."

VISION_RENAMES = [
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^blocks\.(\d+)\.norm([12])\.", r"encoder.layers.\1.layer_norm\2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.fc([12])\.", r"encoder.layers.\1.mlp.fc\2."),
    (r"^norm\.", "post_layernorm."),
]


def rename_vision_key(key: str) -> str:
    """A BLIP ViT state-dict key (without prefix) as the matching `BlipVisionModel` key."""
    for pattern, replacement in VISION_RENAMES:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    raise UserError(f"imagereward: unexpected vision key {key!r} in the checkpoint")


def split_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(vision, text) state dicts in transformers' BLIP names (the head is read separately)."""
    vision = {rename_vision_key(k[len(VISION_PREFIX) :]): v for k, v in state.items() if k.startswith(VISION_PREFIX)}
    text = {
        k[len(TEXT_PREFIX) :]: v
        for k, v in state.items()
        if k.startswith(TEXT_PREFIX) and not k.endswith("embeddings.position_ids")
    }
    if not vision or not text:
        raise UserError("imagereward: the checkpoint has no blip.visual_encoder / blip.text_encoder weights")
    return vision, text


def vision_config(state: dict[str, Tensor]) -> Any:
    """A `BlipVisionConfig` with the ViT shape found in the checkpoint."""
    from transformers import BlipVisionConfig

    width = int(state[f"{VISION_PREFIX}cls_token"].shape[-1])
    patch = int(state[f"{VISION_PREFIX}patch_embed.proj.weight"].shape[-1])
    positions = int(state[f"{VISION_PREFIX}pos_embed"].shape[1])
    blocks = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(VISION_PREFIX)}blocks\.(\d+)\.", k))}
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=int(state[f"{VISION_PREFIX}blocks.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=len(blocks),
        num_attention_heads=max(1, width // VIT_HEAD_WIDTH),
        image_size=round((positions - 1) ** 0.5) * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=VIT_LAYER_NORM_EPS,
    )


def text_config(med: dict[str, Any], encoder_width: int) -> Any:
    """A `BlipTextConfig` from BLIP's `med_config.json` (a BertConfig with cross-attention to the ViT)."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=int(med["vocab_size"]),
        hidden_size=int(med["hidden_size"]),
        encoder_hidden_size=encoder_width,
        intermediate_size=int(med["intermediate_size"]),
        num_hidden_layers=int(med["num_hidden_layers"]),
        num_attention_heads=int(med["num_attention_heads"]),
        max_position_embeddings=int(med["max_position_embeddings"]),
        hidden_act=str(med.get("hidden_act", "gelu")),
        layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        pad_token_id=int(med.get("pad_token_id", 0)),
        bos_token_id=None,  # generation ids, unused by the encoder
        eos_token_id=None,
        sep_token_id=None,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        is_decoder=True,  # builds the cross-attention layers; forward runs bidirectionally (is_decoder=False)
    )


def load_strict(module: Any, state: dict[str, Tensor], part: str) -> None:
    """Load `state` into `module`, a UserError if any weight is missing or left over."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"imagereward: the checkpoint's {part} does not match (missing {list(missing)[:3]}, "
            f"unexpected {list(unexpected)[:3]})"
        )


def blip_tokenizer(source: str) -> Any:
    """BLIP's tokenizer: bert-base-uncased plus the [DEC] bos token and the [ENC] special token."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(resolve_pretrained(source, "imagereward", "tokenizer", "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def med_config_path(checkpoint: str, weights: Path) -> Path:
    """`med_config.json` beside a local checkpoint, or from the same hub repo."""
    if looks_local(checkpoint):
        path = weights.parent / MED_CONFIG_FILE
        if not path.is_file():
            raise UserError(f"imagereward: {MED_CONFIG_FILE} must sit beside {weights} (hub {IMAGEREWARD_REPO} has it)")
        return path
    return resolve_file(checkpoint, MED_CONFIG_FILE, "imagereward", "checkpoint")


class ImageRewardReward(Reward):
    """ImageReward v1.0 (normalised: about N(0, 1) over its training set; higher is better)."""

    name = "imagereward"
    description = "ImageReward v1.0: BLIP ViT-L + BERT cross-attention + MLP, normalised reward"
    differentiable = True
    weights_source = (
        f"hub {IMAGEREWARD_REPO} ({IMAGEREWARD_FILE}, {MED_CONFIG_FILE}) + {IMAGEREWARD_TOKENIZER} "
        "(checkpoint=, tokenizer=)"
    )

    def __init__(self, checkpoint: str = IMAGEREWARD_REPO, tokenizer: str = IMAGEREWARD_TOKENIZER) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        weights = resolve_file(checkpoint, IMAGEREWARD_FILE, self.name, "checkpoint")
        state = load_checkpoint(weights, self.name)
        med = read_json(med_config_path(checkpoint, weights))
        vision_state, text_state = split_state_dict(state)
        self.vision = BlipVisionModel(vision_config(state))
        self.text = BlipTextModel(text_config(med, self.vision.config.hidden_size), add_pooling_layer=False)
        load_strict(self.vision, vision_state, "vision encoder")
        load_strict(self.text, text_state, "text encoder")
        self.head = head_from_state_dict(state, HEAD_PREFIX, self.name)
        self.tokenizer = blip_tokenizer(tokenizer)
        size = self.vision.config.image_size
        self.preprocess = Preprocess(resize=size, crop=(size, size))
        self.freeze()

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        """ImageReward [B] of images [B, 3, H, W] in [0, 1] and their prompts."""
        prompts = check_prompts(images, prompts)
        pixels = self.preprocess(self.prepare(images)).to(self.dtype)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH, return_tensors="pt"
        ).to(pixels.device)
        image_mask = image_embeds.new_ones(image_embeds.shape[:-1], dtype=tokens.attention_mask.dtype)
        text = self.text(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        reward = self.head(text[:, 0, :]).float()
        return (reward - REWARD_MEAN) / REWARD_STD
