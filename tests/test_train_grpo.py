"""The GRPO recipe end to end on a tiny model: the first update of every rollout has ratio 1, later ones move; any
reward works (jpeg is not differentiable); the KL starts at 0; checkpoints must fall on rollout boundaries; DDPO's
running per-prompt statistics resume bit for bit. (Every config's smoke run, the kill -9 resume and 2-rank DDP are
tests/test_gpu_check.py and the contract tests, tests/test_method_contracts.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from clitools import assert_resume_after_kill_9_is_bit_exact, train_in_process

from diffalign.errors import UserError
from diffalign.hub import CONFIGS_DIR
from diffalign.train import load_train_config

TOY = CONFIGS_DIR / "grpo" / "toy.yaml"


def tiny(out, *extra: str) -> list[str]:
    """Overrides of configs/grpo/toy.yaml for a run of seconds on the tiny SD model: rollouts of 2 prompts x 2 images,
    3 sampling steps, micro-batches of 2: two optimizer steps per rollout."""
    return [
        "model.name=tiny-sd", "model.resolution=32", "data.source=", "data.prompts=[a red circle,a blue square]",
        f"output_dir={out}", "report_to=none", "log_every=1", "validation.enabled=false", "checkpoint_every=0",
        "batch_size=2", "gradient_accumulation_steps=1", "grpo.prompts_per_rollout=2", "grpo.group_size=2",
        "grpo.num_steps=3", "optim.lr=1e-2", "optim.warmup_steps=0", *extra,
    ]  # fmt: skip


def logged(out) -> list[dict]:
    """The training rows of metrics.jsonl (validation rows have no loss)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


def test_first_update_of_each_rollout_has_ratio_one_and_a_non_differentiable_reward_trains(tmp_path):
    out = tmp_path / "run"
    train_in_process(tiny(out, "grpo.reward=jpeg", "max_steps=4"), TOY)
    rows = logged(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for first in (rows[0], rows[2]):  # updates 1 and 3 open rollouts 1 and 2: nothing has changed the policy yet
        assert abs(first["ratio"] - 1) < 1e-6 and first["approx_kl"] < 1e-12 and first["clip_fraction"] == 0
    assert any(abs(r["ratio"] - 1) > 1e-6 for r in rows[1::2])  # the second update of a rollout sees the first's step
    assert rows[0]["reward"] != rows[2]["reward"]  # a new rollout, scored again
    for row in rows:
        assert {"policy_loss", "reward_std", "zero_spread_groups", "lr"} <= row.keys()
        assert 0 <= row["zero_spread_groups"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "grpo" and summary["optimizer_steps"] == 4


def test_grpo_guard_starts_at_ratio_one_and_moves_the_normalised_ratio_less(tmp_path):
    """GRPO-Guard's ratio is exp((log r + b)·σ): exactly 1 at a rollout's first update, and after one optimizer step
    much closer to 1 than the raw ratio of the same run (σ scales the log-ratio down)."""
    out = tmp_path / "run"
    train_in_process(tiny(out, "grpo.reward=jpeg", "grpo.guard=true", "max_steps=2"), TOY)
    first, second = logged(out)
    assert abs(first["ratio"] - 1) < 1e-6 and first["clip_fraction"] == 0
    raw_deviation = (2 * second["approx_kl"]) ** 0.5  # |log r| of the raw ratio (RMS over the micro-batch)
    assert 0 < abs(second["ratio"] - 1) < raw_deviation


def test_images_of_a_group_share_their_initial_noise_with_same_noise(tmp_path, monkeypatch):
    from diffalign.train import grpo

    rollouts, original = [], grpo.GrpoRecipe.sample

    def recorded(self, prompts, index):
        rollouts.append(original(self, prompts, index))
        return rollouts[-1]

    monkeypatch.setattr(grpo.GrpoRecipe, "sample", recorded)
    train_in_process(tiny(tmp_path / "run", "grpo.reward=jpeg", "grpo.same_noise=true", "max_steps=2"), TOY)
    start, end = rollouts[0].latents[:, 0], rollouts[0].latents[:, -1]
    assert torch.equal(start[0], start[1]) and torch.equal(start[2], start[3])  # groups of 2: images 0-1, 2-3
    assert not torch.equal(start[0], start[2])
    assert not torch.equal(end[0], end[1])  # the sampler's own noise differs within a group


def test_kl_to_the_reference_starts_at_zero_and_per_reward_advantages_log_every_reward(tmp_path):
    out = tmp_path / "run"
    mix = "grpo.reward=toy-clip=1,jpeg=0.5"
    train_in_process(tiny(out, mix, "grpo.per_reward=true", "grpo.kl_weight=0.04", "max_steps=2"), TOY)
    first, second = logged(out)
    assert first["kl"] == 0.0  # the LoRA starts as the identity: the policy is the reference
    assert second["kl"] > 0
    assert {"reward/toy-clip", "reward/jpeg", "reward_std/jpeg"} <= first.keys()


def test_checkpoints_must_fall_on_rollout_boundaries_and_a_rollout_must_split_into_updates(tmp_path):
    from diffalign.train.online import check_config, updates_per_rollout

    cfg = load_train_config(TOY, tiny(tmp_path, "checkpoint_every=3"))
    assert updates_per_rollout(cfg) == 2
    with pytest.raises(UserError, match="every 2 optimizer steps"):
        check_config(cfg)
    cfg = load_train_config(TOY, tiny(tmp_path, "batch_size=3"))
    with pytest.raises(UserError, match="does not split into optimizer steps of 3"):
        check_config(cfg)
    check_config(load_train_config(TOY, tiny(tmp_path, "checkpoint_every=4")))


def test_the_sde_window_and_timestep_fraction_choose_the_trained_steps():
    from diffalign.train.grpo import GrpoConfig, trained_steps

    assert trained_steps(10, GrpoConfig()) == (range(10), list(range(10)))
    assert trained_steps(10, GrpoConfig(timestep_fraction=0.99)) == (range(10), list(range(9)))  # Flow-GRPO's 9 of 10
    assert trained_steps(10, GrpoConfig(window_start=2, window_size=3)) == (range(2, 5), [2, 3, 4])
    assert trained_steps(4, GrpoConfig(timestep_fraction=0.1)) == (range(4), [0])  # at least one
    with pytest.raises(UserError, match="window_start=10"):
        trained_steps(10, GrpoConfig(window_start=10))


def test_running_prompt_stats_resume_bit_for_bit_after_kill_9(tmp_path):
    """DDPO's tracker carries history across rollouts: a resume that lost it would normalise differently."""
    from diffalign.config import render_config

    config = tmp_path / "cfg.yaml"
    overrides = tiny(
        tmp_path / "unused", "grpo.reward=jpeg", "grpo.advantages=prompt_stats", "grpo.stats_min_count=2",
        "max_steps=8", "checkpoint_every=2",
    )  # fmt: skip
    config.write_text(render_config(load_train_config(TOY, overrides)))
    assert_resume_after_kill_9_is_bit_exact(config, tmp_path, kill_at=4, max_steps=8)
