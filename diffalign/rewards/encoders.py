"""CLIP image/text encoders behind one small interface, for the CLIP-based rewards (clip, pickscore, hpsv2, aesthetic).

`HFClip` wraps a transformers `CLIPModel` (hub id or save_pretrained folder), reading its image preprocessing from the
`preprocessor_config.json` of the processor source. `OpenClip` wraps an open_clip model (built-in name with a
pretrained tag or file, `hf-hub:org/repo`, or `local-dir:/folder`). Both embed images through torch preprocessing, so
gradients reach the pixels. transformers and open_clip are imported only when an encoder is built.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from diffalign.errors import UserError, error_text
from diffalign.hub import quiet_hf_logs
from diffalign.rewards.base import CLIP_MEAN, CLIP_STD, Preprocess
from diffalign.rewards.weights import optional_file, read_json, resolve_pretrained

log = logging.getLogger(__name__)
RESAMPLE_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}
"""PIL resample codes in processor configs -> torch interpolation modes (LANCZOS has no torch equivalent)."""


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, dict):
        return int(value["height"]), int(value["width"])
    return int(value), int(value)


def preprocess_from_processor_config(
    config: dict[str, Any], default_size: int, crop_rounding: str = "floor", what: str = "clip"
) -> Preprocess:
    """A `Preprocess` equivalent to a transformers CLIP image processor config (size, crop_size, mean, std, resample),
    with transformers' floor rounding of the crop offsets (or `crop_rounding="round"`: torchvision's CenterCrop).
    A resample code with no torch equivalent (LANCZOS, BOX, HAMMING) is an error, never a silent substitute.

    `size` {"shortest_edge": n} or an int resizes the shorter side; {"height", "width"} resizes to that exact size.
    """
    size = config.get("size", default_size)
    if not config.get("do_resize", True):
        resize = None
    elif isinstance(size, dict) and "shortest_edge" in size:
        resize = int(size["shortest_edge"])
    elif isinstance(size, dict):
        resize = _pair(size)
    else:
        resize = int(size)
    crop = _pair(config.get("crop_size", default_size)) if config.get("do_center_crop", True) else None
    mean = tuple(config.get("image_mean", CLIP_MEAN)) if config.get("do_normalize", True) else (0.0, 0.0, 0.0)
    std = tuple(config.get("image_std", CLIP_STD)) if config.get("do_normalize", True) else (1.0, 1.0, 1.0)
    resample = int(config.get("resample", 3))
    if resample not in RESAMPLE_MODES:
        known = ", ".join(f"{code} ({mode})" for code, mode in RESAMPLE_MODES.items())
        raise UserError(f"{what}: preprocessor_config.json asks for resample={resample}; supported: {known}")
    return Preprocess(
        resize=resize,
        crop=crop,
        mean=mean,
        std=std,
        interpolation=RESAMPLE_MODES[resample],
        crop_rounding=crop_rounding,
    )


def processor_preprocess(source: str | Path, default_size: int, what: str, crop_rounding: str = "floor") -> Preprocess:
    """The torch preprocessing of the `preprocessor_config.json` in `source` (folder or hub repo). Without that file
    the CLIP defaults are used (shortest edge `default_size`, bicubic, centre crop, CLIP mean/std), with a warning."""
    config_file = optional_file(str(source), "preprocessor_config.json")
    if config_file is None:
        log.warning(
            "%s: %s has no preprocessor_config.json; using the CLIP defaults (%d px, bicubic, centre crop, CLIP norm)",
            what,
            source,
            default_size,
        )
    config = read_json(config_file) if config_file else {}
    return preprocess_from_processor_config(config, default_size, crop_rounding, what)


class HFClip(nn.Module):
    """A transformers CLIP model with its tokenizer and torch preprocessing; embeddings are L2-normalised."""

    def __init__(self, model: str, processor: str | None = None, what: str = "clip", option: str = "model") -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        processor = processor or model
        model_path = resolve_pretrained(model, what, option)
        processor_path = (
            model_path
            if processor == model
            else resolve_pretrained(processor, what, "processor", marker="tokenizer_config.json")
        )
        with quiet_hf_logs("transformers"):
            self.model = CLIPModel.from_pretrained(model_path)
            self.tokenizer = AutoTokenizer.from_pretrained(processor_path)
        text_positions = self.model.config.text_config.max_position_embeddings
        self.max_length = min(int(self.tokenizer.model_max_length), text_positions)
        self.preprocess = processor_preprocess(processor_path, self.model.config.vision_config.image_size, what)

    def embed_images(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings [B, D] of images [B, 3, H, W] in [0, 1]."""
        pixels = self.preprocess(images).to(self.model.dtype)
        features = self.model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)
        return features / features.norm(dim=-1, keepdim=True)

    def embed_texts(self, prompts: list[str]) -> Tensor:
        """L2-normalised text embeddings [B, D]; prompts are padded to max length and truncated."""
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.model.device)
        features = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        features = getattr(features, "pooler_output", features)
        return features / features.norm(dim=-1, keepdim=True)

    def logit_scale(self) -> Tensor:
        """The model's learned temperature exp(logit_scale)."""
        return self.model.logit_scale.exp()


