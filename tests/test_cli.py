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
    assert "'nobody/no-such-model' is not in the Hugging Face cache and HF_HUB_OFFLINE=1" in result.stderr
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


def error_before_torch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter and report whether it exited 2 before importing torch."""
    code = (
        "import sys\n"
        f"sys.argv = ['diffalign', *{list(args)!r}]\n"
        "from diffalign.cli import main\n"
        "try:\n    main()\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'torch' in sys.modules)\n"
    )
    full_env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_an_unreachable_hub_is_decided_up_front_without_hf_hub_offline():
    """A user's shell has no HF_HUB_OFFLINE: a model that is not cached is one line at once (it took 14-20 s and
    three lines pointing at a traceback), still before torch is imported."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_ENDPOINT": "http://127.0.0.1:9"}
    code = (
        "import sys\nsys.argv = ['diffalign', 'generate', '--model', 'nobody/no-such-model', '-p', 'x']\n"
        "from diffalign.cli import main\ntry:\n    main()\nexcept SystemExit as e:\n"
        "    print('exit', e.code, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert "exit 2 False" in result.stdout, result.stderr
    assert result.stderr.strip() == (
        "error: model 'nobody/no-such-model' is not in the Hugging Face cache and 127.0.0.1 cannot be reached: "
        "download it where there is network, or pass a local folder written by save_pretrained"
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["score", "{tmp}/missing.png", "--reward", "toy-clip"], "missing.png does not exist"),
        (["generate", "--model", "nobody/no-model", "-p", "x", "--lora", "{tmp}/no-lora"], "no-lora is not a folder"),
        (["generate", "-p", "x", "--out", "{tmp}/notes.txt"], "notes.txt exists and is not a folder this command"),
        (["demo", "--out", "{tmp}/notes.txt"], "notes.txt exists and is not a folder this command"),
    ],
)
def test_path_arguments_are_checked_before_torch_is_imported(args, fragment, tmp_path):
    """A typo in a path is one line in well under a second, not after torch (3 s) or a model (20 s) loads; the
    LoRA check comes even before the model id's."""
    (tmp_path / "notes.txt").write_text("mine")
    result = error_before_torch(*[a.format(tmp=tmp_path) for a in args])
    assert "exit 2 False" in result.stdout, (result.stdout, result.stderr)
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["pairs", "--prompts", "p.txt", "--reward", "toy-clip", "--out", "o.parquet", "--images-per-prompt", "1"],
         "Invalid value for '--images-per-prompt'"),
        (["generate", "-p", "x", "-n", "0"], "Invalid value for '--num-images'"),
        (["generate", "-p", "x", "--bogus"], "No such option: --bogus"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_like_the_config_errors(args, fragment):
    """click's multi-line usage box is gone: a bad value or option is one `error:` line, exit 2."""
    assert_one_line_error(run_cli(*args), fragment)


def test_device_errors_are_one_line():
    import torch

    if not torch.cuda.is_available():
        assert_one_line_error(run_cli("generate", "--model", "tiny-sd", "-p", "x", "--device", "cuda"), "no CUDA GPU")
    assert_one_line_error(run_cli("generate", "--model", "tiny-sd", "-p", "x", "--device", "gpu0"), "not a device")


def test_version_and_help_without_a_command():
    from diffalign import __version__

    assert run_cli("--version").stdout.strip() == f"diffalign {__version__}"
    result = run_cli()
    assert result.returncode == 0 and "generate" in result.stdout


def test_generate_replaces_its_own_output_whole_and_refuses_a_foreign_folder(tmp_path):
    """A smaller run into an earlier output folder leaves no stale images (a later `score DIR` would have scored the
    mixture); a folder generate did not write is refused, its files untouched; files get the user's umask."""
    import os
    import stat

    out = tmp_path / "gen"
    umask = os.umask(0o022)
    try:
        assert run_cli("generate", "--model", "tiny-sd", "-p", "a", "--out", str(out), "-n", "3").returncode == 0
        assert run_cli("generate", "--model", "tiny-sd", "-p", "a", "--out", str(out), "-n", "1").returncode == 0
    finally:
        os.umask(umask)
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00000.txt", "generate.jsonl"]
    assert len((out / "generate.jsonl").read_text().splitlines()) == 1
    assert stat.S_IMODE((out / "00000.png").stat().st_mode) == 0o644 and stat.S_IMODE(out.stat().st_mode) == 0o755
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "00000.png").write_bytes(b"mine")
    result = run_cli("generate", "--model", "tiny-sd", "-p", "a", "--out", str(foreign))
    assert_one_line_error(result, "is not a folder this command wrote")
    assert (foreign / "00000.png").read_bytes() == b"mine"


def test_rewards_table_fits_an_80_column_terminal():
    result = run_cli("rewards", env={"COLUMNS": "80"})
    assert result.returncode == 0 and "toy-clip" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
