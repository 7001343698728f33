"""RLG: inference-time RL guidance (Jin et al., "Inference-Time Alignment Control for Diffusion Models with
Reinforcement Learning Guidance", arXiv 2508.21016).

With scale w every denoiser prediction becomes

    v = v_base + w * (v_ft - v_base)

where v_ft is the fine-tuned model (LoRA adapters on, or a second full denoiser) and v_base the base model (adapters
off). This is the score of p_base^(1-w) * p_ft^w: w = 0 is the base model, w = 1 the fine-tuned one, w > 1
extrapolates past it (the paper uses 1-3). With classifier-free guidance the paper first guides each model,
v^m = v_u^m + g (v_c^m - v_u^m), then mixes (its eq. for RLG with CFG); because both are linear in the predictions,
mixing every denoiser output and letting the sampler apply its CFG afterwards gives exactly that formula. So RLG is
one wrapper module around the denoiser (`RLGDenoiser`), used

- inside a stock diffusers pipeline: `with rl_guidance(pipe, 1.5): pipe(prompt)` swaps `pipe.unet` /
  `pipe.transformer` for the wrapper during the block (StableDiffusion, SDXL, SD3, FLUX pipelines);
- inside the family sampler: `with rl_guidance(family, 1.5): sample_images(family, ...)` (every `denoise` call of
  the family goes through the wrapper), or `family.sample(..., predict=rlg_predict(family, 1.5))`.

The settings are `diffalign.infer.configs.RLGConfig` (scale, zero_init_step, batched): every entry point takes a
scale or a config, and the other settings by name. `zero_init_step=k` uses the fine-tuned prediction alone for the
first k sampling steps (the official code's `zero_init_step`). With a LoRA, the base pass is a call in which peft
routes every sample to "__base__" (adapters off, `adapter_names`), the fine-tuned pass a plain call. `batched=True`
runs both in ONE call of the doubled batch (peft routes each half); on 2 CPU cores that was slower (the toy UNet,
rank-8 LoRA: 1.94-1.98x a plain call vs 1.72-1.87x for two calls at batch 8 and 128; `scripts/bench.py rlg`), so two
calls are the default. One call may win where per-call overhead dominates (small batches on a GPU): measure there.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffalign.config import check_values
from diffalign.errors import UserError
from diffalign.infer.configs import RLGConfig
from diffalign.models import Family, family_class
from diffalign.models.base import PredictFn

BASE_ADAPTER = "__base__"
"""peft's name for 'no adapter' in a mixed-adapter batch."""


