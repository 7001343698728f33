"""The Diffusion-DPO recipe: its run (logs, validation, checkpoints), the full fine-tune, accumulation, a streamed
resume, the NaN stop, partial checkpoints, the one-line errors. Every family, stock LoRA loading, kill -9 and DDP:
tests/test_method_contracts.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from clitools import run_cli, train_in_process
from pairdata import write_parquet

from diffalign.errors import UserError
from diffalign.train import checkpoint, load_train_config, run_log

DPO_BASE = Path(__file__).parent / "dpo_base.yaml"


def train_dpo(overrides: list[str]) -> Path:
    return train_in_process(overrides, DPO_BASE)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_parquet(tmp_path_factory.mktemp("data") / "pairs.parquet", 12, corrupt_rows=[5])


def base_overrides(kind: str, pairs: Path, out: Path) -> list[str]:
    return [
        f"model.name=tiny-{kind}",
        f"data.source={pairs}",
        f"output_dir={out}",
        "batch_size=2",
        "max_steps=3",
        "checkpoint_every=2",
        "log_every=1",
        "report_to=none",
        "optim.lr=1e-3",
        "dpo.beta=500",
        "validation.prompts=[a red circle]",
        "validation.every=2",
    ]


def test_the_recipe_logs_each_step_validates_checkpoints_and_starts_at_the_reference(pairs_file, tmp_path):
    """Every family runs the recipe and its LoRA loads in a stock pipeline: tests/test_gpu_check.py."""
    out = tmp_path / "run"
    final = train_dpo(base_overrides("sd", pairs_file, out))
    assert final == out / "lora" and (final / "pytorch_lora_weights.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-4)  # LoRA starts as the identity: policy == reference
    assert all(0 <= r["implicit_accuracy"] <= 1 and r["lr"] > 0 for r in steps)
    assert (out / "validation" / "step-000002.png").is_file() and (out / "checkpoints" / "checkpoint-2").is_dir()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["optimizer_steps"] == 3 and summary["skipped_pairs"] >= 0


@pytest.mark.parametrize(("name", "kind"), [("sd15", "sd"), ("sdxl", "sdxl"), ("sd3", "sd3"), ("flux", "flux")])
def test_shipped_configs_turn_on_what_real_runs_need(name, kind):
    """What a real config turns on (bf16 autocast, gradient checkpointing, a stream for the hub dataset); that each
    runs on its family's tiny model: tests/test_gpu_check.py."""
    cfg = load_train_config(Path(__file__).parents[1] / "configs" / "dpo" / f"{name}.yaml")
    assert cfg.gradient_checkpointing and cfg.mixed_precision == "bf16" and cfg.data.streaming
    assert cfg.dpo.beta == {"sd15": 2000, "sdxl": 5000}.get(name, cfg.dpo.beta)


def test_full_finetune_saves_the_denoiser(pairs_file, tmp_path):
    out = tmp_path / "full"
    final = train_dpo(
        [
            *base_overrides("sd", pairs_file, out),
            "lora.enabled=false",
            "max_steps=2",
            "optim.optimizer=adafactor",
            "validation.prompts=[]",
        ]
    )
    assert (final / "config.json").is_file() and list(final.glob("*.safetensors"))


