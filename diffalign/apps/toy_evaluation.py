"""Measure a model family against the gold checker: sample images for shapes-world prompts and read them back.

Samples with `diffalign.infer.sample.sample_images` (the family interface only), so it works for any family and
for a family with a LoRA adapter loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from diffalign.gym.gold import gold_check
from diffalign.gym.world import ATTRIBUTES
from diffalign.infer.sample import sample_images, sampling_settings

ProxyReward = Callable[[Tensor, list[str]], Tensor]
"""A reward: images [B, 3, H, W] in [0, 1] and prompts -> scores [B]."""


def repeat_prompts(prompts: Sequence[str], num_samples: int) -> list[str]:
    """`num_samples` prompts cycling through `prompts` (each prompt gets num_samples / len(prompts) samples, +-1)."""
    if not prompts:
        raise ValueError("evaluate: no prompts given")
    return [prompts[i % len(prompts)] for i in range(num_samples)]


def mean_and_se(values: Tensor) -> tuple[float, float]:
    """Mean of `values` and its standard error (sample std / sqrt(n); 0 for n < 2)."""
    values = values.double().flatten()
    n = values.numel()
    se = values.std().item() / math.sqrt(n) if n > 1 else 0.0
    return values.mean().item(), se


def over_seeds(gains: Sequence[float], paired_ses: Sequence[float] | None = None) -> dict[str, float]:
    """A gain measured once per training (or noise) seed, summarised: the mean, the std over seeds, the SE across
    seeds (std / sqrt(k); nan for one seed) and, given each seed's paired SE, the pooled paired SE
    (sqrt(sum SE²) / k: the SE of the mean of k independent paired estimates)."""
    k = len(gains)
    mean = sum(gains) / k
    std = math.sqrt(sum((g - mean) ** 2 for g in gains) / (k - 1)) if k > 1 else float("nan")
    summary = {"mean": mean, "std": std, "se_across_seeds": std / math.sqrt(k) if k > 1 else float("nan")}
    if paired_ses is not None:
        summary["se_paired_pooled"] = math.sqrt(sum(se**2 for se in paired_ses)) / k
    return summary


def image_seeds(seed: int, num_samples: int) -> list[int]:
    """One seed per image for an evaluation run with `seed`: runs with different seeds share no image seed."""
    return [seed * 1_000_003 + i for i in range(num_samples)]


def summarize(images: Tensor, prompts: Sequence[str], proxy: ProxyReward | None = None) -> dict[str, Any]:
    """Gold metrics of given images: n, per-attribute accuracy, all_correct, gold_score (each with `<name>_se`), and
    proxy_score(_se) when a proxy reward is given. Also the per-image 'gold' (score [N]) and 'proxy' ([N] or None)."""
    check = gold_check(images, prompts)
    metrics: dict[str, Any] = {"n": len(prompts)}
    gold = torch.stack([check[a].float() for a in ATTRIBUTES]).mean(dim=0)
    for name, values in [
        *((a, check[a].float()) for a in ATTRIBUTES),
        ("all_correct", check["all_correct"].float()),
        ("gold_score", gold),
    ]:
        metrics[name], metrics[f"{name}_se"] = mean_and_se(values)
    proxy_scores = None
    if proxy is not None:
        proxy_scores = torch.as_tensor(proxy(images, list(prompts))).detach().float().cpu().flatten()
        metrics["proxy_score"], metrics["proxy_score_se"] = mean_and_se(proxy_scores)
    metrics["gold"], metrics["proxy"] = gold, proxy_scores
    metrics["attributes"] = {a: check[a].float() for a in ATTRIBUTES}
    return metrics


def paired_gain(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Before/after comparison of two `evaluate(..., return_images=True)` results made with the SAME seeds.

    For all_correct (gold score == 1), gold_score (mean attributes), each attribute (background, colour, shape,
    when both results carry them) and proxy (when both have proxy scores): the before and after means, the gain and
    its paired standard error (std of the per-image differences / sqrt(n)), which is much smaller than the unpaired
    one because both runs start from the same noise.
    """
    if list(before["prompts"]) != list(after["prompts"]):
        raise ValueError("paired_gain: the two evaluations used different prompts")
    per_image = {
        "all_correct": lambda r: (r["gold"].double() > 1 - 1e-6).double(),
        "gold_score": lambda r: r["gold"].double(),
        **{a: (lambda r, a=a: r["attributes"][a].double()) for a in ATTRIBUTES},
        "proxy": lambda r: r["proxy"].double(),
    }
    result = {}
    for key, values in per_image.items():
        if key == "proxy" and (before["proxy"] is None or after["proxy"] is None):
            continue
        if key in ATTRIBUTES and ("attributes" not in before or "attributes" not in after):
            continue
        b, a = values(before), values(after)
        gain, se = mean_and_se(a - b)
        result[key] = {"before": b.mean().item(), "after": a.mean().item(), "gain": gain, "paired_se": se}
    return result


def evaluate(
    family: Any,
    prompts: Sequence[str],
    num_samples: int,
    seed: int = 0,
    *,
    proxy: ProxyReward | None = None,
    batch_size: int = 64,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    eta: float | None = None,
    return_images: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Sample `num_samples` images cycling over `prompts` and score them with the gold checker (and `proxy`).

    Sampling uses `family.sampling_defaults` (num_steps, guidance_scale, eta) unless overridden; results are
    deterministic in `seed` and do not depend on `batch_size` (one seed per image). Returns a dict of floats:
        n, background, colour, shape (per-attribute accuracy), all_correct (all three right), gold_score (mean of the
        three), each with a standard error `<name>_se`; proxy_score and proxy_score_se when `proxy` is given;
        settings: the sampling settings used.
    With `return_images`, also: images [N, 3, H, W] in [0, 1], prompts [N], gold [N] (per-image gold score),
    proxy [N] (per-image proxy score, or None) and attributes {background, colour, shape: [N] in {0, 1}}.
    `progress` shows a progress bar while sampling.
    """
    prompts = repeat_prompts(prompts, num_samples)
    settings = sampling_settings(family, num_steps, guidance_scale, eta)
    images = sample_images(
        family,
        prompts,
        image_seeds(seed, num_samples),
        batch_size=batch_size,
        num_steps=settings["num_steps"],
        guidance_scale=settings["guidance_scale"],
        eta=settings["eta"],
        progress=progress,
    ).float()
    metrics = summarize(images, prompts, proxy)
    metrics["settings"] = settings
    per_image = {"gold": metrics.pop("gold"), "proxy": metrics.pop("proxy"), "attributes": metrics.pop("attributes")}
    if return_images:
        metrics.update(images=images, prompts=prompts, **per_image)
    return metrics
