"""`diffalign reno`: the output folder (initial and optimised images with sidecar prompts, history, summary), the
one-line input errors before any model loads, and the split across two processes."""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import fields

import numpy as np
import pytest
from clitools import run_cli
from distributed import failure, launch_two_ranks
from PIL import Image

from diffalign.infer.configs import RenoConfig

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
ARGS = ["--model", "tiny-sd-turbo", "--reward", "toy-clip", "--iters", "2", "--batch-size", "2"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def single_run(prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "reno"
    result = run_cli("reno", *ARGS, "--prompts", str(prompts_file), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, result


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reno_cli_writes_images_with_sidecar_prompts_history_and_table(single_run):
    out, result = single_run
    summary = json.loads((out / "summary.json").read_text())
    assert [p["prompt"] for p in summary["prompts"]] == PROMPTS
    for folder in ("initial", "reno"):
        rows = read_jsonl(out / folder / f"{folder}.jsonl")
        assert [r["prompt"] for r in rows] == PROMPTS and [r["seed"] for r in rows] == [0, 1, 2]
        for i, prompt in enumerate(PROMPTS):
            assert (out / folder / f"{i:05d}.txt").read_text() == prompt  # what `diffalign score` reads
            assert Image.open(out / folder / f"{i:05d}.png").size == (32, 32)
    history = read_jsonl(out / "history.jsonl")
    assert [(h["prompt_index"], h["iteration"]) for h in history] == [(p, i) for p in range(3) for i in range(2)]
    for h in history:
        assert h["prompt"] == PROMPTS[h["prompt_index"]] and h["toy-clip"] == h["reward"]
        assert {"regulariser", "grad_norm", "noise_norm"} <= set(h)
    for p, row in enumerate(summary["prompts"]):
        rewards = [h["reward"] for h in history if h["prompt_index"] == p]
        assert row["reward_before"] == rewards[0] and row["reward_after"] == max(rewards)
        assert row["best_iteration"] == rewards.index(max(rewards))
    assert "reward before" in result.stdout and "a green triangle" in result.stdout  # the before/after table


def test_reno_split_across_two_processes_merges_in_prompt_order(single_run, prompts_file, tmp_path):
    out = tmp_path / "reno"
    result = launch_two_ranks(["-m", "diffalign", "reno", *ARGS, "--prompts", str(prompts_file), "--out", str(out)])
    assert result.returncode == 0, failure(result)
    assert "rank 0/2: 2 prompts" in result.stderr and "rank 1/2: 1 prompts" in result.stderr
    single = single_run[0]
    split, alone = (json.loads((o / "summary.json").read_text())["prompts"] for o in (out, single))
    for a, b in zip(split, alone, strict=True):
        assert (a["prompt"], a["seed"], a["best_iteration"]) == (b["prompt"], b["seed"], b["best_iteration"])
        assert (a["reward_before"], a["reward_after"]) == pytest.approx(
            (b["reward_before"], b["reward_after"]), rel=1e-3
        )
    for folder in ("initial", "reno"):
        for i in range(len(PROMPTS)):
            pixels = [np.asarray(Image.open(o / folder / f"{i:05d}.png")).astype(int) for o in (out, single)]
            assert np.abs(pixels[0] - pixels[1]).max() <= 2


def test_imageselect_and_a_multi_step_model_write_their_folders(tmp_path):
    """--imageselect (best of --iters random noises) with --multi-step-model: the initial and the kept noise
    re-rendered by the multi-step model at its steps, with sidecar prompts and what rendered them."""
    out = tmp_path / "reno"
    args = [*ARGS, "-p", PROMPTS[0], "-p", PROMPTS[1], "--imageselect", "--iters", "3"]
    result = run_cli("reno", *args, "--multi-step-model", "tiny-sd", "--multi-steps", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "wrote 8 images" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["imageselect"] and summary["settings"]["multi_step"]["model"] == "tiny-sd"
    assert all(h["grad_norm"] == 0 for h in read_jsonl(out / "history.jsonl"))
    for folder in ("multi_step", "multi_step_initial"):
        rows = read_jsonl(out / folder / f"{folder}.jsonl")
        assert [r["prompt"] for r in rows] == PROMPTS[:2] and rows[0]["rendered_by"]["num_steps"] == 3
        assert (out / folder / "00001.txt").read_text() == PROMPTS[1]
    pixels = [np.asarray(Image.open(out / f / "00000.png")).astype(int) for f in ("reno", "multi_step")]
    assert np.abs(pixels[0] - pixels[1]).max() > 10  # another model's rendering of the same noise


@pytest.fixture
def broken_model(tmp_path):
    """A pipeline folder that fails to load: an input error reported instead proves the check came first."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return str(broken)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-p", "x", "--reward", "jpeg"], "error: reno --reward: reward 'jpeg' is not differentiable"),
        (["--reward", "toy-clip"], "error: give at least one --prompt or a --prompts file"),
        (["--prompts", "missing.txt"], "error: prompt file not found"),
    ],
)
def test_reno_cli_input_errors_are_one_line_with_exit_2(args, message, broken_model, tmp_path):
    result = run_cli("reno", "--model", broken_model, *args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"reward": "nope"}, "unknown reward 'nope'"),
        ({"reward": "toy-clip,toy-gold"}, "reward 'toy-gold' is not differentiable"),
        ({"starts": 8, "iters": 10}, "raise --iters or lower --starts"),
        ({"lr": 0.0}, "config key 'lr' must be > 0, got 0.0"),
        ({"optimizer": "lbfgs"}, "config key 'optimizer' must be one of 'sgd' | 'adam', got 'lbfgs'"),
        ({"imageselect": True, "starts": 2}, "takes no starts"),
        ({"out": "precious"}, "precious exists and is not a folder this command wrote"),
    ],
)
def test_reno_settings_are_checked_before_the_model_loads(settings, message, broken_model, tmp_path):
    from diffalign.apps.reno import run_reno
    from diffalign.errors import UserError

    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    settings = {"reward": "toy-clip", "out": tmp_path / "out", **settings}
    out = tmp_path / settings.pop("out")
    with pytest.raises(UserError, match=re.escape(message)):
        run_reno(RenoConfig(model=broken_model, **settings), ["x"], out)
    assert not (tmp_path / "out").exists() and (tmp_path / "precious" / "notes.txt").is_file()


def test_settings_come_from_a_config_file_the_flags_and_key_value_overrides(tmp_path):
    """One list of settings (RenoConfig): --show-config prints them with help (the toy's defaults resolved), its
    output loads back with --config, flags and key=value override the file, a bad key is one line."""
    shown = run_cli("reno", "--show-config", "--steps", "3", "iters=7", "multi_step.model=same")
    assert shown.returncode == 0, shown.stderr
    assert "# int, >= 1: Generator forward+backward passes per prompt" in shown.stdout
    assert "\niters: 7\n" in shown.stdout and "\nnum_steps: 3\n" in shown.stdout and "reward: toy-clip" in shown.stdout
    assert "multi_step:\n  # str | None" in shown.stdout and "  model: same\n" in shown.stdout
    (tmp_path / "reno.yaml").write_text(shown.stdout)
    again = run_cli("reno", "--show-config", "--config", str(tmp_path / "reno.yaml"), "--iters", "9", "lr=0.5")
    assert "\niters: 9\n" in again.stdout and "\nlr: 0.5\n" in again.stdout and "\nnum_steps: 3\n" in again.stdout
    (tmp_path / "bad.yaml").write_text("iterations: 5\n")
    bad = run_cli("reno", "--config", str(tmp_path / "bad.yaml"), "-p", "x")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: unknown config key 'iterations'; valid keys here: " + ", ".join(f.name for f in fields(RenoConfig))
    ]


def test_every_reno_flag_sets_a_config_key_and_every_setting_flag_is_mapped():
    from diffalign.cli import RENO_FLAGS, reno

    for key in RENO_FLAGS.values():
        section = RenoConfig()
        *parents, leaf = key.split(".")
        for part in parents:
            section = getattr(section, part)
        assert leaf in {f.name for f in fields(section)}, key
    inputs = {"overrides", "prompt", "prompts", "config", "show_config", "out"}
    assert set(inspect.signature(reno).parameters) - inputs == set(RENO_FLAGS)
