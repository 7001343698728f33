"""What every training run shares (diffalign/train/run_dir.py, checkpoint.py, validation.py and loop.py): the output
folder is never mixed or replaced silently, validation cadence, Ctrl-C says where to resume, the watched metric (best
weights, early stop)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from clitools import train_in_process, wait_for_checkpoint
from pairdata import write_parquet

from diffalign.config import ValidationConfig
from diffalign.errors import UserError
from diffalign.train import run_dir
from diffalign.train.validation import BestTracker, check_best_by


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pairs")
    return write_parquet(folder / "a.parquet", 8), write_parquet(folder / "b.parquet", 6)


def tiny_run(out: Path, source: Path, *extra: str) -> Path:
    base = [
        "model.name=tiny-sd", f"data.source={source}", f"output_dir={out}", "batch_size=2", "max_steps=2",
        "checkpoint_every=1", "log_every=1", "report_to=none", "validation.enabled=false",
    ]  # fmt: skip
    return train_in_process(["method=dpo", *base, *extra])


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_with_other_settings_is_never_continued_into_the_same_folder(pairs, tmp_path):
    """The second experiment (other data, other beta) into a run's folder used to continue it from its checkpoint with
    the old optimizer and append to its metrics: now one line naming what differs; --overwrite replaces it whole."""
    out = tmp_path / "run"
    tiny_run(out, pairs[0])
    before = (out / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    with pytest.raises(UserError, match=r"holds a run with other settings \(data.source, dpo.beta differ\)"):
        tiny_run(out, pairs[1], "dpo.beta=100")
    assert (out / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == before
    tiny_run(out, pairs[1], "dpo.beta=100", "overwrite=true")
    assert metric_steps(out) == [1, 2]  # replaced, not appended to
    assert json.loads((out / run_dir.RUN_FILE).read_text())["dpo.beta"] == 100.0


def test_resume_none_over_a_run_is_refused_unless_overwrite(pairs, tmp_path):
    out = tmp_path / "run"
    tiny_run(out, pairs[0])
    with pytest.raises(UserError, match="resume: none would replace it: pass --overwrite"):
        tiny_run(out, pairs[0], "resume=none")
    tiny_run(out, pairs[0], "resume=none", "overwrite=true")
    assert metric_steps(out) == [1, 2]


def test_a_folder_train_did_not_write_is_refused_whatever_the_flags(pairs, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    for extra in ([], ["overwrite=true"]):
        with pytest.raises(UserError, match="is a folder this command did not write"):
            tiny_run(folder, pairs[0], *extra)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_a_longer_rerun_resumes_and_logs_each_step_once(pairs, tmp_path):
    """max_steps (and the cadence keys) may change on resume; metrics the interrupted run logged after its
    checkpoint are dropped, so every step is logged once."""
    out = tmp_path / "run"
    tiny_run(out, pairs[0], "max_steps=3", "checkpoint_every=2")
    tiny_run(out, pairs[0], "max_steps=4", "checkpoint_every=2", "log_every=1")
    assert metric_steps(out) == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize(("every", "expected"), [(0, [2]), (1, [0, 1, 2])])
def test_validation_every_zero_is_only_the_end(every, expected, pairs, tmp_path):
    out = tmp_path / "run"
    tiny_run(out, pairs[0], "validation.enabled=true", "validation.prompts=[a red circle]", f"validation.every={every}")
    assert sorted(int(p.stem.split("-")[1]) for p in (out / "validation").glob("step-*.png")) == expected


def test_ctrl_c_says_where_the_run_resumes_from(pairs, tmp_path):
    """Ctrl-C used to exit 130 silently: now one line with the last checkpoint and the command that resumes."""
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(
        f"method: dpo\nmodel:\n  name: tiny-sd\ndata:\n  source: {pairs[0]}\nbatch_size: 2\nmax_steps: 10000\n"
        "checkpoint_every: 2\nreport_to: none\nvalidation:\n  enabled: false\n"
    )
    command = [sys.executable, "-m", "diffalign", "train", str(config), f"output_dir={out}"]
    proc = subprocess.Popen(
        command,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A runner started in the background (`make test &`) ignores SIGINT, and the child would inherit that: a
        # user pressing Ctrl-C has it at its default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for_checkpoint(out)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: training stopped at step ") and "the last checkpoint is " in last
    assert last.endswith(f"`diffalign train {config} output_dir={out}` resumes it")


def test_best_tracker_keeps_the_best_and_counts_falls_in_a_row():
    tracker = BestTracker(metric="val/heldout")
    values = [0.5, 0.7, 0.6, 0.65, 0.6, 0.55, 0.8]
    # new best?            yes  yes  no   no    no   no    yes
    # falls in a row:      0    0    1    0     1    2     0
    seen = [(tracker.update({"val/heldout": v, "val/reward": 1.0}, i), tracker.falls) for i, v in enumerate(values)]
    assert seen == [(True, 0), (True, 0), (False, 1), (False, 0), (False, 1), (False, 2), (True, 0)]
    assert (tracker.best, tracker.best_step) == (0.8, 6)
    restored = BestTracker(metric="val/heldout")
    restored.load_state_dict(tracker.state_dict())
    assert restored == tracker
    with pytest.raises(UserError, match=r"'val/heldout' is not among the validation metrics \(val/reward\)"):
        BestTracker(metric="val/heldout").update({"val/reward": 1.0}, 0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"early_stop": 3}, "early_stop needs validation.best_by"),
        ({"best_by": "loss", "prompts": ["a"], "reward": "toy-clip"}, "'loss' is not a validation metric"),
        ({"best_by": "val/heldout", "prompts": ["a"], "reward": "toy-clip"}, "needs validation.prompts and "),
        ({"best_by": "val/reward", "reward": "toy-clip"}, "needs validation.prompts and validation.reward"),
        ({"best_by": "val/reward", "prompts": ["a"], "reward": "toy-clip", "early_stop": 2}, "every > 0"),
    ],
)
def test_best_by_settings_are_checked_before_training(settings, message):
    with pytest.raises(UserError, match=message):
        check_best_by(ValidationConfig(**settings))
    check_best_by(ValidationConfig(best_by="val/heldout/all_correct", prompts=["a"], heldout_reward="toy-gold"))


def test_the_trained_lora_carries_a_model_card_with_the_last_metrics_and_validation_grid(pairs, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "run"
    final = tiny_run(out, pairs[0], "validation.enabled=true", "validation.prompts=[a red circle]",
                     "validation.reward=toy-clip", "validation.every=1")  # fmt: skip
    card = ModelCard.load(final / "README.md")
    assert card.data.library_name == "diffusers" and {"diffalign", "dpo", "lora"} <= set(card.data.tags)
    assert card.data.base_model is None  # tiny-sd is not a hub id; a hub model is named there
    text = card.text
    assert "# Diffusion-DPO LoRA of tiny-sd" in text and "for 2 optimizer steps" in text
    assert f"- data: `{pairs[0]}`" in text and "- rewards: `toy-clip`" in text
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert f"| loss | {next(r['loss'] for r in reversed(last) if 'loss' in r):.6g} |" in text
    assert f"| val/reward | {last[-1]['val/reward']:.6g} |" in text
    assert "![validation](validation.png)" in text
    assert (final / "validation.png").read_bytes() == (out / "validation" / "step-000002.png").read_bytes()
    assert "```yaml\nmethod: dpo\n" in text


def test_push_to_hub_is_checked_before_training_and_uploads_the_final_folder(pairs, tmp_path, monkeypatch):
    from diffalign.train import outputs

    with pytest.raises(UserError, match="push_to_hub: give hub_model_id"):
        tiny_run(tmp_path / "a", pairs[0], "push_to_hub=true")
    with pytest.raises(UserError, match=r"push_to_hub: the hub cannot be reached \(HF_HUB_OFFLINE=1\)"):
        tiny_run(tmp_path / "a", pairs[0], "push_to_hub=true", "hub_model_id=me/lora")
    assert not (tmp_path / "a").exists()  # refused before anything was written
    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            uploads.append(("create", repo_id))

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploads.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return "https://huggingface.co/me/lora/commit/1"

    monkeypatch.setattr(outputs, "check_push", lambda cfg: None)  # as if online with a token
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    tiny_run(tmp_path / "b", pairs[0], "push_to_hub=true", "hub_model_id=me/lora")
    assert uploads == [("create", "me/lora"), ("upload", "me/lora", ["README.md", "pytorch_lora_weights.safetensors"])]
