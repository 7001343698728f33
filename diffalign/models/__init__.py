"""Model families: the ONE layer that knows UNet vs transformer. See `base.Family` for the interface."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffalign.errors import UserError, error_text
from diffalign.hub import TINY_PREFIX, offline, quiet_hf_logs, resolve_model
from diffalign.models.base import (
    Cond,
    Family,
    PredictAt,
    Schedule,
    Trajectory,
    cond_cat,
    cond_expand,
    cond_select,
    cond_to,
    gaussian_log_prob,
)
from diffalign.models.flux import FluxFamily
from diffalign.models.sd import SDFamily
from diffalign.models.sd3 import SD3Family
from diffalign.models.sdxl import SDXLFamily

FAMILIES: dict[str, type[Family]] = {f.name: f for f in (SDFamily, SDXLFamily, SD3Family, FluxFamily)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAMPLING_DEFAULTS_FILE = "diffalign.json"
"""Optional file in a pipeline folder with sampling defaults (num_steps, guidance_scale, eta, resolution)."""

__all__ = [
    "PredictAt",
    "FAMILIES",
    "Cond",
    "Family",
    "Schedule",
    "Trajectory",
    "gaussian_log_prob",
    "cond_cat",
    "cond_expand",
    "cond_select",
    "cond_to",
    "family_class",
    "family_for_pipeline",
    "load_family",
]


def family_class(pipe) -> type[Family]:
    """The family class of a stock diffusers pipeline (from the pipeline class), without wrapping the pipeline."""
    for cls in type(pipe).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ == family.pipeline_class_name:
                return family
    supported = ", ".join(f.pipeline_class_name for f in FAMILIES.values())
    raise UserError(f"pipeline class {type(pipe).__name__} is not supported; supported: {supported}")


def family_for_pipeline(pipe) -> Family:
    """Wrap a stock diffusers pipeline in its family (detected from the pipeline class)."""
    return family_class(pipe)(pipe)


def load_family(
    name: str,
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    revision: str | None = None,
    seed: int = 0,
    vae: str | None = None,
) -> Family:
    """Load a pipeline by name ('toy', 'toy-flow', 'tiny-<kind>', hub id or local folder) in `dtype` and wrap it in
    its family.

    `vae`: another AutoencoderKL (hub id or local folder, e.g. madebyollin/sdxl-vae-fp16-fix) to use instead of the
    pipeline's. A float16 VAE whose config sets force_upcast runs in float32 (see `Family._upcast_vae_if_needed`)."""
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    resolved = resolve_model(name, revision)
    if resolved.startswith(TINY_PREFIX):
        from diffalign.models.tiny import TINY_BUILDERS, TINY_SAMPLING

        kind = resolved[len(TINY_PREFIX) :]
        if kind not in TINY_BUILDERS:
            raise UserError(
                f"unknown tiny model {name!r}; choose one of " + ", ".join(TINY_PREFIX + k for k in TINY_BUILDERS)
            )
        with quiet_hf_logs("diffusers"):  # "cast with to(): modules kept in float32: []" (there are none)
            pipe = TINY_BUILDERS[kind](seed=seed).to(dtype=DTYPES[dtype])
    else:
        from diffusers import DiffusionPipeline

        try:
            with quiet_hf_logs("diffusers", "transformers"):  # "Loading pipeline components" bars: nothing to act on
                pipe = DiffusionPipeline.from_pretrained(
                    resolved, dtype=DTYPES[dtype], revision=revision, local_files_only=offline()
                )
        except (OSError, ValueError) as e:  # diffusers' words for a missing, incomplete or corrupt component
            raise UserError(f"model {name!r} could not be loaded: {error_text(e)}") from e
    with quiet_hf_logs("diffusers"):  # "float16 pipelines cannot run on cpu": they do (torch has CPU fp16 kernels)
        pipe.to(device)
    family = family_for_pipeline(pipe)
    if vae is not None:
        family.set_vae(load_vae(vae, DTYPES[dtype]))
    if resolved.startswith(TINY_PREFIX):
        family.sampling_defaults.update(TINY_SAMPLING)
    defaults = Path(resolved) / SAMPLING_DEFAULTS_FILE
    if defaults.is_file():
        family.sampling_defaults.update(json.loads(defaults.read_text()))
    return family


def load_vae(name: str, dtype: torch.dtype) -> torch.nn.Module:
    """An AutoencoderKL from a hub id or a local folder (a `vae/` subfolder of a pipeline folder works too)."""
    from diffusers import AutoencoderKL

    path = Path(name).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(f"VAE {name}: {path} has no config.json (save it with vae.save_pretrained(folder))")
    if not path.exists() and name.count("/") != 1:
        raise UserError(f"VAE {name!r} is neither a local folder nor a hub id of the form owner/name")
    try:
        source = str(path) if path.exists() else name
        return AutoencoderKL.from_pretrained(source, dtype=dtype, local_files_only=offline())
    except (OSError, ValueError) as e:
        raise UserError(f"VAE {name!r} could not be loaded: {error_text(e)}") from e
