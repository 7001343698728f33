"""Tiny runs of the shipped configs: what the contract tests and the GPU check (`scripts/gpu_check.sh`) share.

Each shipped config runs on a model of its family: a toy's config on the bundled toy, a real model's on the tiny model
of its family (`diffalign.models.tiny`), with only the model, the data, the rewards and the sizes swapped (plus the
method record's `smoke` overrides). Its LoRA must then load whole into a freshly built stock pipeline.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

MODEL_OF_CONFIG = {
    "toy": "toy", "toy-flow": "toy-flow", "sd15": "tiny-sd", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux"
}  # fmt: skip
"""Each shipped config name and the model it runs on in a smoke run."""
SMOKE_REWARD = "toy-clip"
"""The reward every smoke run swaps in (the real configs name rewards whose weights come from the hub)."""
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a white circle on a gray background"]


def shipped_configs() -> list[tuple[str, str]]:
    """(method, config name) of every shipped config of every training method that has a smoke model."""
    from diffalign.hub import CONFIGS_DIR
    from diffalign.methods import training_methods

    return [
        (method, name)
        for method in training_methods()
        for name in MODEL_OF_CONFIG
        if (CONFIGS_DIR / method / f"{name}.yaml").is_file()
    ]


def png_bytes(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    """A random RGB PNG (width, height = `size`)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def pair_rows(n: int, labels=None, corrupt_rows=()) -> dict[str, list]:
    """n preference pairs in the Pick-a-Pic v2 schema (caption, jpg_0, jpg_1, label_0) with random images; the
    rows in `corrupt_rows` get an undecodable second image."""
    labels = labels or [1.0 if i % 2 == 0 else 0.0 for i in range(n)]
    rows = {
        "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(n)],
        "jpg_0": [png_bytes(2 * i) for i in range(n)],
        "jpg_1": [png_bytes(2 * i + 1) for i in range(n)],
        "label_0": list(labels),
    }
    for i in corrupt_rows:
        rows["jpg_1"][i] = b"not an image"
    return rows


def write_parquet(path: Path, n: int = 8, **kwargs: Any) -> Path:
    """A pairs file of `pair_rows(n, **kwargs)`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(pair_rows(n, **kwargs)), path)
    return path


def write_smoke_data(folder: Path) -> dict[type, Path]:
    """A data file of each kind a method trains on, by its config class: preference pairs, prompts."""
    from diffalign.config import DataConfig, PromptConfig

    folder.mkdir(parents=True, exist_ok=True)
    prompts = folder / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    return {DataConfig: write_parquet(folder / "pairs.parquet", 12), PromptConfig: prompts}


def reward_swaps(config: Any, prefix: str = "") -> list[str]:
    """key=value overrides replacing every reward spec of `config` (a field named reward or *_reward, set) with
    `SMOKE_REWARD`."""
    swaps = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            swaps += reward_swaps(value, f"{prefix}{f.name}.")
        elif (f.name == "reward" or f.name.endswith("_reward")) and value:
            swaps.append(f"{prefix}{f.name}={SMOKE_REWARD}")
    return swaps


def smoke_overrides(config: Path, model: str, out: Path, data_files: dict[type, Path], *extra: str) -> list[str]:
    """Overrides running `config` for a few steps on `model` (a tiny model or a toy) in `out`."""
    from diffalign.config import PromptConfig
    from diffalign.methods import METHODS
    from diffalign.train import load_train_config

    shipped = load_train_config(config)
    source = data_files[type(shipped.data)]
    data = [f"data.source={source}"] + (["data.prompts=[]"] if isinstance(shipped.data, PromptConfig) else [])
    return [
        f"model.name={model}", "model.resolution=32", *data, f"output_dir={out}", "batch_size=2",
        "gradient_accumulation_steps=1", "report_to=none", "log_every=1", "validation.num_steps=2",
        *reward_swaps(shipped), *METHODS[shipped.method].smoke, *extra,
    ]  # fmt: skip


def stock_pipeline(model: str) -> Any:
    """A fresh stock pipeline of `model`: a toy loaded with `DiffusionPipeline.from_pretrained`, or a tiny one
    built from its configs."""
    from diffusers import DiffusionPipeline

    from diffalign.hub import TOY_MODELS
    from diffalign.models.tiny import TINY_BUILDERS

    if model in TOY_MODELS:
        return DiffusionPipeline.from_pretrained(TOY_MODELS[model], local_files_only=True)
    return TINY_BUILDERS[model.removeprefix("tiny-")](seed=0)


def lora_loads_whole(pipe: Any, folder: Path) -> list[str]:
    """Load the LoRA `folder` into the stock `pipe` with `load_lora_weights`; what did not arrive whole: the keys of
    the saved file that the denoiser does not hold, or holds with other values (empty: every tensor arrived)."""
    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(Path(folder) / "pytorch_lora_weights.safetensors")
    pipe.load_lora_weights(str(folder))
    attr = "unet" if hasattr(pipe, "unet") else "transformer"
    denoiser = getattr(pipe, attr)
    (adapter,) = denoiser.peft_config
    state = get_peft_model_state_dict(denoiser, adapter_name=adapter)
    loaded = {f"{attr}.{k}": v for k, v in state.items()}
    wrong = sorted(set(saved) ^ set(loaded))
    wrong += [k for k in saved if k in loaded and not torch.equal(loaded[k].float().cpu(), saved[k].float())]
    return wrong
