"""Preference pairs in the Pick-a-Pic v2 schema: `caption`, `jpg_0`, `jpg_1` (encoded image bytes, or image paths in
local JSONL/CSV files), `label_0` (1 = image 0 preferred, 0 = image 1, 0.5 = tie).

`open_pairs` opens a hub dataset or a local .parquet/.jsonl/.csv (streaming or not) and checks the schema before any
model is loaded. `PairDataset` decodes and transforms one pair; every random choice of a pair (flip, crop, empty
caption) is drawn from an RNG seeded by (seed, epoch, row), so a run is reproducible and resumable whatever the number
of data-loader workers. The winner always comes first: a pair's `preference` is the probability that it is preferred.
"""

from __future__ import annotations

import io
import logging
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.config import DataConfig
from diffalign.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")
LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


# ---------------------------------------------------------------------------------------------------------- opening
def open_pairs(cfg: DataConfig):
    """The pairs table of `cfg.source` as a `datasets` Dataset (or IterableDataset when streaming), schema-checked."""
    import datasets

    from diffalign.hub import hub_unreachable, offline

    if not cfg.source:
        raise UserError("data.source is required: a hub dataset id or a local .parquet/.jsonl/.csv file")
    if cfg.streaming and cfg.cache_dir:
        raise UserError("data.cache_dir cannot be combined with data.streaming: true")
    path = Path(cfg.source).expanduser()
    if not path.exists() and path.suffix.lower() in LOCAL_FORMATS:
        raise UserError(f"data.source: no such file: {cfg.source}")
    datasets.disable_progress_bars()
    if path.exists():
        if path.suffix.lower() not in LOCAL_FORMATS:
            raise UserError(f"data.source {path}: unsupported format (use {', '.join(LOCAL_FORMATS)})")
        table = datasets.load_dataset(
            LOCAL_FORMATS[path.suffix.lower()], data_files=str(path), split="train", streaming=cfg.streaming
        )
    else:
        hub_unreachable()  # decided up front: unreachable -> offline, so datasets reads its cache or fails at once
        try:
            table = datasets.load_dataset(cfg.source, split=cfg.split, streaming=cfg.streaming)
        except Exception as e:  # the hub client raises many types for "not there"
            where = " offline (not in the Hugging Face cache)" if offline() else ""
            raise UserError(
                f"dataset {cfg.source!r} could not be opened{where}: {type(e).__name__}; pass a local "
                ".parquet/.jsonl/.csv file as data.source"
            ) from e
    check_columns(table.column_names, cfg, cfg.source)
    return table


def check_columns(columns: list[str] | None, cfg: DataConfig, source: str) -> None:
    """One-line error naming the first missing column (and the columns that exist)."""
    if columns is None:
        return
    for column in [cfg.caption_column, *cfg.image_columns, cfg.label_column]:
        if column not in columns:
            raise UserError(
                f"data: column {column!r} is missing from {source} (columns: {', '.join(columns)}); "
                "map yours with data.caption_column / data.image_columns / data.label_column"
            )
    if len(cfg.image_columns) != 2:
        raise UserError(f"data.image_columns must name exactly two columns, got {cfg.image_columns}")


def preference_of(label: Any) -> float | None:
    """Probability that image 0 is preferred, from a `label_0` value (None if the label is unusable)."""
    try:
        value = float(label)
    except (TypeError, ValueError):
        return None
    return value if 0.0 <= value <= 1.0 else None


def usable(items: Iterable[T], label_of: Callable[[T], Any], cfg: DataConfig) -> Iterator[T]:
    """The items whose label makes a pair: valid label; ties only with keep_ties; at most max_pairs. The one rule for
    tables and streams."""
    kept = (item for item in items if (p := preference_of(label_of(item))) is not None and (p != 0.5 or cfg.keep_ties))
    return islice(kept, cfg.max_pairs)


def no_usable_pairs(cfg: DataConfig) -> UserError:
    return UserError(f"data: no usable pairs in {cfg.source} (labels must be in [0, 1]; ties need keep_ties)")


def usable_rows(table, cfg: DataConfig) -> list[int]:
    """Rows of a (non-streaming) table that make a pair (see `usable`)."""
    rows = [row for row, _ in usable(enumerate(table[cfg.label_column]), lambda item: item[1], cfg)]
    if not rows:
        raise no_usable_pairs(cfg)
    return rows


