"""Writing files: nothing is half-written on failure (write to a temporary sibling, then rename), every output gets
the mode the user's umask gives (0666 / 0777 minus it) whichever library wrote it, and the one place where an image
tensor becomes 8-bit pixels and encoded bytes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffalign.errors import UserError


def umask() -> int:
    """The process's file-creation mask (read without changing it for good)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give `path` — a file, or a folder and everything in it — the modes any tool would create under the umask
    (files 0666, folders 0777, minus the umask). Called on every output before it is renamed into place: some
    writers keep a private mode (safetensors 0.8 writes a 0600 temporary and renames it over the target; mkstemp
    and mkdtemp make 0600 / 0700), and a teammate or a serving process could not read the result."""
    mask = umask()
    path = Path(path)
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed to `path` with the umask's mode
    (`apply_umask`), on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        apply_umask(tmp)  # the writer may have replaced the file (safetensors does) with a private one
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_replaceable(path: str | Path, marker: str) -> None:
    """A UserError unless the folder `path` may be replaced by a command whose output holds the file `marker`: it
    does not exist, is empty, or holds `marker` (the same command wrote it). Call it before any slow work."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / marker).is_file())):
        raise UserError(
            f"{path} exists and is not a folder this command wrote (no {marker}); it would be replaced: "
            "choose a new path or remove it"
        )


@contextlib.contextmanager
def atomic_dir(path: str | Path, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path` (rename), on error it is removed. The
    folder and everything written into it get the umask's modes (`apply_umask`) before the rename.

    With `marker`, an existing `path` is replaced only if it is an empty folder or holds that file (i.e. it was
    written by the same command): anything else is refused up front, so `--out .` never deletes a user's folder."""
    path = Path(path)
    if marker is not None:
        check_replaceable(path, marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        apply_umask(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def quantize(images: Any) -> Any:
    """Image tensors in [0, 1] (any shape) as the uint8 tensor of their 8-bit pixels (clamped, rounded): what a PNG
    holds, and a quarter of the bytes to gather across processes."""
    import torch

    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def to_uint8(image: Any) -> Any:
    """An image tensor [3, H, W] in [0, 1] as a numpy HWC uint8 array (clamped, rounded)."""
    import numpy as np

    return np.ascontiguousarray(quantize(image).permute(1, 2, 0).cpu().numpy())


def encode_image(image: Any, format: str = "PNG", **options: Any) -> bytes:
    """An image tensor [3, H, W] in [0, 1] encoded as PNG (or `format`, e.g. JPEG with quality=95) bytes."""
    import io as _io

    from PIL import Image

    buffer = _io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format=format, **options)
    return buffer.getvalue()


def save_png(image: Any, path: str | Path) -> None:
    """Write an image tensor [3, H, W] in [0, 1] as a PNG file (atomically)."""
    data = encode_image(image)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def image_grid(images: Any, columns: int | None = None) -> Any:
    """[N,3,H,W] -> one [3, rows*H, columns*W] grid image (columns default: about the square root of N)."""
    import math

    import torch

    n = images.shape[0]
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    pad = torch.zeros(rows * columns - n, *images.shape[1:], dtype=images.dtype)
    full = torch.cat([images, pad]).reshape(rows, columns, *images.shape[1:])
    return full.permute(2, 0, 3, 1, 4).reshape(images.shape[1], rows * images.shape[2], columns * images.shape[3])
