"""DPO step-time benchmark (used by `scripts/bench.py dpo`).

Three variants, each in its own process (so peak memory is its own):
  bare    the irreducible work of a DPO step written in plain torch on pre-computed tensors: policy forward+backward
          on the 2B batch, reference forward on the 2B batch, optimizer step
  cached  the real recipe (`diffalign.train.dpo.train`) with the latent/embedding cache
  raw     the real recipe without the cache (VAE + text encoders run every step)
Recipe step time = (T(n2 steps) - T(n1 steps)) / (n2 - n1), so start-up and model loading cancel out; each variant
is timed in ROUNDS interleaved rounds and the fastest counts.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kit import bench_model, interleaved_rounds, memory_mb, train_seconds  # noqa: E402

PAIRS, BATCH, RESOLUTION = 96, 8, 32
STEPS = (10, 50)
ROUNDS = 3  # rounds of (bare, cached, raw) in turn; per variant the fastest round counts (noise only adds)


def _write_pairs(folder: Path) -> Path:
    """PAIRS preference pairs of toy-world scenes in the Pick-a-Pic schema (two renders of one caption each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffalign.gym.world import generate
    from diffalign.io import encode_image

    images, captions = generate(2 * PAIRS, seed=0, split="train")
    rows = {
        "caption": captions[0::2],
        "jpg_0": [encode_image(image) for image in images[0::2]],
        "jpg_1": [encode_image(image) for image in images[1::2]],
        "label_0": [1.0] * PAIRS,
    }
    path = folder / "pairs.parquet"
    pq.write_table(pa.table(rows), path)
    return path


def bare(folder: Path) -> dict:
    """Plain-torch DPO step on tensors already in memory."""
    import torch
    import torch.nn.functional as F

    from diffalign.models import load_family

    family = load_family(bench_model())
    params = family.add_lora(rank=8)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    unet = family.denoiser
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2 * BATCH, *family.latent_shape(1, RESOLUTION)[1:], generator=g)
    cond = family.encode_prompts(["a red circle on a black background"] * (2 * BATCH))["prompt_embeds"]
    alphas = family.alphas_cumprod

    def step():
        noise = torch.randn(latents[:BATCH].shape, generator=g).repeat(2, 1, 1, 1)
        t = torch.randint(0, 1000, (BATCH,), generator=g).repeat(2)
        a = alphas[t].reshape(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        with torch.no_grad():
            unet.disable_adapters()
            unet(noisy, t, encoder_hidden_states=cond)
            unet.enable_adapters()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(STEPS[1] - STEPS[0]):
        step()
    return {"step_s": (time.perf_counter() - start) / (STEPS[1] - STEPS[0]), "peak_mb": memory_mb("VmHWM")}


def _train(pairs: Path, out: Path, steps: int, cache: Path | None, method: str = "dpo", batch: int = BATCH) -> float:
    """Seconds for one in-process run of `steps` steps of the `method` recipe (a preference-pair method) with
    `batch` pairs a step."""
    overrides = [
        f"method={method}", f"model.name={bench_model()}", f"data.source={pairs}", f"output_dir={out}",
        f"batch_size={batch}", f"max_steps={steps}", "checkpoint_every=0", "report_to=none", "log_every=1000",
        f"model.resolution={RESOLUTION}", "lora.rank=8",
    ]  # fmt: skip
    return train_seconds([*overrides, *([f"data.cache_dir={cache}"] if cache is not None else [])])


def recipe(folder: Path, cached: bool) -> dict:
    """The real recipe, timed at two lengths (the cache, if any, is built by an untimed warm-up run)."""
    pairs = _write_pairs(folder)
    cache = folder / "cache" if cached else None
    _train(pairs, folder / "warm", 1, cache)
    short, long = (_train(pairs, folder / f"run{n}", n, cache) for n in STEPS)
    return {"step_s": (long - short) / (STEPS[1] - STEPS[0]), "peak_mb": memory_mb("VmHWM")}


def run_variant(name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if name == "bare":
            return bare(folder)
        return recipe(folder, cached=name == "cached")


def main() -> None:
    """Run the three variants in subprocesses and print their figures and ratios."""
    names = ("bare", "cached", "raw")
    found = interleaved_rounds(__file__, [[name] for name in names], ROUNDS)
    rounds = {name: found[(name,)] for name in names}
    results = {
        name: {"step_s": min(r["step_s"] for r in runs), "peak_mb": max(r["peak_mb"] for r in runs)}
        for name, runs in rounds.items()
    }
    print(f"dpo bench ({bench_model()}, {BATCH} pairs/step at {RESOLUTION}px, LoRA rank 8, CPU threads as set)")
    for name, runs in rounds.items():
        print(f"  {name:7s} rounds: " + ", ".join(f"{r['step_s'] * 1000:.1f}" for r in runs) + " ms/step")
    bare_s = results["bare"]["step_s"]
    for name, r in results.items():
        print(f"  {name:7s} {r['step_s'] * 1000:8.1f} ms/step   peak RSS {r['peak_mb']:7.0f} MB")
    print(f"  recipe (cached) / bare work: {results['cached']['step_s'] / bare_s:.3f}   (target <= 1.10)")
    print(f"  recipe without cache / with cache: {results['raw']['step_s'] / results['cached']['step_s']:.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(run_variant(sys.argv[1])))
    else:
        main()
