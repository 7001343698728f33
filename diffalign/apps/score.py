"""`diffalign score`: score image files with a reward spec, batched, decoded by DataLoader workers.

Steps: find the images and their prompts (errors here come before any model loads), load the reward, score this
process's share of the images, gather the shares on the main process, write one row per scored image in input order
(CSV or JSONL, written to a temporary file and renamed), print a summary. Under `accelerate launch` (WORLD_SIZE > 1)
image i goes to process i % world_size.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffalign.errors import UserError
from diffalign.processes import gather_to_all, process_info, resolve_device

OUTPUT_SUFFIXES = (".csv", ".jsonl")
TOTAL = "total"


@dataclass
class ScoreResult:
    """What `run_score` scored: rows in input order (path, prompt, components..., total) and what it skipped."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    """Wall time of decoding + scoring (after the reward is loaded, before the output is written)."""


# ----------------------------------------------------------------------------------------------------- scoring
def default_workers(device: str) -> int:
    """DataLoader workers. On a GPU: the CPU cores left after the main process (1 to 8), so decoding keeps up with
    the model. On the CPU: only the cores torch's own threads leave free (usually none: decoding then runs between
    batches), because a decoding process preempting one of torch's threads stalls every parallel op of the reward
    (measured on 2 cores: 1 worker made scoring 2x slower, decoding in the main process cost ~5%)."""
    import torch

    cores = os.cpu_count() or 1
    if not str(device).startswith("cpu"):
        return max(1, min(8, cores - 1))
    return max(0, min(8, cores - torch.get_num_threads()))


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def make_loader(paths: Sequence[Path], indices: Sequence[int], batch_size: int, workers: int):
    """A DataLoader of lists of (index, uint8 image or None, error or None), decoding in `workers` processes."""
    from torch.utils.data import DataLoader

    from diffalign.data.images import ImageFileDataset, collate_as_list

    return DataLoader(
        ImageFileDataset(paths, indices),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_as_list,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        pin_memory=False,
    )


def score_images(reward, images: list, prompts: list[str], device: str) -> list[dict[str, float]]:
    """Components and total per image for uint8 images [3, H, W] (any sizes: scored in same-size groups)."""
    import torch

    from diffalign.rewards.base import group_by_size

    scores: list[dict[str, float]] = [{} for _ in images]
    for group in group_by_size(images):
        batch = torch.stack([images[i] for i in group]).to(device, non_blocking=True).float().div_(255)
        with torch.no_grad():
            components = reward.components(batch, [prompts[i] for i in group])
            total = reward.combine(components)
        values = {name: value.float().cpu().tolist() for name, value in components.items()}
        values[TOTAL] = total.float().cpu().tolist()
        for j, i in enumerate(group):
            scores[i] = {name: column[j] for name, column in values.items()}
    return scores


def score_share(
    reward,
    paths: Sequence[Path],
    prompts: Sequence[str | None],
    indices: Sequence[int],
    batch_size: int,
    workers: int,
    device: str,
    on_skip: Callable[[int, str], None],
    on_batch: Callable[[int], None] = lambda n: None,
) -> dict[int, dict[str, float]]:
    """{image index: scores} for the images `indices`; undecodable ones go to `on_skip(index, reason)`."""
    results: dict[int, dict[str, float]] = {}
    for batch in make_loader(paths, indices, batch_size, workers):
        good = []
        for index, image, error in batch:
            if image is None:
                on_skip(index, error)
            else:
                good.append((index, image))
        if good:
            batch_scores = score_images(reward, [im for _, im in good], [prompts[i] or "" for i, _ in good], device)
            results.update({index: s for (index, _), s in zip(good, batch_scores, strict=True)})
        on_batch(len(batch))
    return results


# ------------------------------------------------------------------------------------------------------ output
def _format_value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def rows_as_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """CSV text with a header row; floats at full precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_format_value(row[c]) for c in columns])
    return buffer.getvalue()


