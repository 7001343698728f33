"""The GPU check (`scripts/gpu_check.sh`) run as the suite can run it: `--cpu`, the same matrix on this machine. Every
registered method appears in its JSON, every shipped config of every training method trains with gradient
checkpointing and its LoRA loads whole into a stock pipeline, the CUDA-only items are skipped with their reason, and
an item that fails is recorded with its error line while the others run on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from clitools import run_cli

from diffalign.methods import METHODS
from diffalign.smoke import shipped_configs

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    report = json.loads((out / "gpu_check.json").read_text())
    report["returncode"], report["stdout"] = result.returncode, result.stdout
    report["table"] = (out / "gpu_check.md").read_text()
    return report


def test_every_item_passes_or_is_skipped_with_a_reason(cpu_check):
    failed = {i["name"]: i["error"] for i in cpu_check["items"] if i["status"] == "fail"}
    assert not failed and cpu_check["returncode"] == 0, failed
    assert cpu_check["cuda"] is False and cpu_check["device"].startswith("cpu")
    for item in cpu_check["items"]:
        assert set(item) == {
            "name",
            "method",
            "status",
            "error",
            "seconds",
            "seconds_per_step",
            "peak_cuda_mib",
            "notes",
        }
        assert item["status"] in ("pass", "skipped") and item["seconds"] >= 0 and item["peak_cuda_mib"] is None
        if item["status"] == "skipped":
            assert item["error"]  # the reason, never silent
    skipped = {i["name"] for i in cpu_check["items"] if i["status"] == "skipped"}
    assert skipped == {"generate/toy-float16", "attention/xformers", "fsdp2", "deepspeed-zero2"}
    assert cpu_check["counts"]["pass"] + cpu_check["counts"]["skipped"] == len(cpu_check["items"])
    assert all(f"| {i['name']} | {i['status']} |" in cpu_check["table"] for i in cpu_check["items"])


def test_every_registered_method_and_shipped_config_is_in_the_check(cpu_check):
    """A new method (or config) cannot be forgotten: the matrix is built from the registry and the configs folder."""
    items = {i["name"]: i for i in cpu_check["items"]}
    assert {i["method"] for i in cpu_check["items"] if i["method"]} == set(METHODS)
    for method, name in shipped_configs():
        train = items[f"train/{method}/{name}"]
        assert train["status"] == "pass" and train["seconds_per_step"] > 0
        expected = "bf16" if name == "sd15" else "no"  # on CPU as the real configs allow: SD 1.5's keeps bf16
        assert train["notes"]["mixed_precision"] == expected
    assert {"reno/toy", "reno/toy-flow", "rlg/toy", "generate/toy", "score/toy", "attention/sdpa"} <= items.keys()


def test_a_failing_item_is_recorded_and_the_check_goes_on():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))

    def broken() -> dict:
        raise ValueError("line one\nthe line that says what broke")

    def skipped() -> dict:
        raise gpu_check.Skip("not here")

    items = [
        gpu_check.run_item(gpu_check.Item("broken"), broken, cuda=False),
        gpu_check.run_item(gpu_check.Item("skipped"), skipped, cuda=False),
        gpu_check.run_item(gpu_check.Item("fine"), lambda: {"seconds_per_step": 0.5, "x": 1}, cuda=False),
    ]
    assert [(i.status, i.error) for i in items] == [
        ("fail", "the line that says what broke"), ("skipped", "not here"), ("pass", None)
    ]  # fmt: skip
    assert "ValueError" in items[0].notes["traceback"] and items[2].seconds_per_step == 0.5
    assert items[2].notes == {"x": 1}


def test_xformers_attention_on_cpu_is_a_one_line_error(tmp_path):
    result = run_cli("train", "configs/dpo/toy.yaml", "attention=xformers", f"output_dir={tmp_path / 'run'}", cwd=ROOT)
    assert result.returncode == 2 and "attention: xformers needs a CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr
