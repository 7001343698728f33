"""RLG (inference-time RL guidance) on the tiny pipelines of every family: the family sampler and the stock pipeline,
with and without CFG, LoRA (ours or plain peft/diffusers) or a second full denoiser, and the CLI."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from conftest import build_family, build_pipeline, family_of
from sampling import family_sampler_images, perturb_lora, stock_images, with_family_scheduler

from diffalign.errors import UserError
from diffalign.infer.rlg import double_batch, parse_scales, rl_guidance, rlg_predict

KINDS = ["sd", "sdxl", "sd3", "flux", "toy-flow"]  # toy-flow: the trained SD3-class toy, RLG's own setting
PROMPT, SEED, STEPS = "a blue square on a gray background", 3, 2


def lora_family(kind: str):
    """A tiny family with a perturbed LoRA (the fine-tuned model) and a fresh copy without it (the base)."""
    family = family_of(kind)
    family.add_lora(rank=4, alpha=8.0)
    perturb_lora(family, scale=0.2)
    return family, family_of(kind)


def guidance_of(cfg: bool) -> float:
    return 3.0 if cfg else 1.0  # FLUX: true CFG with the empty negative (see stock_images)


def images(family, guidance: float, scale: float | None = None, **rlg) -> torch.Tensor:
    """The family sampler's image (with RLG at `scale` when given)."""
    if scale is None:
        return family_sampler_images(family, PROMPT, SEED, STEPS, guidance)
    with rl_guidance(family, scale, **rlg):
        return family_sampler_images(family, PROMPT, SEED, STEPS, guidance)


def stock(family, guidance: float, scale: float, **rlg) -> torch.Tensor:
    """The stock pipeline's image with RLG (the family's DDIM swapped in where the stock scheduler differs)."""
    pipe = with_family_scheduler(family)
    with rl_guidance(pipe, scale, **rlg):
        out = stock_images(pipe, PROMPT, SEED, STEPS, family, guidance)
    assert getattr(pipe, family.denoiser_attr) is family.denoiser  # restored after the block
    return out.float()


