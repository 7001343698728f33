"""The demo's ReNO section on the toy world: its baseline is the same seeds at the same few steps, its after is the
optimised images, and the curves end at the after-measurement."""

from __future__ import annotations

import pytest
import torch

from diffalign.apps import demo
from diffalign.apps.sections.reno import reno_section
from diffalign.apps.toy_evaluation import evaluate, paired_gain
from diffalign.gym.world import heldout_prompts, train_prompts
from diffalign.models import load_family
from diffalign.rewards import load_reward

SETTINGS = demo.DemoSettings(
    eval_samples=9, pairs_repeats=1, images_per_prompt=2, validation_every=1, validation_images=1,
    sizes={"reno": {"samples": 9, "iters": 3}},
)  # fmt: skip


@pytest.fixture(scope="module")
def section_run(tmp_path_factory):
    ctx = demo.DemoContext(
        family=load_family("toy"), proxy=load_reward(demo.PROXY), heldout=heldout_prompts(), train=train_prompts(),
        settings=SETTINGS, work=tmp_path_factory.mktemp("demo"), eval_seed=3,
    )  # fmt: skip
    return ctx, reno_section(ctx)  # without a base evaluation: the section needs none (its baseline is its own)


def test_reno_section_measures_against_its_own_few_step_baseline(section_run):
    ctx, result = section_run
    few_steps = evaluate(ctx.family, ctx.heldout, 9, 3, num_steps=4, guidance_scale=4.5, return_images=True)
    assert torch.allclose(result.before["images"], few_steps["images"], atol=1e-4)  # same seeds, same steps, no ReNO
    assert result.baseline(ctx) is result.before and result.after["prompts"] == ctx.heldout
    gain = paired_gain(result.baseline(ctx), result.after)
    assert gain["proxy"]["after"] > gain["proxy"]["before"]  # ReNO keeps the best proxy image: it cannot fall
    assert (ctx.work / "reno" / "before_grid.png").is_file()


def test_reno_section_curves_follow_the_iterations_and_end_at_the_after_measurement(section_run):
    _, result = section_run
    for name in ("proxy", "proxy_kept", "gold_all_correct", "gold_all_correct_kept", "gold_score"):
        assert [i for i, _ in result.curves[name]] == [0, 1, 2]
    assert result.curves["proxy"][0][1] == pytest.approx(result.before["proxy_score"], rel=1e-4)
    assert result.curves["proxy_kept"][-1][1] == pytest.approx(result.after["proxy_score"], rel=1e-4)
    assert result.curves["gold_all_correct_kept"][-1][1] == pytest.approx(result.after["all_correct"])
    assert result.curves["gold_all_correct"][0][1] == pytest.approx(result.before["all_correct"])
