"""Prompt lists: a .txt file (one prompt per line), .jsonl ({"prompt": ...} per line) or .csv (a `prompt` column), a
list in the config, or the toy world's training prompts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from diffalign.config import PromptConfig
from diffalign.errors import UserError

TOY_TRAIN = "toy:train"
"""`data.source` naming the toy world's training prompts (`diffalign.gym.world.train_prompts`)."""


def read_prompts(path: str | Path, column: str = "prompt") -> list[str]:
    """Read prompts from `path`; blank lines of a .txt file are skipped. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        where = "" if path.is_absolute() else f" (in {Path.cwd()})"
        raise UserError(f"prompt file not found: {path}{where}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                prompts.append(str(json.loads(line)[column]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{n}: expected a JSON object with a {column!r} field") from None
    elif suffix == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if column not in (reader.fieldnames or []):
                raise UserError(f"{path}: no {column!r} column (columns: {', '.join(reader.fieldnames or [])})")
            prompts = [row[column] for row in reader]
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def load_prompts(cfg: PromptConfig) -> list[str]:
    """The training prompts of a `data:` section: `data.prompts`, the file `data.source`, or the toy world's training
    prompts (`toy:train`). A missing or empty source is a UserError (checked before any model loads)."""
    if cfg.source and cfg.prompts:
        raise UserError("data: give the prompts either as data.source (a file or toy:train) or as data.prompts")
    if cfg.prompts:
        return list(cfg.prompts)
    if cfg.source == TOY_TRAIN:
        from diffalign.gym.world import train_prompts

        return train_prompts()
    if not cfg.source:
        raise UserError(
            f"data: no training prompts; set data.source (a .txt/.jsonl/.csv file, or {TOY_TRAIN}) or data.prompts"
        )
    return read_prompts(cfg.source, cfg.column)
