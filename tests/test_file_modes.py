"""Every file and folder a command writes gets the mode the user's umask gives (0666 / 0777 minus it), whatever
library writes it: safetensors (LoRA, checkpoints, the latent cache), diffusers' `save_lora_weights` and
`save_pretrained`, accelerate's `save_state`, torch, pyarrow, tensorboard, PIL and our own atomic writers."""

from __future__ import annotations

import os
from pathlib import Path

from clitools import UMASK, run_cli, umask, wrong_modes
from pairdata import write_parquet

from diffalign.processes import reset_accelerate_state
from diffalign.train import checkpoint


def train(*overrides: str) -> None:
    reset_accelerate_state()
    try:
        result = run_cli("train", str(Path(__file__).parent / "dpo_base.yaml"), *overrides)
    finally:
        reset_accelerate_state()
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_command_writes_files_with_the_umasks_modes(tmp_path):
    with umask(UMASK):
        pairs_file = write_parquet(tmp_path / "input.parquet", 6)
        (tmp_path / "prompts.txt").write_text("a red circle on a black background\na blue square\n")
        os.chmod(pairs_file, 0o666 & ~UMASK)
        os.chmod(tmp_path / "prompts.txt", 0o666 & ~UMASK)
        outputs = {name: tmp_path / name for name in ("lora-run", "full-run", "gen", "pairs", "scores", "reno")}
        common_args = [
            "model.name=tiny-sd", f"data.source={pairs_file}", "batch_size=2", "max_steps=2", "checkpoint_every=1",
            "checkpoints_keep=0", "log_every=1", "validation.prompts=[a red circle]", "validation.every=1",
            "validation.reward=toy-clip", "validation.best_by=val/reward", "report_to=tensorboard",
        ]  # fmt: skip
        train(*common_args, f"output_dir={outputs['lora-run']}", f"data.cache_dir={tmp_path / 'cache'}")
        train(*common_args, f"output_dir={outputs['full-run']}", "lora.enabled=false", "optim.optimizer=adafactor")
        commands = [
            ["generate", "--model", "tiny-sd", "-p", "a red circle", "-n", "2", "--steps", "2",
             "--out", outputs["gen"]],
            ["pairs", "--model", "tiny-sd", "--prompts", tmp_path / "prompts.txt", "--reward", "toy-clip",
             "--images-per-prompt", "2", "--steps", "2", "--out", outputs["pairs"] / "pairs.parquet"],
            ["score", outputs["gen"], "--reward", "toy-clip", "--out", outputs["scores"] / "scores.csv"],
            ["score", outputs["gen"], "--reward", "toy-clip", "--out", outputs["scores"] / "scores.jsonl"],
            ["reno", "--model", "tiny-sd-turbo", "-p", "a red circle", "--reward", "toy-clip", "--iters", "2",
             "--out", outputs["reno"]],
        ]  # fmt: skip
        outputs["scores"].mkdir()
        outputs["pairs"].mkdir()
        for command in commands:
            result = run_cli(*map(str, command))
            assert result.returncode == 0, (command, result.stderr[-3000:])
    written = [*outputs.values(), tmp_path / "cache"]
    last_checkpoint = outputs["lora-run"] / "checkpoints" / "checkpoint-2"
    for must in (
        outputs["lora-run"] / "lora" / "pytorch_lora_weights.safetensors",
        last_checkpoint / checkpoint.TRAINABLE_FILE,
        outputs["lora-run"] / "best",
        outputs["full-run"] / "denoiser" / "config.json",
        outputs["pairs"] / "pairs.parquet",
    ):
        assert must.exists(), must  # the writers this test is about did write
    assert list((outputs["lora-run"] / "logs").rglob("events.out.tfevents.*"))
    wrong = [problem for root in written for problem in wrong_modes(root)]
    assert not wrong, "\n".join(wrong)


def test_the_mode_checker_reports_private_and_hard_coded_modes(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    (root / "private.safetensors").write_bytes(b"x")
    (root / "ok.json").write_text("{}")
    os.chmod(root, 0o775)
    os.chmod(root / "private.safetensors", 0o600)
    os.chmod(root / "ok.json", 0o664)
    assert wrong_modes(root, 0o002) == ["out/private.safetensors 600 (want 664)"]
    assert len(wrong_modes(root, 0o022)) == 3  # 0664 and 0775 are wrong under 022
