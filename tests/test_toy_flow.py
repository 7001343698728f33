"""The flow-matching toy `toy-flow` (assets/toy-flow, built by scripts/make_toy_flow_assets.py): a stock
StableDiffusion3Pipeline carrying SD3.5's settings, inside the quality window its build promises, and sampled by the
family layer exactly as by the stock pipeline. (Its LoRAs load whole into the stock pipeline: the contract tests run
every configs/<method>/toy-flow.yaml on it; RLG's identities: test_infer_rlg.)"""

from __future__ import annotations

import json

import torch
from sampling import family_sampler_images, stock_images

from diffalign.hub import TOY_MODELS
from diffalign.models import load_family
from diffalign.models.tiny import published

TOY_FLOW = TOY_MODELS["toy-flow"]
REPORT = json.loads((TOY_FLOW.parent / "build_report.json").read_text())


def test_toy_flow_is_a_stock_sd3_pipeline_with_sd35_settings():
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    pipe = StableDiffusion3Pipeline.from_pretrained(TOY_FLOW, local_files_only=True)
    sd35 = published("sd35")["scheduler"]
    assert type(pipe.scheduler).__name__ == sd35["_class_name"] and pipe.scheduler.config.shift == sd35["shift"]
    assert type(pipe.transformer) is SD3Transformer2DModel and pipe.transformer.config.qk_norm == "rms_norm"
    assert all(type(e) is CLIPTextModelWithProjection for e in (pipe.text_encoder, pipe.text_encoder_2))
    assert type(pipe.text_encoder_3) is T5EncoderModel
    assert pipe.vae.config.shift_factor == REPORT["vae"]["shift_factor"]  # SD3's latent convention, measured
    family = load_family("toy-flow")
    assert family.name == "sd3" and family.sampling_defaults == REPORT["sampling_defaults"]


def test_the_build_is_inside_the_quality_window_on_fresh_seeds():
    """Held-out prompts all-correct in [0.15, 0.50] and training prompts >= 0.60 at the default settings: room for
    every method to show a gain on a model that has learnt the world."""
    assert REPORT["quick"] is False
    assert 0.15 <= REPORT["heldout"]["all_correct"] <= 0.50
    assert REPORT["train"]["all_correct"] >= 0.60
    assert REPORT["heldout_few_steps"]["n"] == REPORT["heldout"]["n"]  # the few-step figure ReNO starts from


def test_the_family_sampler_is_the_stock_pipeline_at_the_default_settings():
    family = load_family("toy-flow")
    steps, guidance = family.sampling_defaults["num_steps"], family.sampling_defaults["guidance_scale"]
    prompt, seed = "a green triangle on a white background", 5
    stock = stock_images(family.pipe, prompt, seed, steps, family, guidance)
    ours = family_sampler_images(family, prompt, seed, steps, guidance)
    assert ours.shape == stock.shape == (1, 3, 32, 32)
    torch.testing.assert_close(ours, stock.float(), atol=1e-5, rtol=0)


def test_the_build_script_writes_a_loadable_pipeline_and_its_report(tmp_path):
    """A smoke build (`--quick`: same files, untrained) into a fresh folder, never over the shipped one."""
    import subprocess
    import sys
    from pathlib import Path

    from diffusers import StableDiffusion3Pipeline

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_toy_flow_assets.py"
    out = tmp_path / "toy-flow"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "build_report.json").read_text())
    assert report["quick"] is True and set(report["seconds"]) >= {"train_denoiser", "evaluate", "total"}
    assert not (tmp_path / "toy-flow.partial").exists()
    pipe = StableDiffusion3Pipeline.from_pretrained(out / "model", local_files_only=True)
    assert pipe.vae.config.shift_factor == report["vae"]["shift_factor"]