def test_gradient_accumulation_counts_optimizer_steps(pairs_file, tmp_path):
    out = tmp_path / "accum"
    train_dpo(
        [
            *base_overrides("sd", pairs_file, out),
            "gradient_accumulation_steps=2",
            "max_steps=2",
            "validation.prompts=[]",
            "checkpoint_every=0",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["optimizer_steps"] == 2
    assert not (out / "checkpoints").exists()


def test_streamed_run_resumed_from_a_checkpoint_equals_an_uninterrupted_one(pairs_file, tmp_path):
    def run(out, *extra):
        stream = ["data.streaming=true", "data.num_workers=2", "validation.prompts=[]", "max_steps=4", *extra]
        train_dpo([*base_overrides("sd", pairs_file, out), *stream])
        return json.loads((out / "summary.json").read_text())

    straight = run(tmp_path / "straight")
    run(tmp_path / "resumed", "max_steps=2")  # stops after checkpoint-2
    resumed = run(tmp_path / "resumed", "resume=auto")
    assert straight["skipped_pairs"] == 1  # the stream reached the corrupt row 5 (12 rows, 4 steps of 2 pairs)
    assert resumed["rank_weight_sha256"] == straight["rank_weight_sha256"]


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(pairs_file, tmp_path):
    out = tmp_path / "nan"
    overrides = [
        *base_overrides("sd", pairs_file, out),
        "checkpoint_every=1",
        "max_steps=5",
        "optim.lr=1e30",
        "optim.max_grad_norm=0",
        "validation.prompts=[]",
    ]
    with pytest.raises(run_log.TrainingDiverged, match=r"loss became (nan|inf) at step 2; .*checkpoint-1"):
        train_dpo(overrides)
    assert [step for step, _ in checkpoint.complete_checkpoints(out)] == [1]
    assert not (out / "lora").exists()


def test_partial_checkpoints_are_never_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "checkpoint-4").mkdir(parents=True)
    (root / "checkpoint-4" / checkpoint.CHECKPOINT_MARKER).write_text(json.dumps({"step": 4}))
    (root / "checkpoint-9").mkdir()  # no marker: written by a crashed run or copied half-way
    (root / ".tmp-checkpoint-8").mkdir()
    (root / ".tmp-checkpoint-8" / checkpoint.CHECKPOINT_MARKER).write_text(json.dumps({"step": 8}))
    assert checkpoint.resolve_resume(tmp_path, "auto") == root / "checkpoint-4"
    assert checkpoint.resolve_resume(tmp_path, "none") is None
    with pytest.raises(UserError, match="not a complete diffalign checkpoint"):
        checkpoint.resolve_resume(tmp_path, str(root / "checkpoint-9"))


@pytest.mark.parametrize("change", ["lora.rank=2", "lora.targets=[to_q]"])
def test_resuming_with_other_trainable_weights_is_a_clear_error(change, pairs_file, tmp_path):
    """A checkpoint of another run, named by resume=, is checked against this run's trainable weights (a resume in
    the same output_dir is refused earlier, by the recorded settings: tests/test_train_common.py)."""
    overrides = [*base_overrides("sd", pairs_file, tmp_path), "max_steps=2", "validation.prompts=[]"]
    first = train_dpo(overrides).parent
    with pytest.raises(UserError, match=r"checkpoint-2 holds other trainable weights than this run .* new output_dir"):
        checkpoint = first / "checkpoints" / "checkpoint-2"
        train_dpo([*overrides, "max_steps=3", change, f"output_dir={tmp_path / 'b'}", f"resume={checkpoint}"])


@pytest.mark.parametrize(
    "data, message",
    [
        (["data.source={tmp}/p.parquet"], "error: data: column 'label_0' is missing"),
        (["data.source={tmp}/missing.parquet"], "error: data.source: no such file: "),
        (
            ["data.source={tmp}/p.parquet", "data.streaming=true", "data.cache_dir={tmp}/c"],
            "error: data.cache_dir cannot",
        ),
        (
            ["data.source={tmp}/p.parquet", "data.label_column=caption", "validation.reward=nope"],
            "error: unknown reward",
        ),
        pytest.param(
            ["data.source={tmp}/p.parquet", "data.label_column=caption", "report_to=wandb"],
            "error: report_to: wandb is not installed",
            marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed"),
        ),
    ],
)
def test_cli_rejects_bad_data_or_reward_before_loading_the_model(data, message, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b""], "jpg_1": [b""]}), tmp_path / "p.parquet")
    (tmp_path / "empty").mkdir()  # a pipeline folder without components: loading it would fail with another error
    (tmp_path / "empty" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    result = run_cli(
        "train",
        str(_write(tmp_path / "c.yaml", "method: dpo\n")),
        f"model.name={tmp_path / 'empty'}",
        *[item.format(tmp=tmp_path) for item in data],
        f"output_dir={tmp_path / 'o'}",
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert not (tmp_path / "o").exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.name=tiny-flux", "model.resolution=30"], "resolution 30 is not a multiple of 4 for flux: use 28"),
        (["model.dtype=float16", "mixed_precision=bf16"], "model.dtype float16 with mixed_precision bf16"),
    ],
)
def test_settings_the_model_cannot_run_are_one_line_errors(overrides, message, pairs_file, tmp_path):
    """A resolution FLUX cannot pack (was a raw RuntimeError in the transformer) and float16 weights under bf16
    autocast (CPU kernels refuse the mix) fail before training with one line."""
    base = [f"data.source={pairs_file}", f"output_dir={tmp_path / 'o'}", "report_to=none", "max_steps=1"]
    with pytest.raises(UserError, match=message):
        train_dpo(["model.name=tiny-sd", *base, *overrides])
