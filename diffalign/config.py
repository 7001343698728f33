"""Typed configs: dataclasses with defaults, loaded from YAML plus `key=value` overrides (nested with dots).

`TrainConfig` holds what every training method shares (model, lora, optim, validation, run settings) and the
sections several methods use (`DataConfig` for preference pairs, `TimestepConfig`); each method's own config class
(e.g. `diffalign.train.dpo.Config`) extends it beside its recipe, and `diffalign.train.load_train_config` picks the
class from the YAML's `method:`.

Strict: an unknown key, a value of the wrong type or a missing required value raises `UserError` naming the key and the
valid keys, before any model is loaded. Override values are parsed as YAML (`lr=1e-4`, `lora.targets=[to_q,to_k]`),
except for string fields and choices of strings, which take the text as written (`model.name=123` stays "123",
`mixed_precision=no` is "no").
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from diffalign.errors import UserError

T = TypeVar("T")


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A field whose value (unless None) must be >= ge, > gt and <= le; checked when the config is loaded."""
    bounds = {name: value for name, value in ((">=", ge), (">", gt), ("<=", le)) if value is not None}
    return field(default=default, metadata={"bounds": bounds})


# ---------------------------------------------------------------------------------------------------------- schemas
@dataclass
class ModelConfig:
    """Which pipeline to load."""

    name: str = "toy"
    """'toy' or 'toy-flow' (the bundled shapes-world models: UNet / flow matching), a hub id, or a local folder
    written by `save_pretrained`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Weights dtype of the frozen parts (VAE, text encoders). Trainable weights stay float32."""
    resolution: int | None = bounded(None, ge=8)
    """Training/sampling resolution in pixels; default: the family's native resolution."""
    vae: str | None = None
    """Another VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix; a float16 VAE whose config sets
    force_upcast runs in float32 either way."""


@dataclass
class LoraConfig:
    """LoRA adapter on the denoiser (UNet or transformer). `enabled: false` means a full fine-tune."""

    enabled: bool = True
    """true: a LoRA adapter on the denoiser (the other weights frozen); false: train every denoiser weight."""
    rank: int = bounded(4, ge=1)
    """LoRA rank r of each adapted layer."""
    alpha: float | None = bounded(None, gt=0)
    """LoRA alpha; default = rank (scale 1)."""
    targets: list[str] | None = None
    """Module names to adapt; default: the family's attention projections."""
    dropout: float = bounded(0.0, ge=0, le=1)
    """Dropout on the LoRA branch's input (0 = off)."""


@dataclass
class TimestepConfig:
    """How training timesteps (noise levels) are drawn for the denoising losses."""

    weighting: Literal["default", "uniform", "logit_normal", "mode"] = "default"
    """default: the family's reference (uniform for SD/SDXL/FLUX, logit_normal for SD3 as diffusers' SD3 scripts)."""
    logit_mean: float = 0.0
    """Mean of the normal whose sigmoid is u (logit_normal; diffusers' SD3 scripts: 0)."""
    logit_std: float = bounded(1.0, gt=0)
    """Std of that normal (logit_normal; diffusers' SD3 scripts: 1)."""
    mode_scale: float = 1.29
    """The scale of the mode weighting (Esser et al. 2024, eq. 20; diffusers' default 1.29)."""


