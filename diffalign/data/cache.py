"""Pre-computed VAE latents and prompt embeddings for a pairs dataset, so training steps do no VAE or text-encoder work.

Layout of a cache folder: `meta.json` (the key it was built for), `shard-00000.safetensors`, ... with, per pair,
`latents_w`, `latents_l` (and `latents_w_flip`, `latents_l_flip` when random flips are on), `time_ids_w/l`,
`preference`, `row`, and `cond.<name>` for the caption's conditioning, plus `empty.safetensors` (the "" caption).
The folder is written atomically and reused only when the key (dataset, model weights, resolution and data options)
matches; otherwise it is rebuilt. Latents are the VAE posterior mode, exactly what the uncached path computes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffalign.config import DataConfig
from diffalign.data.pairs import PairChoices, PairTransform, decode_pair, draw_choices
from diffalign.errors import UserError
from diffalign.io import atomic_dir
from diffalign.models import Family

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: flipped pairs carry their own SDXL crop coordinates
SHARD_SIZE = 256


def _files_fingerprint(folder: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json")
    )


def cache_key(cfg: DataConfig, model_name: str, model_path: str, resolution: int) -> str:
    """A digest of everything the cached tensors depend on."""
    source = Path(cfg.source).expanduser()
    source_id: Any = (
        [str(source.resolve()), source.stat().st_size, source.stat().st_mtime_ns]
        if source.exists()
        else [cfg.source, cfg.split]
    )
    model = Path(model_path)
    model_id: Any = _files_fingerprint(model) if model.is_dir() else model_name
    key = {
        "version": CACHE_VERSION,
        "source": source_id,
        "model": model_id,
        "resolution": resolution,
        "columns": [cfg.caption_column, *cfg.image_columns, cfg.label_column],
        "keep_ties": cfg.keep_ties,
        "max_pairs": cfg.max_pairs,
        "random_flip": cfg.random_flip,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cache_is_valid(cache_dir: Path, key: str) -> bool:
    meta = cache_dir / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("key") == key


@torch.no_grad()
def build_cache(
    family: Family,
    table,
    rows: list[int],
    cfg: DataConfig,
    resolution: int,
    cache_dir: Path,
    key: str,
    progress: bool = True,
) -> None:
    """Encode every usable pair of `table` into `cache_dir` (replacing it atomically). Undecodable pairs are skipped."""
    if cfg.random_crop:
        raise UserError("data.cache_dir needs data.random_crop: false (cached latents are computed once)")
    from rich.progress import Progress

    transform = PairTransform(resolution, random_crop=False)
    flips = [False, True] if cfg.random_flip else [False]
    skipped, shard, shards = 0, [], 0
    root = Path(cfg.source).expanduser().parent if Path(cfg.source).expanduser().exists() else None
    with atomic_dir(cache_dir, marker="meta.json") as tmp, Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("caching latents", total=len(rows))
        for n, row in enumerate(rows):
            record = table[row]
            decoded = decode_pair(record, row, cfg, root)
            if decoded is None:
                skipped += 1
                continue
            images, p = decoded
            item = {"row": torch.tensor(row), "preference": torch.tensor(p, dtype=torch.float32)}
            pixels = []
            for flip in flips:  # exactly what the uncached path computes for each flip choice
                pair, time_ids = transform(images, PairChoices(0.5, 0.5, flip=flip, empty_caption=False))
                suffix = "_flip" if flip else ""
                item[f"time_ids_w{suffix}"], item[f"time_ids_l{suffix}"] = time_ids
                pixels += pair
            latents = family.encode_images(torch.stack(pixels).to(family.device), sample=False).cpu()
            for n_flip, flip in enumerate(flips):
                suffix = "_flip" if flip else ""
                item[f"latents_w{suffix}"], item[f"latents_l{suffix}"] = latents[2 * n_flip], latents[2 * n_flip + 1]
            caption = str(record[cfg.caption_column] or "")
            for name, value in family.encode_prompts([caption]).items():
                item[f"cond.{name}"] = value[0].cpu()
            shard.append(item)
            if len(shard) == SHARD_SIZE or n == len(rows) - 1:
                _write_shard(tmp / f"shard-{shards:05d}.safetensors", shard)
                shards, shard = shards + 1, []
            bar.advance(task)
        if shard:
            _write_shard(tmp / f"shard-{shards:05d}.safetensors", shard)
        empty = family.encode_prompts([""])
        save_file({k: v[0].contiguous().cpu() for k, v in empty.items()}, tmp / "empty.safetensors")
        (tmp / "meta.json").write_text(json.dumps({"key": key, "skipped": skipped, "source": cfg.source}))
    if skipped:
        log.warning("cache: skipped %d undecodable pairs of %d", skipped, len(rows))


def _write_shard(path: Path, items: list[dict[str, torch.Tensor]]) -> None:
    save_file({k: torch.stack([item[k] for item in items]).contiguous() for k in items[0]}, path)


class CachedPairDataset(torch.utils.data.Dataset):
    """Map-style view of a cache: (epoch, position) -> latents and conditioning, with the same per-pair random
    choices (flip, empty caption) as the uncached `PairDataset`."""

    def __init__(self, cache_dir: Path, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.shards = sorted(Path(cache_dir).glob("shard-*.safetensors"))
        self.index: list[tuple[int, int]] = []
        self.rows: list[int] = []
        for s, path in enumerate(self.shards):
            with safe_open(path, "pt") as f:
                rows = f.get_tensor("row").tolist()
            self.index += [(s, i) for i in range(len(rows))]
            self.rows += rows
        if not self.index:
            raise UserError(f"the latent cache {cache_dir} holds no pairs")
        with safe_open(Path(cache_dir) / "empty.safetensors", "pt") as f:
            self.empty = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, position = key
        shard, i = self.index[position]
        row = self.rows[position]
        choices = draw_choices(self.seed, epoch, row, self.cfg)
        suffix = "_flip" if choices.flip else ""
        item: dict[str, Any] = {"row": row}
        with safe_open(self.shards[shard], "pt") as f:
            for name in ("latents_w", "latents_l"):
                item[name] = f.get_slice(name + suffix)[i]
            for name in ("time_ids_w", "time_ids_l"):
                item[name] = f.get_slice(name + suffix)[i]
            item["preference"] = float(f.get_slice("preference")[i])
            cond = {k[len("cond.") :]: f.get_slice(k)[i] for k in f.keys() if k.startswith("cond.")}  # noqa: SIM118
        if choices.empty_caption:
            cond = dict(self.empty)
        for name, value in cond.items():
            item[f"cond.{name}"] = value
        return item


def cached_cond(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The conditioning tensors of a collated cached batch."""
    return {k[len("cond.") :]: v for k, v in batch.items() if k.startswith("cond.")}
