"""Benchmarks that print figures (never timed tests). Offline, CPU-friendly, each under ~2 minutes.

    python scripts/bench.py score     # `diffalign score` end to end vs the bare reward forward (target ratio >= 0.8)
    python scripts/bench.py dpo       # DPO step time vs the bare work (scripts/bench_dpo.py)
    python scripts/bench.py inpo      # InPO step vs a DPO step + the bare inversion forwards (scripts/bench_inpo.py)
    python scripts/bench.py alignprop # AlignProp memory vs sampling steps, time vs the bare work (bench_alignprop.py)
    python scripts/bench.py reno      # ReNO iteration time vs the bare work, peak memory, images/min (bench_reno.py)
    python scripts/bench.py grpo      # GRPO rollout and update vs the bare work (bench_grpo.py, targets <= 1.10)
    python scripts/bench.py nft       # NFT rollout and update vs the bare work (bench_nft.py, <= 1.05 / 1.10)
    python scripts/bench.py rlg       # RLG sampling time vs plain CFG sampling (scripts/bench_rlg.py, target <= 2.10)
    python scripts/bench.py all       # every bench, in order

A method's bench is scripts/bench_<name>.py with a main(), run when its record in `diffalign.methods.METHODS` says
`bench=True`; another bench is a function printing its figures, registered in BENCHES.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffalign.methods import METHODS  # noqa: E402

SCORE_IMAGES, SCORE_SIZE, SCORE_BATCH, SCORE_ROUNDS = 128, 256, 32, 3
SCORE_WORDS = "a photo of red green blue circle square triangle on white black background".split()


# ------------------------------------------------------------------------------------------------------- score
def write_bench_clip(folder: Path) -> Path:
    """A small CLIP (ViT 384 wide, 6 layers, patch 16, 224 px input) saved like a hub model, random weights."""
    import torch

    from diffalign.models.tiny import clip_model, clip_tokenizer, save_clip_folder
    from diffalign.rewards.base import CLIP_MEAN, CLIP_STD

    tokenizer = clip_tokenizer(SCORE_WORDS)
    torch.manual_seed(0)
    # ViT-S/16-sized vision tower (6 of its 12 layers): still ~20x lighter than the ViT-L/H of real rewards
    model = clip_model(
        tokenizer, text=(128, 2, 2), vision=(384, 6, 6), image_size=224, patch_size=16, projection_dim=128, mlp_ratio=4
    )
    return save_clip_folder(folder, model, tokenizer, 224, CLIP_MEAN, CLIP_STD)


def write_bench_images(folder: Path, count: int, size: int) -> list[Path]:
    """`count` smooth-noise PNGs of size x size with sidecar prompts."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        low = rng.random((8, 8, 3))
        image = np.kron(low, np.ones((size // 8, size // 8, 1))) + 0.1 * rng.random((size, size, 3))
        path = folder / f"{i:04d}.png"
        Image.fromarray((image.clip(0, 1) * 255).astype(np.uint8)).save(path)
        (folder / f"{i:04d}.txt").write_text(SCORE_WORDS[i % len(SCORE_WORDS)] + " circle")
        paths.append(path)
    return paths


def bare_rate(reward, images, prompts: list[str], batch_size: int) -> float:
    """Images/s of the reward forward alone on images already decoded into float tensors [N, 3, H, W]."""
    import torch

    with torch.no_grad():
        started = time.perf_counter()
        for start in range(0, len(images), batch_size):
            reward(images[start : start + batch_size], prompts[start : start + batch_size])
    return len(images) / (time.perf_counter() - started)


def bench_score() -> None:
    """`diffalign score` throughput (decoding + batching + reward + output) vs the bare forward, in paired rounds."""
    import torch

    from diffalign.apps.score import make_loader, run_score
    from diffalign.data.images import assign_prompts, decode_image
    from diffalign.rewards import load_reward

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clip = write_bench_clip(root / "clip")
        paths = write_bench_images(root / "images", SCORE_IMAGES, SCORE_SIZE)
        spec = f"clip:model={clip}"
        prompts = [p or "" for p in assign_prompts(paths)]
        reward = load_reward(spec)
        images = torch.stack([decode_image(p) for p in paths]).float() / 255
        bare_rate(reward, images[:SCORE_BATCH], prompts, SCORE_BATCH)  # warm-up

        def end_to_end(workers: int | None = None) -> float:
            result = run_score(
                [str(root / "images")],
                spec,
                batch_size=SCORE_BATCH,
                out=root / "scores.csv",
                progress=False,
                workers=workers,
            )
            return len(result.rows) / result.seconds

        bare_rates, score_rates = [], []
        for round_ in range(SCORE_ROUNDS):  # paired rounds, order alternating: the machine may be shared
            if round_ % 2:
                score_rates.append(end_to_end())
            bare_rates.append(bare_rate(reward, images, prompts, SCORE_BATCH))
            if not round_ % 2:
                score_rates.append(end_to_end())
        started = time.perf_counter()
        for _ in make_loader(paths, range(len(paths)), SCORE_BATCH, workers=0):
            pass
        decode_rate = len(paths) / (time.perf_counter() - started)
        ratios = sorted(s / b for s, b in zip(score_rates, bare_rates, strict=True))
        one_worker = end_to_end(workers=1) / bare_rate(reward, images, prompts, SCORE_BATCH)
        started = time.perf_counter()
        command = ["-m", "diffalign", "score", str(root / "images"), "--reward", spec, "--out", str(root / "cli.csv")]
        cli = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=ROOT)
        cli_seconds = time.perf_counter() - started
        if cli.returncode != 0:
            raise SystemExit(cli.stderr)

    rates = lambda values: ", ".join(f"{v:.1f}" for v in values)  # noqa: E731
    print(
        f"score bench: {SCORE_IMAGES} PNGs {SCORE_SIZE}x{SCORE_SIZE} -> small CLIP (ViT-S/16-sized, 6 layers) at "
        f"224 px, batch {SCORE_BATCH}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores, "
        f"{SCORE_ROUNDS} paired rounds"
    )
    print(f"  bare reward forward (decoded tensors) images/s: {rates(bare_rates)}")
    print(f"  diffalign score (decode + score)      images/s: {rates(score_rates)}")
    print(f"  ratio end-to-end / bare: median {ratios[len(ratios) // 2]:.3f}, best {ratios[-1]:.3f}   (target >= 0.8)")
    print(
        f"  decoding alone (the DataLoader, no reward): {decode_rate:.0f} images/s = "
        f"{decode_rate / max(bare_rates):.0f}x the best bare reward rate"
    )
    print(f"  ratio with --workers 1 (a decoding process beside torch's CPU threads): {one_worker:.3f}")
    print(f"  CLI wall time incl. start-up and model load: {cli_seconds:.1f} s for {SCORE_IMAGES} images")


# ----------------------------------------------------------------------------------------------------- methods
METHOD_BENCHES = tuple(name for name, method in METHODS.items() if method.bench)
"""Benches in their own scripts/bench_<name>.py (each with a main() printing its figures)."""


def method_bench(name: str) -> Callable[[], None]:
    """The main() of scripts/bench_<name>.py, imported when it runs."""

    def run() -> None:
        import importlib

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        importlib.import_module(f"bench_{name}").main()

    return run


BENCHES: dict[str, Callable[[], None]] = {"score": bench_score, **{n: method_bench(n) for n in METHOD_BENCHES}}


def main() -> None:
    """Run one bench by name, or `all`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=[*BENCHES, "all"], help="which benchmark to run")
    args = parser.parse_args()
    for name, bench in BENCHES.items():
        if args.bench in (name, "all"):
            bench()


if __name__ == "__main__":
    main()
