"""The toy shapes world: scene generator and captions, the gold checker, the bundled assets, evaluate()."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from diffalign.gym import world
from diffalign.gym.gold import gold_check, gold_score, read_scenes
from diffalign.hub import ASSETS_DIR, TOY_MODEL_DIR

TOY_DIR = ASSETS_DIR / "toy"


# --------------------------------------------------------------------------------------------------------- generator
def test_generate_is_deterministic_in_the_seed():
    images, prompts = world.generate(16, seed=3)
    again, prompts_again = world.generate(16, seed=3)
    other, _ = world.generate(16, seed=4)
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, again) and prompts == prompts_again
    assert not torch.equal(images, other)


def test_scenes_cover_every_combination_except_shape_on_its_own_colour():
    scenes = world.all_scenes()
    expected = {(s, c, b) for s, c, b in itertools.product(world.SHAPES, world.COLOURS, world.BACKGROUNDS) if c != b}
    assert {(s.shape, s.colour, s.background) for s in scenes} == expected
    assert len(scenes) == len(expected) == 42


def test_heldout_split_is_disjoint_and_every_attribute_pair_is_still_trained():
    train, heldout = set(world.train_prompts()), set(world.heldout_prompts())
    assert train.isdisjoint(heldout) and train | heldout == set(world.all_prompts())
    assert len(heldout) == 9
    trained = world.train_scenes()
    for a, b in itertools.combinations(world.ATTRIBUTES, 2):
        pairs = {(getattr(s, a), getattr(s, b)) for s in world.all_scenes()}
        assert pairs == {(getattr(s, a), getattr(s, b)) for s in trained}, f"a ({a}, {b}) pair is never trained"


def test_training_data_never_shows_a_heldout_scene():
    _, prompts = world.generate(3000, seed=0, split="train")
    assert set(prompts) == set(world.train_prompts())
    _, prompts = world.generate(300, seed=0, split="heldout")
    assert set(prompts) == set(world.heldout_prompts())


def test_captions_parse_back_to_their_scene():
    for scene in world.all_scenes():
        assert world.parse_prompt(scene.prompt) == scene
    assert world.parse_prompt("A Red Circle on a Black background") == world.Scene("circle", "red", "black")
    for bad in ["a photo of a cat", "a purple circle on a black background", "a red circle on a black"]:
        with pytest.raises(ValueError):
            world.parse_prompt(bad)


def test_rendering_draws_the_asked_geometry():
    scene = world.Scene("square", "red", "black")
    image = world.render([scene], np.array([16.0]), np.array([16.0]), np.array([10.0]))[0]
    red = torch.tensor(world.COLOURS["red"]) / 255
    black = torch.tensor(world.BACKGROUNDS["black"]) / 255
    assert torch.allclose(image[:, 11:21, 11:21], red[:, None, None].expand(3, 10, 10))  # the 10x10 square
    assert torch.allclose(image[:, :10, :], black[:, None, None].expand(3, 10, 32))


# ------------------------------------------------------------------------------------------------------------ gold
@pytest.mark.parametrize("noise_std", [0.0, 15 / 255])
def test_gold_checker_reads_ground_truth(noise_std):
    images, prompts = world.generate(1000, seed=11, split="all", noise_std=noise_std)
    check = gold_check(images, prompts)
    for attribute in [*world.ATTRIBUTES, "all_correct"]:
        assert check[attribute].float().mean() >= 0.99, attribute
    scores = gold_score(images, prompts)
    assert torch.equal(scores == 1, check["all_correct"]) and scores.mean() >= 0.99


def test_gold_checker_notices_each_wrong_attribute():
    images, prompts = world.generate(300, seed=5, split="all")
    scenes = [world.parse_prompt(p) for p in prompts]
    wrong_shape = [
        world.Scene(world.SHAPES[(world.SHAPES.index(s.shape) + 1) % 3], s.colour, s.background).prompt for s in scenes
    ]
    check = gold_check(images, wrong_shape)
    assert check["shape"].float().mean() <= 0.01
    assert check["colour"].all() and check["background"].all()
    scores = gold_score(images, wrong_shape)
    assert torch.allclose(scores[check["shape"].logical_not()], torch.tensor(2 / 3))
    other_colour = {c: next(o for o in world.COLOURS if o != c and o != "white") for c in world.COLOURS}
    wrong_colour = [f"a {other_colour[s.colour]} {s.shape} on a {s.background} background" for s in scenes]
    assert gold_check(images, wrong_colour)["colour"].float().mean() <= 0.01


def test_gold_checker_on_an_image_without_shape():
    gray = torch.full((2, 3, 32, 32), 128 / 255)
    seen = read_scenes(gray)
    assert seen == {"background": ["gray", "gray"], "colour": [None, None], "shape": [None, None]}
    scores = gold_score(gray, ["a red circle on a gray background", "a red circle on a black background"])
    assert torch.allclose(scores, torch.tensor([1 / 3, 0.0]))


def test_gold_checker_validates_its_input():
    images, _ = world.generate(2, seed=0)
    with pytest.raises(ValueError):
        gold_check(images, ["a red circle on a black background"])
    with pytest.raises(ValueError):
        gold_score(images, ["a photo of a cat", "a dog"])


# ---------------------------------------------------------------------------------------------------------- assets
def test_prompt_files_match_the_world():
    assert (TOY_DIR / "prompts_train.txt").read_text().splitlines() == world.train_prompts()
    assert (TOY_DIR / "prompts_heldout.txt").read_text().splitlines() == world.heldout_prompts()
    report = json.loads((TOY_DIR / "build_report.json").read_text())
    assert 0.2 <= report["heldout"]["all_correct"] <= 0.7
    assert sum(p.stat().st_size for p in ASSETS_DIR.rglob("*") if p.is_file()) < 30e6


def test_toy_model_is_a_stock_pipeline_offline():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL_DIR, local_files_only=True)
    assert type(pipe.scheduler) is DDIMScheduler and pipe.scheduler.config.clip_sample is False
    assert len(pipe.tokenizer("a red circle on a black background").input_ids) == 9  # each word one token + BOS/EOS
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a red square on a gray background"] * 2,
        num_inference_steps=4,
        guidance_scale=2.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_load_family_toy_reads_the_sampling_defaults():
    from diffalign.models import load_family

    family = load_family("toy")
    defaults = json.loads((TOY_MODEL_DIR / "diffalign.json").read_text())
    assert family.name == "sd" and family.sampling_defaults == defaults
    assert defaults["resolution"] == 32 and defaults["num_steps"] <= 25


def test_proxy_reward_prefers_the_true_caption():
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = TOY_DIR / "reward"
    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    assert processor.crop_size == {"height": 32, "width": 32}
    images, prompts = world.generate(128, seed=9, split="all", noise_std=0.03)
    mean, std = torch.tensor(processor.image_mean)[:, None, None], torch.tensor(processor.image_std)[:, None, None]
    captions = world.all_prompts()
    with torch.no_grad():
        image = model.get_image_features(pixel_values=(images - mean) / std).pooler_output
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        text = model.get_text_features(input_ids=ids).pooler_output
    similarity = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    best = [captions[i] for i in similarity.argmax(dim=1).tolist()]
    assert np.mean([b == p for b, p in zip(best, prompts, strict=True)]) >= 0.8
