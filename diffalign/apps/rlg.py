"""`diffalign generate` with RL guidance (`--rlg-scale W`, `--rlg-sweep 0,0.5,1`), a fine-tuned full denoiser
(`--denoiser DIR`) and scoring (`--score SPEC`).

Every scale samples the same prompts with the same seeds (image i uses seed + i, as plain `generate`), so a sweep
compares the scales image by image. One scale writes its images into `--out` like plain `generate`; a sweep writes
`<out>/rlg-<W>/` per scale. Both write `<out>/grid.png` (a row per scale, a column per image, at most 16) and, with
`--score`, `<out>/scores.json` and a table `scale | reward mean ± SE` on stdout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffalign.errors import UserError

GRID_COLUMNS = 16


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


def generate_rlg(
    model: str,
    prompts: Sequence[str],
    out: str | Path,
    *,
    scales: list[float] | None,
    lora: str | Path | None = None,
    denoiser: str | Path | None = None,
    score: str | None = None,
    num_images: int = 1,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
) -> int:
    """Images of `model` for every RLG scale in `scales` (None: the model as loaded, no guidance), the grid and,
    with `score`, the score table. Returns the number of images written."""
    import contextlib

    import torch

    from diffalign.apps.generate import write_images
    from diffalign.infer.rlg import rl_guidance
    from diffalign.infer.sample import sample_images, sampling_settings
    from diffalign.models import load_family

    family = load_family(model, dtype=dtype, device=device)
    finetuned = family.load_denoiser(denoiser) if denoiser is not None else None
    if lora is not None:
        family.load_lora(lora)
    reward = None
    if score is not None:
        from diffalign.rewards import load_reward

        reward = load_reward(score, device=device)
    all_prompts = [p for p in prompts for _ in range(num_images)]
    seeds = [seed + i for i in range(len(all_prompts))]
    settings = sampling_settings(family, num_steps, guidance_scale)
    common = {"model": model, "lora": str(lora) if lora else None, "denoiser": str(denoiser) if denoiser else None}
    out = Path(out)
    rows, grid_rows, written = [], [], 0
    for scale in scales if scales is not None else [None]:
        guided = rl_guidance(family, scale, finetuned=finetuned) if scale is not None else contextlib.nullcontext()
        with guided:
            images = sample_images(
                family, all_prompts, seeds, num_steps=num_steps, guidance_scale=guidance_scale,
                batch_size=batch_size, progress=True,
            )  # fmt: skip
        folder = out / scale_name(scale) if scales is not None and len(scales) > 1 else out
        records = [{"seed": s, "rlg_scale": scale, **common, **settings} for s in seeds]
        written += write_images(folder, images, all_prompts, records, "generate")
        grid_rows.append(images[:GRID_COLUMNS])
        if reward is not None:
            rows.append(score_row(reward, images, all_prompts, scale, device))
    if scales is not None or reward is not None:
        from diffalign.io import save_png
        from diffalign.train.common import image_grid

        columns = grid_rows[0].shape[0]
        save_png(image_grid(torch.cat(grid_rows), columns=columns), out / "grid.png")
    if reward is not None:
        from diffalign.io import write_text_atomic

        write_text_atomic(out / "scores.json", json.dumps({"reward": score, "scales": rows}, indent=2))
        print(score_table(rows, score), flush=True)
    return written


def score_row(reward: Any, images: Any, prompts: list[str], scale: float | None, device: str) -> dict[str, Any]:
    """Mean and standard error of the reward over `images`, scored as their PNG files would be (8-bit pixels)."""
    import torch

    from diffalign.apps.score import TOTAL, score_images

    pixels = [(image.clamp(0, 1) * 255).round().to(torch.uint8) for image in images]
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
