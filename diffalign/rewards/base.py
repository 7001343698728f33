"""The reward protocol and its torch preprocessing.

A reward is a frozen `nn.Module`: `forward(images, prompts) -> Tensor[B]` with `images` float [B, 3, H, W] in [0, 1]
of any size. It is differentiable with respect to the images unless its class says `differentiable = False`.
Preprocessing (antialiased bicubic resize, center crop, normalise) is done in torch so gradients reach the pixels;
a PIL processor is never in the gradient path. `Reward.score` is the convenience path for PIL images / numpy arrays:
it converts them and calls the same `forward`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------------------------- preprocessing
def resized_shorter_side(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (height, width) when the shorter side becomes `size` (torchvision / CLIP processor rounding)."""
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(size * long / short)
    return (size, new_long) if height <= width else (new_long, size)


def resize(images: Tensor, size: tuple[int, int], mode: str = "bicubic") -> Tensor:
    """Resize [B, C, H, W] to `size` (height, width), antialiased when downsampling; a no-op at the same size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    antialias = mode in ("bilinear", "bicubic")
    align = False if mode in ("bilinear", "bicubic") else None
    return F.interpolate(images, size=size, mode=mode, antialias=antialias, align_corners=align)


def resize_shorter_side(images: Tensor, size: int, mode: str = "bicubic") -> Tensor:
    """Resize so that the shorter side is `size`, keeping the aspect ratio."""
    return resize(images, resized_shorter_side(images.shape[-2], images.shape[-1], size), mode)


def crop_offset(length: int, crop: int, rounding: str = "round") -> int:
    """Start of a centered window of `crop` in `length`: torchvision rounds half the margin ('round', as open_clip
    and ImageReward preprocess), transformers' image processors floor it ('floor')."""
    margin = (length - crop) / 2.0
    return int(round(margin)) if rounding == "round" else int(margin)


def center_crop(images: Tensor, size: tuple[int, int], rounding: str = "round") -> Tensor:
    """The central `size` (height, width) window of [B, C, H, W]; `rounding` of the offsets as in `crop_offset`."""
    height, width = images.shape[-2:]
    crop_h, crop_w = size
    if crop_h > height or crop_w > width:
        raise ValueError(f"center_crop: crop {size} is larger than the image {(height, width)}")
    top, left = crop_offset(height, crop_h, rounding), crop_offset(width, crop_w, rounding)
    return images[..., top : top + crop_h, left : left + crop_w]


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(images - mean) / std per channel."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


@dataclass(frozen=True)
class Preprocess:
    """Torch image preprocessing of a vision encoder: resize, center crop, normalise.

    `resize` is an int (the shorter side, aspect kept), a (height, width) pair (exact size) or None;
    `crop` a (height, width) pair or None; `crop_rounding` 'round' (torchvision) or 'floor' (transformers).
    """

    resize: int | tuple[int, int] | None = 224
    crop: tuple[int, int] | None = (224, 224)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    interpolation: str = "bicubic"
    crop_rounding: str = "round"

    def __call__(self, images: Tensor) -> Tensor:
        """Preprocess float images [B, 3, H, W] in [0, 1]; differentiable."""
        if isinstance(self.resize, int):
            images = resize_shorter_side(images, self.resize, self.interpolation)
        elif self.resize is not None:
            images = resize(images, self.resize, self.interpolation)
        if self.crop is not None:
            images = center_crop(images, self.crop, self.crop_rounding)
        return normalize(images, self.mean, self.std)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """The (height, width) this preprocessing always produces, or None if it depends on the input."""
        if self.crop is not None:
            return self.crop
        return self.resize if isinstance(self.resize, tuple) else None


# ------------------------------------------------------------------------------------------ PIL / numpy -> tensor
def image_to_tensor(image: Any) -> Tensor:
    """One image (PIL image, numpy array HWC/HW uint8 or float in [0, 1], or tensor [3, H, W] in [0, 1]) as a float
    tensor [3, H, W] in [0, 1]."""
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a [3, H, W] tensor, got shape {tuple(image.shape)}")
        return image.float()
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image without importing PIL eagerly
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an HWC image array with 1, 3 or 4 channels, got shape {array.shape}")
    array = array[..., :3] if array.shape[-1] >= 3 else np.repeat(array, 3, axis=-1)
    tensor = torch.from_numpy(np.array(array, copy=True, order="C")).permute(2, 0, 1)
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    return tensor.float()


