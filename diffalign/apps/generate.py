"""`diffalign generate`: images of a model (optionally with a LoRA) into a folder: `<index>.png`, a sidecar
`<index>.txt` with its prompt (what `diffalign score` reads) and `generate.jsonl` (prompt, seed, sampling settings).
`write_images` is the folder writer other commands reuse."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from diffalign.infer.sample import sample_images, sampling_settings
from diffalign.io import atomic_dir, check_replaceable, save_png, write_text_atomic


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
    num_images: int = 1,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "float32",
) -> int:
    """`diffalign generate`: PNGs `<out>/<index>.png` with a sidecar `<index>.txt` prompt, and generate.jsonl."""
    from diffalign.models import load_family
    from diffalign.processes import resolve_device

    check_replaceable(out, "generate.jsonl")  # a folder generate did not write is refused before any work
    family = load_family(model, dtype=dtype, device=resolve_device(device))
    if lora is not None:
        family.load_lora(lora)
    all_prompts = [p for p in prompts for _ in range(num_images)]
    seeds = [seed + i for i in range(len(all_prompts))]
    images = sample_images(
        family,
        all_prompts,
        seeds,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        progress=True,
    )
    settings = sampling_settings(family, num_steps, guidance_scale)
    common = {"model": model, "lora": str(lora) if lora else None, **settings}
    records = [{"seed": s, **common} for s in seeds]
    return write_images(Path(out), images, all_prompts, records, "generate")
