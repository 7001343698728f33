"""The toy shapes world: 32x32 scenes of one shape of one colour on a plain background, with captions.

A scene is three attributes, e.g. ("circle", "red", "black"), captioned "a red circle on a black background". Size and
position are random (uniform); images are rendered with 4x4 supersampling, so edges are antialiased. A fixed set of
attribute combinations is HELD OUT: no training image of the toy model shows them, so they measure whether a model
composes attributes it has only seen apart. numpy/torch only, deterministic in the seed.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 220),
    "yellow": (235, 210, 40),
    "white": (240, 240, 240),
}
"""Shape colours (RGB, 0..255)."""
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "white": (240, 240, 240),
}
"""Background colours (RGB, 0..255). A shape is never the colour of its background."""
ATTRIBUTES: tuple[str, ...] = ("background", "colour", "shape")
"""The attributes of a scene, in the order the gold checker reports them."""

RESOLUTION = 32
SUPERSAMPLE = 4
MIN_SIZE, MAX_SIZE = 10.0, 18.0
"""Extent of a shape in pixels: circle diameter, square side, triangle base (= its height)."""
MARGIN = 2.0
"""Shapes keep at least this many pixels from the image border."""


@dataclass(frozen=True)
class Scene:
    """The attributes a caption names."""

    shape: str
    colour: str
    background: str

    @property
    def prompt(self) -> str:
        """The caption, e.g. 'a red circle on a black background'."""
        return f"a {self.colour} {self.shape} on a {self.background} background"


HELDOUT_SCENES: tuple[Scene, ...] = (
    Scene("circle", "red", "black"),
    Scene("square", "green", "black"),
    Scene("triangle", "blue", "black"),
    Scene("circle", "yellow", "gray"),
    Scene("square", "white", "gray"),
    Scene("triangle", "red", "gray"),
    Scene("circle", "blue", "white"),
    Scene("square", "yellow", "white"),
    Scene("triangle", "green", "white"),
)
"""Combinations no training image contains. No two share two attributes, so every pair of attribute values (e.g. red +
circle, red + black) still appears in the training split, and every background and shape is held out 3 times."""

_PROMPT_PATTERN = re.compile(r"^\s*an? (\w+) (\w+) on an? (\w+) background\s*$")


def all_scenes() -> list[Scene]:
    """Every valid scene (shape colour != background colour), in a fixed order."""
    return [
        Scene(shape, colour, background)
        for background, colour, shape in itertools.product(BACKGROUNDS, COLOURS, SHAPES)
        if colour != background
    ]


def train_scenes() -> list[Scene]:
    """The scenes the toy model is trained on: all but the held-out ones."""
    heldout = set(HELDOUT_SCENES)
    return [s for s in all_scenes() if s not in heldout]


def heldout_scenes() -> list[Scene]:
    """The held-out scenes, in a fixed order."""
    return list(HELDOUT_SCENES)


def train_prompts() -> list[str]:
    """Captions of the training scenes."""
    return [s.prompt for s in train_scenes()]


def heldout_prompts() -> list[str]:
    """Captions of the held-out scenes."""
    return [s.prompt for s in heldout_scenes()]


def all_prompts() -> list[str]:
    """Captions of every scene."""
    return [s.prompt for s in all_scenes()]


def vocabulary() -> list[str]:
    """Every word a caption of this world can use (for a tokenizer where each is one token)."""
    return ["a", "on", "background", *SHAPES, *dict.fromkeys([*COLOURS, *BACKGROUNDS])]


def parse_prompt(prompt: str) -> Scene:
    """The scene a caption describes; ValueError if it is not a caption of this world."""
    match = _PROMPT_PATTERN.match(prompt.lower())
    if match is None:
        raise ValueError(
            f"not a shapes-world caption: {prompt!r} (expected 'a <colour> <shape> on a <background> background')"
        )
    colour, shape, background = match.groups()
    if shape not in SHAPES or colour not in COLOURS or background not in BACKGROUNDS:
        raise ValueError(
            f"unknown attribute in {prompt!r}: shapes {SHAPES}, colours {tuple(COLOURS)}, "
            f"backgrounds {tuple(BACKGROUNDS)}"
        )
    return Scene(shape, colour, background)


# ---------------------------------------------------------------------------------------------------------- rendering
def shape_masks(
    shapes: list[str],
    cx: np.ndarray,
    cy: np.ndarray,
    size: np.ndarray,
    height: int,
    width: int,
    supersample: int = SUPERSAMPLE,
) -> np.ndarray:
    """Coverage in [0, 1] ([B, height, width], float32) of each shape, from `supersample`^2 points per pixel.

    `cx`, `cy` are the centre of the shape's bounding box and `size` its extent, in pixels (pixel i spans [i, i+1)).
    Squares are axis-aligned; triangles are isosceles, apex up, base = height = size.
    """
    offsets = (np.arange(supersample) + 0.5) / supersample
    ys = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1)  # [H*s] sample coordinates
    xs = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1)
    kinds = np.array([SHAPES.index(s) for s in shapes])
    dx = xs[None, None, :] - np.asarray(cx, dtype=np.float64)[:, None, None]  # [B, 1, W*s]
    dy = ys[None, :, None] - np.asarray(cy, dtype=np.float64)[:, None, None]  # [B, H*s, 1]
    half = np.asarray(size, dtype=np.float64)[:, None, None] / 2
    circle = dx**2 + dy**2 <= half**2
    square = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # apex at (0, -half), base from (-half, half) to (half, half): |dx| <= (dy + half) / 2
    triangle = (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    inside = np.select([kinds[:, None, None] == k for k in range(len(SHAPES))], [circle, square, triangle])
    pooled = inside.reshape(len(shapes), height, supersample, width, supersample).mean(axis=(2, 4))
    return pooled.astype(np.float32)


def render(
    scenes: list[Scene], cx: np.ndarray, cy: np.ndarray, size: np.ndarray, resolution: int = RESOLUTION
) -> Tensor:
    """Images [B, 3, R, R] in [0, 1] of `scenes` with the given geometry (see `shape_masks`)."""
    alpha = shape_masks([s.shape for s in scenes], cx, cy, size, resolution, resolution)[:, None]
    fg = np.array([COLOURS[s.colour] for s in scenes], dtype=np.float32)[:, :, None, None] / 255
    bg = np.array([BACKGROUNDS[s.background] for s in scenes], dtype=np.float32)[:, :, None, None] / 255
    return torch.from_numpy(bg * (1 - alpha) + fg * alpha)


def random_geometry(
    n: int, rng: np.random.Generator, resolution: int = RESOLUTION
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random (cx, cy, size) for `n` shapes: size uniform in [MIN_SIZE, MAX_SIZE] (scaled to the resolution), centre
    uniform such that the shape stays MARGIN pixels inside the image."""
    scale = resolution / RESOLUTION
    size = rng.uniform(MIN_SIZE, MAX_SIZE, n) * scale
    low, high = MARGIN * scale + size / 2, resolution - MARGIN * scale - size / 2
    cx = rng.uniform(low, high)
    cy = rng.uniform(low, high)
    return cx, cy, size


def sample_scenes(n: int, rng: np.random.Generator, split: str = "train") -> list[Scene]:
    """`n` scenes drawn uniformly from the split: 'train', 'heldout' or 'all'."""
    pool = {"train": train_scenes, "heldout": heldout_scenes, "all": all_scenes}
    if split not in pool:
        raise ValueError(f"split must be one of {tuple(pool)}, not {split!r}")
    scenes = pool[split]()
    return [scenes[i] for i in rng.integers(0, len(scenes), n)]


def generate(
    n: int, seed: int = 0, split: str = "train", noise_std: float = 0.0, resolution: int = RESOLUTION
) -> tuple[Tensor, list[str]]:
    """`n` random images [n, 3, R, R] in [0, 1] of the split's scenes and their captions; deterministic in `seed`.

    `noise_std` adds gaussian pixel noise (then clamps to [0, 1]).
    """
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(n, rng, split)
    images = render(scenes, *random_geometry(n, rng, resolution), resolution=resolution)
    if noise_std > 0:
        noise = torch.from_numpy(rng.standard_normal(images.shape).astype(np.float32))
        images = (images + noise_std * noise).clamp(0, 1)
    return images, [s.prompt for s in scenes]
