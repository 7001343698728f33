"""Training recipes (one short module per method) built from the shared blocks in `common`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from diffalign.config import TrainConfig


def recipe(method: str) -> Callable[[TrainConfig], Path]:
    """The `train(cfg)` function of a method."""
    if method == "dpo":
        from diffalign.train.dpo import train

        return train
    from diffalign.errors import NotImplementedYet

    raise NotImplementedYet(f"training method {method!r} is not implemented yet")
