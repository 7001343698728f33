"""The reward registry and the reward spec language of `load_reward`.

A spec is one or more comma-separated terms; a term is a reward, its options and its weight:

    hpsv2                                    one registered reward
    hpsv2=5,pickscore=0.05                   weighted sum (components logged per reward)
    clip:model=openai/clip-vit-base-patch32  options as key=value after ':' (several: clip:model=x:scale=1)
    clip:model=ViT-B-32:pretrained=openai:weight=0.01   a weight together with options
    my_pkg.my_mod:MyReward                   a user reward by dotted path (a Reward subclass), options as above

A value may itself contain ':' (hf-hub:org/repo, local-dir:/folder); values cannot contain ','. With options, the
weight is the `weight=` option (a trailing `=w` would be read as part of the last value).
"""

from __future__ import annotations

import importlib
import inspect
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from diffalign.errors import UserError
from diffalign.rewards.aesthetic import AestheticReward
from diffalign.rewards.base import Reward
from diffalign.rewards.clip import ClipReward
from diffalign.rewards.hpsv2 import HPSv2Reward
from diffalign.rewards.imagereward import ImageRewardReward
from diffalign.rewards.jpeg import JpegReward
from diffalign.rewards.mix import WeightedSum
from diffalign.rewards.pickscore import PickScoreReward
from diffalign.rewards.toy import ToyClipReward, ToyGoldReward

REWARDS: dict[str, type[Reward]] = {
    cls.name: cls
    for cls in (
        ClipReward,
        AestheticReward,
        HPSv2Reward,
        PickScoreReward,
        ImageRewardReward,
        JpegReward,
        ToyClipReward,
        ToyGoldReward,
    )
}
"""Registered rewards by name. A user reward needs no registration: give it by dotted path."""


@dataclass
class RewardTerm:
    """One parsed term of a spec: the reward class, its options (strings, checked) and its weight (None: unweighted)."""

    cls: type[Reward]
    options: dict[str, str] = field(default_factory=dict)
    weight: float | None = None
    text: str = ""


OPTION_START = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
"""A spec part that starts a new key=value option (anything else continues the previous value)."""


