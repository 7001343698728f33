"""ReNO (diffalign.infer.reno) on the tiny one/few-step pipelines: the reward rises, the best image is tracked per
prompt, gradients are clipped per prompt, a batch equals one-by-one runs, multi-start spends the same budget."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import build_family

from diffalign.errors import UserError
from diffalign.infer.reno import phase_lengths, reno
from diffalign.infer.sample import initial_latents
from diffalign.models import cond_select
from diffalign.rewards import Reward, WeightedSum
from diffalign.rewards.toy import ToyGoldReward

PROMPTS = ["a red circle", "a blue square on a white background", "a green triangle"]


class Probe(Reward):
    """scale * mean brightness (an analytic differentiable reward), plus an optional per-prompt table of values
    added at successive calls (to place the best iteration where a test wants it)."""

    name = "probe"

    def __init__(self, scale: float = 10.0, table: dict[str, list[float]] | None = None) -> None:
        super().__init__()
        self.scale, self.table, self.calls = scale, table, 0

    def forward(self, images, prompts):
        value = self.scale * images.mean(dim=(1, 2, 3))
        if self.table is not None:
            value = value + torch.tensor([self.table[p][self.calls] for p in prompts])
            self.calls += 1
        return value


@pytest.fixture(scope="module")
def turbo():
    return build_family("sd-turbo")


@pytest.mark.parametrize("kind", ["sd-turbo", "flux-schnell"])
def test_the_reward_rises_on_one_step_models(kind, turbo):
    family = turbo if kind == "sd-turbo" else build_family(kind)
    result = reno(family, PROMPTS[:2], Probe(), iters=4)
    curve = result.curve("reward")
    assert curve.shape == (4, 2)
    assert (curve[-1] > curve[0]).all(), curve
    assert all(b > i for b, i in zip(result.best_reward, result.initial_reward, strict=True))
    assert result.noise.dtype == torch.float32 and result.images.shape == (2, 3, 32, 32)


def test_few_steps_with_cfg_get_gradients_through_every_step(turbo):
    result = reno(turbo, PROMPTS[:1], Probe(), iters=3, num_steps=2, guidance_scale=2.0)
    assert result.best_reward[0] > result.initial_reward[0]
    initial = turbo.decode(
        turbo.sample(
            turbo.encode_prompts(PROMPTS[:1]), turbo.encode_negative(), latents=initial_latents(turbo, [0]),
            num_steps=2, guidance_scale=2.0,
        )
    )  # fmt: skip
    assert torch.allclose(result.initial_images, initial.detach(), atol=1e-5)  # iteration 0 = the plain sampler


def test_best_image_is_the_best_iteration_of_each_prompt(turbo):
    table = {PROMPTS[0]: [1.0, 5.0, 3.0, 2.0, 0.0], PROMPTS[1]: [0.0, 1.0, 2.0, 9.0, 4.0]}
    result = reno(turbo, PROMPTS[:2], Probe(scale=1e-3, table=table), iters=5)
    assert result.best_iteration == [1, 3]
    rewards = result.curve("reward")
    assert result.best_reward == pytest.approx([rewards[1, 0].item(), rewards[3, 1].item()])
    # the kept image is the one its kept noise generates, not the last one
    regenerated = turbo.decode(turbo.sample(turbo.encode_prompts(PROMPTS[:2]), latents=result.noise, num_steps=1))
    assert torch.allclose(result.images, regenerated.detach(), atol=1e-5)
    assert not torch.allclose(result.noise, initial_latents(turbo, [0, 1]))


def test_each_prompt_gradient_is_clipped_to_grad_clip(turbo):
    table = {p: [0.0, 100.0] for p in PROMPTS[:2]}  # iteration 1 is best: result.noise is the noise after one step
    result = reno(turbo, PROMPTS[:2], Probe(scale=1e4, table=table), iters=2, lr=1.0, momentum=0.0, grad_clip=0.05)
    step = (result.noise - initial_latents(turbo, [0, 1])).flatten(1).norm(dim=1)
    grad_norms = result.curve("grad_norm")[0]
    assert (grad_norms > 0.05).all()  # the raw gradients exceed the limit...
    assert step.tolist() == pytest.approx([0.05, 0.05], rel=1e-4)  # ...and each prompt's step is lr * clip


def test_a_batch_equals_one_by_one_runs_with_multi_start(turbo):
    settings = {"iters": 5, "starts": 2, "start_fraction": 0.8, "reg_weight": 1.0}  # 2 starts x 2 iters, then 1
    batch = reno(turbo, PROMPTS, Probe(), seeds=[5, 6, 7], **settings)
    for b, prompt in enumerate(PROMPTS):
        alone = reno(turbo, [prompt], Probe(), seeds=[5 + b], **settings)
        assert torch.allclose(batch.images[b], alone.images[0], atol=1e-4)
        assert torch.allclose(batch.noise[b], alone.noise[0], atol=1e-4)
        assert (batch.best_iteration[b], batch.best_start[b]) == (alone.best_iteration[0], alone.best_start[0])
        assert batch.followed_start[b] == alone.followed_start[0]
        assert torch.allclose(batch.curve("reward")[:, b], alone.curve("reward")[:, 0], rtol=1e-4)


def test_multi_start_spends_the_same_budget_and_continues_the_best_start(turbo):
    assert phase_lengths(50, 1, 0.5) == (50, 0)
    assert phase_lengths(50, 4, 0.5) == (6, 26)  # 4 x 6 + 26 = 50 generator passes
    with pytest.raises(UserError, match="raise --iters or lower --starts"):
        phase_lengths(4, 3, 0.5)
    result = reno(turbo, PROMPTS[:2], Probe(), iters=7, starts=3, start_fraction=0.9)  # 3 x 2 + 1
    assert len(result.history) == 2 * 7
    for b in range(2):
        first_phase = [r for r in result.history if r["prompt"] == b and r["iteration"] < 2]
        best_per_start = [max(r["reward"] for r in first_phase if r["start"] == s) for s in range(3)]
        assert result.followed_start[b] == max(range(3), key=best_per_start.__getitem__)
        assert [r["start"] for r in result.history if r["prompt"] == b and r["iteration"] == 2] == [
            result.followed_start[b]
        ]
    single = reno(turbo, PROMPTS[:2], Probe(), iters=1)
    assert torch.allclose(result.initial_images, single.initial_images, atol=1e-6)  # start 0 = the prompt's seed


def test_weighted_sum_components_are_logged_and_weighted(turbo):
    mix = WeightedSum([Probe(scale=1.0), Probe(scale=2.0)], [0.5, 3.0])
    result = reno(turbo, PROMPTS[:1], mix, iters=2)
    for record in result.history:
        assert set(record["rewards"]) == {"probe", "probe#2"}
        expected = 0.5 * record["rewards"]["probe"] + 3.0 * record["rewards"]["probe#2"]
        assert record["reward"] == pytest.approx(expected, rel=1e-5)


def test_half_precision_generator_keeps_noise_and_regulariser_in_float32(turbo):
    import copy

    half = copy.deepcopy(turbo)
    half.pipe.to(torch.bfloat16)
    result = reno(half, PROMPTS[:1], Probe(), iters=2)
    assert half.dtype == torch.bfloat16
    assert result.noise.dtype == torch.float32 and torch.isfinite(result.images).all()
    assert result.best_reward[0] >= result.initial_reward[0]


def test_non_differentiable_rewards_and_bad_settings_are_refused(turbo):
    with pytest.raises(UserError, match="'jpeg' is not differentiable"):
        reno(turbo, PROMPTS[:1], "jpeg")
    with pytest.raises(UserError, match="'toy-gold' is not differentiable"):
        reno(turbo, PROMPTS[:1], ToyGoldReward())
    with pytest.raises(UserError, match=re.escape("'optimizer' must be one of 'sgd' | 'adam'")):
        reno(turbo, PROMPTS[:1], Probe(), optimizer="lbfgs")


def test_default_reward_is_the_papers_mix_and_the_toy_uses_its_proxy():
    from diffalign.apps.reno import reno_defaults
    from diffalign.infer.reno import RENO_REWARD
    from diffalign.rewards import parse_differentiable_spec

    terms = {t.cls.name: (t.weight, t.options) for t in parse_differentiable_spec(RENO_REWARD, "reno")}
    assert terms == {
        "hpsv2": (5.0, {}),
        "imagereward": (1.0, {}),
        "clip": (0.01, {"model": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"}),
        "pickscore": (0.05, {}),
    }
    assert reno_defaults("stabilityai/sd-turbo") == {"reward": RENO_REWARD, "num_steps": 1, "guidance_scale": 1.0}
    assert reno_defaults("toy") == {"reward": "toy-clip", "num_steps": 4, "guidance_scale": 4.5}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_five_iterations_keep_the_noise_on_the_gaussian_shell(optimizer, turbo):
    # Adam at torch's eps 1e-8 and SGD's lr 5.0 moved every element by ~lr an iteration (|z| from 16 to ~50): with
    # the official eps 1e-2 and its own lr it stays on the shell |z| ~ sqrt(d), as SGD does.
    result = reno(turbo, PROMPTS[:2], Probe(), iters=6, optimizer=optimizer)
    d = result.noise[0].numel()
    norms = result.curve("noise_norm")  # |z| at iterations 0..5: after 0..5 optimiser steps
    assert torch.allclose(norms, torch.full_like(norms, d**0.5), rtol=0.05), (d**0.5, norms)
    assert (result.curve("reward")[-1] > result.curve("reward")[0]).all()  # and it still optimises


def test_imageselect_keeps_the_best_of_n_random_noises_without_optimising(turbo):
    """The paper's control at equal reward evaluations: iteration i scores a fresh noise (iteration 0 the prompt's
    own, so the baseline is ReNO's), no gradient step, and the best image is the one its own noise generates."""
    from diffalign.infer.reno import start_seed

    result = reno(turbo, PROMPTS[:2], Probe(), seeds=[3, 4], iters=5, imageselect=True)
    assert len(result.history) == 2 * 5 and all(r["grad_norm"] == 0 for r in result.history)
    optimised = reno(turbo, PROMPTS[:2], Probe(), seeds=[3, 4], iters=1)
    torch.testing.assert_close(result.initial_images, optimised.initial_images)
    cond = turbo.encode_prompts(PROMPTS[:2])
    for b, seed in enumerate([3, 4]):
        rewards = result.curve("reward")[:, b]
        assert result.best_reward[b] == pytest.approx(rewards.max().item()) and result.best_iteration[b] == int(
            rewards.argmax()
        )
        drawn = initial_latents(turbo, [start_seed(seed, result.best_iteration[b])])
        torch.testing.assert_close(result.noise[b : b + 1], drawn)  # a candidate noise, not an optimised one
        image = turbo.decode(turbo.sample(cond_select(cond, [b]), latents=drawn, num_steps=1))
        torch.testing.assert_close(result.images[b : b + 1], image.detach(), atol=1e-5, rtol=1e-5)
    assert len({round(v, 6) for v in result.curve("reward")[:, 0].tolist()}) == 5  # five different noises
    with pytest.raises(UserError, match="takes no starts"):
        reno(turbo, PROMPTS[:1], Probe(), iters=4, starts=2, imageselect=True)


