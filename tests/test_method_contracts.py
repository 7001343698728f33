"""What every training method promises, tested for each record of `diffalign.methods.METHODS` (a new method gets
these by being registered): a run killed with SIGKILL and resumed ends bit for bit where an uninterrupted one does; a
2-rank DDP run keeps the ranks' weights identical. The runs start from the method's own configs with only the model,
the data, the rewards and the sizes swapped (plus the record's `smoke` overrides; `diffalign.smoke`). That each
shipped config runs on its model (a toy's on the toy, a real model's on the tiny model of its family) with gradient
checkpointing, and that its LoRA loads whole into a stock diffusers pipeline, is the GPU check's matrix, run on CPU
in tests/test_gpu_check.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clitools import assert_resume_after_kill_9_is_bit_exact
from distributed import failure, launch_two_ranks

from diffalign.hub import CONFIGS_DIR
from diffalign.methods import training_methods
from diffalign.smoke import SMOKE_REWARD, smoke_overrides, write_smoke_data
from diffalign.train import load_train_config


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[type, Path]:
    """A data file of each kind a method trains on: preference pairs, prompts."""
    return write_smoke_data(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("method", training_methods())
def test_kill_9_then_resume_equals_an_uninterrupted_run_bit_for_bit(method, data_files, tmp_path):
    """A subprocess run killed with SIGKILL after a checkpoint, resumed, ends with the weights of an uninterrupted
    run; a half-written checkpoint folder beside the complete ones is never resumed from."""
    config = tmp_path / "cfg.yaml"
    toy = CONFIGS_DIR / method / "toy.yaml"
    overrides = smoke_overrides(toy, "tiny-sd", tmp_path / "unused", data_files, "validation.enabled=false")
    from diffalign.config import render_config

    resolved = load_train_config(toy, [*overrides, "max_steps=10", "checkpoint_every=2"])
    config.write_text(render_config(resolved))

    def half_written_folder(out: Path) -> None:
        (out / "checkpoints" / "checkpoint-999").mkdir()

    assert_resume_after_kill_9_is_bit_exact(
        config, tmp_path, kill_at=4, max_steps=10, before_resume=half_written_folder
    )


@pytest.mark.parametrize("method", training_methods())
def test_two_rank_ddp_run_keeps_ranks_identical(method, data_files, tmp_path):
    """SD3 on purpose: its transformer has a buffer, which DDP broadcasts on every forward, so every collective of
    a step must be matched across the ranks. The ranks see different data and noise and end with the same weights;
    each rank's train state is checkpointed; the best weights are kept (validation runs on the main process). (The
    model layer's DDP alone needs no test of its own: every method's recipe runs it here.)"""
    from diffalign.config import render_config

    out, config = tmp_path / "ddp", tmp_path / "cfg.yaml"
    toy = CONFIGS_DIR / method / "toy.yaml"
    extra = (
        "max_steps=2", "checkpoint_every=2", "validation.prompts=[a red circle]", "validation.every=1",
        f"validation.reward={SMOKE_REWARD}", "validation.best_by=val/reward", "validation.early_stop=5",
    )  # fmt: skip
    config.write_text(render_config(load_train_config(toy, smoke_overrides(toy, "tiny-sd3", out, data_files, *extra))))
    result = launch_two_ranks(["-m", "diffalign", "train", str(config)])
    assert result.returncode == 0, failure(result)
    assert result.stdout.count(f"saved {out / 'lora'}") == 1  # the main process reports, not every rank
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2 and summary["optimizer_steps"] == 2
    first, second = summary["rank_weight_sha256"]
    assert first == second
    checkpoint = out / "checkpoints" / "checkpoint-2"
    states = [torch.load(checkpoint / f"train_state-{r}.pt", weights_only=True) for r in (0, 1)]
    assert states[0]["data_position"] == states[1]["data_position"] == 4  # 2 steps x batch 2, on each rank
    assert not torch.equal(states[0]["generator"], states[1]["generator"])  # different noise per rank
    assert (out / "best" / "pytorch_lora_weights.safetensors").is_file()  # the guards run under DDP too
