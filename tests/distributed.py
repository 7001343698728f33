"""Launching 2-process CPU runs for tests (see shared/ENV.md: `--cpu` alone silently runs ONE process)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it): every launch its own, so launches one after another in
    a test process (or in parallel ones) never meet a port still held by the previous one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_ranks(args: list[str], timeout: float = 300, cwd: str | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` on 2 CPU ranks (gloo); `args` is a script path or `-m module ...` with its arguments."""
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MASTER_PORT": str(free_port()),
    }
    return subprocess.run(
        [*LAUNCH, "--main_process_port", env["MASTER_PORT"], *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def failure(result: subprocess.CompletedProcess, chars: int = 2500) -> str:
    """The end of each rank's own output (lines tagged `[rankN]:`) and of the launcher's, for a failed launch."""
    parts = []
    for rank in (0, 1):
        tag = f"[rank{rank}]:"
        lines = "\n".join(line for line in result.stderr.splitlines() if line.startswith(tag))
        parts.append(lines[-chars:] or f"{tag} (no output)")
    return "\n".join(parts) + "\n" + result.stderr[-chars:]
