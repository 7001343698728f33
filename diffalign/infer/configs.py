"""The typed settings of the inference-time methods, ReNO and RL guidance: dataclasses read by `diffalign.config`'s
strict loader (YAML, key=value overrides, bounds, help text, `--show-config`) like the training configs, and the one
list of each method's settings that the CLI flags, the apps and the Python API all map onto. Torch-free, so a bad
setting is reported before a model loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from diffalign.config import bounded

RENO_REWARD = "hpsv2=5,imagereward=1,clip:model=laion/CLIP-ViT-H-14-laion2B-s32B-b79K:weight=0.01,pickscore=0.05"
"""The paper's reward mix (official code: HPSv2.1 5.0 on 1 - cos, ImageReward 1.0 on 2 - IR, CLIP ViT-H-14 0.01 on
100 - 100 cos, PickScore 0.05 on 30 - 100 cos; aesthetic off). diffalign's rewards are hpsv2 = cos, imagereward =
the normalised ImageReward, clip = 100 cos, pickscore = exp(logit_scale) cos = 100 cos, so the same weights apply to
them unchanged and the constants (1, 2, 100, 30) drop out (official code: ExplainableML/ReNO bd6f6ac, `arguments.py`
and `rewards/*.py`)."""

SAME_MODEL = "same"
"""`multi_step.model: same`: re-render with the ReNO model itself at more steps (the paper's FLUX-schnell 4 steps)."""


@dataclass
class MultiStepConfig:
    """The multi-step model that re-renders ReNO's initial and best noise (the paper's `multi_apply`)."""

    model: str | None = None
    """A model whose latents have the ReNO model's shape (hub id, folder, toy, tiny-*), or 'same' for the ReNO model
    itself; None: no re-rendering. Official pairs: FLUX.1-schnell with itself at 4 steps, SDXL-Turbo with SDXL base
    (50 steps, CFG 5), SD-Turbo with SD 2.1 base (50 steps, CFG 7.5)."""
    num_steps: int | None = bounded(None, ge=1)
    """Its sampling steps; default: its own."""
    guidance_scale: float | None = bounded(None, ge=0)
    """Its CFG scale; default: its own."""


@dataclass
class RenoConfig:
    """ReNO (Eyring et al., NeurIPS 2024): optimise each prompt's initial noise against differentiable rewards.
    Defaults: the paper's (official code ExplainableML/ReNO bd6f6ac, `arguments.py`)."""

    model: str = "toy"
    """The one- or few-step model: 'toy', 'toy-flow', a hub id (stabilityai/sdxl-turbo), a local folder, or tiny-*."""
    reward: str | None = None
    """Differentiable reward spec to maximise; default: the paper's mix hpsv2=5, imagereward=1, clip (ViT-H-14)
    0.01, pickscore=0.05 (`diffalign.infer.reno.RENO_REWARD`); on the toy model its proxy toy-clip."""
    iters: int = bounded(50, ge=1)
    """Generator forward+backward passes per prompt (the paper's 50)."""
    lr: float | None = bounded(None, gt=0)
    """Learning rate; default: the optimizer's (SGD the paper's 5.0, Adam 0.2: `diffalign.infer.reno.DEFAULT_LR`)."""
    optimizer: Literal["sgd", "adam"] = "sgd"
    """sgd (the paper's: momentum, Nesterov) or adam (the official eps 1e-2)."""
    momentum: float = bounded(0.9, ge=0, le=1)
    """SGD momentum (Nesterov when > 0; the paper's 0.9)."""
    num_steps: int | None = bounded(None, ge=1)
    """Sampling steps of the generator, each backpropagated through; default 1 (the toy: 4)."""
    guidance_scale: float | None = bounded(None, ge=0)
    """CFG scale; default 1 = none, what the Turbos and FLUX-schnell are distilled for (the toy: 4.5)."""
    negative_prompt: str | None = None
    """The CFG negative prompt (with guidance_scale != 1); None: the model's stock one."""
    resolution: int | None = bounded(None, ge=8)
    """Image side in pixels; default: the model's."""
    reg_weight: float = bounded(0.01, ge=0)
    """λ_reg of the χ_d noise-norm regulariser K(z) (the paper's 0.01)."""
    grad_clip: float = bounded(0.1, gt=0)
    """Clip each prompt's noise gradient to this L2 norm (the paper's 0.1)."""
    starts: int = bounded(1, ge=1)
    """Initial noises per prompt sharing the first `start_fraction` of the budget (beyond the paper; 1 = off)."""
    start_fraction: float = bounded(0.5, gt=0, le=1)
    """Fraction of `iters` the starts share before the best one continues."""
    imageselect: bool = False
    """The paper's control: the best of `iters` random noises under the same rewards, no optimisation."""
    multi_step: MultiStepConfig = field(default_factory=MultiStepConfig)
    checkpoint: bool | None = None
    """Recompute each sampling step in the backward pass instead of storing it; default: when num_steps > 1."""
    seed: int = 0
    """Prompt i starts from the noise of seed + i (the initial noise `diffalign generate` uses for it)."""
    batch_size: int = bounded(8, ge=1)
    """Prompts optimised together (independently: a batch gives the one-by-one results)."""
    device: str | None = None
    """cpu, cuda, cuda:1; default: this process's GPU, else the CPU."""
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    """Generator dtype; default float16 on a GPU, else float32 (the noise and the regulariser stay float32)."""


@dataclass
class RLGConfig:
    """RL guidance (Jin et al., arXiv 2508.21016): v = v_base + scale·(v_ft − v_base) at every sampling step, each
    model with its own CFG."""

    scale: float = 1.0
    """w: 0 = the base model, 1 = the fine-tuned one, > 1 extrapolates (the paper recommends 1-3)."""
    zero_init_step: int = bounded(0, ge=0)
    """The fine-tuned model alone for the first k sampling steps (the official code's `zero_init_step`)."""
    batched: bool = False
    """Base and fine-tuned pass in ONE call of the doubled batch (peft routes each half); default two calls, which
    measured faster on CPU."""
