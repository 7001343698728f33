"""Preference-pair data: schema checks, ties, undecodable images, transforms, sharding, the latent cache."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import build_family
from pairdata import write_parquet

from diffalign.config import DataConfig
from diffalign.data.cache import CachedPairDataset, build_cache, cache_is_valid, cache_key
from diffalign.data.loader import PairBatches, pair_model_inputs
from diffalign.data.pairs import (
    EpochSampler,
    PairChoices,
    PairDataset,
    PairTransform,
    collate_pairs,
    open_pairs,
    usable_rows,
)
from diffalign.errors import UserError
from diffalign.train.dpo import DPOConfig, dpo_step


def data_cfg(path, **kwargs) -> DataConfig:
    return DataConfig(source=str(path), **kwargs)


def test_missing_column_is_named_before_training(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b""], "label_0": [1.0]}), tmp_path / "p.parquet")
    with pytest.raises(UserError, match=r"column 'jpg_1' is missing .* \(columns: caption, jpg_0, label_0\)"):
        open_pairs(data_cfg(tmp_path / "p.parquet"))
    with pytest.raises(UserError, match="data.source is required"):
        open_pairs(DataConfig())
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(UserError, match="unsupported format"):
        open_pairs(data_cfg(tmp_path / "p.txt"))


def test_hub_dataset_not_cached_offline_is_a_one_line_error():
    with pytest.raises(UserError, match="could not be opened offline"):
        open_pairs(DataConfig(source="nobody/no-such-dataset"))


def test_ties_dropped_by_default_and_kept_as_soft_labels(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", 4, labels=[1.0, 0.5, 0.0, 0.5])
    table = open_pairs(data_cfg(path))
    assert usable_rows(table, data_cfg(path)) == [0, 2]
    cfg = data_cfg(path, keep_ties=True, empty_prompt_fraction=0.0, random_flip=False)
    rows = usable_rows(table, cfg)
    assert rows == [0, 1, 2, 3]
    dataset = PairDataset(table, rows, cfg, resolution=16, seed=0)
    assert [dataset[(0, i)]["preference"] for i in range(4)] == [1.0, 0.5, 1.0, 0.5]
    # label 0 means image 1 won: it is put first
    from diffalign.data.pairs import decode_image

    winner = PairTransform(16)([decode_image(table[2]["jpg_1"])], PairChoices(0.5, 0.5, False, False))[0][0]
    torch.testing.assert_close(dataset[(0, 2)]["pixels_w"], winner)


def test_undecodable_pair_is_skipped_with_a_warning_and_counted(tmp_path, caplog):
    path = write_parquet(tmp_path / "p.parquet", 4, corrupt_rows=[1])
    cfg = data_cfg(path)
    table = open_pairs(cfg)
    dataset = PairDataset(table, usable_rows(table, cfg), cfg, resolution=16, seed=0)
    with caplog.at_level(logging.WARNING):
        batch = collate_pairs([dataset[(0, i)] for i in range(4)])
    assert "skipping pair at row 1" in caplog.text
    assert batch["skipped"] == 1
    assert batch["row"].tolist() == [0, 2, 2, 3]  # row 1 replaced by the next decodable one: the batch stays full


def test_transform_resizes_crops_and_flips_both_images_alike():
    image = torch.rand(3, 40, 60)
    (a, b), (ta, _) = PairTransform(32)([image, image], PairChoices(0.5, 0.5, flip=True, empty_caption=False))
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    (c,), _ = PairTransform(32)([image], PairChoices(0.5, 0.5, flip=False, empty_caption=False))
    assert torch.equal(a, c.flip(-1))
    assert ta.tolist() == [40, 60, 0, 8, 32, 32]  # original size, centre-crop offset (48-32)//2, target size
    (d,), (td,) = PairTransform(32, random_crop=True)([image], PairChoices(0.0, 1.0, flip=False, empty_caption=False))
    assert td.tolist()[2:4] == [0, 16]


def test_sdxl_crop_coordinates_are_those_of_the_flipped_image():
    """Flip, then crop (diffusers' SDXL scripts): time_ids' crop_left locates the crop in the flipped image the model
    sees. Before, the crop was taken unflipped and then flipped, so crop_left described another window."""
    import torch.nn.functional as F

    image = torch.rand(3, 40, 60, generator=torch.Generator().manual_seed(0))
    choices = PairChoices(crop_u=0.0, crop_v=0.25, flip=True, empty_caption=False)
    (out,), (time_ids,) = PairTransform(32, random_crop=True)([image], choices)
    top, left = int(time_ids[2]), int(time_ids[3])
    assert (top, left) == (0, 4)  # int(0.25 * (48 - 32))
    resized = F.interpolate(image[None], size=(32, 48), mode="bicubic", antialias=True, align_corners=False)[0]
    torch.testing.assert_close(out, resized.flip(-1)[:, top : top + 32, left : left + 32].clamp(0, 1))


def stream_batches(path, count: int, position: int = 0, rank: int = 0, world: int = 1, **options) -> list[dict]:
    cfg = data_cfg(path, streaming=True, **options)
    batches = PairBatches(
        cfg, None, model_name="-", model_path="-", resolution=32, batch_size=2, seed=4,
        position=position, rank=rank, world=world,
    )  # fmt: skip
    return [next(batches) for _ in range(count)]


def assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a["row"].tolist() == b["row"].tolist() and a["caption"] == b["caption"]
        assert torch.equal(a["pixels_w"], b["pixels_w"]) and torch.equal(a["pixels_l"], b["pixels_l"])
        assert a["skipped"] == b["skipped"]


def test_stream_decoded_on_threads_gives_the_same_batches_and_skips_the_bad_pair(tmp_path):
    path = write_parquet(tmp_path / "pairs.parquet", 12, corrupt_rows=[5])
    inline = stream_batches(path, 8)
    rows = [r for batch in inline for r in batch["row"].tolist()]
    assert rows[:11] == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11] and rows[11:14] == [0, 1, 2]  # in order, then epoch 2
    assert sum(batch["skipped"] for batch in inline) == 1
    assert_same_batches(stream_batches(path, 8, num_workers=3), inline)
    capped = [r for batch in stream_batches(path, 3, max_pairs=3) for r in batch["row"].tolist()]
    assert capped == [0, 1, 2, 0, 1, 2]  # the same usable-row rule as a table: at most max_pairs, then a new epoch


def test_stream_resumes_at_the_same_pair_and_splits_ranks(tmp_path):
    path = write_parquet(tmp_path / "pairs.parquet", 12, corrupt_rows=[5])
    full = stream_batches(path, 7, num_workers=2)
    position = sum(len(batch["row"]) + batch["skipped"] for batch in full[:3])  # what PairBatches.advance adds up
    assert_same_batches(stream_batches(path, 4, position=position, num_workers=2), full[3:])
    ranks = [[r for b in stream_batches(path, 3, rank=r, world=2) for r in b["row"].tolist()] for r in (0, 1)]
    assert ranks == [[0, 2, 4, 6, 8, 10], [1, 3, 7, 9, 11, 1]]  # every 2nd usable row; row 5 skipped on rank 1


def test_epoch_sampler_shards_ranks_and_resumes():
    keys = [list(zip(range(12), iter(EpochSampler(10, seed=3, rank=r, world=2)), strict=False)) for r in (0, 1)]
    first_epoch = [[k for _, k in ks][:5] for ks in keys]
    positions = [p for ks in first_epoch for _, p in ks]
    assert sorted(positions) == list(range(10))  # the two ranks split epoch 0 without overlap
    full = [k for _, k in zip(range(12), iter(EpochSampler(10, seed=3)), strict=False)]
    resumed = [k for _, k in zip(range(5), iter(EpochSampler(10, seed=3, start=7)), strict=False)]
    assert resumed == full[7:12]
    assert full[10][0] == 1 and full[:10] != full[10:]  # a new permutation in epoch 1


def test_cache_gives_the_same_loss_as_the_uncached_path(tmp_path):
    family = build_family("sd")
    torch.manual_seed(0)  # LoRA A is drawn from the global RNG: the same loss whichever tests ran before
    family.add_lora(rank=4)
    with torch.no_grad():  # a non-identity LoRA, so the loss depends on the data (policy != reference)
        for name, p in family.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    path = write_parquet(tmp_path / "p.parquet", 6)
    cfg = data_cfg(path, empty_prompt_fraction=0.5, cache_dir=str(tmp_path / "cache"))
    table = open_pairs(cfg)
    rows = usable_rows(table, cfg)
    key = cache_key(cfg, "tiny-sd", "tiny-sd", 32)
    build_cache(family, table, rows, cfg, 32, tmp_path / "cache", key, progress=False)
    assert cache_is_valid(tmp_path / "cache", key)
    assert not cache_is_valid(tmp_path / "cache", cache_key(cfg, "tiny-sd", "tiny-sd", 64))
    cached = CachedPairDataset(tmp_path / "cache", cfg, seed=0)
    raw = PairDataset(table, rows, cfg, 32, seed=0)
    keys = [(1, 0), (1, 3), (2, 5), (0, 2)]  # several epochs: different flips and empty captions
    inputs, losses = [], []
    for dataset in (raw, cached):
        batch = collate_pairs([dataset[k] for k in keys])
        inputs.append(pair_model_inputs(family, batch))
        with torch.no_grad():
            loss, _ = dpo_step(family, *inputs[-1], DPOConfig(beta=5000.0), torch.Generator().manual_seed(0))
        losses.append(loss)
    (lat_raw, cond_raw, pref_raw), (lat_cached, cond_cached, pref_cached) = inputs
    torch.testing.assert_close(lat_raw, lat_cached, atol=1e-5, rtol=0)  # only batch-size float noise
    assert cond_raw.keys() == cond_cached.keys()
    for key in cond_raw:
        torch.testing.assert_close(cond_raw[key], cond_cached[key], atol=1e-5, rtol=0)
    assert torch.equal(pref_raw, pref_cached)
    assert abs(losses[0].item() - 0.693147) > 0.1  # the data moves the loss far from log 2...
    # ...and both paths agree. beta = 5000 multiplies error differences by 2500, so float noise of 1e-8..1e-7 in the
    # errors (batch size, thread count) shows at 1e-5..1e-4 here; a wrong pair, label or time id would move it ~0.1
    torch.testing.assert_close(losses[0], losses[1], atol=1e-3, rtol=0)


def test_cache_never_replaces_a_folder_it_did_not_write(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", 2)
    cfg = data_cfg(path, cache_dir=str(tmp_path))  # e.g. `data.cache_dir: .` by mistake
    table = open_pairs(cfg)
    with pytest.raises(UserError, match="exists and is not a folder this command wrote"):
        build_cache(build_family("sd"), table, usable_rows(table, cfg), cfg, 32, tmp_path, "key", progress=False)
    assert path.is_file()


def test_cache_rejects_random_crop(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", 2)
    cfg = data_cfg(path, random_crop=True)
    table = open_pairs(cfg)
    with pytest.raises(UserError, match="random_crop: false"):
        build_cache(build_family("sd"), table, [0, 1], cfg, 32, tmp_path / "c", "k", progress=False)
