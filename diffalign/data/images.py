"""Image files to score: finding them (files, folders, globs), their prompts, and decoding them in DataLoader workers.

Prompts come from one prompt for all images, from a mapping file (CSV with a header, or JSONL) whose rows name an image
file and its prompt, or from a sidecar text file next to the image (`photo.txt` or `photo.png.txt`), in that order.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Sequence
from pathlib import Path

from diffalign.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
FILE_COLUMNS = ("file", "file_name", "filename", "image", "image_path", "path", "name")
PROMPT_COLUMNS = ("prompt", "caption", "text")
GLOB_CHARS = set("*?[")


def is_image_file(path: Path) -> bool:
    """True for a regular file whose suffix is a known image format."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def images_in_folder(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted by path (hidden files and folders skipped)."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).parts
        if is_image_file(path) and not any(part.startswith(".") for part in relative):
            found.append(path)
    return sorted(found)


def expand_path_argument(argument: str) -> list[Path]:
    """The image files one command-line argument names: a file (kept as is), a folder (recursive) or a glob."""
    path = Path(argument).expanduser()
    if path.is_dir():
        return images_in_folder(path)
    if path.is_file():
        return [path]
    if GLOB_CHARS & set(argument):
        found: list[Path] = []
        for match in sorted(glob.glob(str(path), recursive=True)):
            match_path = Path(match)
            found.extend(images_in_folder(match_path) if match_path.is_dir() else [match_path])
        return [p for p in found if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES)]
    raise UserError(f"{argument} does not exist (give image files, folders or globs)")


def find_images(arguments: Sequence[str]) -> list[Path]:
    """All image files named by `arguments` (files, folders searched recursively, globs), in order, without repeats.

    Nothing found is a UserError."""
    seen: dict[Path, None] = {}
    for argument in arguments:
        for path in expand_path_argument(argument):
            seen.setdefault(path, None)
    if not seen:
        raise UserError(f"no images found in {' '.join(arguments)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return list(seen)


# ---------------------------------------------------------------------------------------------------------- prompts
def _pick_column(columns: Sequence[str], wanted: Sequence[str], source: Path, what: str) -> str:
    lowered = {c.strip().lower(): c for c in columns}
    for name in wanted:
        if name in lowered:
            return lowered[name]
    raise UserError(f"{source} has no {what} column (one of {', '.join(wanted)}; found {', '.join(columns) or 'none'})")


def _read_rows(source: Path) -> list[dict[str, object]]:
    try:
        text = source.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise UserError(f"cannot read prompts file {source}: {e.strerror or e}") from e
    if source.suffix.lower() == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if source.suffix.lower() not in (".jsonl", ".json"):
        raise UserError(f"prompts file {source} must be .csv (with a header) or .jsonl")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(f"{source}:{number} is not a JSON object (the file must be JSON lines)") from None
            if not isinstance(row, dict):
                raise UserError(f"{source}:{number} is not a JSON object (the file must be JSON lines)")
            rows.append(row)
    return rows


def read_prompt_mapping(source: str | Path) -> dict[str, str]:
    """{image file name as written in the file: prompt} from a CSV (header row) or JSONL file.

    The file column is one of FILE_COLUMNS, the prompt column one of PROMPT_COLUMNS (case-insensitive)."""
    source = Path(source)
    rows = _read_rows(source)
    if not rows:
        raise UserError(f"prompts file {source} has no rows")
    columns = list(rows[0].keys())
    file_column = _pick_column(columns, FILE_COLUMNS, source, "image file")
    prompt_column = _pick_column(columns, PROMPT_COLUMNS, source, "prompt")
    mapping = {}
    for row in rows:
        name, prompt = row.get(file_column), row.get(prompt_column)
        if name is not None and prompt is not None:
            mapping[str(name).strip()] = str(prompt)
    return mapping


def _mapping_keys(image: Path, mapping_dir: Path) -> list[str]:
    """The ways a mapping file may name `image`: relative to the mapping file, as given, absolute, or by file name."""
    keys = []
    try:
        keys.append(image.resolve().relative_to(mapping_dir.resolve()).as_posix())
    except ValueError:
        pass
    return keys + [image.as_posix(), str(image.resolve()), image.name]


def sidecar_prompt(image: Path) -> str | None:
    """The prompt in `photo.txt` or `photo.png.txt` next to `photo.png`, or None."""
    for candidate in (image.with_suffix(".txt"), image.with_name(image.name + ".txt")):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8").strip()
    return None


def assign_prompts(
    images: Sequence[Path], prompt: str | None = None, prompts_file: str | Path | None = None, required: bool = True
) -> list[str | None]:
    """One prompt per image: `prompt` for all; else the mapping file's entry; else the sidecar text file.

    With `required`, an image without a prompt is a UserError naming it (raised before any model is loaded)."""
    if prompt is not None and prompts_file is not None:
        raise UserError("give either --prompt or --prompts, not both")
    if prompt is not None:
        return [prompt] * len(images)
    mapping = read_prompt_mapping(prompts_file) if prompts_file is not None else {}
    mapping_dir = Path(prompts_file).parent if prompts_file is not None else Path.cwd()
    prompts: list[str | None] = []
    for image in images:
        found = next((mapping[k] for k in _mapping_keys(image, mapping_dir) if k in mapping), None)
        if found is None:
            found = sidecar_prompt(image)
        if found is None and required:
            where = f"add it to {prompts_file} or " if prompts_file is not None else "give --prompt, --prompts or "
            raise UserError(f"no prompt for image {image}: {where}write {image.with_suffix('.txt')}")
        prompts.append(found)
    return prompts


# --------------------------------------------------------------------------------------------------------- decoding
def decode_image(path: Path):
    """The image at `path` as a uint8 tensor [3, H, W] (RGB), decoded by PIL. Raises PIL's error if it cannot be read.

    The HWC -> CHW transpose is done in numpy: torch's multi-threaded copy of one small image costs several ms when
    the reward's threads are busy (decoding then ran 7x slower than PIL itself)."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class ImageFileDataset:
    """A map-style dataset of (index, uint8 tensor [3, H, W] or None, error message or None) for DataLoader workers.

    A file that cannot be decoded yields None and a one-line reason instead of raising, so one bad file does not stop
    the run (the caller decides whether to skip it or fail)."""

    def __init__(self, paths: Sequence[Path], indices: Sequence[int] | None = None) -> None:
        self.paths = list(paths)
        self.indices = list(range(len(self.paths))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        index = self.indices[item]
        try:
            return index, decode_image(self.paths[index]), None
        except Exception as e:  # PIL raises many kinds (OSError, ValueError, SyntaxError, DecompressionBombError)
            return index, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"


def collate_as_list(batch: list) -> list:
    """DataLoader collate that keeps the items as a list (images may differ in size)."""
    return batch