def _open_clip_preprocess(model: nn.Module) -> Preprocess:
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    resize: int | tuple[int, int] = (height, width)
    if cfg.get("resize_mode", "shortest") != "squash" and height == width:
        resize = height
    return Preprocess(
        resize=resize,
        crop=(height, width),
        mean=tuple(cfg.get("mean", CLIP_MEAN)),
        std=tuple(cfg.get("std", CLIP_STD)),
        interpolation=cfg.get("interpolation", "bicubic"),
    )


def create_open_clip(arch: str, pretrained: str | None, what: str) -> nn.Module:
    """`open_clip.create_model(arch, pretrained)` with its failures (unknown name, offline) as one-line UserErrors."""
    import logging

    import open_clip

    logging.disable(logging.ERROR)  # open_clip logs each failure on the root logger before raising it
    try:
        return open_clip.create_model(arch, pretrained=pretrained or None)
    except (RuntimeError, FileNotFoundError, ValueError, OSError) as e:
        raise UserError(
            f"{what}: cannot build open_clip model {arch!r} (pretrained={pretrained!r}): {error_text(e)[:120]}; "
            "offline, pass a local weights file with pretrained=/path/to/file or model=local-dir:/folder"
        ) from e
    finally:
        logging.disable(logging.NOTSET)


class OpenClip(nn.Module):
    """An open_clip model with its tokenizer and torch preprocessing; embeddings are L2-normalised."""

    def __init__(self, arch: str, pretrained: str | None = None, what: str = "clip") -> None:
        super().__init__()
        import open_clip

        self.model = create_open_clip(arch, pretrained, what)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.preprocess = _open_clip_preprocess(self.model)

    def load_weights(self, state_dict: dict[str, Tensor], what: str) -> None:
        """Load a full CLIP state dict (a 'module.' prefix from DDP training is stripped); strict."""
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise UserError(
                f"{what}: the checkpoint does not match the open_clip architecture "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}): check arch="
            )

    def embed_images(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings [B, D] of images [B, 3, H, W] in [0, 1]."""
        dtype = next(self.model.parameters()).dtype
        return self.model.encode_image(self.preprocess(images).to(dtype), normalize=True)

    def embed_texts(self, prompts: list[str]) -> Tensor:
        """L2-normalised text embeddings [B, D]."""
        tokens = self.tokenizer(prompts).to(next(self.model.parameters()).device)
        return self.model.encode_text(tokens, normalize=True)

    def logit_scale(self) -> Tensor:
        """The model's learned temperature exp(logit_scale)."""
        return self.model.logit_scale.exp()


def is_open_clip_name(model: str) -> bool:
    """True when `model` names an open_clip model ('hf-hub:...', 'local-dir:...', or a built-in architecture name
    such as 'ViT-B-32', which has no '/') rather than a transformers hub id or a local save_pretrained folder."""
    from diffalign.rewards.weights import looks_local

    if model.startswith(("hf-hub:", "local-dir:")):
        return True
    return "/" not in model and not looks_local(model)


def cosine(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Row-wise cosine of L2-normalised embeddings [B, D] x [B, D] -> [B] in float32."""
    return (image_embeds.float() * text_embeds.float()).sum(dim=-1)