def group_by_size(images: Sequence[Tensor]) -> list[list[int]]:
    """Indices of `images` ([3, H, W] each) grouped by (H, W), groups in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(i)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------------------- Reward
class Reward(nn.Module):
    """Base class of rewards: a frozen module scoring images against prompts.

    Subclasses set the class attributes and implement `forward`. `components` returns the named parts of the score
    (one for a plain reward, one per reward for a weighted mix) and `combine` turns components back into the score.
    """

    name: ClassVar[str] = "reward"
    """Registry name (also the component name in logs and `diffalign score` columns)."""
    description: ClassVar[str] = ""
    """One line for `diffalign rewards`."""
    differentiable: ClassVar[bool] = True
    """False: `forward` returns scores without a gradient path to the images."""
    needs_prompts: ClassVar[bool] = True
    """False: the prompts are ignored (e.g. aesthetic, jpeg), so `diffalign score` needs none."""
    weights_source: ClassVar[str] = "none"
    """Where the weights come from (hub id and file, or 'none'), for `diffalign rewards`."""

    def __init__(self) -> None:
        super().__init__()
        self.label = self.name

    def freeze(self) -> Reward:
        """Evaluation mode, no parameter gradients. Returns self."""
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> Reward:
        """A reward always stays in evaluation mode (dropout off), whatever the caller asks."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """The device of the reward's first parameter or buffer (CPU for rewards without weights)."""
        for tensor in list(self.parameters()) + list(self.buffers()):
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the reward's first parameter (float32 for rewards without weights)."""
        for tensor in self.parameters():
            return tensor.dtype
        return torch.float32

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Scores [B] (float32) of `images` [B, 3, H, W] in [0, 1] against `prompts` (B strings)."""
        raise NotImplementedError

    def components(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """The named parts of the score, for logging: {label: scores [B]}."""
        return {self.label: self(images, prompts)}

    def combine(self, components: dict[str, Tensor]) -> Tensor:
        """The score from `components` (as returned by `components`)."""
        return components[self.label]

    def weights_by_label(self) -> dict[str, float]:
        """{component label: its weight in `combine`} (one reward: its own label, weight 1)."""
        return {self.label: 1.0}

    def prepare(self, images: Tensor) -> Tensor:
        """Move `images` to the reward's device as float32 (differentiable). Preprocessing runs in float32 (CPU
        antialiased resizing has no bfloat16 kernel); cast to `self.dtype` after it."""
        check_images(images)
        return images.to(device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def score(self, images: Sequence[Any] | Tensor, prompts: Sequence[str]) -> Tensor:
        """Convenience path: score PIL images, numpy arrays or tensors (any mix of sizes) without gradients.

        Images are converted to float tensors in [0, 1], grouped by size, and scored with the same `forward`.
        Returns scores [B] on the CPU.
        """
        tensors = list(images) if isinstance(images, Tensor) else [image_to_tensor(image) for image in images]
        if len(tensors) != len(prompts):
            raise ValueError(f"{len(tensors)} images but {len(prompts)} prompts")
        scores = torch.empty(len(tensors))
        for group in group_by_size(tensors):
            batch = torch.stack([tensors[i] for i in group])
            scores[group] = self(batch, [prompts[i] for i in group]).float().cpu()
        return scores

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}"


def check_images(images: Tensor) -> None:
    """Raise ValueError unless `images` is a float tensor [B, 3, H, W]."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"rewards take float images [B, 3, H, W] in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"rewards take float images in [0, 1], got dtype {images.dtype}")


def check_prompts(images: Tensor, prompts: Sequence[str]) -> list[str]:
    """The prompts as a list, checked to be one string per image."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    return prompts
