"""Shared fixtures: tiny pipelines of every family, built once per session and deep-copied per test."""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The four families, each tiny pipeline carrying a real checkpoint's published scheduler and VAE settings
# (diffalign/models/published): sd = SD 1.5 (PNDM), sd-v = SD 2.1 (DDIM, v-prediction), sdxl = SDXL base (Euler,
# force_upcast VAE), sd3 = SD3.5 (shifted flow matching), flux = FLUX.1-dev (dynamic shifting), flux-schnell.
FAMILY_KINDS = ["sd", "sd-v", "sdxl", "sd3", "flux", "flux-schnell"]
# ... plus the few-step Turbos, which differ only in their scheduler (trailing Euler / Euler-Ancestral).
ALL_KINDS = [*FAMILY_KINDS, "sd-turbo", "sdxl-turbo"]
_BUILT: dict[str, object] = {}


def build_pipeline(kind: str, seed: int = 0):
    """A fresh copy of the tiny `kind` pipeline (built once per session per kind and seed)."""
    from diffalign.models.tiny import TINY_BUILDERS

    key = f"{kind}:{seed}"
    if key not in _BUILT:
        _BUILT[key] = TINY_BUILDERS[kind](seed=seed)
    return copy.deepcopy(_BUILT[key])


def build_family(kind: str, seed: int = 0):
    """A fresh tiny family with the tiny sampling defaults (32x32, 4 steps)."""
    from diffalign.models import family_for_pipeline
    from diffalign.models.tiny import TINY_SAMPLING

    family = family_for_pipeline(build_pipeline(kind, seed))
    family.sampling_defaults.update(TINY_SAMPLING)
    return family


def family_of(kind: str):
    """`build_family(kind)` for a tiny kind; for a bundled toy ('toy', 'toy-flow') the shipped model, with its own
    sampling defaults."""
    from diffalign.hub import TOY_MODELS

    if kind in TOY_MODELS:
        from diffalign.models import load_family

        return load_family(kind)
    return build_family(kind)


@pytest.fixture(autouse=True)
def own_random_state():
    """Every test starts from the same torch RNG state and thread count, whatever ran before it in this process
    (a LoRA's A matrices are drawn from the global RNG): the suite passes in any order and any subset."""
    import torch

    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=FAMILY_KINDS)
def family(request):
    return build_family(request.param)
