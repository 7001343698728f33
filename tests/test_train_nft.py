"""The DiffusionNFT recipe end to end on a tiny model: the first update of a rollout starts at the old policy when it
follows the trained one fully, and away from it when it lags; any reward works (jpeg is not differentiable); the KL
starts at 0; the lagging old policy resumes bit for bit after kill -9; checkpoints must fall on rollout boundaries.
(Every config's smoke run: tests/test_gpu_check.py; the kill -9 resume and 2-rank DDP: the contract tests,
tests/test_method_contracts.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from clitools import assert_resume_after_kill_9_is_bit_exact, train_in_process

from diffalign.errors import UserError
from diffalign.hub import CONFIGS_DIR
from diffalign.train import load_train_config

TOY = CONFIGS_DIR / "nft" / "toy.yaml"


def tiny(out, *extra: str) -> list[str]:
    """Overrides of configs/nft/toy.yaml for a run of seconds on the tiny SD model: rollouts of 2 prompts x 2 images,
    3 sampling steps (2 trained per image), micro-batches of 2: two optimizer steps per rollout."""
    return [
        "model.name=tiny-sd", "model.resolution=32", "data.source=", "data.prompts=[a red circle,a blue square]",
        f"output_dir={out}", "report_to=none", "log_every=1", "validation.enabled=false", "checkpoint_every=0",
        "batch_size=2", "gradient_accumulation_steps=1", "nft.prompts_per_rollout=2", "nft.group_size=2",
        "nft.num_steps=3", "optim.lr=1e-2", "optim.warmup_steps=0", *extra,
    ]  # fmt: skip


def logged(out) -> list[dict]:
    """The training rows of metrics.jsonl (validation rows have no loss)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


def test_a_fully_following_old_policy_is_the_model_at_each_rollout_start_and_jpeg_trains(tmp_path):
    out = tmp_path / "run"
    train_in_process(tiny(out, "nft.reward=jpeg", "nft.old_decay_max=0", "max_steps=4"), TOY)
    rows = logged(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["old_deviation"] == 0.0 and rows[2]["old_deviation"] == 0.0  # decay 0: old = θ after each rollout
    assert rows[1]["old_deviation"] > 0 and rows[3]["old_deviation"] > 0  # the first update of a rollout moved θ
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0  # the LoRA starts as the identity: the model is the reference
    assert rows[0]["reward"] != rows[2]["reward"]  # a new rollout, scored again
    for row in rows:
        assert {"policy_loss", "optimality", "positive_loss", "negative_loss", "reward_std", "lr"} <= row.keys()
        assert 0 <= row["optimality"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "nft" and summary["optimizer_steps"] == 4


def test_a_lagging_old_policy_differs_from_the_model_at_the_next_rollout(tmp_path):
    out = tmp_path / "run"
    train_in_process(tiny(out, "nft.old_decay_rate=1", "nft.old_decay_max=0.9", "max_steps=4"), TOY)
    rows = logged(out)
    assert rows[0]["old_deviation"] == 0.0  # the old policy starts as the model
    assert rows[2]["old_deviation"] > 0  # after rollout 1: old = 0.9 old + 0.1 θ, not θ


def test_the_old_policy_samples_with_its_own_weights_and_swaps_the_model_s_back():
    """What a rollout is sampled under (`OldPolicy.active`): with the old weights different from the model's, the
    family's sampler draws exactly what it draws with the old weights copied in, and the model's come back."""
    from conftest import build_family

    from diffalign.models import cond_select
    from diffalign.train.nft import OldPolicy

    family = build_family("sd")
    family.add_lora(rank=4, alpha=4)
    params = family.trainable_parameters()
    old = OldPolicy(params)
    with torch.no_grad():
        for w in old.weights:
            w.add_(0.5)
    cond = cond_select(family.encode_prompts(["a red circle"]), [0])
    noise = family.initial_noise(1, 32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        with old.active():
            by_old = family.sample(cond, latents=noise, num_steps=3)
        by_model = family.sample(cond, latents=noise, num_steps=3)
        saved = [p.detach().clone() for p in params]
        for p, w in zip(params, old.weights, strict=True):
            p.copy_(w)
        expected = family.sample(cond, latents=noise, num_steps=3)
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    assert torch.equal(by_old, expected) and not torch.equal(by_old, by_model)
    assert all(torch.equal(p, s) for p, s in zip(params, saved, strict=True))  # swapped back


def test_a_lagging_old_policy_resumes_bit_for_bit_after_kill_9(tmp_path):
    """The old weights carry across rollouts: a resume that re-copied them from the model would train differently."""
    from diffalign.config import render_config

    config = tmp_path / "cfg.yaml"
    overrides = tiny(
        tmp_path / "unused", "nft.reward=jpeg", "nft.old_decay_rate=1", "nft.old_decay_max=0.9", "max_steps=8",
        "checkpoint_every=2",
    )  # fmt: skip
    config.write_text(render_config(load_train_config(TOY, overrides)))
    assert_resume_after_kill_9_is_bit_exact(config, tmp_path, kill_at=4, max_steps=8)


def test_checkpoints_must_fall_on_rollout_boundaries(tmp_path):
    from diffalign.train.online import check_config, updates_per_rollout

    cfg = load_train_config(TOY, tiny(tmp_path, "checkpoint_every=3"))
    assert updates_per_rollout(cfg) == 2
    with pytest.raises(UserError, match="nft checkpoints fall on rollout boundaries, every 2"):
        check_config(cfg)
    with pytest.raises(UserError, match=r"nft.prompts_per_rollout x nft.group_size"):
        check_config(load_train_config(TOY, tiny(tmp_path, "batch_size=3")))
