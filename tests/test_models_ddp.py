"""Multi-process training on CPU: 2 gloo ranks with different data end with identical LoRA weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from distributed import failure, launch_two_ranks
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "ddp_lora_steps.py"


def test_two_ranks_end_with_identical_lora_weights(tmp_path):
    result = launch_two_ranks([str(SCRIPT), str(tmp_path)])
    assert result.returncode == 0, failure(result)
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(log["world_size"] == 2 for log in logs)
    assert logs[0]["losses"] != logs[1]["losses"]  # the ranks really saw different data
    weights = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    lora_b = [v for k, v in weights[0].items() if "lora_B" in k or "lora.up" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # training moved the zero-initialised B
