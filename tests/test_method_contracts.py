"""What every training method promises, tested for each record of `diffalign.methods.METHODS` (a new method gets
these by being registered): each shipped config runs (a toy's on the toy, a real model's on the tiny model of its
family) and its LoRA loads whole into a stock diffusers pipeline; a run killed with SIGKILL and resumed ends bit for
bit where an uninterrupted one does; a 2-rank DDP run keeps the ranks' weights identical. The runs start from the
method's own configs with only the model, the data, the rewards and the sizes swapped (plus the record's `smoke`
overrides)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clitools import assert_resume_after_kill_9_is_bit_exact, train_in_process
from conftest import build_pipeline
from distributed import failure, launch_two_ranks
from pairdata import write_parquet

from diffalign.config import DataConfig, PromptConfig
from diffalign.hub import CONFIGS_DIR
from diffalign.methods import METHODS, training_methods
from diffalign.train import load_train_config

MODEL_OF_CONFIG = {
    "toy": "toy", "toy-flow": "toy-flow", "sd15": "tiny-sd", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux"
}  # fmt: skip
"""Each shipped config and the model it runs on here: the bundled toys themselves, and for a real-model config the tiny
model of its family."""
SHIPPED = [
    (method, name)
    for method in training_methods()
    for name in MODEL_OF_CONFIG
    if (CONFIGS_DIR / method / f"{name}.yaml").is_file()
]
TINY_REWARD = "toy-clip"


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[type, Path]:
    """A data file of each kind a method trains on: preference pairs, prompts."""
    folder = tmp_path_factory.mktemp("data")
    prompts = folder / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    return {DataConfig: write_parquet(folder / "pairs.parquet", 12), PromptConfig: prompts}


def reward_swaps(config, prefix: str = "") -> list[str]:
    """key=value overrides replacing every reward spec of `config` (a field named reward or *_reward, set) with the
    tiny proxy: the real configs name rewards whose weights come from the hub."""
    import dataclasses

    swaps = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            swaps += reward_swaps(value, f"{prefix}{f.name}.")
        elif (f.name == "reward" or f.name.endswith("_reward")) and value:
            swaps.append(f"{prefix}{f.name}={TINY_REWARD}")
    return swaps


def tiny_overrides(config: Path, model: str, out: Path, data_files: dict, *extra: str) -> list[str]:
    """Overrides running `config` for a few steps on `model` (a tiny model or a toy) in `out`."""
    shipped = load_train_config(config)
    source = data_files[type(shipped.data)]
    data = [f"data.source={source}"] + (["data.prompts=[]"] if isinstance(shipped.data, PromptConfig) else [])
    return [
        f"model.name={model}", "model.resolution=32", *data, f"output_dir={out}", "batch_size=2",
        "gradient_accumulation_steps=1", "report_to=none", "log_every=1", "validation.num_steps=2",
        *reward_swaps(shipped), *METHODS[shipped.method].smoke, *extra,
    ]  # fmt: skip


def stock_pipeline(model: str):
    """A fresh stock pipeline of `model`: a toy loaded with `DiffusionPipeline.from_pretrained`, or a tiny one."""
    from diffusers import DiffusionPipeline

    from diffalign.hub import TOY_MODELS

    if model in TOY_MODELS:
        return DiffusionPipeline.from_pretrained(TOY_MODELS[model], local_files_only=True)
    return build_pipeline(model.removeprefix("tiny-"))


def loaded_lora(pipe, family_attr: str) -> dict[str, torch.Tensor]:
    """The LoRA weights the stock pipeline's denoiser holds, under the saved file's key names."""
    from peft.utils import get_peft_model_state_dict

    denoiser = getattr(pipe, family_attr)
    (adapter,) = denoiser.peft_config
    state = get_peft_model_state_dict(denoiser, adapter_name=adapter)
    return {f"{family_attr}.{k}": v for k, v in state.items()}


@pytest.mark.parametrize(("method", "name"), SHIPPED)
def test_a_shipped_config_runs_on_its_model_and_its_lora_loads_whole(method, name, data_files, tmp_path):
    """Everything the real config turns on (for SD 1.5 the half-precision frozen parts and bf16 autocast too; 6x
    slower on CPU, so the others run in float32) for one step; then the LoRA file loads into a freshly built stock
    pipeline with `load_lora_weights`, every tensor of it into an adapted module."""
    from safetensors.torch import load_file

    model = MODEL_OF_CONFIG[name]
    config, out = CONFIGS_DIR / method / f"{name}.yaml", tmp_path / "run"
    precision = [] if name == "sd15" else ["mixed_precision=no", "model.dtype=float32"]
    final = train_in_process(
        tiny_overrides(config, model, out, data_files, "max_steps=1", "checkpoint_every=0", *precision), config
    )
    assert final == out / "lora"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["optimizer_steps"] == 1
    saved = load_file(final / "pytorch_lora_weights.safetensors")
    pipe = stock_pipeline(model)
    pipe.load_lora_weights(str(final))
    attr = "unet" if hasattr(pipe, "unet") else "transformer"
    loaded = loaded_lora(pipe, attr)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k].float(), saved[k].float()) for k in saved)


@pytest.mark.parametrize("method", training_methods())
def test_kill_9_then_resume_equals_an_uninterrupted_run_bit_for_bit(method, data_files, tmp_path):
    """A subprocess run killed with SIGKILL after a checkpoint, resumed, ends with the weights of an uninterrupted
    run; a half-written checkpoint folder beside the complete ones is never resumed from."""
    config = tmp_path / "cfg.yaml"
    toy = CONFIGS_DIR / method / "toy.yaml"
    overrides = tiny_overrides(toy, "tiny-sd", tmp_path / "unused", data_files, "validation.enabled=false")
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
        f"validation.reward={TINY_REWARD}", "validation.best_by=val/reward", "validation.early_stop=5",
    )  # fmt: skip
    config.write_text(render_config(load_train_config(toy, tiny_overrides(toy, "tiny-sd3", out, data_files, *extra))))
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
