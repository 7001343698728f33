"""What the benches share: the model they run on, this process's memory, a variant run in a fresh process, and
interleaved rounds. Each `bench_<method>.py` times only its method's work against the bare torch work."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def bench_model() -> str:
    """The bundled toy model, or the tiny SD pipeline where its assets are absent."""
    from diffalign.hub import TOY_MODEL_DIR

    return "toy" if (TOY_MODEL_DIR / "model_index.json").is_file() else "tiny-sd"


def memory_mb(field: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MB. Where /proc has none, the peak from getrusage (ru_maxrss
    survives exec, so it is the parent's peak when that was larger)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_variant(script: str, *args: str) -> dict:
    """`python script args...` in a fresh process (so its peak memory is its own); the JSON of its last line."""
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{Path(script).name} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved_rounds(script: str, variants: Sequence[Sequence[str]], rounds: int) -> dict[tuple, list[dict]]:
    """Each variant (its command-line arguments) once per round, in turn, each in a fresh process: a slow spell of
    a shared machine hits every variant alike. {variant: [figures of each round]}."""
    results: dict[tuple, list[dict]] = {tuple(v): [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            results[tuple(variant)].append(run_variant(script, *variant))
    return results


def train_seconds(overrides: list[str]) -> float:
    """Seconds of one in-process `diffalign train` with `overrides` (they name the method)."""
    import time

    from diffalign.processes import reset_accelerate_state
    from diffalign.train import load_train_config, train

    started = time.perf_counter()
    reset_accelerate_state()
    try:
        train(load_train_config(None, overrides))
    finally:
        reset_accelerate_state()
    return time.perf_counter() - started


def alternate(runs: dict, rounds: int) -> dict[str, list[float]]:
    """In this process, each of `runs` ({name: function() -> seconds}) once per round, the order reversed every other
    round (so a trend of the machine's speed hits all alike); {name: [seconds of each round]}."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds):
        for name in list(runs) if round_ % 2 == 0 else list(reversed(runs)):
            times[name].append(runs[name]())
    return times


def rollout_bench_setup(images: int, chunk: int):
    """What the online-RL benches (grpo, nft) start from: the toy with a rank-8 LoRA (random non-zero B) whose LoRA
    weights alone train, `images` training prompts (8 distinct) encoded once with the negative prompt, the toy's CFG
    scale, and the image indices in chunks of `chunk`. Returns (family, prompts, cond, uncond, guidance, chunks)."""
    import torch
    from bench_rlg import lora_family

    from diffalign.gym.world import train_prompts

    family = lora_family()
    for name, p in family.denoiser.named_parameters():
        p.requires_grad_("lora_" in name)
    prompts = [train_prompts()[i % 8] for i in range(images)]
    cond, uncond = family.encode_prompts(prompts), family.encode_negative()
    guidance = family.sampling_defaults["guidance_scale"]
    return family, prompts, cond, uncond, guidance, torch.arange(images).split(chunk)
