"""Where reward weights come from: a local file or folder given in the spec, or a hub repo id (huggingface_hub cache).

Offline (HF_HUB_OFFLINE=1) and not cached is one line naming the id and saying to pass a local path. Pickled
checkpoints are only ever read with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffalign.errors import UserError
from diffalign.hub import hub_unreachable


def looks_local(source: str) -> bool:
    """True when `source` is meant as a path (it exists, or is written like one: ./x, /x, ~/x, a/b/c) rather than a
    hub repo id (owner/name, or a legacy bare name such as bert-base-uncased)."""
    if Path(source).expanduser().exists():
        return True
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def local_path(source: str, what: str) -> Path:
    """`source` as an existing local path, else a UserError naming it."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{what}: {source} does not exist (give an existing file or folder, or a hub id owner/name)")
    return path


def _not_available(repo_id: str, filename: str, what: str, option: str, reason: str = "") -> UserError:
    why = reason or "not in the Hugging Face cache"
    return UserError(
        f"{what}: {repo_id}/{filename} is not available ({why}): download it where there is network, or pass a "
        f"local path with {option}=/path/to/it"
    )


def hub_file(repo_id: str, filename: str, what: str, option: str) -> Path:
    """The local path of `filename` in hub repo `repo_id` (from the cache, or downloaded when online)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return Path(cached)
    reason = hub_unreachable()
    if reason:
        raise _not_available(repo_id, filename, what, option, reason=f"not in the Hugging Face cache and {reason}")
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as e:  # network, auth, missing file: one line for the user
        raise _not_available(repo_id, filename, what, option, reason=f"{type(e).__name__}: {e}") from e


def resolve_file(source: str, filename: str, what: str, option: str) -> Path:
    """A weights file from `source`: a local file, a local folder holding `filename`, or a hub repo holding it."""
    if looks_local(source):
        path = local_path(source, what)
        if path.is_dir():
            path = path / filename
            if not path.is_file():
                raise UserError(f"{what}: {source} has no {filename} (give the file itself with {option}=<file>)")
        return path
    return hub_file(source, filename, what, option)


def optional_file(source: str, filename: str) -> Path | None:
    """`filename` inside a local folder or a cached/downloadable hub repo, or None when it is not there."""
    if looks_local(source):
        path = Path(source).expanduser()
        candidate = (path if path.is_dir() else path.parent) / filename
        return candidate if candidate.is_file() else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(source, filename)
    if isinstance(cached, str):
        return Path(cached)
    if hub_unreachable():
        return None
    try:
        return Path(hf_hub_download(source, filename))
    except Exception:
        return None


def resolve_pretrained(source: str, what: str, option: str, marker: str = "config.json") -> str:
    """What `from_pretrained` should load: a local folder (checked for `marker`) or a hub id available to us."""
    if looks_local(source):
        path = local_path(source, what)
        if not (path / marker).is_file():
            raise UserError(f"{what}: {source} is not a model folder (no {marker}): write it with save_pretrained")
        return str(path)
    hub_file(source, marker, what, option)  # raises the one-line error when offline and not cached
    return source


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict, or a UserError naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read JSON file {path}: {e}") from e


def load_checkpoint(path: Path, what: str) -> dict[str, Any]:
    """A pickled torch checkpoint read with `weights_only=True` (never arbitrary code), or a UserError."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{what}: cannot read {path} as a weights-only torch checkpoint ({type(e).__name__})") from e


def check_sha256(path: Path, expected: str, what: str) -> None:
    """A UserError unless the file at `path` has the sha256 `expected` (for weights fetched from a mirror)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise UserError(
            f"{what}: {path} is not the published file (sha256 {digest.hexdigest()[:12]}..., expected "
            f"{expected[:12]}...); give the official file with head=<file>"
        )
