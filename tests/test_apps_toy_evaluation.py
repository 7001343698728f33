"""Measuring a model against the toy world's gold checker, and the paired before/after comparison."""

from __future__ import annotations

import pytest
import torch

from diffalign.gym import world
from diffalign.gym.gold import gold_score


def test_evaluate_is_deterministic_and_beats_chance_on_training_prompts():
    from diffalign.apps.toy_evaluation import evaluate
    from diffalign.models import load_family

    family = load_family("toy")
    prompts = world.train_prompts()[:8]
    metrics = evaluate(family, prompts, 48, seed=1, return_images=True, proxy=lambda x, p: x.mean(dim=(1, 2, 3)))
    again = evaluate(family, prompts, 48, seed=1)
    assert metrics["n"] == 48 and metrics["images"].shape == (48, 3, 32, 32) and len(metrics["prompts"]) == 48
    for key in ["background", "colour", "shape", "all_correct", "gold_score"]:
        assert 0 <= metrics[key] <= 1 and metrics[key] == again[key]
        assert 0 < metrics[f"{key}_se"] < 0.1 or metrics[key] in (0.0, 1.0)
    assert metrics["gold_score"] > 0.6  # chance is ~0.3
    assert torch.allclose(metrics["gold"], gold_score(metrics["images"], metrics["prompts"]))
    assert metrics["proxy_score"] == pytest.approx(metrics["images"].mean().item(), abs=1e-5)
    assert metrics["settings"] == {k: family.sampling_defaults[k] for k in metrics["settings"]}


def test_paired_gain_uses_the_per_image_differences():
    from diffalign.apps.toy_evaluation import paired_gain

    prompts = ["a", "b", "c", "d"]
    before = {"prompts": prompts, "gold": torch.tensor([1, 2 / 3, 1, 0]), "proxy": torch.tensor([1.0, 2, 3, 4])}
    after = {"prompts": prompts, "gold": torch.tensor([1, 1, 2 / 3, 1]), "proxy": torch.tensor([2.0, 3, 4, 5])}
    gain = paired_gain(before, after)
    # all-correct 1,0,1,0 -> 1,1,0,1: differences 0,1,-1,1 (mean 0.25, sample std sqrt(2.75/3))
    assert gain["all_correct"]["before"] == 0.5 and gain["all_correct"]["after"] == 0.75
    assert gain["all_correct"]["gain"] == pytest.approx(0.25)
    assert gain["all_correct"]["paired_se"] == pytest.approx((2.75 / 3) ** 0.5 / 2)
    assert gain["gold_score"]["gain"] == pytest.approx((0 + 1 / 3 - 1 / 3 + 1) / 4)
    # the proxy rose by exactly 1 on every image: a paired SE of 0 although both runs spread widely
    assert gain["proxy"]["gain"] == pytest.approx(1.0) and gain["proxy"]["paired_se"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="different prompts"):
        paired_gain(before, after | {"prompts": ["a", "b", "c", "e"]})
    assert "proxy" not in paired_gain(before | {"proxy": None}, after)


def test_paired_gain_covers_each_gold_attribute():
    from diffalign.apps.toy_evaluation import paired_gain

    prompts = ["a", "b"]
    attrs = lambda c: {"background": torch.tensor([1.0, 1.0]), "colour": c, "shape": torch.tensor([0.0, 1.0])}  # noqa: E731
    before = {"prompts": prompts, "gold": torch.tensor([1.0, 1.0]), "proxy": None, "attributes": attrs(torch.ones(2))}
    after = before | {"attributes": attrs(torch.tensor([0.0, 1.0]))}
    gain = paired_gain(before, after)
    assert gain["colour"]["gain"] == pytest.approx(-0.5) and gain["background"]["gain"] == 0


def test_over_seeds_pools_paired_ses_and_the_spread_across_seeds():
    import math

    from diffalign.apps.toy_evaluation import over_seeds

    summary = over_seeds([0.06, 0.02, 0.04], [0.03, 0.04, 0.0])
    assert summary["mean"] == pytest.approx(0.04) and summary["std"] == pytest.approx(0.02)
    assert summary["se_across_seeds"] == pytest.approx(0.02 / math.sqrt(3))
    assert summary["se_paired_pooled"] == pytest.approx(0.05 / 3)  # sqrt(0.03² + 0.04²) / 3
    assert math.isnan(over_seeds([0.1])["se_across_seeds"]) and "se_paired_pooled" not in over_seeds([0.1])
