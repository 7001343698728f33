"""The sampler of methods that sample while they train (AlignProp; the online RL methods next): its settings resolved
against the model's defaults, and gradient checkpointing of a call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffalign.models import Family


@dataclass(frozen=True)
class Sampler:
    """The sampler settings of training, resolved against the model's defaults."""

    num_steps: int
    guidance_scale: float
    eta: float
    resolution: int


def resolve_sampler(
    family: Family,
    resolution: int,
    *,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    eta: float | None = None,
    section: str = "sampler",
) -> Sampler:
    """The training sampler: the given settings, else the model's defaults. η > 0 on a deterministic (flow Euler)
    sampler is a UserError naming `<section>.eta`, never silently ignored."""
    from diffalign.errors import UserError

    defaults = family.sampling_defaults
    eta = defaults["eta"] if eta is None else eta
    if eta > 0 and not family.stochastic_sampler:
        raise UserError(
            f"{section}.eta={eta}: {family.name} samples with the deterministic flow-matching Euler sampler, where "
            f"η does not exist; set {section}.eta=0"
        )
    return Sampler(
        num_steps=num_steps or defaults["num_steps"],
        guidance_scale=defaults["guidance_scale"] if guidance_scale is None else guidance_scale,
        eta=eta,
        resolution=resolution,
    )


def checkpointed(function, *args, enabled: bool = True):
    """`function(*args)`, recomputed in the backward pass instead of keeping its activations when `enabled` and
    gradients are on."""
    import torch
    import torch.utils.checkpoint

    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
    return function(*args)
