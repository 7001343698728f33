"""`pip install .` (a wheel, not editable) works from another directory: the package never reads the repository,
the toy assets and the shipped configs install under <prefix>/share/diffalign and are found there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = """
import json, sys
import diffalign
from diffalign import hub
from diffalign.apps import demo
assert "site-packages" in diffalign.__file__, diffalign.__file__
assert str(hub.ASSETS_DIR).startswith(sys.argv[1]) and str(hub.CONFIGS_DIR).startswith(sys.argv[1]), hub.ASSETS_DIR
toys = hub.TOY_MODELS.values()
assert all(str(t).startswith(sys.argv[1]) and (t / "model_index.json").is_file() for t in toys), toys  # both toys ship
from diffalign.methods import training_methods
found = [m for m in training_methods() if demo.toy_config(f"{m}/toy.yaml").is_file()]
# One training section end to end (the toy model, the proxy and gold rewards, a shipped config, the report): the
# others are the same package data, and the full demo runs in-process in test_apps_demo.
small = demo.DemoSettings(eval_samples=9, pairs_repeats=1, images_per_prompt=2, validation_every=2, validation_images=1,
                          sizes={"alignprop": {"steps": 1}})
metrics = demo.run_demo(sys.argv[2], settings=small, methods=["alignprop"])
print(json.dumps({"configs": found, "methods": list(metrics["methods"])}))
"""


def test_a_wheel_install_runs_the_demo_from_another_directory(tmp_path):
    wheels, prefix = tmp_path / "wheels", tmp_path / "prefix"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, ROOT], check=True, timeout=300)
    (wheel,) = wheels.glob("diffalign-*.whl")
    # --ignore-installed: never touch the diffalign of the running environment (pip would uninstall it)
    subprocess.run(
        [*pip, "install", "--no-deps", "--ignore-installed", "--prefix", prefix, wheel], check=True, timeout=300
    )
    site = next(prefix.glob("lib/python*/site-packages"))
    (tmp_path / "elsewhere").mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    env.pop("DIFFALIGN_ASSETS", None)
    result = subprocess.run(
        [sys.executable, "-c", DEMO, str(prefix / "share" / "diffalign"), str(tmp_path / "demo")],
        cwd=tmp_path / "elsewhere", env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    from diffalign.methods import training_methods

    assert json.dumps({"configs": training_methods(), "methods": ["alignprop"]}) in result.stdout
    assert (tmp_path / "demo" / "report.html").is_file()