@dataclass
class DataConfig:
    """Preference pairs in the Pick-a-Pic v2 schema: caption, jpg_0, jpg_1, label_0."""

    source: str = ""
    """A hub dataset id or a local .parquet/.jsonl/.csv file (image paths or bytes)."""
    split: str = "train"
    """The split of a hub dataset."""
    streaming: bool = False
    """Read a hub dataset as a stream (in order, resumable by position) instead of downloading it whole first."""
    caption_column: str = "caption"
    """The column holding the prompt."""
    image_columns: list[str] = field(default_factory=lambda: ["jpg_0", "jpg_1"])
    """The two image columns (encoded bytes or file paths) of a pair."""
    label_column: str = "label_0"
    """The preference column: 1 = the first image is preferred, 0 = the second, 0.5 = a tie."""
    keep_ties: bool = False
    """Keep label 0.5 pairs with half weight in both orders (default: drop them, as the paper does)."""
    empty_prompt_fraction: float = bounded(0.2, ge=0, le=1)
    """Fraction of captions replaced by "" (so the model keeps an unconditional mode for CFG)."""
    random_flip: bool = True
    """Flip both images of a pair horizontally with probability 1/2 (diffusers' DPO scripts)."""
    random_crop: bool = False
    """Crop a random square of the resized images instead of the centre."""
    max_pairs: int | None = bounded(None, ge=1)
    """Use only the first N usable pairs (None: all)."""
    num_workers: int = bounded(0, ge=0)
    """Decoding workers: DataLoader processes for a map-style table; threads for a stream (read once, in order)."""
    cache_dir: str | None = None
    """If set, VAE latents and prompt embeddings are pre-computed into this folder and reused."""


