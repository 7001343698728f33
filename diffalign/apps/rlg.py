"""`diffalign generate` with RL guidance (`--rlg-scale W`, `--rlg-sweep 0,0.5,1`), a fine-tuned full denoiser
(`--denoiser DIR`) and scoring (`--score SPEC`).

Every scale samples the same prompts with the same seeds (image i uses seed + i, as plain `generate`), so a sweep
compares the scales image by image. One scale writes its images into `--out` like plain `generate`; a sweep writes
`<out>/rlg-<W>/` per scale. Both write `<out>/grid.png` (a row per scale, a column per image, at most 16) and, with
`--score`, `<out>/scores.json` and a table `scale | reward mean ± SE` on stdout. The sampling and writing are
`diffalign.apps.generate.generate_to_folder`'s; this module checks the options and scores.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from diffalign.errors import UserError

GRID_COLUMNS = 16
"""At most this many images per row of grid.png."""


def check_rlg_inputs(
    lora: Path | None,
    denoiser: Path | None,
    rlg_scale: float | None,
    rlg_sweep: str | None,
    score: str | None,
) -> list[float] | None:
    """The RLG scales to sample (None: no guidance), after checking every option without loading a model: one
    fine-tuned model at most, a scale needs one, the folders look right, the reward spec parses."""
    from diffalign.hub import check_denoiser_folder, check_lora_folder

    if rlg_scale is not None and rlg_sweep is not None:
        raise UserError("give --rlg-scale or --rlg-sweep, not both")
    if lora is not None and denoiser is not None:
        raise UserError("give one fine-tuned model: --lora DIR or --denoiser DIR, not both")
    if lora is not None:
        check_lora_folder(lora)
    if denoiser is not None:
        check_denoiser_folder(denoiser)
    scales = None
    if rlg_sweep is not None:
        from diffalign.infer.rlg import parse_scales

        scales = parse_scales(rlg_sweep)
    elif rlg_scale is not None:
        if not math.isfinite(rlg_scale):
            raise UserError(f"--rlg-scale {rlg_scale}: give a finite number (0 = base, 1 = fine-tuned)")
        scales = [rlg_scale]
    elif denoiser is not None:
        scales = [1.0]  # the fine-tuned denoiser alone
    if scales is not None and lora is None and denoiser is None:
        raise UserError("RL guidance needs the fine-tuned model: add --lora DIR (or --denoiser DIR)")
    if score is not None:
        from diffalign.rewards.registry import parse_spec

        parse_spec(score)
    return scales


def scale_name(scale: float) -> str:
    """The folder of a scale in a sweep: rlg-0, rlg-0.5, rlg-2."""
    return f"rlg-{scale:g}"


def score_row(reward: Any, images: Any, prompts: list[str], scale: float | None, device: str) -> dict[str, Any]:
    """Mean and standard error of the reward over `images`, scored as their PNG files would be (8-bit pixels)."""
    import torch

    from diffalign.apps.score import TOTAL, score_images
    from diffalign.io import quantize

    pixels = list(quantize(images))
    totals = torch.tensor([s[TOTAL] for s in score_images(reward, pixels, prompts, device)], dtype=torch.float64)
    se = totals.std().item() / math.sqrt(len(totals)) if len(totals) > 1 else 0.0
    return {"scale": scale, "n": len(totals), "mean": totals.mean().item(), "se": se}


def score_table(rows: list[dict[str, Any]], spec: str) -> str:
    """The printed table: one line per scale with the reward's mean ± SE over its images."""
    lines = [f"{'scale':>6}  {spec} mean ± SE  (n)"]
    for row in rows:
        scale = "-" if row["scale"] is None else f"{row['scale']:g}"
        lines.append(f"{scale:>6}  {row['mean']:.4f} ± {row['se']:.4f}  ({row['n']})")
    return "\n".join(lines)