# --------------------------------------------------------------------------------------------------------- decoding
def decode_image(value: Any, root: Path | None = None) -> Tensor:
    """An image cell (bytes, {'bytes', 'path'}, a path, or PIL image) -> float [3,H,W] in [0,1]. Raises on failure."""
    from PIL import Image

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        path = Path(value)
        image = Image.open(path if path.is_absolute() or root is None else root / path)
    elif isinstance(value, Image.Image):
        image = value
    else:
        raise ValueError(f"unsupported image cell of type {type(value).__name__}")
    image.load()
    array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return array.reshape(image.height, image.width, 3).permute(2, 0, 1).float() / 255


@dataclass
class PairChoices:
    """The random choices made for one pair in one epoch (shared by the cached and the uncached data paths)."""

    crop_u: float
    crop_v: float
    flip: bool
    empty_caption: bool


def draw_choices(seed: int, epoch: int, row: int, cfg: DataConfig) -> PairChoices:
    """The choices of pair `row` in `epoch`, from an RNG seeded by (seed, epoch, row): independent of workers, batch
    size and resume point."""
    rng = random.Random(f"{seed}:{epoch}:{row}")
    crop_u, crop_v, flip, empty = rng.random(), rng.random(), rng.random(), rng.random()
    return PairChoices(crop_u, crop_v, cfg.random_flip and flip < 0.5, empty < cfg.empty_prompt_fraction)


