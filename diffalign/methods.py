"""The methods diffalign offers, one record each: everything else (the `train` command, the demo and its report, the
acceptance scripts, the benches, the shipped configs, the contract tests) iterates over `METHODS`.

Adding a training method: `diffalign/losses/<name>.py` (the tensor math), `diffalign/train/<name>.py` (its `Config`
and `train(cfg)`), `diffalign/apps/sections/<name>.py` (its demo section), `configs/<name>/*.yaml` (a `toy.yaml`
and one per family), and one `Method(...)` line below. A bench, if it has one, is `scripts/bench_<name>.py`.

The records name their code by dotted path (imported when used), so reading this module imports nothing heavy.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Method:
    """One method: what it is, where its code lives, how big its demo section runs."""

    name: str
    """The `method:` key of a training config, the demo's `--methods` name."""
    title: str
    """Its name in the report and the README."""
    kind: Literal["training", "inference"]
    module: str
    """The module of its entry function (`train(cfg)` for a training method, `reno` / `rl_guidance`)."""
    config: str
    """module:Class of its settings (a training method's config class, over `diffalign.config.TrainConfig`)."""
    section: str
    """module:function of its demo section, `section(ctx: DemoContext) -> SectionResult`."""
    full: dict[str, Any] = field(default_factory=dict)
    """Its sizes in the full demo (`diffalign demo`), e.g. {"steps": 200}; read by its section. Chosen so that its
    held-out gain is beyond 2 paired SE on the demo's seed within the demo's 15 minutes (docs/results/demo.md)."""
    quick: dict[str, Any] = field(default_factory=dict)
    """Its sizes in the quick demo (`diffalign demo --quick`), a smoke run."""
    in_demo: bool = True
    """Whether `diffalign demo` runs it by default (False: only when named in `--methods`, e.g. while its claim on
    the toy world is not yet shown within the demo's budget)."""
    bench: bool = False
    """Whether it has a benchmark, `scripts/bench_<name>.py` (`python scripts/bench.py <name>`)."""
    smoke: tuple[str, ...] = ()
    """key=value overrides that make a training run of a few seconds on a tiny model (its config's sizes that matter
    for speed), for the contract tests every training method passes."""

    @property
    def trains(self) -> bool:
        """True for a training method (a `train` recipe with configs under configs/<name>/)."""
        return self.kind == "training"

    def entry(self, name: str) -> Callable[..., Any]:
        """The function or class `name` of its module (e.g. "train", "Config")."""
        return getattr(importlib.import_module(self.module), name)

    def config_class(self) -> type:
        """The dataclass of its settings."""
        module, _, name = self.config.partition(":")
        return getattr(importlib.import_module(module), name)

    def section_function(self) -> Callable[..., Any]:
        """Its demo section function."""
        module, _, name = self.section.partition(":")
        return getattr(importlib.import_module(module), name)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "dpo", "Diffusion-DPO", "training", "diffalign.train.dpo", "diffalign.train.dpo:Config",
            "diffalign.apps.sections.dpo:dpo_section",
            full={"steps": 200}, quick={"steps": 100}, bench=True,
        ),
        Method(
            "inpo", "DDIM-InPO", "training", "diffalign.train.inpo", "diffalign.train.inpo:Config",
            "diffalign.apps.sections.inpo:inpo_section",
            full={"steps": 150}, quick={"steps": 40}, bench=True, smoke=("inpo.inversion_steps=3",),
        ),
        Method(
            "alignprop", "AlignProp", "training", "diffalign.train.alignprop", "diffalign.train.alignprop:Config",
            "diffalign.apps.sections.alignprop:alignprop_section",
            full={"steps": 50}, quick={"steps": 4}, bench=True, smoke=("alignprop.num_steps=3",),
        ),
        Method(
            "grpo", "GRPO (DDPO / Flow-GRPO)", "training", "diffalign.train.grpo", "diffalign.train.grpo:Config",
            "diffalign.apps.sections.grpo:grpo_section",
            full={"steps": 150, "rollout": (8, 8)}, quick={"steps": 2, "rollout": (2, 4)}, in_demo=False, bench=True,
            smoke=(
                "grpo.prompts_per_rollout=2", "grpo.group_size=2", "gradient_accumulation_steps=2",
                "grpo.num_steps=3",
            ),
        ),
        Method(
            "nft", "DiffusionNFT", "training", "diffalign.train.nft", "diffalign.train.nft:Config",
            "diffalign.apps.sections.nft:nft_section",
            full={"steps": 60, "rollout": (8, 8)}, quick={"steps": 2, "rollout": (2, 4)}, in_demo=False, bench=True,
            smoke=(
                "nft.prompts_per_rollout=2", "nft.group_size=2", "gradient_accumulation_steps=2", "nft.num_steps=3",
            ),
        ),
        Method(
            "reno", "ReNO", "inference", "diffalign.infer.reno", "diffalign.infer.configs:RenoConfig",
            "diffalign.apps.sections.reno:reno_section",
            full={"samples": 18, "iters": 50}, quick={"samples": 9, "iters": 15}, bench=True,
        ),
        Method(
            "rlg", "RL guidance (RLG)", "inference", "diffalign.infer.rlg", "diffalign.infer.configs:RLGConfig",
            "diffalign.apps.sections.rlg:rlg_section",
            full={"scales": (0.0, 1.0, 2.0, 3.0), "samples": 64, "scale": 2.0},
            quick={"scales": (0.0, 1.0, 2.0), "samples": 64, "scale": 2.0},
            bench=True,
        ),
    )
}  # fmt: skip
"""Every method, in the order the demo runs them (DPO first: RLG guides with its LoRA)."""


def demo_methods() -> list[str]:
    """The methods `diffalign demo` runs when `--methods` names none."""
    return [name for name, method in METHODS.items() if method.in_demo]


def training_methods() -> list[str]:
    """The names of the training methods (the values of a config's `method:`)."""
    return [name for name, method in METHODS.items() if method.trains]
