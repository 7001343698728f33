"""Running the `diffalign` CLI as a user would: the same `main()` as the console script, with its parsing, exit
codes and one-line errors, in the test's own interpreter (a fresh one costs ~9 s of imports). Tests of what only a
new process shows (imports, signals, exit-time behaviour) start one themselves."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffalign.train import checkpoint


def run_cli(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """`diffalign ARGS` in this process, with HF_HUB_OFFLINE=1 and `env` set, in `cwd`: its exit code and captured
    text output. An exception that escapes `main` is printed as a traceback with exit code 1, as the interpreter
    would."""
    from diffalign.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update({"HF_HUB_OFFLINE": "1", **(env or {})})
    if cwd is not None:
        os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = exit_code_of(main, list(args))
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["diffalign", *args], code, out.getvalue(), err.getvalue())


def exit_code_of(main, args: list[str]) -> int:
    """The exit code the interpreter would give `main(args)`: SystemExit's code (a message goes to stderr, code 1),
    1 with a traceback for any other exception."""
    try:
        main(args)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - as the interpreter reports an uncaught exception
        traceback.print_exc()
        return 1
    return 0


def train_in_process(overrides: list[str], config: Path | None = None) -> Path:
    """`diffalign train` of `config` (or of the overrides alone, which then name the method) in this process, with a
    fresh accelerate state before and after; the folder of the final LoRA (or denoiser)."""
    from diffalign.processes import reset_accelerate_state
    from diffalign.train import load_train_config, train

    reset_accelerate_state()
    try:
        return train(load_train_config(config, overrides))
    finally:
        reset_accelerate_state()


def wait_for_checkpoint(out: Path, step: int = 1, timeout: float = 300) -> None:
    """Poll until `out` holds a complete checkpoint of step >= `step` (a run in another process), or `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline and not any(s >= step for s, _ in checkpoint.complete_checkpoints(out)):
        time.sleep(0.05)


def assert_resume_after_kill_9_is_bit_exact(config: Path, tmp_path: Path, *, kill_at: int, max_steps: int,
                                            before_resume=None) -> None:  # fmt: skip
    """`diffalign train config` straight through into tmp_path/a (in this process); into tmp_path/b in a subprocess
    killed with SIGKILL once a checkpoint of step >= `kill_at` is complete, then resumed there (in this process,
    after `before_resume(b)`). Asserts the kill came mid-run, the resume started from the last complete checkpoint,
    and both runs end with the same LoRA weights, bit for bit."""
    straight = run_cli("train", str(config), f"output_dir={tmp_path / 'a'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "b"
    # the same number of threads as this process: CPU matmuls split their sums by thread
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, "-m", "diffalign", "train", str(config), f"output_dir={out}"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint(out, kill_at)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [s for s, _ in checkpoint.complete_checkpoints(out)]
    assert done and max(done) < max_steps, f"the run was not interrupted in the middle ({done})"
    if before_resume is not None:
        before_resume(out)
    resumed = run_cli("train", str(config), f"output_dir={out}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints'}/checkpoint-{max(done)}" in resumed.stdout
    weights = "lora/pytorch_lora_weights.safetensors"
    a, b = load_file(tmp_path / "a" / weights), load_file(out / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


UMASK = 0o002  # not the usual 022: a writer that hard-codes 0644 shows as well as one that keeps a private 0600


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def wrong_modes(root: Path, mask: int = UMASK) -> list[str]:
    """'path mode' of every folder and file under `root` (itself included) whose mode is not what `mask` gives."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        mode = path.stat().st_mode & 0o777
        if mode != want:
            wrong.append(f"{path.relative_to(root.parent)} {mode:o} (want {want:o})")
    return wrong
