"""The GPU check: every method's CUDA path in one short run (`scripts/gpu_check.sh`, which installs the carried wheels
first on the GPU machine; `--cpu` runs the same matrix here, in the test suite).

    bash scripts/gpu_check.sh [--cpu] [--out runs/gpu-check]

Items (each one on its own: a failure is recorded with its error line and the next item runs):
  train/<method>/<config>   every shipped config of every training method (`diffalign.smoke`: a toy's config on the
                            toy, a real model's on the tiny model of its family) for 3 optimizer steps (1 on CPU) with
                            gradient checkpointing, under bf16 autocast on a GPU (on CPU as the contract tests run them:
                            float32, SD 1.5's config in bf16); then its LoRA loads whole into a stock pipeline
  <inference method>/<toy>  ReNO: 3 iterations on each toy; RLG: 2 images mixing the base with train/dpo/toy's LoRA
  generate/toy, score/toy   the CLI end to end (on a GPU also in float16, the VAE upcast path)
  attention/sdpa            the toy denoiser with torch SDPA against diffusers' classic attention, same output
  attention/xformers        train/dpo/toy with `attention: xformers` (CUDA with xformers only)
  fsdp2, deepspeed-zero2    a full fine-tune of the toy through `accelerate launch` with configs/accelerate/{fsdp,
                            deepspeed_zero2}.yaml on 1 process (CUDA only; DeepSpeed only where it imports)
Each item's status (pass / fail / skipped, with the reason), error line, seconds, seconds per optimizer step and peak
CUDA memory go to <out>/gpu_check.json and a table in <out>/gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRAIN_STEPS = {"cuda": 3, "cpu": 1}
"""Optimizer steps of a train item: a few on the GPU, one on the CPU (the suite's time)."""
INFERENCE_ITEMS = {"reno": ("toy", "toy-flow"), "rlg": ("toy",)}
"""The toys each inference method's items run on (a method missing here is an item that fails, loudly)."""


class Skip(Exception):
    """An item that cannot run on this machine, with the reason."""


@dataclass
class Item:
    """One line of the check."""

    name: str
    method: str | None = None
    status: str = "pass"
    error: str | None = None
    seconds: float = 0.0
    seconds_per_step: float | None = None
    peak_cuda_mib: float | None = None
    notes: dict = field(default_factory=dict)


@dataclass
class Check:
    """Where the check runs and writes."""

    cuda: bool
    work: Path
    data: dict
    loras: dict = field(default_factory=dict)
    """train item name -> its LoRA folder (RLG uses the DPO toy LoRA)."""

    @property
    def steps(self) -> int:
        """Optimizer steps of a train item here."""
        return TRAIN_STEPS["cuda" if self.cuda else "cpu"]


def one_line(error: BaseException) -> str:
    """The error's last line, as a user would quote it."""
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[-1][:400] if text else type(error).__name__


def run_item(item: Item, work: Callable[[], dict | None], cuda: bool) -> Item:
    """Run `work` as `item`: pass with what it returns (notes, seconds_per_step), skipped, or fail with its error."""
    import torch

    from diffalign.processes import reset_accelerate_state

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    reset_accelerate_state()
    try:
        notes = work() or {}
        item.seconds_per_step = notes.pop("seconds_per_step", None)
        item.notes = notes
    except Skip as e:
        item.status, item.error = "skipped", str(e)
    except Exception as e:  # noqa: BLE001 - the check records every failure and goes on
        item.status, item.error = "fail", one_line(e)
        item.notes = {"traceback": traceback.format_exc()[-2000:]}
    finally:
        reset_accelerate_state()
    item.seconds = round(time.perf_counter() - started, 2)
    if cuda:
        item.peak_cuda_mib = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return item


def cli(*args: str) -> None:
    """`diffalign ARGS` in this process; a non-zero exit is an error with its last stderr line."""
    import contextlib
    import io

    from diffalign.cli import main

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    if code != 0:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        raise RuntimeError(f"diffalign {args[0]} exited {code}: {lines[-1] if lines else ''}")


def train_work(check: Check, method: str, name: str, *extra: str) -> Callable[[], dict]:
    """Train the shipped config `name` of `method` on its smoke model, then load the LoRA into a stock pipeline."""

    def work() -> dict:
        from diffalign.hub import CONFIGS_DIR
        from diffalign.smoke import MODEL_OF_CONFIG, lora_loads_whole, smoke_overrides, stock_pipeline
        from diffalign.train import load_train_config, train

        config, model = CONFIGS_DIR / method / f"{name}.yaml", MODEL_OF_CONFIG[name]
        out = check.work / "train" / method / name
        if check.cuda:
            precision = ["mixed_precision=bf16"]
        else:  # as the contract tests: bf16 autocast is 6x slower on CPU, so only SD 1.5's config keeps it
            precision = [] if name == "sd15" else ["mixed_precision=no", "model.dtype=float32"]
        overrides = smoke_overrides(
            config, model, out, check.data, f"max_steps={check.steps}", "checkpoint_every=0",
            "gradient_checkpointing=true", "validation.enabled=false", *precision, *extra,
        )  # fmt: skip
        resolved = load_train_config(config, overrides)
        final = train(resolved)
        summary = json.loads((out / "summary.json").read_text())
        wrong = lora_loads_whole(stock_pipeline(model), final)
        if wrong:
            raise RuntimeError(f"the LoRA did not load whole into a stock pipeline: {len(wrong)} keys, e.g. {wrong[0]}")
        check.loras[f"{method}/{name}"] = final
        return {
            "seconds_per_step": round(summary["seconds"] / max(1, summary["steps_run"]), 3),
            "mixed_precision": resolved.mixed_precision, "model_dtype": resolved.model.dtype,
        }  # fmt: skip

    return work


def inference_work(check: Check, method: str, toy: str) -> Callable[[], dict]:
    """A few iterations / images of an inference method on a toy, through the CLI."""

    def work() -> dict:
        out = check.work / method / toy
        if method == "reno":
            cli("reno", "-p", "a red circle on a black background", "--model", toy, "--out", str(out), "iters=3")
        elif method == "rlg":
            lora = check.loras.get(f"dpo/{toy}")
            if lora is None:
                raise RuntimeError(f"no LoRA to guide with: train/dpo/{toy} did not pass")
            cli(
                "generate", "-p", "a red circle on a black background", "--model", toy, "--lora", str(lora),
                "--rlg-scale", "2", "-n", "2", "--steps", "4", "--out", str(out),
            )  # fmt: skip
        else:
            raise RuntimeError(f"the GPU check has no item for inference method {method!r}: add it to INFERENCE_ITEMS")
        return {}

    return work


def generate_work(check: Check, dtype: str) -> Callable[[], dict]:
    def work() -> dict:
        if dtype == "float16" and not check.cuda:
            raise Skip("float16 (the VAE upcast path) runs on a GPU only")
        out = check.work / f"generate-{dtype}"
        device = "cuda" if check.cuda else "cpu"
        cli(
            "generate", "-p", "a red circle on a black background", "--model", "toy", "-n", "4", "--steps", "4",
            "--out", str(out), "--device", device, "--dtype", dtype,
        )  # fmt: skip
        return {"images": len(list(out.glob("*.png")))}

    return work


def score_work(check: Check) -> dict:
    images = check.work / "generate-float32"
    if not list(images.glob("*.png")):
        raise RuntimeError("no images to score: generate/toy did not pass")
    out = check.work / "scores.csv"
    cli("score", str(images), "--reward", "toy-clip", "--out", str(out))
    return {"rows": len(out.read_text().splitlines()) - 1}


def sdpa_work(check: Check) -> dict:
    """The toy UNet's output with torch SDPA (diffusers' default) against its classic attention processor."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from diffalign.models import load_family

    family = load_family("toy", device="cuda" if check.cuda else "cpu")
    unet = family.denoiser
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0)).to(family.device)
    cond = family.encode_prompts(["a red circle", "a blue square"])
    t = torch.tensor([500, 500], device=family.device)
    outputs = {}
    for name, processor in (("sdpa", AttnProcessor2_0()), ("classic", AttnProcessor())):
        unet.set_attn_processor(processor)
        with torch.no_grad(), torch.autocast(family.device.type, torch.bfloat16, enabled=check.cuda):
            outputs[name] = family.denoise(x, t, cond).float()
    difference = float((outputs["sdpa"] - outputs["classic"]).abs().max())
    if difference > (5e-2 if check.cuda else 1e-4):
        raise RuntimeError(f"SDPA and classic attention differ by {difference:.3g}")
    return {"max_abs_difference": difference}


def xformers_work(check: Check) -> Callable[[], dict]:
    def work() -> dict:
        import importlib.util

        if not check.cuda:
            raise Skip("xformers runs on CUDA only")
        if importlib.util.find_spec("xformers") is None:
            raise Skip("xformers is not installed (its wheel is larger than the 64 MiB that travels to the GPU)")
        return train_work(check, "dpo", "toy", "attention=xformers")()

    return work


def launched_work(check: Check, name: str, accelerate_config: str, module: str | None) -> Callable[[], dict]:
    """A full fine-tune of the toy (DPO, a few steps) through `accelerate launch` with a shipped accelerate config."""

    def work() -> dict:
        import importlib.util

        if not check.cuda:
            raise Skip(f"configs/accelerate/{accelerate_config} is for GPUs (use_cpu: false)")
        if module is not None and importlib.util.find_spec(module) is None:
            raise Skip(f"{module} is not installed here")
        from diffalign.hub import CONFIGS_DIR
        from diffalign.smoke import smoke_overrides

        config = CONFIGS_DIR / "dpo" / "toy.yaml"
        out = check.work / name
        overrides = smoke_overrides(
            config, "toy", out, check.data, f"max_steps={check.steps}", "checkpoint_every=0", "lora.enabled=false",
            "validation.enabled=false", "mixed_precision=bf16", "optim.optimizer=adamw",
        )  # fmt: skip
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(CONFIGS_DIR / "accelerate" / accelerate_config), "--num_processes", "1",
            *(["--gradient_accumulation_steps", "1"] if module == "deepspeed" else []),
            "-m", "diffalign", "train", str(config), *overrides,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            raise RuntimeError(f"accelerate launch exited {result.returncode}: {lines[-1] if lines else ''}")
        summary = json.loads((out / "summary.json").read_text())
        return {"seconds_per_step": round(summary["seconds"] / max(1, summary["steps_run"]), 3)}

    return work


def plan(check: Check) -> list[tuple[Item, Callable[[], dict | None]]]:
    """Every item, in the order they run (train items first: RLG guides with the DPO toy LoRA)."""
    from diffalign.methods import METHODS
    from diffalign.smoke import shipped_configs

    items = [(Item(f"train/{m}/{n}", method=m), train_work(check, m, n)) for m, n in shipped_configs()]
    for name, method in METHODS.items():
        if not method.trains:
            for toy in INFERENCE_ITEMS.get(name, ("toy",)):
                items.append((Item(f"{name}/{toy}", method=name), inference_work(check, name, toy)))
    items += [
        (Item("generate/toy"), generate_work(check, "float32")),
        (Item("generate/toy-float16"), generate_work(check, "float16")),
        (Item("score/toy"), lambda: score_work(check)),
        (Item("attention/sdpa"), lambda: sdpa_work(check)),
        (Item("attention/xformers"), xformers_work(check)),
        (Item("fsdp2"), launched_work(check, "fsdp2", "fsdp.yaml", None)),
        (Item("deepspeed-zero2"), launched_work(check, "deepspeed-zero2", "deepspeed_zero2.yaml", "deepspeed")),
    ]
    return items


def table(items: list[Item]) -> str:
    """The check as a Markdown table."""
    rows = ["| item | status | s | s/step | peak CUDA MiB | error or reason |", "|---|---|---|---|---|---|"]
    for i in items:
        step = "" if i.seconds_per_step is None else f"{i.seconds_per_step:.3f}"
        peak = "" if i.peak_cuda_mib is None else f"{i.peak_cuda_mib:.0f}"
        error = (i.error or "").replace("|", "/")
        rows.append(f"| {i.name} | {i.status} | {i.seconds:.1f} | {step} | {peak} | {error} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run the matrix on the CPU (CUDA-only items skipped)")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    args = parser.parse_args()
    import torch

    from diffalign.smoke import write_smoke_data

    cuda = torch.cuda.is_available() and not args.cpu
    if not args.cpu and not cuda:
        print("error: no CUDA device here; run with --cpu for the CPU matrix", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        check = Check(cuda=cuda, work=Path(work), data=write_smoke_data(Path(work) / "data"))
        items = []
        for item, work_fn in plan(check):
            items.append(run_item(item, work_fn, cuda))
            print(f"{item.status:7s} {item.name} ({item.seconds:.1f} s){': ' + item.error if item.error else ''}")
            sys.stdout.flush()
    report = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "cuda": cuda,
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
        "counts": {s: sum(i.status == s for i in items) for s in ("pass", "fail", "skipped")},
        "items": [asdict(i) for i in items],
    }
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_check.md").write_text(table(items) + "\n")
    print(table(items))
    print(f"{report['counts']} in {report['seconds']} s; {args.out / 'gpu_check.json'}")
    return 1 if report["counts"]["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
