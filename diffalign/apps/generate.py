"""`diffalign generate`: images of a model (optionally with a LoRA) into a folder: `<index>.png`, a sidecar
`<index>.txt` with its prompt (what `diffalign score` reads) and `generate.jsonl` (prompt, seed, sampling settings).
`write_images` is the folder writer other commands reuse.

With RL guidance (`--rlg-scale W`, `--rlg-sweep 0,0.5,1`), a fine-tuned full denoiser (`--denoiser DIR`) and scoring
(`--score SPEC`): every scale samples the same prompts with the same seeds (image i uses seed + i, as plain
`generate`), so a sweep compares the scales image by image. One scale writes its images into `--out` like plain
`generate`; a sweep writes `<out>/rlg-<W>/` per scale. Both write `<out>/grid.png` (a row per scale, a column per
image, at most 16) and, with `--score`, `<out>/scores.json` and a table `scale | reward mean ± SE` on stdout. The
module imports torch lazily: the options are checked (`check_rlg_inputs`) before it loads."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffalign.errors import UserError
from diffalign.infer.configs import RLGConfig
from diffalign.io import atomic_dir, check_replaceable, save_png, write_text_atomic

if TYPE_CHECKING:
    from torch import Tensor


def write_images(out: Path, images: Tensor, prompts: Sequence[str], records: Sequence[dict], name: str) -> int:
    """`<out>/<i>.png` + sidecar `<i>.txt` per image and `<out>/<name>.jsonl` with one record per image (its
    `file`, `prompt` and the given fields); returns the number of images. The folder is written whole under a
    temporary name and then replaces `out`: an earlier output of the same command (it holds `<name>.jsonl`) is
    replaced, never mixed with the new one; any other existing folder is refused."""
    with atomic_dir(out, marker=f"{name}.jsonl") as tmp:
        rows = []
        for i, (image, prompt, record) in enumerate(zip(images, prompts, records, strict=True)):
            save_png(image, tmp / f"{i:05d}.png")
            write_text_atomic(tmp / f"{i:05d}.txt", prompt)
            rows.append({"file": f"{i:05d}.png", "prompt": prompt, **record})
        write_text_atomic(tmp / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def generate_to_folder(
    model: str,
    prompts: Sequence[str],
    out: str | Path,
    *,
    lora: str | Path | None = None,
    denoiser: str | Path | None = None,
    scales: Sequence[float] | None = None,
    rlg: RLGConfig | None = None,
    score: str | None = None,
    num_images: int = 1,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "float32",
) -> int:
    """`diffalign generate`: PNGs `<out>/<index>.png` with a sidecar `<index>.txt` prompt, and generate.jsonl.

    With `scales` (RL guidance of the `lora` or `denoiser` model with the other settings of `rlg`,
    below) every scale samples the same prompts and seeds; a sweep (more than one scale) writes
    `<out>/rlg-<W>/` per scale and an index generate.jsonl in `out`; with scales or `score` also `<out>/grid.png`,
    and with `score` `<out>/scores.json` and a printed table. `out` is written whole and replaces an earlier
    generate output; any other folder is refused before any work.
    Returns the number of images written."""
    import contextlib

    from diffalign.infer.rlg import rl_guidance
    from diffalign.infer.sample import sample_images, sampling_settings
    from diffalign.models import load_family
    from diffalign.processes import resolve_device

    check_replaceable(out, "generate.jsonl")
    device = resolve_device(device)
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
    common = {"model": model, "lora": str(lora) if lora else None, **settings}
    if denoiser is not None:
        common["denoiser"] = str(denoiser)
    sweep = scales is not None and len(scales) > 1
    rows, grid_rows, index = [], [], []
    with atomic_dir(out, marker="generate.jsonl") as tmp:
        for scale in scales if scales is not None else [None]:
            guided = contextlib.nullcontext()
            if scale is not None:
                guided = rl_guidance(family, dataclasses.replace(rlg or RLGConfig(), scale=scale), finetuned=finetuned)
            with guided:
                images = sample_images(
                    family, all_prompts, seeds, num_steps=num_steps, guidance_scale=guidance_scale,
                    batch_size=batch_size, progress=True,
                )  # fmt: skip
            records = [{"seed": s, **({"rlg_scale": scale} if scale is not None else {}), **common} for s in seeds]
            folder = tmp / scale_name(scale) if sweep else tmp
            write_images(folder, images, all_prompts, records, "generate")
            prefix = f"{scale_name(scale)}/" if sweep else ""
            files = [f"{prefix}{i:05d}.png" for i in range(len(seeds))]
            index += [{"file": f, "prompt": p, **r} for f, p, r in zip(files, all_prompts, records, strict=True)]
            grid_rows.append(images[:GRID_COLUMNS])
            if reward is not None:
                rows.append(score_row(reward, images, all_prompts, scale, device))
        if sweep:  # the index of every image, and the mark of a folder generate wrote
            write_text_atomic(tmp / "generate.jsonl", "".join(json.dumps(r) + "\n" for r in index))
        if scales is not None or reward is not None:
            import torch

            from diffalign.io import image_grid

            save_png(image_grid(torch.cat(grid_rows), columns=grid_rows[0].shape[0]), tmp / "grid.png")
        if reward is not None:
            write_text_atomic(tmp / "scores.json", json.dumps({"reward": score, "scales": rows}, indent=2))
    if reward is not None:
        print(score_table(rows, score), flush=True)
    return len(index)


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
