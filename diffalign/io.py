"""Writing files: nothing is half-written on failure (write to a temporary sibling, then rename), and the one place
where an image tensor becomes 8-bit pixels and encoded bytes."""

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


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed to `path`, on error removed. The file gets the
    mode any tool would create (0666 minus the umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~umask())
    os.close(fd)
    try:
        yield Path(tmp)
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
    folder gets the usual mode (0777 minus the umask), not mkdtemp's private 0700.

    With `marker`, an existing `path` is replaced only if it is an empty folder or holds that file (i.e. it was
    written by the same command): anything else is refused up front, so `--out .` never deletes a user's folder."""
    path = Path(path)
    if marker is not None:
        check_replaceable(path, marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes 0700: a teammate or a web server could not read the result
    try:
        yield tmp
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


def to_uint8(image: Any) -> Any:
    """An image tensor [3, H, W] in [0, 1] as a numpy HWC uint8 array (clamped, rounded)."""
    import numpy as np
    import torch

    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy())


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
