"""Batch sources of the training loop (`diffalign.train.loop.BatchSource`), one shard of the data per process,
resumable from a data position: preference pairs (local or hub, streaming or not, cached latents or not) and prompts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from diffalign.config import DataConfig
from diffalign.data.cache import CachedPairDataset, build_cache, cache_is_valid, cache_key, cached_cond
from diffalign.data.pairs import EpochSampler, PairDataset, PairStream, collate_pairs, open_pairs, usable_rows
from diffalign.models import Cond, Family, cond_cat


class PairBatches:
    """An endless iterator of collated pair batches for this process, starting at data `position` (items this
    process consumed before; for streams, rows). `table`: the already opened `open_pairs(cfg)`, if any. A batch
    source of the training loop (`diffalign.train.loop.BatchSource`)."""

    unit = "pairs"

    def __init__(
        self,
        cfg: DataConfig,
        family: Family,
        *,
        model_name: str,
        model_path: str,
        resolution: int,
        batch_size: int,
        seed: int,
        position: int = 0,
        rank: int = 0,
        world: int = 1,
        accelerator=None,
        table=None,
    ):
        self.cfg, self.batch_size = cfg, batch_size
        table = open_pairs(cfg) if table is None else table
        self.streaming = cfg.streaming
        if cfg.streaming:
            dataset: Any = PairStream(table, cfg, resolution, seed, rank, world, skip=position, threads=cfg.num_workers)
            sampler = None
        else:
            rows = usable_rows(table, cfg)
            if cfg.cache_dir:
                cache = Path(cfg.cache_dir)
                key = cache_key(cfg, model_name, model_path, resolution)
                main = accelerator is None or accelerator.is_main_process
                if main and not cache_is_valid(cache, key):
                    build_cache(family, table, rows, cfg, resolution, cache, key)
                if accelerator is not None:
                    accelerator.wait_for_everyone()
                dataset = CachedPairDataset(cache, cfg, seed)
            else:
                dataset = PairDataset(table, rows, cfg, resolution, seed)
            sampler = EpochSampler(len(dataset), seed, rank, world, start=position)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_pairs,
            num_workers=0 if cfg.streaming else cfg.num_workers,  # a stream is read here, decoded on threads
            generator=torch.Generator(),  # never draw from the global RNG: resumed runs must match bit for bit
            persistent_workers=not cfg.streaming and cfg.num_workers > 0,
        )
        self._iter: Iterator | None = None

    def __iter__(self) -> PairBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iter is None:
            self._iter = iter(self.loader)
        return next(self._iter)

    def advance(self, batch: dict[str, Any]) -> int:
        """How far `batch` moved this process's data position."""
        size = len(batch["row"])
        return size + batch["skipped"] if self.streaming else size

    def skipped(self, batch: dict[str, Any]) -> int:
        """Undecodable pairs skipped to make `batch`."""
        return int(batch["skipped"])


class PromptBatches:
    """An endless iterator of prompt batches (lists of `batch_size` strings) for this process: a seeded order of
    `prompts` per epoch (the same on every process), process `rank` of `world` taking every world-th, starting after
    `position` prompts of its own (the resume point). A batch source of the training loop."""

    unit = "prompts"

    def __init__(
        self,
        prompts: list[str],
        batch_size: int,
        seed: int,
        *,
        position: int = 0,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = True,
    ):
        if not prompts:
            raise ValueError("PromptBatches: no prompts")
        self.prompts, self.batch_size = list(prompts), batch_size
        self._keys = iter(EpochSampler(len(self.prompts), seed, rank, world, start=position, shuffle=shuffle))

    def __iter__(self) -> PromptBatches:
        return self

    def __next__(self) -> list[str]:
        return [self.prompts[next(self._keys)[1]] for _ in range(self.batch_size)]

    def advance(self, batch: list[str]) -> int:
        """How far `batch` moved this process's position (one per prompt)."""
        return len(batch)

    def skipped(self, batch: list[str]) -> int:
        """Prompts are never skipped."""
        return 0


def pair_model_inputs(family: Family, batch: dict[str, Any]) -> tuple[torch.Tensor, Cond, torch.Tensor]:
    """(latents [2B] = winners then losers, conditioning [2B], preference [B]) on the family's device, from a cached
    batch (latents and embeddings read from disk) or a raw one (VAE and text encoders run here, without grad)."""
    device = family.device
    if "latents_w" in batch:
        latents = torch.cat([batch["latents_w"], batch["latents_l"]]).to(device)
        cond = {k: v.to(device) for k, v in cached_cond(batch).items()}
    else:
        with torch.no_grad():
            latents = family.encode_images(torch.cat([batch["pixels_w"], batch["pixels_l"]]).to(device), sample=False)
            cond = family.encode_prompts(batch["caption"])
    both = cond_cat([cond, cond])
    both["time_ids"] = torch.cat([batch["time_ids_w"], batch["time_ids_l"]]).to(device)
    return latents, both, batch["preference"].to(device).float()
