"""The Diffusion-DPO recipe: smoke runs on every family, stock LoRA loading, resume after kill -9, NaN stop, DDP."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from clitools import assert_resume_after_kill_9_is_bit_exact, run_cli
from conftest import build_pipeline
from distributed import failure, launch_two_ranks
from pairdata import write_parquet

from diffalign.errors import UserError
from diffalign.processes import reset_accelerate_state
from diffalign.train import checkpoint, load_train_config, run_log


def train_in_process(overrides: list[str], config: Path | None = None) -> Path:
    from diffalign.train import load_train_config, train

    reset_accelerate_state()
    try:
        return train(load_train_config(config or DPO_BASE, overrides))
    finally:
        reset_accelerate_state()


DPO_BASE = Path(__file__).parent / "dpo_base.yaml"


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


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_recipe_runs_on_every_family_and_its_lora_loads_in_a_stock_pipeline(kind, pairs_file, tmp_path):
    out = tmp_path / "run"
    final = train_in_process(base_overrides(kind, pairs_file, out))
    assert final == out / "lora" and (final / "pytorch_lora_weights.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-4)  # LoRA starts as the identity: policy == reference
    assert all(0 <= r["implicit_accuracy"] <= 1 and r["lr"] > 0 for r in steps)
    assert (out / "validation" / "step-000002.png").is_file() and (out / "checkpoints" / "checkpoint-2").is_dir()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["optimizer_steps"] == 3 and summary["skipped_pairs"] >= 0
    # the saved LoRA loads into a freshly built stock pipeline and changes its output
    pipe = build_pipeline(kind)
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "pt"}
    if kind in ("sd3", "flux"):
        kwargs["max_sequence_length"] = 32
    base = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(str(final))
    tuned = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (tuned - base).abs().max() > 1e-5


@pytest.mark.parametrize("name,kind", [("sd15", "sd"), ("sdxl", "sdxl"), ("sd3", "sd3"), ("flux", "flux")])
def test_shipped_config_runs_on_cpu_with_the_tiny_model_of_its_family(name, kind, pairs_file, tmp_path):
    """Everything a real config turns on (half-precision frozen parts, bf16 autocast, gradient checkpointing,
    streaming decoded on threads, its optimizer) runs here; only model, data and sizes are swapped."""
    config = Path(__file__).parents[1] / "configs" / "dpo" / f"{name}.yaml"
    out = tmp_path / name
    overrides = [
        f"model.name=tiny-{kind}", "model.resolution=32", f"data.source={pairs_file}", f"output_dir={out}",
        "max_steps=2", "batch_size=2", "gradient_accumulation_steps=1", "report_to=none",
        "validation.prompts=[a red circle]", "validation.every=2", "validation.reward=toy-clip",
    ]  # fmt: skip
    cfg = load_train_config(config, overrides)
    assert cfg.data.streaming and cfg.gradient_checkpointing and cfg.mixed_precision == "bf16"
    assert train_in_process(overrides, config) == out / "lora"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer_steps"] == 2 and (out / "validation" / "step-000002.png").is_file()


def test_full_finetune_saves_the_denoiser(pairs_file, tmp_path):
    out = tmp_path / "full"
    final = train_in_process(
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
    train_in_process(
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
        train_in_process([*base_overrides("sd", pairs_file, out), *stream])
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
        train_in_process(overrides)
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
    first = train_in_process(overrides).parent
    with pytest.raises(UserError, match=r"checkpoint-2 holds other trainable weights than this run .* new output_dir"):
        checkpoint = first / "checkpoints" / "checkpoint-2"
        train_in_process([*overrides, "max_steps=3", change, f"output_dir={tmp_path / 'b'}", f"resume={checkpoint}"])


def test_kill_9_then_resume_equals_an_uninterrupted_run_bit_for_bit(pairs_file, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"method: dpo\nmodel:\n  name: toy\ndata:\n  source: {pairs_file}\n  empty_prompt_fraction: 0.3\n"
        "batch_size: 2\nmax_steps: 24\ncheckpoint_every: 4\nlog_every: 1\nreport_to: none\n"
        "optim:\n  lr: 1.0e-3\ndpo:\n  beta: 500\n"
    )

    def half_written_folder(out: Path) -> None:  # must be ignored by the resume
        (out / "checkpoints" / "checkpoint-999").mkdir()

    assert_resume_after_kill_9_is_bit_exact(
        config, tmp_path, kill_at=8, max_steps=24, before_resume=half_written_folder
    )


def test_two_rank_ddp_run_keeps_ranks_identical(pairs_file, tmp_path):
    out = tmp_path / "ddp"
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"method: dpo\nmodel:\n  name: tiny-sd\ndata:\n  source: {pairs_file}\nbatch_size: 2\nmax_steps: 3\n"
        f"checkpoint_every: 2\nreport_to: none\noutput_dir: {out}\noptim:\n  lr: 1.0e-3\n"
    )
    result = launch_two_ranks(["-m", "diffalign", "train", str(config)])
    assert result.returncode == 0, failure(result)
    assert result.stdout.count(f"saved {out / 'lora'}") == 1  # the main process reports, not every rank
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3 and summary["optimizer_steps"] == 3
    first, second = summary["rank_weight_sha256"]
    assert first == second
    assert sorted(p.name for p in (out / "checkpoints" / "checkpoint-2").glob("train_state-*.pt")) == [
        "train_state-0.pt",
        "train_state-1.pt",
    ]
    states = [
        torch.load(out / "checkpoints" / "checkpoint-2" / f"train_state-{r}.pt", weights_only=True) for r in (0, 1)
    ]
    assert states[0]["data_position"] == states[1]["data_position"] == 4  # 2 steps x batch 2, on each rank
    assert not torch.equal(states[0]["generator"], states[1]["generator"])  # different noise per rank


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
        train_in_process(["model.name=tiny-sd", *base, *overrides])
