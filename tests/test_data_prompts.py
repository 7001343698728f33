"""Training prompts: the sources (file, list, toy world) and the resumable, process-split batch source."""

from __future__ import annotations

import itertools

import pytest

from diffalign.config import PromptConfig
from diffalign.data.loader import PromptBatches
from diffalign.data.prompts import TOY_TRAIN, load_prompts
from diffalign.errors import UserError
from diffalign.gym.world import train_prompts


def test_prompt_sources(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    (tmp_path / "p.jsonl").write_text('{"text": "a cat"}\n{"text": "a dog"}\n')
    assert load_prompts(PromptConfig(source=str(tmp_path / "p.txt"))) == ["a cat", "a dog"]
    assert load_prompts(PromptConfig(source=str(tmp_path / "p.jsonl"), column="text")) == ["a cat", "a dog"]
    assert load_prompts(PromptConfig(prompts=["x", "y"])) == ["x", "y"]
    assert load_prompts(PromptConfig(source=TOY_TRAIN)) == train_prompts()
    with pytest.raises(UserError, match="no training prompts"):
        load_prompts(PromptConfig())
    with pytest.raises(UserError, match="either as data.source"):
        load_prompts(PromptConfig(source=TOY_TRAIN, prompts=["x"]))
    with pytest.raises(UserError, match="prompt file not found"):
        load_prompts(PromptConfig(source=str(tmp_path / "missing.txt")))


def take(batches: PromptBatches, n: int) -> list[list[str]]:
    return list(itertools.islice(batches, n))


def test_every_epoch_is_a_seeded_permutation_split_between_processes():
    prompts = [f"p{i}" for i in range(10)]
    ranks = [take(PromptBatches(prompts, 5, seed=7, rank=r, world=2), 2) for r in (0, 1)]  # 2 batches = 2 epochs
    for epoch in range(2):
        both = ranks[0][epoch] + ranks[1][epoch]
        assert sorted(both) == sorted(prompts)  # each epoch covers every prompt once, split between the ranks
    assert ranks[0][0] != ranks[0][1]  # a new order every epoch
    assert take(PromptBatches(prompts, 5, seed=7, rank=0, world=2), 2) == ranks[0]  # deterministic in the seed
    assert take(PromptBatches(prompts, 5, seed=8, rank=0, world=2), 2) != ranks[0]
    in_order = [prompts[:4], prompts[4:8], prompts[8:] + prompts[:2]]
    assert take(PromptBatches(prompts, 4, seed=0, shuffle=False), 3) == in_order


def test_a_source_reopened_at_its_position_continues_where_it_stopped():
    prompts = [f"p{i}" for i in range(7)]
    straight = PromptBatches(prompts, 3, seed=1, rank=1, world=2)
    first = take(straight, 2)
    position = sum(straight.advance(b) for b in first)
    assert position == 6 and all(straight.skipped(b) == 0 for b in first) and straight.unit == "prompts"
    rest = take(straight, 3)
    assert take(PromptBatches(prompts, 3, seed=1, rank=1, world=2, position=position), 3) == rest