@dataclass
class PromptConfig:
    """Training prompts (methods that sample from prompts, e.g. AlignProp): a file, a list here, or the toy world's."""

    source: str = ""
    """A prompt file (.txt one per line, .jsonl, .csv) or 'toy:train' (the toy world's training prompts)."""
    prompts: list[str] = field(default_factory=list)
    """The prompts themselves, instead of `source`."""
    column: str = "prompt"
    """The prompt field of a .jsonl file or column of a .csv file."""
    shuffle: bool = True
    """A new seeded order every epoch (off: file order)."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    optimizer: Literal["adamw", "adafactor", "sgd"] = "adamw"
    """AdamW (default), Adafactor (SF-DPO's full fine-tune choice, less optimizer memory) or plain SGD."""
    lr: float = bounded(1e-4, gt=0)
    """Learning rate (with scale_lr: per image, multiplied by the effective batch)."""
    weight_decay: float = bounded(1e-2, ge=0)
    """Decoupled weight decay (AdamW, Adafactor) or L2 (SGD)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's (beta1, beta2)."""
    eps: float = bounded(1e-8, gt=0)
    """AdamW's epsilon."""
    max_grad_norm: float = bounded(1.0, ge=0)
    """Gradient clipping norm (0 = no clipping)."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    """diffusers' learning-rate schedule, stepped once per optimizer step."""
    warmup_steps: int = bounded(0, ge=0)
    """Optimizer steps of linear warm-up (constant_with_warmup, linear, cosine)."""
    scale_lr: bool = False
    """Multiply lr by batch size x accumulation x processes (diffusers' `--scale_lr`)."""


@dataclass
class ValidationConfig:
    """Image grids and reward during training."""

    enabled: bool = True
    """false switches validation off (no sampling, no reward loaded)."""
    every: int = bounded(0, ge=0)
    """Validate before training, every N optimizer steps and at the end; 0 = only at the end."""
    prompts: list[str] = field(default_factory=list)
    """Fixed prompts (none: no validation)."""
    reward: str | None = None
    """Reward spec scored on the validation images (see `diffalign rewards`); for reward fine-tuning, the optimised
    one."""
    heldout_reward: str | None = None
    """A second reward spec logged beside it and never optimised (on the toy world the gold checker, toy-gold): when
    the optimised reward rises and this one falls, the model is hacking the reward."""
    num_images: int = bounded(1, ge=1)
    """Images per validation prompt (image i uses seed + i)."""
    num_steps: int | None = bounded(None, ge=1)
    """Sampling steps of the validation images; default: the model's."""
    guidance_scale: float | None = bounded(None, ge=0)
    """CFG scale of the validation images; default: the model's."""
    negative_prompt: str | None = None
    """The CFG negative prompt of the validation images; None: the method's training one where it has one
    (AlignProp's `alignprop.negative_prompt`), else the model's stock default."""
    seed: int = 1234
    """Seed of the first validation image (the same images at every validation)."""
    best_by: str | None = None
    """A validation metric, higher is better (e.g. val/heldout, val/heldout/all_correct): the trainable weights at its
    best value (the model before training included) are kept in output_dir/best."""
    early_stop: int = bounded(0, ge=0)
    """Stop training when `best_by` has fallen for this many validations in a row (0 = never)."""


@dataclass
class TrainConfig:
    """`diffalign train CONFIG.yaml [key=value ...]`: what every training method shares. A method's own config class
    (beside its recipe in `diffalign.train`) adds its sections."""

    method: str = ""
    """The training method: a training record of `diffalign.methods.METHODS` (its recipe and config class)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    output_dir: str = "runs/train"
    """The run's folder: run.json, metrics.jsonl, checkpoints/, validation/, the final lora/ (or denoiser/)."""
    seed: int = 0
    """Seed of the run: LoRA init, data order, training noise (a different stream on every process)."""
    max_steps: int = bounded(2000, ge=1)
    """Optimizer steps to train for (a resumed run may raise it)."""
    batch_size: int = bounded(1, ge=1)
    """Items (pairs, prompts) per process per micro-batch."""
    gradient_accumulation_steps: int = bounded(1, ge=1)
    """Micro-batches per optimizer step (effective batch = batch_size x this x processes)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """accelerate's autocast: no, fp16 (GPU only) or bf16; the trainable weights stay float32."""
    gradient_checkpointing: bool = False
    """Recompute the denoiser's activations in the backward pass (less memory, ~30 % more time)."""
    allow_tf32: bool = False
    """Allow TF32 matmuls on Ampere+ GPUs (ignored on CPU)."""
    attention: Literal["sdpa", "xformers"] = "sdpa"
    """The denoiser's attention kernels: sdpa (torch's scaled_dot_product_attention, diffusers' default) or
    xformers (CUDA only; `pip install "diffalign[xformers]"`)."""
    checkpoint_every: int = bounded(500, ge=0)
    """Write a resumable checkpoint every N optimizer steps (0 = never)."""
    checkpoints_keep: int = bounded(2, ge=0)
    """How many of the newest checkpoints to keep (0 = all)."""
    resume: str = "auto"
    """'auto' (newest complete checkpoint in output_dir, if any), 'none', or a checkpoint folder. Resuming with
    other settings than the run in output_dir recorded is refused (only max_steps and the logging, validation and
    checkpoint cadence may change)."""
    overwrite: bool = False
    """Replace a previous run in output_dir (with other settings, or with resume: none) instead of refusing."""
    push_to_hub: bool = False
    """Upload the final LoRA (or denoiser) folder, with its model card, to `hub_model_id` when training ends
    (checked before training: a token, the hub reachable)."""
    hub_model_id: str | None = None
    """The hub repository to push to, e.g. your-name/sdxl-dpo-lora (created if it does not exist)."""
    log_every: int = bounded(10, ge=1)
    """Log the metrics (mean over processes) every N optimizer steps, and at the last."""
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    """The tracker beside metrics.jsonl: tensorboard (logs/ in output_dir), wandb, or none."""


# ---------------------------------------------------------------------------------------------------------- loader
class _Raw(str):
    """An override value as typed on the command line; parsed as YAML unless the field is a string."""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the type annotation `tp` (converting _Raw override text); raise UserError naming `key`."""
    if dataclasses.is_dataclass(tp):
        if isinstance(value, _Raw):
            raise UserError(f"config key '{key}' is a section; set its fields with '{key}.<field>=value'")
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping of {_field_list(tp)}, got {value!r}")
        return _build(tp, value, prefix=key + ".")
    if _is_optional(tp):
        if value is None or (isinstance(value, _Raw) and value.lower() in ("null", "none", "~")):
            return None
        (inner,) = [a for a in get_args(tp) if a is not type(None)]
        return _convert(value, inner, key)
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise UserError(f"config key '{key}' must be a string, got {value!r}")
    if get_origin(tp) is Literal and isinstance(value, _Raw) and all(isinstance(a, str) for a in get_args(tp)):
        value = str(value)  # a choice of strings takes the text as typed: mixed_precision=no is "no", not False
    if isinstance(value, _Raw):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"config key '{key}': cannot parse {str(value)!r} as {_type_name(tp)}") from None
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise UserError(f"config key '{key}' must be one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = get_args(tp)
        if isinstance(value, (str, _Raw)) and item is str:
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"config key '{key}' must be a list of {_type_name(item)}, got {value!r}")
        return [_convert(_Raw(v) if isinstance(v, str) and item is not str else v, item, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    else:
        raise TypeError(f"unsupported config type {tp} for {key}")
    raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _field_list(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


_BOUND_HOLDS = {">=": lambda v, b: v >= b, ">": lambda v, b: v > b, "<=": lambda v, b: v <= b}


def _check_bounds(value: Any, bounds: dict[str, float], key: str) -> None:
    if value is not None and not all(_BOUND_HOLDS[op](value, bound) for op, bound in bounds.items()):
        wanted = " and ".join(f"{op} {bound:g}" for op, bound in bounds.items())
        raise UserError(f"config key '{key}' must be {wanted}, got {value!r}")


def check_values(config: Any, prefix: str = "") -> None:
    """The types, choices and bounds of every field of a config dataclass made in code (the loader checks them as
    it reads a file or an override): a one-line UserError naming the first field that is wrong."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_values(value, f"{prefix}{f.name}.")
        else:
            _convert(value, hints[f.name], prefix + f.name)
            _check_bounds(value, f.metadata.get("bounds", {}), prefix + f.name)


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise UserError(f"unknown config key '{prefix}{key}'; valid keys here: {_field_list(cls)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], prefix + f.name)
            _check_bounds(kwargs[f.name], f.metadata.get("bounds", {}), prefix + f.name)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise UserError(f"missing required config key '{prefix}{f.name}'")
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ['a.b=1', 'c=x'] into {'a': {'b': _Raw('1')}, 'c': _Raw('x')}."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override {item!r} is not of the form key=value (nested keys with dots: lora.rank=8)")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} conflicts with an earlier override of '{part}'")
        node[leaf] = _Raw(value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"config file {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> T:
    """Build `cls` from an optional YAML file, then `values` (already typed, e.g. a command's flags, nested with
    dotted keys: {"multi_step.model": "same"}), then `key=value` overrides; strict about keys and types."""
    data = read_yaml(path) if path is not None else {}
    for key, value in (values or {}).items():
        data = _merge(data, _nested(key, value))
    return _build(cls, _merge(data, parse_overrides(overrides or [])))


def _nested(key: str, value: Any) -> dict[str, Any]:
    """{"a.b": 1} as {"a": {"b": 1}}."""
    *parents, leaf = key.split(".")
    tree: dict[str, Any] = {leaf: value}
    for part in reversed(parents):
        tree = {part: tree}
    return tree


def to_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass (for saving the resolved config)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML; `load_config(type(config), path)` reads it back."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


# ---------------------------------------------------------------------------------------------------- show-config
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (and of its dataclass bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):  # no source (e.g. defined in a REPL): no docs
            continue
        for node, following in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def render_config(config: Any, indent: int = 0) -> str:
    """The resolved config as YAML, each key preceded by a comment with its type, bounds and help text (what
    `diffalign train --show-config` prints); loading the output gives the same config."""
    cls = type(config)
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    pad = "  " * indent
    lines = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            summary = (inspect.getdoc(type(value)) or "").split("\n")[0]
            lines += [f"{pad}# {summary}", f"{pad}{f.name}:", render_config(value, indent + 1)]
            continue
        bounds = " and ".join(f"{op} {bound:g}" for op, bound in f.metadata.get("bounds", {}).items())
        kind = _type_name(hints[f.name]) + (f", {bounds}" if bounds else "")
        doc = docs.get(f.name)
        lines.append(f"{pad}# {kind}" + (f": {doc}" if doc else ""))
        text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()
        lines.append(f"{pad}{f.name}: {text}")
    return "\n".join(lines)