@dataclass
class PairTransform:
    """Resize the shorter side to `resolution` (bicubic, antialiased), flip, crop a square (random or centre) — the
    same flip and crop for both images of a pair, as the Diffusion-DPO scripts do. The flip comes before the crop
    (as diffusers' SDXL scripts), so SDXL's crop coordinates are those of the flipped image the model sees."""

    resolution: int
    random_crop: bool = False

    def __call__(self, images: list[Tensor], choices: PairChoices) -> tuple[list[Tensor], list[Tensor]]:
        """(transformed images, SDXL time_ids per image: orig_h, orig_w, crop_top, crop_left, R, R)."""
        r = self.resolution
        out, time_ids = [], []
        for image in images:
            h, w = image.shape[-2:]
            scale = r / min(h, w)
            nh, nw = max(r, round(h * scale)), max(r, round(w * scale))
            resized = F.interpolate(image[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
            if choices.flip:
                resized = resized.flip(-1)
            top = int(choices.crop_u * (nh - r)) if self.random_crop else (nh - r) // 2
            left = int(choices.crop_v * (nw - r)) if self.random_crop else (nw - r) // 2
            out.append(resized[0, :, top : top + r, left : left + r].clamp(0, 1))
            time_ids.append(torch.tensor([h, w, top, left, r, r], dtype=torch.float32))
        return out, time_ids


# ---------------------------------------------------------------------------------------------------------- datasets
class PairDataset(torch.utils.data.Dataset):
    """Map-style: key (epoch, position) -> a decoded, transformed pair. A pair whose image does not decode is
    skipped with a warning and replaced by the next one, so every batch is full (distributed ranks stay in step);
    the item's `skipped` counts the pairs skipped to reach it."""

    max_consecutive_failures = 100

    def __init__(self, table, rows: list[int], cfg: DataConfig, resolution: int, seed: int):
        self.table, self.rows, self.cfg, self.seed = table, rows, cfg, seed
        self.transform = PairTransform(resolution, cfg.random_crop)
        source = Path(cfg.source).expanduser()
        self.root = source.parent if source.exists() else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, position = key
        for skipped in range(min(len(self.rows), self.max_consecutive_failures)):
            row = self.rows[(position + skipped) % len(self.rows)]
            item = make_pair(self.table[row], row, epoch, self.cfg, self.transform, self.seed, self.root)
            if item is not None:
                item["skipped"] = skipped
                return item
        raise UserError(f"data: {self.max_consecutive_failures} pairs in a row of {self.cfg.source} do not decode")


def ordered(record: dict[str, Any], cfg: DataConfig) -> tuple[str, str, float]:
    """(winner column, loser column, preference of the winner) of a record."""
    p = preference_of(record[cfg.label_column])
    first, second = cfg.image_columns
    if p is not None and p < 0.5:
        return second, first, 1 - p
    return first, second, 1.0 if p is None else p


def decode_pair(
    record: dict[str, Any], row: int, cfg: DataConfig, root: Path | None
) -> tuple[list[Tensor], float] | None:
    """([winner image, loser image], the winner's preference) of a table record, or None (with a warning naming the
    row) if an image does not decode: the one decode-and-skip rule of the raw and the cached data paths."""
    first, second, p = ordered(record, cfg)
    try:
        return [decode_image(record[first], root), decode_image(record[second], root)], p
    except Exception as e:  # PIL raises many types for corrupt data
        log.warning("skipping pair at row %d: cannot decode an image (%s: %s)", row, type(e).__name__, e)
        return None


def make_pair(
    record: dict[str, Any],
    row: int,
    epoch: int,
    cfg: DataConfig,
    transform: PairTransform,
    seed: int,
    root: Path | None,
) -> dict[str, Any] | None:
    """One training pair from a table record (winner first), or None (with a warning) if an image does not decode."""
    decoded = decode_pair(record, row, cfg, root)
    if decoded is None:
        return None
    images, p = decoded
    choices = draw_choices(seed, epoch, row, cfg)
    (image_w, image_l), (time_w, time_l) = transform(images, choices)
    caption = "" if choices.empty_caption else str(record[cfg.caption_column] or "")
    return {
        "pixels_w": image_w,
        "pixels_l": image_l,
        "time_ids_w": time_w,
        "time_ids_l": time_l,
        "caption": caption,
        "preference": p,
        "row": row,
    }


class PairStream(torch.utils.data.IterableDataset):
    """Streaming: rows in stream order, rank r of W taking every W-th usable row, starting after `skip` of its own.
    Undecodable pairs are skipped (counted in the next item's `skipped`). The stream is read once, in order, by the
    process that iterates this; `threads` > 0 decode and transform pairs on that many threads (Pillow and torch
    release the GIL), so the items and their order are the same for any number of threads."""

    def __init__(
        self,
        table,
        cfg: DataConfig,
        resolution: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        skip: int = 0,
        threads: int = 0,
    ):
        self.table, self.cfg, self.seed, self.rank, self.world, self.skip = table, cfg, seed, rank, world, skip
        self.threads = threads
        self.transform = PairTransform(resolution, cfg.random_crop)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if torch.utils.data.get_worker_info() is not None:
            # datasets shards a stream by worker process, which would break the order (and the resume position)
            raise RuntimeError("PairStream is read in the main process; decode with `threads`, not DataLoader workers")
        skipped = 0
        for item in ordered_map(self._decode, self._my_records(), self.threads):
            if item is None:
                skipped += 1
                continue
            item["skipped"], skipped = skipped, 0
            yield item

    def _decode(self, task: tuple[int, int, dict[str, Any]]) -> dict[str, Any] | None:
        epoch, row, record = task
        return make_pair(record, row, epoch, self.cfg, self.transform, self.seed, None)

    def _my_records(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(epoch, row, record) of this rank's usable rows, endlessly, after the first `skip`."""
        taken = 0
        for epoch in range(1 << 30):
            count = 0
            rows = usable(enumerate(self.table), lambda item: item[1][self.cfg.label_column], self.cfg)
            for count, (row, record) in enumerate(rows, start=1):
                if (count - 1) % self.world == self.rank:
                    taken += 1
                    if taken > self.skip:
                        yield epoch, row, record
            if count == 0:
                raise no_usable_pairs(self.cfg)


def ordered_map(fn: Callable[[Any], Any], items: Iterator[Any], threads: int) -> Iterator[Any]:
    """`map(fn, items)` in order, computed on `threads` threads at most 2 x `threads` items ahead (0 = inline)."""
    if threads <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class EpochSampler(torch.utils.data.Sampler):
    """Endless (epoch, position) keys: a seeded permutation per epoch, rank r of W taking every W-th, starting after
    `start` keys of its own (the resume point)."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0, shuffle: bool = True):
        self.size, self.seed, self.rank, self.world, self.start, self.shuffle = size, seed, rank, world, start, shuffle

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_epoch = self.size // self.world if self.size >= self.world else 1
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            order = (
                torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
                if self.shuffle
                else torch.arange(self.size)
            )
            mine = order[self.rank :: self.world][:per_epoch] if self.size >= self.world else order[:1]
            for position in mine[offset:].tolist():
                yield epoch, position
            epoch, offset = epoch + 1, 0


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch of pairs (tensors stacked, numbers as tensors, strings as lists); `skipped` is summed."""
    batch: dict[str, Any] = {"skipped": sum(item.pop("skipped", 0) for item in items)}
    for key, value in items[0].items():
        if isinstance(value, Tensor):
            batch[key] = torch.stack([item[key] for item in items])
        elif isinstance(value, (int, float, bool)):
            batch[key] = torch.tensor([item[key] for item in items])
        else:
            batch[key] = [item[key] for item in items]
    return batch
