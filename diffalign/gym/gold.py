"""The gold checker: reads a shapes-world image's background colour, shape colour and shape type from its pixels.

No learned model. Per image: the background is the median colour of the border ring; the shape's colour is the
median of the pixels that differ most from the background; the shape's soft mask (coverage in [0, 1]) follows by
projecting each pixel onto the background -> shape-colour line. Its area and centroid fix a circle, a square and a
triangle template of the same area and centre, and the template with the highest soft IoU with the mask names the
shape (a bounding-box fill ratio alone reads small circles as squares). Each colour is named by the nearest palette
entry. This is the TRUTH of the toy world; learned rewards (toy-clip) are proxies of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from diffalign.gym.world import ATTRIBUTES, BACKGROUNDS, COLOURS, SHAPES, parse_prompt, shape_masks

MIN_CONTRAST = 0.2
"""A pixel this far (RGB euclidean, [0,1] scale) from the background may belong to the shape."""
MIN_SHAPE_PIXELS = 3
"""Fewer candidate shape pixels than this: the image has no shape (colour and shape read as None)."""
CORE_FRACTION = 0.6
"""The shape colour is the median of pixels at least this fraction of the largest background distance away."""
TEMPLATE_SUPERSAMPLE = 2


def _palette(colours: dict[str, tuple[int, int, int]]) -> tuple[list[str], Tensor]:
    return list(colours), torch.tensor(list(colours.values()), dtype=torch.float32) / 255


def _nearest(colours: Tensor, palette: Tensor) -> Tensor:
    """Index of the nearest palette entry ([K, 3]) for each colour ([B, 3])."""
    return torch.cdist(colours, palette).argmin(dim=1)


def border_pixels(images: Tensor) -> Tensor:
    """The pixels of a border ring ~1/16 of the side wide (2 pixels at 32x32): [B, 3, N]."""
    width = max(1, round(images.shape[-1] / 16))
    top, bottom = images[..., :width, :], images[..., -width:, :]
    left, right = images[..., width:-width, :width], images[..., width:-width, -width:]
    return torch.cat([p.flatten(2) for p in (top, bottom, left, right)], dim=2)


def read_background(images: Tensor) -> Tensor:
    """Estimated background colour [B, 3]: the per-channel median of the border ring."""
    return border_pixels(images).median(dim=2).values


def read_foreground(images: Tensor, background: Tensor) -> tuple[Tensor, Tensor]:
    """Estimated shape colour [B, 3] and whether the image has a shape at all [B] (bool)."""
    distance = (images - background[:, :, None, None]).norm(dim=1).flatten(1)  # [B, H*W]
    pixels = images.flatten(2)  # [B, 3, H*W]
    has_shape = (distance > MIN_CONTRAST).sum(dim=1) >= MIN_SHAPE_PIXELS
    colours = background.clone()
    for i in torch.nonzero(has_shape).flatten().tolist():
        core = distance[i] >= CORE_FRACTION * distance[i].max()
        colours[i] = pixels[i][:, core].median(dim=1).values
    return colours, has_shape


def shape_coverage(images: Tensor, background: Tensor, foreground: Tensor) -> Tensor:
    """Soft shape mask [B, H, W] in [0, 1]: each pixel's position on the background -> shape-colour line, with the
    lowest and highest quarter clipped (removes the noise floor, keeps antialiased edges area-true)."""
    direction = foreground - background
    direction = direction / direction.pow(2).sum(dim=1, keepdim=True).clamp(min=1e-6)
    alpha = ((images - background[:, :, None, None]) * direction[:, :, None, None]).sum(dim=1)
    return ((alpha - 0.25) * 2).clamp(0, 1)


def template_geometry(area: Tensor, cx: Tensor, cy: Tensor, shape: str) -> tuple[Tensor, Tensor, Tensor]:
    """(cx, cy, size) of the `shape` (as `world.shape_masks` takes them) with the given area and centroid."""
    if shape == "circle":
        return cx, cy, 2 * (area / math.pi).sqrt()
    if shape == "square":
        return cx, cy, area.sqrt()
    size = (2 * area).sqrt()  # triangle: area = size^2 / 2; the centroid is size/6 below the bounding-box centre
    return cx, cy - size / 6, size


def read_shape(coverage: Tensor) -> Tensor:
    """Index into SHAPES of the template (same area and centroid as the mask) with the highest soft IoU: [B]."""
    batch, height, width = coverage.shape
    area = coverage.sum(dim=(1, 2)).clamp(min=1e-6)
    ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    cx = (coverage * xs).sum(dim=(1, 2)) / area
    cy = (coverage * ys).sum(dim=(1, 2)) / area
    ious = []
    for shape in SHAPES:
        tx, ty, size = (t.double().numpy() for t in template_geometry(area, cx, cy, shape))
        template = torch.from_numpy(shape_masks([shape] * batch, tx, ty, size, height, width, TEMPLATE_SUPERSAMPLE))
        overlap = torch.minimum(template, coverage).sum(dim=(1, 2))
        union = torch.maximum(template, coverage).sum(dim=(1, 2)).clamp(min=1e-6)
        ious.append(overlap / union)
    return torch.stack(ious, dim=1).argmax(dim=1)


@torch.no_grad()
def read_scenes(images: Tensor) -> dict[str, list[str | None]]:
    """What the gold checker sees in each image [B, 3, H, W] in [0, 1]: {'background', 'colour', 'shape'} -> names.

    'colour' and 'shape' are None when the image shows no shape (nothing differs enough from the background).
    """
    images = images.detach().float().cpu().clamp(0, 1)
    background_names, background_palette = _palette(BACKGROUNDS)
    colour_names, colour_palette = _palette(COLOURS)
    background = read_background(images)
    foreground, has_shape = read_foreground(images, background)
    shapes = read_shape(shape_coverage(images, background, foreground))
    colours = _nearest(foreground, colour_palette)
    return {
        "background": [background_names[i] for i in _nearest(background, background_palette).tolist()],
        "colour": [colour_names[c] if ok else None for c, ok in zip(colours.tolist(), has_shape.tolist(), strict=True)],
        "shape": [SHAPES[s] if ok else None for s, ok in zip(shapes.tolist(), has_shape.tolist(), strict=True)],
    }


def gold_check(images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
    """Per-image correctness of each attribute against its prompt: {'background', 'colour', 'shape', 'all_correct'}
    -> bool tensors [B]. `images` [B, 3, H, W] in [0, 1]; `prompts` are shapes-world captions (ValueError otherwise)."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"gold_check: {images.shape[0]} images but {len(prompts)} prompts")
    wanted = [parse_prompt(p) for p in prompts]
    seen = read_scenes(images)
    result = {
        attr: torch.tensor([seen[attr][i] == getattr(w, attr) for i, w in enumerate(wanted)], dtype=torch.bool)
        for attr in ATTRIBUTES
    }
    result["all_correct"] = torch.stack([result[a] for a in ATTRIBUTES]).all(dim=0)
    return result


def gold_score(images: Tensor, prompts: list[str]) -> Tensor:
    """Gold reward [B] in [0, 1]: the fraction of the prompt's attributes (background, colour, shape) the image shows.
    Not differentiable. `images` [B, 3, H, W] in [0, 1]."""
    check = gold_check(images, prompts)
    score = torch.stack([check[a].float() for a in ATTRIBUTES]).mean(dim=0)
    return score.to(images.device)


def gold_accuracy(images: Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Mean of each `gold_check` field over the batch (a convenience for reports and tests)."""
    return {k: v.float().mean().item() for k, v in gold_check(images, prompts).items()}


__all__ = ["gold_accuracy", "gold_check", "gold_score", "read_scenes"]