def test_multi_step_renders_the_initial_and_the_best_noise_with_another_model(turbo):
    """The paper's multi_apply: the optimised noise re-rendered by a multi-step model of the same latent space."""
    from diffalign.infer.configs import MultiStepConfig
    from diffalign.models import load_family

    other = MultiStepConfig(model="tiny-sd", num_steps=3, guidance_scale=2.0)
    result = reno(turbo, PROMPTS[:2], Probe(), iters=3, multi_step=other)
    sd = load_family("tiny-sd")
    cond, uncond = sd.encode_prompts(PROMPTS[:2]), sd.encode_negative()
    for noise, rendered in ((result.noise, result.multi_step_images),
                            (initial_latents(turbo, [0, 1]), result.multi_step_initial_images)):  # fmt: skip
        expected = sd.decode(sd.sample(cond, uncond, latents=noise, num_steps=3, guidance_scale=2.0))
        torch.testing.assert_close(rendered, expected.detach(), atol=1e-5, rtol=1e-5)
    assert result.settings["multi_step"] == {"model": "tiny-sd", "num_steps": 3, "guidance_scale": 2.0}
    same = reno(turbo, PROMPTS[:1], Probe(), iters=2, multi_step=MultiStepConfig(model="same", num_steps=2))
    assert same.multi_step_images.shape == same.images.shape
    with pytest.raises(UserError, match="latents are"):
        reno(turbo, PROMPTS[:1], Probe(), iters=1, multi_step=MultiStepConfig(model="tiny-flux-schnell"))
