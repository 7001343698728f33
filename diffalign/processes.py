"""Which process this is under `accelerate launch` / torchrun, for commands that split work without an Accelerator.

`accelerate.PartialState()` alone does not join the process group of CPU ranks (ACCELERATE_USE_CPU=1 or no GPU):
every rank then reports itself as rank 0 of 1 and does all the work. `process_info()` asks for CPU ranks the way
`Accelerator()` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class ProcessInfo:
    """This process's rank among `world` processes and its default device."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """True on the process that writes the output."""
        return self.rank == 0


def process_info() -> ProcessInfo:
    """Rank, world size and device; under `accelerate launch` / torchrun this joins the process group."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        state = PartialState(cpu=forced_cpu or not torch.cuda.is_available())
        return ProcessInfo(rank=state.process_index, world=state.num_processes, device=str(state.device))
    return ProcessInfo(device="cuda" if torch.cuda.is_available() else "cpu")


def gather_to_all(obj: Any, info: ProcessInfo) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every process (just [obj] in a single process)."""
    if info.world == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * info.world
    dist.all_gather_object(gathered, obj)
    return gathered


def wait_for_everyone(info: ProcessInfo) -> None:
    """A barrier across the processes (nothing in a single process)."""
    if info.world > 1:
        import torch.distributed as dist

        dist.barrier()


def resolve_device(device: str | None, info: ProcessInfo | None = None) -> str:
    """The torch device for a `--device` value: None/"auto" -> this process's GPU or the CPU; "cpu"; "cuda[:N]" or
    "mps" only where present (else a one-line UserError)."""
    import torch

    from diffalign.errors import UserError

    if device in (None, "auto"):
        return (info or process_info()).device
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device: use auto, cpu, cuda, cuda:1 or mps") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available here; use --device cpu (or auto)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available here; use --device cpu (or auto)")
    return str(parsed)


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so another `Accelerator` can be made in this process (training
    several runs in one process: the demo, the acceptance scripts, tests)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