@pytest.mark.parametrize("cfg", [False, True], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("kind", KINDS)
def test_rlg_in_the_family_sampler_and_the_stock_pipeline(kind, cfg):
    """Each prediction is the paper's formula (one batched call or two); w = 0 gives the base model's image, w = 1
    the fine-tuned one (same seed); at w = 1.5 (and with zero_init_step) family sampler and stock pipeline agree."""
    family, base_family = lora_family(kind)
    guidance = guidance_of(cfg)
    check_prediction_formula(family, base_family, guidance)
    base, finetuned = images(base_family, guidance), images(family, guidance)
    assert (base - finetuned).abs().max() > 1e-2  # the LoRA matters
    torch.testing.assert_close(images(family, guidance, 0.0), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(images(family, guidance, 1.0), finetuned, atol=1e-5, rtol=0)
    guided = images(family, guidance, 1.5)
    assert (guided - finetuned).abs().max() > 1e-3
    # the stock pipeline's own call forms (0-d timestep, FLUX's ids and guidance): two calls and one batched call
    torch.testing.assert_close(stock(family, guidance, 1.5, batched=cfg), guided, atol=2e-4, rtol=0)
    if cfg:  # the fine-tuned model alone for the first step, counted in both samplers (FLUX: 2 calls per step)
        zero_init = images(family, guidance, 1.5, zero_init_step=1)
        assert (zero_init - guided).abs().max() > 1e-4 and (zero_init - finetuned).abs().max() > 1e-4
        torch.testing.assert_close(stock(family, guidance, 1.5, zero_init_step=1), zero_init, atol=2e-4, rtol=0)
        if kind == "sd":  # zero-init over every step: the fine-tuned model's image
            torch.testing.assert_close(
                images(family, guidance, 1.5, zero_init_step=STEPS), finetuned, atol=1e-5, rtol=0
            )


def check_prediction_formula(family, base_family, guidance: float) -> None:
    """The RLG prediction equals base_cfg + w (ft_cfg - base_cfg), each model with its own CFG (the paper's formula),
    computed from two separate models; one batched call (peft routes each half) and two calls agree."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, family.latent_channels, 16, 16, generator=g)
    t = family.schedule(4, x).timesteps[1]
    cond, uncond = family.encode_prompts(["a red circle", "a cat"]), family.encode_negative()
    with torch.no_grad():
        base = base_family.predict(x, t, cond, uncond, guidance)
        finetuned = family.predict(x, t, cond, uncond, guidance)
        for scale in (0.5, 2.0):
            expected = base + scale * (finetuned - base)
            for batched, calls in ((True, 1), (False, 2)):
                predict = rlg_predict(family, scale, batched=batched)
                torch.testing.assert_close(predict(x, t, cond, uncond, guidance), expected, atol=2e-4, rtol=1e-5)
                assert predict.wrapper.calls == calls  # CFG's two halves ride in the same call


def test_batching_keeps_unbatched_inputs():
    """Only batch-first tensors are doubled: 0-d timesteps, the family's unbatched inputs (FLUX's ids) and
    non-tensors stay; nested dicts (SDXL's added_cond_kwargs) are doubled inside."""
    x, ids = torch.zeros(3, 4), torch.zeros(3, 3)
    args, kwargs = double_batch(
        (x, torch.tensor(5.0)), {"img_ids": ids, "added": {"time_ids": torch.zeros(3, 6)}, "flag": False},
        3, frozenset({"img_ids"}),
    )  # fmt: skip
    assert args[0].shape == (6, 4) and args[1].shape == ()
    assert kwargs["img_ids"] is ids and kwargs["added"]["time_ids"].shape == (6, 6) and kwargs["flag"] is False


def test_second_full_denoiser_as_finetuned_or_as_base():
    """A second full checkpoint instead of a LoRA: finetuned= (the pipeline's denoiser is the base) or base= (the
    pipeline's is the fine-tuned one); w = 0 / 1 are the two models, stock and family sampler agree."""
    base_family = build_family("sd")
    tuned = copy.deepcopy(base_family.denoiser)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    tuned_family = build_family("sd")
    tuned_family.pipe.unet = tuned
    guidance = 3.0
    base, finetuned = images(base_family, guidance), images(tuned_family, guidance)
    assert (base - finetuned).abs().max() > 1e-2
    torch.testing.assert_close(images(base_family, guidance, 0.0, finetuned=tuned), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(images(base_family, guidance, 1.0, finetuned=tuned), finetuned, atol=1e-5, rtol=0)
    other_side = build_family("sd")
    other_side.pipe.unet = copy.deepcopy(tuned)
    torch.testing.assert_close(images(other_side, guidance, 0.0, base=base_family.denoiser), base, atol=1e-5, rtol=0)
    guided = images(base_family, guidance, 2.0, finetuned=tuned)
    torch.testing.assert_close(stock(base_family, guidance, 2.0, finetuned=tuned), guided, atol=2e-4, rtol=0)
    torch.testing.assert_close(images(other_side, guidance, 2.0, base=base_family.denoiser), guided, atol=1e-5, rtol=0)


def test_a_lora_saved_with_plain_peft_and_diffusers_works(tmp_path):
    """A LoRA made with plain peft and saved the diffusers training-script way (convert_state_dict_to_diffusers +
    save_lora_weights): loaded with family.load_lora, w = 1 is the in-memory peft model, w = 0 the base."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    base_family = build_family("sd")
    peft_family = build_family("sd")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    inject_adapter_in_model(config, peft_family.denoiser)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(peft_family.denoiser))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers, safe_serialization=True)
    loaded = build_family("sd")
    loaded.load_lora(tmp_path / "lora")
    in_memory = family_sampler_images(peft_family, PROMPT, SEED, STEPS, 3.0)
    assert (in_memory - images(base_family, 3.0)).abs().max() > 1e-2
    torch.testing.assert_close(images(loaded, 3.0, 1.0), in_memory, atol=1e-5, rtol=0)
    torch.testing.assert_close(images(loaded, 3.0, 0.0), images(base_family, 3.0), atol=1e-5, rtol=0)


def test_stock_pipeline_with_a_loaded_lora_folder(tmp_path):
    """The README recipe: a stock pipeline, pipe.load_lora_weights(folder), `with rl_guidance(pipe, w)`: w = 0 is the
    pipeline without the LoRA, w = 1 with it."""
    family, _ = lora_family("sd3")
    family.save_lora(tmp_path / "lora")
    plain = build_pipeline("sd3")
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "pt", "max_sequence_length": 32}
    run = lambda pipe: pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images  # noqa: E731
    base = run(plain)
    plain.load_lora_weights(str(tmp_path / "lora"))
    finetuned = run(plain)
    for scale, expected in ((0.0, base), (1.0, finetuned)):
        with rl_guidance(plain, scale):
            torch.testing.assert_close(run(plain), expected, atol=1e-5, rtol=0)
    with rl_guidance(plain, 2.0):
        assert (run(plain) - finetuned).abs().max() > 1e-3


def test_rlg_without_a_finetuned_model_is_a_user_error():
    family = build_family("sd")
    with pytest.raises(UserError, match="needs a fine-tuned model"), rl_guidance(family, 1.5):
        pass


@pytest.mark.parametrize("text", ["", "0,a", "1,1", "nan", "0,,1"])
def test_bad_scale_lists_are_user_errors(text):
    with pytest.raises(UserError, match="comma-separated"):
        parse_scales(text)
    assert parse_scales("0,0.5,1,1.5,2") == [0.0, 0.5, 1.0, 1.5, 2.0]


# ------------------------------------------------------------------------------------------------------------ CLI
def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`diffalign ARGS` in this process (exit code, stdout, stderr)."""
    from diffalign.cli import main

    monkeypatch.setattr(sys, "argv", ["diffalign", *args])
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def saved_lora(tmp_path_factory):
    family, _ = lora_family("sd")
    return family.save_lora(tmp_path_factory.mktemp("lora") / "lora")


def test_generate_sweep_writes_each_scale_a_grid_and_a_score_table(saved_lora, tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    out = tmp_path / "sweep"
    common = ["--model", "tiny-sd", "-p", "a red circle on a black background", "-n", "2", "--seed", "5"]
    code, stdout, stderr = run_main(
        monkeypatch, capsys, "generate", *common, "--lora", str(saved_lora), "--rlg-sweep", "0,1,2",
        "--score", "toy-gold", "--out", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    folders = {scale: out / f"rlg-{scale}" for scale in ("0", "1", "2")}
    for folder in folders.values():
        assert sorted(p.name for p in folder.glob("*.png")) == ["00000.png", "00001.png"]
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 32, 3 * 32)  # a row per scale, a column per seed
    rows = [line for line in stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 3 and "±" in rows[0]
    # same seeds across scales: scale 0 is the model without the LoRA
    code, _, stderr = run_main(monkeypatch, capsys, "generate", *common, "--out", str(tmp_path / "plain"))
    assert code == 0, stderr
    for name in ("00000.png", "00001.png"):
        plain = np.asarray(Image.open(tmp_path / "plain" / name)).astype(int)
        assert np.abs(np.asarray(Image.open(folders["0"] / name)).astype(int) - plain).max() <= 1
    assert np.abs(np.asarray(Image.open(folders["2"] / "00000.png")).astype(int) - plain).max() > 2
    index = [json.loads(line) for line in (out / "generate.jsonl").read_text().splitlines()]
    assert [(r["file"], r["rlg_scale"]) for r in index][::2] == [("rlg-0/00000.png", 0), ("rlg-1/00000.png", 1),
                                                                 ("rlg-2/00000.png", 2)]  # fmt: skip
    # the sweep's folder is its own: a smaller run into it replaces it whole (no stale rlg-2/)
    code, _, stderr = run_main(monkeypatch, capsys, "generate", *common, "--lora", str(saved_lora),
                               "--rlg-sweep", "0,1", "--out", str(out))  # fmt: skip
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["generate.jsonl", "grid.png", "rlg-0", "rlg-1"]
    # a full fine-tuned denoiser instead of a LoRA: scale 0 is still the model as loaded
    tuned = build_pipeline("sd").unet
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    tuned.save_pretrained(tmp_path / "denoiser")
    args = ["--denoiser", str(tmp_path / "denoiser"), "--rlg-sweep", "0,1", "--out", str(tmp_path / "full")]
    code, _, stderr = run_main(monkeypatch, capsys, "generate", *common, *args)
    assert code == 0, stderr
    full = [np.asarray(Image.open(tmp_path / "full" / f"rlg-{w}" / "00001.png")).astype(int) for w in (0, 1)]
    assert np.abs(full[0] - plain).max() <= 1 and np.abs(full[1] - plain).max() > 2


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--lora", "{tmp}/missing", "--rlg-scale", "1.5"], "is not a folder"),
        (["--lora", "{tmp}", "--rlg-scale", "1.5"], "has no .safetensors"),
        (["--lora", "{lora}", "--rlg-sweep", "0,x"], "comma-separated"),
        (["--rlg-scale", "1.5"], "--lora"),
        (["--lora", "{lora}", "--rlg-scale", "1", "--rlg-sweep", "0,1"], "not both"),
        (["--lora", "{lora}", "--rlg-scale", "1", "--score", "no-such-reward"], "no-such-reward"),
        (["--denoiser", "{tmp}", "--rlg-scale", "1"], "no config.json"),
        (["--denoiser", "{tmp}", "--lora", "{lora}"], "not both"),
    ],
)
def test_generate_rlg_input_errors_are_one_line_before_the_model_loads(
    args, fragment, saved_lora, tmp_path, monkeypatch, capsys
):
    import diffalign.models

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the input check")

    monkeypatch.setattr(diffalign.models, "load_family", no_loading)
    args = [a.format(tmp=tmp_path, lora=saved_lora) for a in args]
    code, _, stderr = run_main(monkeypatch, capsys, "generate", "--model", "tiny-sd", "-p", "x", *args)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], stderr


def test_a_lora_that_does_not_fit_is_one_error_line(saved_lora, tmp_path, monkeypatch, capsys):
    """A LoRA folder that does not fit the model exits 2 with one line naming it: an SD LoRA given to SDXL (in
    process), a corrupt weights file (as a user runs it, diffusers' own logging included)."""
    from clitools import run_cli

    args = ["-p", "x", "--rlg-scale", "2", "--out", str(tmp_path / "out")]
    code, _, stderr = run_main(
        monkeypatch, capsys, "generate", "--model", "tiny-sdxl", "--lora", str(saved_lora), *args
    )
    assert code == 2 and stderr.strip().splitlines()[-1].startswith(f"error: LoRA {saved_lora} "), stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    result = run_cli("generate", "--model", "tiny-sd", "--lora", str(broken), *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: LoRA {broken} does not load"), result.stderr
    assert not (tmp_path / "out").exists()
