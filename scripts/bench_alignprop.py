"""AlignProp benchmark (used by `scripts/bench.py alignprop`): memory against the number of sampling steps, and the
time per sample against the bare work. Every variant runs in its own process (so its peak memory is its own).

  memory N   the recipe's step (`alignprop_step`: checkpointed sampler and VAE decode, truncation last_k K) at N
             sampling steps: peak RSS of the steps (VmHWM reset after a warm-up step) above the RSS before them, and
             the bytes autograd keeps for the backward pass outside the checkpoints. Target: N=50 / N=10 <= 1.10.
  bare       the irreducible work in plain torch on the same model: N - K no-grad CFG denoiser calls, K with grad
             (no checkpointing), VAE decode, reward, backward through all of it, AdamW step
  recipe     the real recipe (`diffalign.train.alignprop.train`), step time = (T(n2 steps) - T(n1 steps)) / (n2 - n1),
             so start-up and model loading cancel out. Target: recipe / bare <= 1.15.
Time variants run in ROUNDS interleaved rounds; per variant the fastest counts (noise on a shared machine only adds).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kit import bench_model, interleaved_rounds, memory_mb, reset_peak, run_variant, train_seconds  # noqa: E402

BATCH, K, TIME_STEPS, MEMORY_STEPS = 4, 1, 20, (10, 50)
RECIPE_LENGTHS = (3, 13)
ROUNDS = 3
PROMPTS = ["a red square on a black background", "a green circle on a gray background"]


def _setup():
    import torch

    from diffalign.models import load_family
    from diffalign.rewards import load_reward

    torch.manual_seed(0)
    family = load_family(bench_model())
    params = family.add_lora(rank=4)
    reward = load_reward("toy-clip")
    with torch.no_grad():
        uncond = family.encode_negative()
    return family, params, reward, uncond


def memory(num_steps: int) -> dict:
    """Peak memory of three recipe steps (forward, backward, optimizer) at `num_steps` sampling steps."""
    import torch

    from diffalign.train.alignprop import AlignPropConfig, alignprop_step
    from diffalign.train.sampler import Sampler

    family, params, reward, uncond = _setup()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    cfg = AlignPropConfig(reward="toy-clip", k=K)
    defaults = family.sampling_defaults
    sampler = Sampler(num_steps, defaults["guidance_scale"], 0.0, defaults["resolution"])
    generator = torch.Generator().manual_seed(0)
    prompts = (PROMPTS * BATCH)[:BATCH]
    saved = {"now": 0, "peak": 0}

    def pack(tensor):
        saved["now"] += tensor.numel() * tensor.element_size()
        saved["peak"] = max(saved["peak"], saved["now"])
        return tensor

    def step(count_saved: bool) -> None:
        saved["now"] = 0
        if count_saved:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss, _ = alignprop_step(family, prompts, reward, cfg, sampler, generator, uncond)
        else:
            loss, _ = alignprop_step(family, prompts, reward, cfg, sampler, generator, uncond)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step(False)  # warm-up: allocator pools, optimizer state
    before = memory_mb("VmRSS")
    reset = reset_peak()
    for _ in range(3):
        step(False)
    peak = memory_mb("VmHWM")
    step(True)
    return {"peak_mb": peak, "above_mb": peak - before, "reset": reset, "saved_mb": saved["peak"] / 2**20}


def bare(folder: Path) -> dict:
    """Seconds per step of the plain-torch work (see the module docstring)."""
    import torch

    family, params, reward, uncond = _setup()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    unet, vae = family.denoiser, family.vae
    guidance = family.sampling_defaults["guidance_scale"]
    prompts = (PROMPTS * BATCH)[:BATCH]
    with torch.no_grad():
        cond = family.encode_prompts(prompts)["prompt_embeds"]
    both = torch.cat([uncond["prompt_embeds"].expand_as(cond), cond])
    family.ddim.set_timesteps(TIME_STEPS)
    timesteps = family.ddim.timesteps
    alphas = family.alphas_cumprod
    generator = torch.Generator().manual_seed(0)
    scale = vae.config.scaling_factor

    def denoise_step(x, i):
        t = timesteps[i]
        eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample.chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        a = alphas[t]
        a_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

    def step() -> None:
        x = torch.randn(family.latent_shape(BATCH, family.sampling_defaults["resolution"]), generator=generator)
        with torch.no_grad():
            for i in range(TIME_STEPS - K):
                x = denoise_step(x, i)
        for i in range(TIME_STEPS - K, TIME_STEPS):
            x = denoise_step(x, i)
        images = (vae.decode(x / scale).sample / 2 + 0.5).clamp(0, 1)
        loss = -reward(images, prompts).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    start = time.perf_counter()
    count = RECIPE_LENGTHS[1] - RECIPE_LENGTHS[0]
    for _ in range(count):
        step()
    return {"step_s": (time.perf_counter() - start) / count}


def _train(out: Path, steps: int) -> float:
    """Seconds for one in-process recipe run of `steps` steps."""
    overrides = [
        "method=alignprop",
        f"model.name={bench_model()}",
        "alignprop.reward=toy-clip",
        f"alignprop.num_steps={TIME_STEPS}",
        "alignprop.eta=0",
        f"alignprop.k={K}",
        f"data.prompts=[{','.join(PROMPTS)}]",
        f"output_dir={out}",
        f"batch_size={BATCH}",
        f"max_steps={steps}",
        "checkpoint_every=0",
        "report_to=none",
        "log_every=1000",
        "lora.rank=4",
    ]
    return train_seconds(overrides)


def recipe(folder: Path) -> dict:
    """The real recipe, timed at two lengths."""
    _train(folder / "warm", 1)
    short, long = (_train(folder / f"run{n}", n) for n in RECIPE_LENGTHS)
    return {"step_s": (long - short) / (RECIPE_LENGTHS[1] - RECIPE_LENGTHS[0])}


def variant(name: str, arg: str | None) -> dict:
    if name == "memory":
        return memory(int(arg))
    with tempfile.TemporaryDirectory() as tmp:
        return bare(Path(tmp)) if name == "bare" else recipe(Path(tmp))


def main() -> None:
    """Run the variants in subprocesses and print their figures and ratios."""
    import torch

    print(
        f"alignprop bench ({bench_model()}, batch {BATCH}, K = {K}, LoRA rank 4, CFG, {torch.get_num_threads()} torch "
        "threads; peak memory of 3 steps after a warm-up step)"
    )
    mem = {n: run_variant(__file__, "memory", str(n)) for n in MEMORY_STEPS}
    for n, m in mem.items():
        print(
            f"  N = {n:2d} sampling steps: peak RSS {m['peak_mb']:7.0f} MB, {m['above_mb']:6.1f} MB above the RSS "
            f"before the steps{'' if m['reset'] else ' (peak not resettable here)'}; kept for backward outside the "
            f"checkpoints {m['saved_mb']:.3f} MB"
        )
    low, high = (mem[n] for n in MEMORY_STEPS)
    ratio = high["peak_mb"] / low["peak_mb"]
    print(f"  peak RSS N={MEMORY_STEPS[1]} / N={MEMORY_STEPS[0]}: {ratio:.3f}   (target <= 1.10)")
    print(f"  growth above the pre-step RSS: {low['above_mb']:.1f} MB -> {high['above_mb']:.1f} MB")
    found = interleaved_rounds(__file__, [["bare"], ["recipe"]], ROUNDS)
    rounds = {name: found[(name,)] for name in ("bare", "recipe")}
    best = {name: min(r["step_s"] for r in runs) for name, runs in rounds.items()}
    for name, runs in rounds.items():
        per_sample = ", ".join(f"{r['step_s'] / BATCH * 1000:.0f}" for r in runs)
        print(f"  {name:6s} ms/sample at N = {TIME_STEPS}, rounds: {per_sample}; best {best[name] / BATCH * 1000:.0f}")
    print(f"  recipe / bare work: {best['recipe'] / best['bare']:.3f}   (target <= 1.15)")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(variant(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)))
    else:
        main()
