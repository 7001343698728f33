"""Training methods: one short recipe per method, each a `Config` class (its config sections over the shared
`diffalign.config.TrainConfig`) and a `train(cfg) -> Path` that builds a step function and a batch source and hands
them to the one training loop (`diffalign.train.loop.fit`). The methods are the training records of
`diffalign.methods.METHODS`. Recipe modules import torch lazily, so a bad config fails fast.

The shared blocks, by concept: `setup` (accelerator, model, optimizer), `run_dir` (the output folder, run.json),
`checkpoint` (state, save, resume), `validation` (validation, best weights, early stop), `run_log` (metrics, the
NaN stop), `outputs` (the final LoRA or denoiser, summary.json), `pair_training` (what the preference-pair methods
share), `sampler` (the sampler of methods that sample while training), and `loop.fit`, the one loop.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from diffalign.config import TrainConfig, load_config, parse_overrides, read_yaml
from diffalign.errors import UserError
from diffalign.methods import METHODS, training_methods


def method_module(method: str) -> ModuleType:
    """The recipe module of `method`, or a UserError listing the known training methods."""
    if method not in training_methods():
        raise UserError(f"unknown method {method!r}; known methods: {', '.join(training_methods())}")
    return importlib.import_module(METHODS[method].module)


def config_class(method: str) -> type[TrainConfig]:
    """The config class of `method`."""
    method_module(method)  # a UserError for an unknown method
    return METHODS[method].config_class()


def recipe(method: str) -> Callable[[TrainConfig], Path]:
    """The `train(cfg)` function of `method`."""
    return method_module(method).train


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """The config of a YAML file plus `key=value` overrides, built as the class of its `method:` (so a key of
    another method is an unknown key)."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    method = parse_overrides(overrides or []).get("method", data.get("method"))
    if method is None:
        raise UserError(f"the config has no 'method:' key; known methods: {', '.join(training_methods())}")
    return load_config(config_class(str(method)), path, overrides)


class TrainingInterrupted(Exception):
    """Ctrl-C during training; the message says where a re-run resumes from (raised by `loop.fit`)."""


def train(cfg: TrainConfig) -> Path:
    """Run the recipe of `cfg.method`; returns the folder of the final LoRA (or full denoiser)."""
    return recipe(cfg.method)(cfg)