def rows_as_jsonl(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """One JSON object per row, keys in column order."""
    return "".join(json.dumps({c: row[c] for c in columns}, ensure_ascii=False) + "\n" for row in rows)


def write_rows(out: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Write rows as CSV or JSONL by the suffix of `out`, atomically (a temporary file renamed into place)."""
    from diffalign.io import atomic_path

    text = rows_as_jsonl(rows, columns) if out.suffix.lower() == ".jsonl" else rows_as_csv(rows, columns)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")


def summary_lines(result: ScoreResult, spec: str) -> list[str]:
    """Count, skipped count, and mean / std (sample; 0 for one image) of each score column."""
    lines = [f"scored {len(result.rows)} images with {spec} ({len(result.skipped)} skipped)"]
    score_columns = result.columns[2:]
    if result.rows:
        width = max(len(c) for c in score_columns + ["component"])
        lines.append(f"{'component':<{width}}  {'mean':>12}  {'std':>12}")
        for column in score_columns:
            values = [row[column] for row in result.rows]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            lines.append(f"{column:<{width}}  {statistics.fmean(values):>12.6g}  {std:>12.6g}")
    return lines


# -------------------------------------------------------------------------------------------------------- main
def check_output_path(out: Path | None) -> None:
    """A UserError unless `out` is None, or a .csv / .jsonl path that does not exist or holds an earlier score
    output (its header / first record starts with the path and prompt columns): a file score did not write is never
    replaced."""
    if out is None:
        return
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"--out {out}: use a .csv or .jsonl file name")
    if out.exists() and not looks_like_score_output(out):
        raise UserError(f"--out {out} exists and is not a score output; it would be replaced: choose a new name")


def looks_like_score_output(path: Path) -> bool:
    """True when `path` is a file whose first line is a score output's header (CSV) or record (JSONL)."""
    if not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as f:
        first = f.readline().strip()
    if path.suffix.lower() == ".csv":
        return first.startswith("path,prompt,")
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and list(record)[:2] == ["path", "prompt"]


def warn(message: str) -> None:
    """One line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def run_score(
    paths: Sequence[str],
    spec: str,
    prompt: str | None = None,
    prompts_file: Path | None = None,
    batch_size: int = 32,
    out: Path | None = None,
    strict: bool = False,
    device: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> ScoreResult | None:
    """Score image files with the reward `spec`; see the module docstring. Returns the result on the main process
    (None on the others). Writes `out` (or CSV on stdout when `out` is None) and prints the summary on stderr."""
    from diffalign.data.images import assign_prompts, find_images

    check_output_path(out)
    images = find_images(paths)  # a missing path fails here, before torch is imported (~3 s)
    from diffalign.rewards.registry import build_rewards, parse_spec

    terms = parse_spec(spec)
    prompts = assign_prompts(images, prompt, prompts_file, required=any(t.cls.needs_prompts for t in terms))
    info = process_info()
    device = resolve_device(device, info)
    reward = build_rewards(terms, device=device)
    skipped: dict[int, str] = {}

    def on_skip(index: int, reason: str) -> None:
        if strict and info.world == 1:
            raise UserError(f"cannot read image {images[index]} ({reason}): fix or remove it, or drop --strict")
        warn(f"skipping {images[index]}: cannot read image ({reason})")
        skipped[index] = reason

    share = list(range(info.rank, len(images), info.world))
    workers = default_workers(device) if workers is None else workers
    started = time.perf_counter()
    with progress_bar(len(share), enabled=progress and info.is_main and sys.stderr.isatty()) as advance:
        scores = score_share(reward, images, prompts, share, batch_size, workers, device, on_skip, advance)
    seconds = time.perf_counter() - started
    if info.world > 1:
        print(f"rank {info.rank}/{info.world}: scored {len(scores)} images ({len(skipped)} skipped)", file=sys.stderr)
    shares = gather_to_all((scores, skipped), info)
    all_scores = {i: s for part, _ in shares for i, s in part.items()}
    all_skipped = {i: r for _, part in shares for i, r in part.items()}
    if strict and all_skipped:
        first = min(all_skipped)
        raise UserError(f"cannot read image {images[first]} ({all_skipped[first]}): fix or remove it, or drop --strict")
    if not info.is_main:
        return None
    result = assemble(images, prompts, all_scores, all_skipped, seconds)
    finish(result, spec, out)
    return result


def assemble(
    images: Sequence[Path],
    prompts: Sequence[str | None],
    scores: dict[int, dict[str, float]],
    skipped: dict[int, str],
    seconds: float,
) -> ScoreResult:
    """Rows in input order from the gathered scores."""
    first = next(iter(scores.values()), {TOTAL: 0.0})
    columns = ["path", "prompt"] + [c for c in first if c != TOTAL] + [TOTAL]
    rows = [
        {"path": str(images[i]), "prompt": prompts[i] or "", **scores[i]} for i in range(len(images)) if i in scores
    ]
    skipped_rows = [(str(images[i]), skipped[i]) for i in sorted(skipped)]
    return ScoreResult(rows=rows, columns=columns, skipped=skipped_rows, seconds=seconds)


def finish(result: ScoreResult, spec: str, out: Path | None) -> None:
    """Write the rows (file or stdout) and print the summary on stderr; nothing readable at all is a UserError."""
    if not result.rows:
        raise UserError(f"none of the {len(result.skipped)} images could be read (nothing written)")
    if out is not None:
        write_rows(out, result.rows, result.columns)
    else:
        sys.stdout.write(rows_as_csv(result.rows, result.columns))
        sys.stdout.flush()
    for line in summary_lines(result, spec):
        print(line, file=sys.stderr)
    if out is not None:
        print(f"wrote {len(result.rows)} rows to {out}", file=sys.stderr)


class progress_bar:  # noqa: N801 - used as a context manager like a function
    """A rich progress bar on stderr over `total` items (`label`: what is counted); yields `advance(n)`. Disabled: a
    no-op."""

    def __init__(self, total: int, enabled: bool = True, label: str = "scoring") -> None:
        self.total, self.enabled, self.label = total, enabled, label
        self._progress = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn(self.label),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._progress.start()
        task = self._progress.add_task(self.label, total=self.total)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