def _parse_weight(value: str, term: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UserError(f"reward spec {term!r}: weight {value!r} is not a number") from None


def _split_options(parts: list[str], term: str) -> tuple[dict[str, str], float | None]:
    """key=value parts; a part without '=' continues the previous value (values may contain ':')."""
    options: dict[str, str] = {}
    last_key = None
    for part in parts:
        if OPTION_START.match(part):
            key, value = part.split("=", 1)
            key = key.strip()
            if key in options:
                raise UserError(f"reward spec {term!r}: option {key!r} is given twice")
            options[key] = value.strip()
            last_key = key
        elif last_key is not None:
            options[last_key] += ":" + part
        else:
            raise UserError(f"reward spec {term!r}: {part!r} is not an option of the form key=value")
    weight = options.pop("weight", None)
    return options, (None if weight is None else _parse_weight(weight, term))


def import_reward_class(path: str, term: str) -> type[Reward]:
    """The Reward subclass at 'package.module:ClassName', or a UserError saying what is wrong."""
    module_name, _, class_name = path.partition(":")
    if not class_name:
        raise UserError(f"reward spec {term!r}: a user reward is given as package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if "." not in module_name:  # most likely a misspelt reward name rather than a top-level module
            lookup_reward(module_name, term)
        raise UserError(f"reward spec {term!r}: cannot import module {module_name!r} ({e})") from e
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UserError(f"reward spec {term!r}: module {module_name!r} has no {class_name!r}")
    if not (inspect.isclass(cls) and issubclass(cls, Reward)):
        raise UserError(f"reward spec {term!r}: {path} is not a subclass of diffalign.rewards.Reward")
    return cls


def lookup_reward(name: str, term: str) -> type[Reward]:
    """The registered reward `name`, or a UserError listing the registered names."""
    if name not in REWARDS:
        raise UserError(
            f"unknown reward {name!r} in {term!r}: registered rewards are {', '.join(sorted(REWARDS))} "
            "(or give a user reward as package.module:ClassName)"
        )
    return REWARDS[name]


def parse_term(term: str) -> RewardTerm:
    """One spec term -> RewardTerm (the class is looked up or imported; options are checked, not applied)."""
    parts = [p.strip() for p in term.split(":")]
    head, rest = parts[0], parts[1:]
    name = head.split("=")[0]
    if name not in REWARDS and rest:
        head, rest = f"{head}:{rest[0]}", rest[1:]  # module:ClassName[=weight]
    elif "." in name:
        raise UserError(f"reward spec {term!r}: a user reward is given as package.module:ClassName")
    head, has_weight, weight_text = head.partition("=")
    cls = import_reward_class(head, term) if ":" in head else lookup_reward(head, term)
    weight = _parse_weight(weight_text, term) if has_weight else None
    options, option_weight = _split_options(rest, term)
    if weight is not None and option_weight is not None:
        raise UserError(f"reward spec {term!r}: the weight is given twice")
    parsed = RewardTerm(cls=cls, options=options, weight=weight if weight is not None else option_weight, text=term)
    coerce_options(parsed)
    return parsed


def parse_spec(spec: str) -> list[RewardTerm]:
    """Parse a reward spec (see the module docstring) without loading any weights."""
    terms = [t.strip() for t in spec.split(",")]
    if not spec.strip() or any(not t for t in terms):
        raise UserError(f"empty reward spec {spec!r}: give e.g. --reward hpsv2 or --reward hpsv2=5,pickscore=0.05")
    return [parse_term(t) for t in terms]


def parse_differentiable_spec(spec: str, what: str) -> list[RewardTerm]:
    """Parse `spec` for a method that backpropagates through the reward (`what`, e.g. "alignprop.reward"): a term
    whose reward is not differentiable (jpeg, toy-gold) is a UserError naming it, before any weights load."""
    terms = parse_spec(spec)
    for term in terms:
        if not term.cls.differentiable:
            usable = ", ".join(sorted(name for name, cls in REWARDS.items() if cls.differentiable))
            raise UserError(
                f"{what}: reward {term.cls.name!r} is not differentiable, and this method backpropagates through the "
                f"reward; differentiable rewards: {usable}"
            )
    return terms


def _option_types(cls: type[Reward]) -> tuple[dict[str, Any], bool]:
    """{option name: type} of cls.__init__, and whether it takes **kwargs."""
    signature = inspect.signature(cls.__init__)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:
        hints = {}
    options = {}
    takes_kwargs = False
    for name, param in list(signature.parameters.items())[1:]:
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            takes_kwargs = True
        elif param.kind is not inspect.Parameter.VAR_POSITIONAL:
            options[name] = hints.get(name, str)
    return options, takes_kwargs


def _coerce(value: str, kind: Any, option: str, term: RewardTerm) -> Any:
    base = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    target = base[0]
    try:
        if target is bool:
            lowered = value.lower()
            if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(value)
            return lowered in ("1", "true", "yes", "on")
        if target in (int, float):
            return target(value)
    except ValueError:
        raise UserError(
            f"reward {term.cls.name!r}: option {option}={value!r} is not a valid {target.__name__}"
        ) from None
    return value


def coerce_options(term: RewardTerm) -> dict[str, Any]:
    """The term's options converted to the types of its class's __init__; unknown option -> UserError listing them."""
    types, takes_kwargs = _option_types(term.cls)
    converted = {}
    for option, value in term.options.items():
        if option not in types and not takes_kwargs:
            accepted = ", ".join(types) or "none"
            raise UserError(f"reward {term.cls.name!r} has no option {option!r} (options: {accepted})")
        converted[option] = _coerce(value, types.get(option, str), option, term)
    return converted


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise UserError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16")
    return resolved


def build_reward(term: RewardTerm, device: Any = None, dtype: Any = None) -> Reward:
    """Instantiate one parsed term (loads its weights), frozen, on `device` / `dtype`."""
    reward = term.cls(**coerce_options(term))
    if device is not None or dtype is not None:
        reward = reward.to(device=device, dtype=_torch_dtype(dtype))
    return reward.freeze()


def build_rewards(terms: list[RewardTerm], device: Any = None, dtype: Any = None) -> Reward:
    """One reward (a single unweighted term) or the weighted sum of the terms."""
    rewards = [build_reward(t, device, dtype) for t in terms]
    if len(terms) == 1 and terms[0].weight in (None, 1.0):
        return rewards[0]
    return WeightedSum(rewards, [1.0 if t.weight is None else t.weight for t in terms]).freeze()


def load_reward(spec: str, device: Any = None, dtype: Any = None) -> Reward:
    """Load the reward of `spec` (see the module docstring) as a frozen Reward on `device` / `dtype`.

    >>> reward = load_reward("hpsv2=5,pickscore=0.05", device="cuda")   # doctest: +SKIP
    >>> total = reward(images, prompts); parts = reward.components(images, prompts)   # doctest: +SKIP
    """
    return build_rewards(parse_spec(spec), device=device, dtype=dtype)


def describe_rewards() -> list[dict[str, str]]:
    """One row per registered reward: name, description, differentiable ('yes'/'no'), weights (source)."""
    return [
        {
            "name": name,
            "description": cls.description,
            "differentiable": "yes" if cls.differentiable else "no",
            "weights": cls.weights_source,
        }
        for name, cls in REWARDS.items()
    ]
