"""The output folder of a training run: what a run does with an existing `output_dir` (start fresh, resume, replace,
or refuse), `run.json` (the settings a run was started with: what a later command may resume, and the mark of our
folder) and the metrics kept on resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from diffalign.config import TrainConfig, to_dict
from diffalign.errors import UserError
from diffalign.train.checkpoint import checkpoint_step, resolve_resume

RUN_FILE = "run.json"
"""The settings a run was started with, in output_dir: what a later command may resume, and the mark of our folder."""

CADENCE_KEYS = frozenset(
    {
        "max_steps",
        "log_every",
        "validation.every",
        "checkpoint_every",
        "checkpoints_keep",
        "resume",
        "overwrite",
        "push_to_hub",
        "hub_model_id",
    }
)
"""Settings a resumed run may change: how long it runs, how often it logs, validates and checkpoints, and where the
result is published."""


def run_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The flattened config minus the cadence keys: what must be equal for a run to be resumed."""
    return {k: v for k, v in flat_config(to_dict(cfg)).items() if k not in CADENCE_KEYS}


def output_plan(cfg: TrainConfig) -> str:
    """What training does with output_dir: "fresh" (absent or empty), "resume" (our run with the same settings and a
    checkpoint to continue), "replace" (our run, replaced whole: same settings without a checkpoint, or --overwrite).
    Anything else is a one-line UserError: a folder we did not write, another run's settings, resume: none over a run.
    Read-only, so every process decides the same."""
    out = Path(cfg.output_dir)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "fresh"
    recorded = out / RUN_FILE
    if not recorded.is_file():
        what = "a file" if not out.is_dir() else "a folder this command did not write (no run.json)"
        raise UserError(f"output_dir {out} is {what}: choose a new output_dir (nothing there is replaced)")
    before = json.loads(recorded.read_text())
    now = run_settings(cfg)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed and not cfg.overwrite:
        shown = ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else "")
        raise UserError(
            f"output_dir {out} holds a run with other settings ({shown} differ): rerun with its settings to resume "
            "it, choose a new output_dir, or pass --overwrite to replace it"
        )
    if cfg.overwrite:
        return "replace"
    if cfg.resume == "none":
        raise UserError(
            f"output_dir {out} holds a run and resume: none would replace it: pass --overwrite, choose a new "
            "output_dir, or resume it (resume: auto)"
        )
    return "resume" if resolve_resume(out, cfg.resume) is not None else "replace"


def prepare_output_dir(cfg: TrainConfig, accelerator) -> None:
    """Check output_dir (`output_plan`), then (main process) empty a replaced run, record this run's settings, and
    on resume drop the metrics the interrupted run logged after its checkpoint."""
    plan = output_plan(cfg)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        if plan == "replace":
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        from diffalign.io import write_text_atomic

        write_text_atomic(out / RUN_FILE, json.dumps(run_settings(cfg), indent=2, sort_keys=True))
        if plan == "resume":
            keep_metrics_until(out / "metrics.jsonl", checkpoint_step(resolve_resume(out, cfg.resume)))
    accelerator.wait_for_everyone()


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the records of metrics.jsonl logged after `step` (the resumed run logs them again)."""
    if path.is_file():
        from diffalign.io import write_text_atomic

        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as one level of dotted keys, values kept when scalar, else as text."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
