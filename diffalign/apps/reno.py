"""`diffalign reno`: ReNO (reward-based initial-noise optimisation) for a list of prompts, into a folder:

    <out>/initial/00000.png + 00000.txt ... initial.jsonl   the images of the initial noise (the model without ReNO)
    <out>/reno/00000.png + 00000.txt ...    reno.jsonl      the best image ReNO found per prompt
    <out>/multi_step/ and multi_step_initial/               with multi_step.model: the best and the initial noise
                                                            re-rendered by that model (the paper's multi_apply)
    <out>/history.jsonl                                     one line per prompt, iteration (and start): each reward
                                                            component, the weighted reward, K(z), |grad|, |z|
    <out>/summary.json                                      settings and per prompt: reward before/after, best iteration

Both image folders carry the sidecar prompt files `diffalign score` reads. Prompt i uses seed + i. Under `accelerate
launch -m diffalign reno` prompt i goes to process i % world; the main process gathers the results and writes the
folder (replaced only once complete).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffalign.errors import UserError
from diffalign.infer.configs import RenoConfig

TOY_STEPS = 4
"""ReNO on a bundled toy ('toy', 'toy-flow'): the proxy reward and 4 sampling steps at the toy's own CFG (the toys are
20-step models, not distilled ones: at 1 step their images are blurs at chance gold accuracy; see
docs/results/reno.md)."""
MARKER = "summary.json"


def reno_defaults(model: str) -> dict[str, Any]:
    """Reward spec, sampling steps and guidance scale ReNO uses for `model` unless given: on a toy its proxy, 4 steps
    and its own CFG, else the paper's (its reward mix, one step, no CFG: SD-Turbo, SDXL-Turbo and FLUX.1-schnell are
    distilled for that)."""
    from diffalign.hub import TOY_MODELS, resolve_model
    from diffalign.infer.configs import RENO_REWARD

    if model in TOY_MODELS:
        settings = json.loads((Path(resolve_model(model)) / "diffalign.json").read_text())
        return {"reward": "toy-clip", "num_steps": TOY_STEPS, "guidance_scale": settings["guidance_scale"]}
    return {"reward": RENO_REWARD, "num_steps": 1, "guidance_scale": 1.0}


def for_model(config: RenoConfig) -> RenoConfig:
    """`config` with the reward, steps and CFG its model takes unless given (`reno_defaults`)."""
    defaults = reno_defaults(config.model)
    unset = {key: value for key, value in defaults.items() if getattr(config, key) is None}
    return dataclasses.replace(config, **unset)


def run_reno(config: RenoConfig, prompts: Sequence[str], out: str | Path, progress: bool = True) -> dict | None:
    """`diffalign reno` with the settings `config` (see the module docstring). Every input is checked before the
    model loads. Returns the summary on the main process (None on the others)."""
    from diffalign.infer.reno import check
    from diffalign.io import atomic_dir, check_replaceable
    from diffalign.processes import gather_to_all, process_info
    from diffalign.rewards import parse_differentiable_spec

    cfg = for_model(config)
    parse_differentiable_spec(cfg.reward, "reno --reward")
    check(cfg)
    if not prompts:
        raise UserError("give at least one --prompt or a --prompts file")
    out = Path(out)
    check_replaceable(out, MARKER)
    info = process_info()
    device = cfg.device or info.device
    dtype = cfg.dtype or ("float16" if device.startswith("cuda") else "float32")
    cfg = dataclasses.replace(cfg, device=device, dtype=dtype)
    share = list(range(info.rank, len(prompts), info.world))
    if info.world > 1:
        print(f"rank {info.rank}/{info.world}: {len(share)} prompts", file=sys.stderr)
    part = optimise_share(cfg, prompts, share, progress and info.is_main)
    parts = gather_to_all(part, info)
    if not info.is_main:
        return None
    merged = merge_shares(parts, len(prompts))
    with atomic_dir(out, marker=MARKER) as work:
        summary = write_outputs(work, prompts, merged, part["settings"])
    print_table(summary)
    return summary


def optimise_share(cfg: RenoConfig, prompts: Sequence[str], share: list[int], progress: bool) -> dict[str, Any]:
    """Run ReNO on prompts[share]; returns what the main process needs (uint8 images, rewards, history) and the
    settings with every default resolved."""
    from diffalign.apps.score import progress_bar
    from diffalign.infer.reno import reno, resolved
    from diffalign.io import quantize
    from diffalign.models import load_family

    family = load_family(cfg.model, dtype=cfg.dtype, device=cfg.device)
    if not share:
        return {"indices": [], "history": [], "settings": dataclasses.asdict(resolved(cfg, family))}
    total = -(-len(share) // cfg.batch_size) * cfg.iters
    with progress_bar(total, progress and sys.stderr.isatty(), label="ReNO iterations") as advance:
        result = reno(
            family, [prompts[i] for i in share], config=cfg, seeds=[cfg.seed + i for i in share], on_progress=advance
        )
    for record in result.history:
        record["prompt"] = share[record["prompt"]]
    rendered = {}
    if result.multi_step_images is not None:
        rendered = {
            "multi_step": quantize(result.multi_step_images),
            "multi_step_initial": quantize(result.multi_step_initial_images),
        }
    return {
        "indices": share,
        "initial": quantize(result.initial_images),
        "best": quantize(result.images),
        **rendered,
        "initial_reward": result.initial_reward,
        "best_reward": result.best_reward,
        "best_iteration": result.best_iteration,
        "best_start": result.best_start,
        "history": result.history,
        "settings": result.settings,
    }


def merge_shares(parts: list[dict[str, Any]], count: int) -> dict[str, Any]:
    """The shares of every process in prompt order."""
    import torch

    position = {}
    for n, part in enumerate(parts):
        for k, index in enumerate(part["indices"]):
            position[index] = (n, k)
    if sorted(position) != list(range(count)):
        raise RuntimeError("reno: the processes' shares do not cover every prompt once")
    order = [position[i] for i in range(count)]
    merged: dict[str, Any] = {}
    for key in ("initial", "best", "multi_step", "multi_step_initial"):
        if key in parts[order[0][0]]:
            merged[key] = torch.stack([parts[n][key][k] for n, k in order]).float() / 255
    for key in ("initial_reward", "best_reward", "best_iteration", "best_start"):
        merged[key] = [parts[n][key][k] for n, k in order]
    history = [record for part in parts for record in part["history"]]
    merged["history"] = sorted(history, key=lambda r: (r["prompt"], r["start"], r["iteration"]))
    return merged


def write_outputs(work: Path, prompts: Sequence[str], merged: dict[str, Any], settings: dict) -> dict[str, Any]:
    """The two image folders, history.jsonl and summary.json in `work`; returns the summary."""
    from diffalign.apps.generate import write_images
    from diffalign.io import write_text_atomic

    seeds = [settings["seed"] + i for i in range(len(prompts))]
    per_prompt = [
        {
            "prompt": prompt,
            "seed": seeds[i],
            "reward_before": merged["initial_reward"][i],
            "reward_after": merged["best_reward"][i],
            "best_iteration": merged["best_iteration"][i],
            "best_start": merged["best_start"][i],
        }
        for i, prompt in enumerate(prompts)
    ]
    common = {
        "model": settings["model"], "reward_spec": settings["reward"], "num_steps": settings["num_steps"],
        "guidance_scale": settings["guidance_scale"],
    }  # fmt: skip
    initial = [{"seed": s, "reward": r["reward_before"], **common} for s, r in zip(seeds, per_prompt, strict=True)]
    best = [
        {"seed": s, "reward": r["reward_after"], "iteration": r["best_iteration"], "start": r["best_start"], **common}
        for s, r in zip(seeds, per_prompt, strict=True)
    ]
    write_images(work / "initial", merged["initial"], prompts, initial, "initial")
    write_images(work / "reno", merged["best"], prompts, best, "reno")
    if "multi_step" in merged:
        rendered = settings["multi_step"]
        for key, rows in (("multi_step", best), ("multi_step_initial", initial)):
            write_images(work / key, merged[key], prompts, [{**r, "rendered_by": rendered} for r in rows], key)
    lines = [json.dumps(history_row(record, prompts)) + "\n" for record in merged["history"]]
    write_text_atomic(work / "history.jsonl", "".join(lines))
    summary = {"settings": settings, "prompts": per_prompt}
    write_text_atomic(work / MARKER, json.dumps(summary, indent=2))
    return summary


def history_row(record: dict[str, Any], prompts: Sequence[str]) -> dict[str, Any]:
    """One line of history.jsonl: prompt_index, prompt, start, iteration, reward (weighted), each reward component
    (unweighted), regulariser, grad_norm, noise_norm."""
    index = record["prompt"]
    head = {"prompt_index": index, "prompt": prompts[index], "start": record["start"], "iteration": record["iteration"]}
    tail = {k: record[k] for k in ("regulariser", "grad_norm", "noise_norm")}
    return {**head, "reward": record["reward"], **record["rewards"], **tail}


def print_table(summary: dict[str, Any]) -> None:
    """The before/after table: per prompt the weighted reward of the initial and of the best image."""
    from rich.console import Console
    from rich.table import Table

    rows = summary["prompts"]
    table = Table(title=f"ReNO with {summary['settings']['reward']}")
    for column in ("#", "prompt", "reward before", "reward after", "gain", "best iteration"):
        table.add_column(column, justify="left" if column == "prompt" else "right", overflow="fold")
    for i, row in enumerate(rows):
        gain = row["reward_after"] - row["reward_before"]
        table.add_row(
            str(i), row["prompt"], f"{row['reward_before']:.4g}", f"{row['reward_after']:.4g}", f"{gain:+.4g}",
            str(row["best_iteration"]),
        )  # fmt: skip
    before = sum(r["reward_before"] for r in rows) / len(rows)
    after = sum(r["reward_after"] for r in rows) / len(rows)
    table.add_row("", "mean", f"{before:.4g}", f"{after:.4g}", f"{after - before:+.4g}", "")
    Console(width=max(120, Console().width)).print(table)