def lora_layers(module: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers inside `module` (empty when no LoRA is loaded)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


class RLGDenoiser(nn.Module):
    """A denoiser whose every output is base + scale * (fine-tuned - base). It is called exactly like the denoiser it
    wraps (same arguments, same output type) and reads as it for everything else (`config`, `dtype`, `device`, ...),
    so a stock pipeline or a family runs it in place of its UNet / transformer.

    Exactly one of: a LoRA loaded in `denoiser` (fine-tuned = adapters on, base = adapters off), `finetuned` (a second
    full denoiser; `denoiser` is the base), or `base` (a second full denoiser; `denoiser` is the fine-tuned one).
    `unbatched` names keyword inputs without a batch dimension (the family's `unbatched_denoiser_inputs`).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        config: RLGConfig,
        *,
        finetuned: nn.Module | None = None,
        base: nn.Module | None = None,
        unbatched: Sequence[str] = (),
    ):
        super().__init__()
        if finetuned is not None and base is not None:
            raise ValueError("RLG: give the second denoiser as finetuned= or as base=, not both")
        check_values(config)
        self.denoiser = denoiser
        self.other = finetuned if finetuned is not None else base
        self.other_is_finetuned = finetuned is not None
        self.scale, self.zero_init_step = float(config.scale), int(config.zero_init_step)
        self.unbatched = frozenset(unbatched)
        self._layers: list[nn.Module] = []
        self._adapter: str | None = None
        if self.other is None:
            self._layers = lora_layers(denoiser)
            if not self._layers:
                raise UserError(
                    "RLG needs a fine-tuned model: load a LoRA first (pipe.load_lora_weights(folder), "
                    "family.load_lora(folder), --lora DIR) or pass a second denoiser (finetuned=...)"
                )
            if any(layer.merged for layer in self._layers):
                raise UserError("RLG needs the LoRA unfused (the base model is the weights without it): unfuse_lora()")
            active = self._layers[0].active_adapters
            uses_dora = any(layer.use_dora.get(name, False) for layer in self._layers for name in active)
            # peft routes one adapter per sample: several active adapters (or DoRA) need the two-call path.
            self._adapter = active[0] if len(active) == 1 and not uses_dora else None
        self.batched = config.batched and self.other is None and self._adapter is not None
        self._last_t: float | None = None
        self._step = 0
        self.calls = 0
        """Denoiser calls made (for tests and benchmarks)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("denoiser", "_modules"):
                raise
            return getattr(self._modules["denoiser"], name)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """base + scale * (fine-tuned - base) for one denoiser call (a fine-tuned-only call in zero-init steps)."""
        x = first_input(args, kwargs)
        scale = 1.0 if self.step_index(args, kwargs) < self.zero_init_step else self.scale
        if scale == 1.0:
            return self._finetuned(args, kwargs)
        if scale == 0.0:
            return self._base(args, kwargs)
        if self.batched:
            doubled_args, doubled_kwargs = double_batch(args, kwargs, x.shape[0], self.unbatched)
            both = self._call(self.denoiser, doubled_args, doubled_kwargs, [BASE_ADAPTER, self._adapter], x.shape[0])
            base, finetuned = output_tensor(both).chunk(2)
            return with_output_tensor(both, mix(base, finetuned, scale))
        base_out = self._base(args, kwargs)
        finetuned = output_tensor(self._finetuned(args, kwargs))
        return with_output_tensor(base_out, mix(output_tensor(base_out), finetuned, scale))

    def _base(self, args: tuple, kwargs: dict) -> Any:
        if self.other is None:
            return self._call(self.denoiser, args, kwargs, [BASE_ADAPTER], args_batch(args, kwargs))
        return self._call(self.denoiser if self.other_is_finetuned else self.other, args, kwargs)

    def _finetuned(self, args: tuple, kwargs: dict) -> Any:
        if self.other is None:
            return self._call(self.denoiser, args, kwargs)
        return self._call(self.other if self.other_is_finetuned else self.denoiser, args, kwargs)

    def _call(self, module: nn.Module, args: tuple, kwargs: dict, routes: list | None = None, n: int = 0) -> Any:
        """module(*args, **kwargs); with `routes` (adapter names, each for `n` consecutive samples) peft runs each
        sample with its adapter ("__base__": none)."""
        self.calls += 1
        if routes is None:
            return module(*args, **kwargs)
        names = [name for name in routes for _ in range(n)]
        hooks = [layer.register_forward_pre_hook(_route(names), with_kwargs=True) for layer in self._layers]
        try:
            return module(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()

    def step_index(self, args: tuple, kwargs: dict) -> int:
        """Which sampling step this call belongs to, counted from the timesteps seen: a lower timestep than the last
        call's is the next step, the same one the same step (FLUX's true CFG calls twice per step), a higher one
        starts a new sampling run at step 0."""
        if self.zero_init_step == 0:
            return 0
        if torch.is_grad_enabled():
            raise ValueError("RLG zero_init_step counts steps in call order: sample without gradient")
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        value = float(torch.as_tensor(t).reshape(-1)[0])
        if self._last_t is None or value > self._last_t:
            self._step = 0
        elif value < self._last_t:
            self._step += 1
        self._last_t = value
        return self._step

    def reset(self) -> None:
        """Forget the step count (the next call is step 0)."""
        self._last_t, self._step = None, 0


def _route(names: list[str]):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "adapter_names": names}

    return hook


def mix(base: Tensor, finetuned: Tensor, scale: float) -> Tensor:
    """base + scale * (finetuned - base), computed in float32 (half-precision differences lose digits)."""
    base32 = base.float()
    return (base32 + scale * (finetuned.float() - base32)).to(base.dtype)


def first_input(args: tuple, kwargs: dict) -> Tensor:
    """The latents of a denoiser call: the first positional input, or `hidden_states` / `sample` by keyword."""
    if args:
        return args[0]
    for name in ("hidden_states", "sample"):
        if name in kwargs:
            return kwargs[name]
    return next(iter(kwargs.values()))


def args_batch(args: tuple, kwargs: dict) -> int:
    """The batch size of a denoiser call."""
    return first_input(args, kwargs).shape[0]


def double_batch(args: tuple, kwargs: dict, batch: int, unbatched: frozenset[str]) -> tuple[tuple, dict]:
    """The call's inputs with every batch-first tensor repeated twice along dim 0 (base half, fine-tuned half);
    scalars, 0-d timesteps and the keyword inputs named in `unbatched` stay as they are."""
    doubled_kwargs = {k: v if k in unbatched else _doubled(v, batch) for k, v in kwargs.items()}
    return tuple(_doubled(a, batch) for a in args), doubled_kwargs


def _doubled(value: Any, batch: int) -> Any:
    if isinstance(value, Tensor):
        return torch.cat([value, value]) if value.ndim > 0 and value.shape[0] == batch else value
    if isinstance(value, Mapping):
        return {k: _doubled(v, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_doubled(v, batch) for v in value)
    return value


def output_tensor(out: Any) -> Tensor:
    """The prediction in a denoiser's output: a tensor, the first item of a tuple, or `.sample` of an output class."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.sample


def with_output_tensor(out: Any, tensor: Tensor) -> Any:
    """`out` with its prediction replaced by `tensor` (same output type)."""
    if isinstance(out, Tensor):
        return tensor
    if isinstance(out, tuple):
        return (tensor, *out[1:])
    return type(out)(sample=tensor)


# ------------------------------------------------------------------------------------------------------ entry points
def rlg_config(scale: float | RLGConfig, settings: Mapping[str, Any]) -> RLGConfig:
    """The RLG settings of an entry point: a config, or a scale and `settings` (RLGConfig's other fields, e.g.
    zero_init_step=2, batched=True)."""
    if isinstance(scale, RLGConfig):
        return dataclasses.replace(scale, **settings)
    return RLGConfig(scale=float(scale), **settings)


def rlg_denoiser(
    target: Any,
    scale: float | RLGConfig,
    *,
    finetuned: nn.Module | None = None,
    base: nn.Module | None = None,
    **settings: Any,
) -> RLGDenoiser:
    """The RLG wrapper of the denoiser of `target` (a Family or a stock diffusers pipeline); see `RLGDenoiser`."""
    family = type(target) if isinstance(target, Family) else family_class(target)
    denoiser = target.denoiser if isinstance(target, Family) else getattr(target, family.denoiser_attr)
    if isinstance(denoiser, RLGDenoiser):
        raise ValueError("RLG: this denoiser is already guided (nested rl_guidance blocks)")
    config = rlg_config(scale, settings)
    inputs = family.unbatched_denoiser_inputs
    return RLGDenoiser(denoiser, config, finetuned=finetuned, base=base, unbatched=inputs)


@contextlib.contextmanager
def rl_guidance(
    target: Any,
    scale: float | RLGConfig,
    *,
    finetuned: nn.Module | None = None,
    base: nn.Module | None = None,
    **settings: Any,
) -> Iterator[RLGDenoiser]:
    """Within the block, `target` samples with RL guidance at `scale` (a number, or an RLGConfig; `settings` are
    RLGConfig's other fields: zero_init_step, batched).

    `target` is a stock diffusers pipeline (StableDiffusion, SDXL, SD3, FLUX; its `unet` / `transformer` is the
    wrapper during the block, restored after) or a diffalign Family (every `denoise` call goes through the wrapper,
    so `family.sample`, `sample_images` and `evaluate` use RLG). The fine-tuned model is the LoRA loaded in it, or
    `finetuned=` a second full denoiser (the pipeline's own is the base), or `base=` one (the pipeline's own is the
    fine-tuned model). Yields the wrapper (`.calls` counts denoiser calls).

        pipe.load_lora_weights("runs/dpo/lora")
        with rl_guidance(pipe, 1.5):
            image = pipe("a cat", guidance_scale=7.5).images[0]
    """
    wrapper = rlg_denoiser(target, scale, finetuned=finetuned, base=base, **settings)
    if isinstance(target, Family):
        with target.calling(wrapper):
            yield wrapper
        return
    attr = family_class(target).denoiser_attr
    original = getattr(target, attr)
    # object.__setattr__: DiffusionPipeline.__setattr__ would also rewrite the pipeline's config entry
    object.__setattr__(target, attr, wrapper)
    try:
        yield wrapper
    finally:
        object.__setattr__(target, attr, original)


def rlg_predict(
    family: Family,
    scale: float | RLGConfig,
    *,
    finetuned: nn.Module | None = None,
    base: nn.Module | None = None,
    **settings: Any,
) -> PredictFn:
    """A prediction hook for `family.sample(..., predict=...)`: the family's prediction (with its CFG) under RLG."""
    wrapper = rlg_denoiser(family, scale, finetuned=finetuned, base=base, **settings)

    def predict(x: Tensor, t: Tensor | float, cond: dict, uncond: dict | None, guidance_scale: float) -> Tensor:
        with family.calling(wrapper):
            return family.predict(x, t, cond, uncond, guidance_scale)

    predict.wrapper = wrapper  # type: ignore[attr-defined]
    return predict


def parse_scales(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; anything else is a one-line UserError."""
    import math

    try:
        scales = [float(part) for part in text.split(",")]
    except ValueError:
        scales = []
    if not scales or not all(math.isfinite(s) for s in scales) or len(set(scales)) != len(scales):
        raise UserError(f"RLG scales {text!r}: give distinct comma-separated numbers, e.g. 0,0.5,1,1.5,2")
    return scales
