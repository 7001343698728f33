"""The command line: help, one-line errors with exit code 2, --debug tracebacks, generate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clitools import run_cli
from PIL import Image

COMMANDS = ["train", "generate", "reno", "score", "pairs", "rewards", "demo"]


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


def test_console_script_and_module_are_the_same_cli():
    from shutil import which

    exe = which("diffalign", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe, "the `diffalign` console script is installed next to the interpreter"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "generate" in result.stdout


def test_unknown_command_exits_2():
    result = run_cli("trian")
    assert result.returncode == 2
    assert "No such command 'trian'" in result.stderr


def test_debug_shows_the_traceback():
    result = run_cli("--debug", "reno", "--prompt", "x", "--reward", "jpeg")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_offline_model_id_fails_fast_with_one_line_naming_it():
    """The error comes before torch/diffusers are imported (which alone takes seconds)."""
    code = (
        "import sys\n"
        "sys.argv = ['diffalign', 'generate', '--model', 'nobody/no-such-model', '-p', 'x']\n"
        "from diffalign.cli import main\n"
        "try:\n    main()\n"
        "except SystemExit as e:\n"
        "    assert e.code == 2, e.code\n"
        "    assert 'torch' not in sys.modules, 'torch was imported before the model check'\n"
        "    print('exit-2-without-torch')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert "exit-2-without-torch" in result.stdout, result.stderr
    assert "'nobody/no-such-model' is not available offline" in result.stderr
    assert "local folder" in result.stderr


def test_local_folder_without_model_index_is_named(tmp_path):
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path), "-p", "x"), str(tmp_path), "model_index.json")


@pytest.mark.parametrize("damage", ["no components", "truncated weights"])
def test_a_broken_pipeline_folder_is_one_error_line_naming_it(damage, tmp_path):
    folder = tmp_path / "model"
    if damage == "no components":
        folder.mkdir()
        (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    else:
        shutil.copytree(Path(__file__).parents[1] / "assets" / "toy" / "model", folder)
        weights = next((folder / "unet").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:1000])
    result = run_cli("generate", "--model", str(folder), "-p", "x", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after diffusers' loading progress bar
    assert last.startswith(f"error: model '{folder}' could not be loaded: ")
    assert not (tmp_path / "out").exists()


def test_train_rejects_a_bad_config_key_before_loading_a_model(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: dpo\nmodel:\n  name: nobody/no-such-model\nlora:\n  rnak: 4\n")
    assert_one_line_error(run_cli("train", str(cfg)), "unknown config key 'lora.rnak'", "valid keys here")
    assert_one_line_error(run_cli("train", str(cfg), "lora.rank=x"), "lora.r")


def test_generate_writes_images_prompts_and_metadata(tmp_path):
    out = tmp_path / "gen"
    result = run_cli(
        "generate",
        "--model",
        "tiny-sd",
        "-p",
        "a red circle",
        "-p",
        "a blue square",
        "-n",
        "2",
        "--out",
        str(out),
        "--batch-size",
        "3",
        "--seed",
        "7",
    )
    assert result.returncode == 0, result.stderr
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert (out / "00002.txt").read_text() == "a blue square"
    rows = [json.loads(line) for line in (out / "generate.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [7, 8, 9, 10] and rows[0]["num_steps"] == 4
    arrays = [np.asarray(Image.open(p)) for p in pngs]
    assert all(a.shape == (32, 32, 3) for a in arrays)
    assert not np.array_equal(arrays[0], arrays[1])  # different seeds, different images
    # one image per seed: the same seed alone (another batch size) gives the same picture
    again = run_cli(
        "generate",
        "--model",
        "tiny-sd",
        "-p",
        "a red circle",
        "--out",
        str(tmp_path / "one"),
        "--seed",
        "8",
        "--batch-size",
        "1",
    )
    assert again.returncode == 0, again.stderr
    assert np.abs(np.asarray(Image.open(tmp_path / "one" / "00000.png")).astype(int) - arrays[1]).max() <= 1


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--model", "tiny-sd"],
        ["generate", "--model", "tiny-nope", "-p", "x"],
        ["generate", "--model", "tiny-sd", "-p", "x", "--lora", "{tmp}/no-lora"],
        ["generate", "--model", "tiny-sd", "-p", "x", "--lora", "{tmp}"],
    ],
)
def test_generate_input_errors(args, tmp_path):
    result = run_cli(*[a.format(tmp=tmp_path) for a in args], "--out", str(tmp_path / "out"))
    assert_one_line_error(result)
    assert not (tmp_path / "out").exists()
