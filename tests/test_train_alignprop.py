"""The AlignProp recipe: where gradients go (LoRA only, only the steps after the cut), checkpointed = plain gradients,
the official settings of the shipped configs, the random draws on resume, config errors before the model loads, the
best-weights and early-stop guards, the negative prompt. Every family and stock LoRA loading:
tests/test_gpu_check.py; kill -9 and DDP: tests/test_method_contracts.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clitools import run_cli, train_in_process
from conftest import build_family
from safetensors.torch import load_file

from diffalign.errors import UserError
from diffalign.rewards import load_reward
from diffalign.train import checkpoint, load_train_config
from diffalign.train.alignprop import AlignPropConfig, alignprop_step
from diffalign.train.sampler import Sampler

CONFIGS = Path(__file__).parents[1] / "configs" / "alignprop"
PROMPT_FILE = "hps_v2_all.txt"  # the official HPD-v2 prompt list the real configs train on
PROMPTS = ["a red circle", "a blue square"]


def train_alignprop(overrides: list[str], config: Path | None = None) -> Path:
    return train_in_process(["method=alignprop", *overrides], config)


def tiny_overrides(out: Path, kind: str = "sd") -> list[str]:
    return [
        f"model.name=tiny-{kind}",
        "model.resolution=32",
        f"output_dir={out}",
        "alignprop.reward=toy-clip",
        "alignprop.num_steps=3",
        "data.prompts=[a red circle,a blue square,a green triangle]",
        "batch_size=1",
        "report_to=none",
        "log_every=1",
        "checkpoint_every=0",
    ]


def lora_family(kind: str = "sd"):
    family = build_family(kind)
    params = family.add_lora(rank=4)
    with torch.no_grad():  # LoRA B starts at zero (the identity); make the policy differ from the reference
        g = torch.Generator().manual_seed(0)
        for name, p in family.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return family, params


def step_grads(family, params, cfg: AlignPropConfig, sampler: Sampler, seed: int = 0):
    for p in params:
        p.grad = None
    reward = load_reward("toy-clip")
    uncond = family.encode_negative()
    loss, metrics = alignprop_step(family, PROMPTS, reward, cfg, sampler, torch.Generator().manual_seed(seed), uncond)
    loss.backward()
    return loss.detach(), metrics, [p.grad.clone() if p.grad is not None else None for p in params]


def test_gradients_reach_the_lora_parameters_only():
    family, params = lora_family()
    _, metrics, grads = step_grads(family, params, AlignPropConfig(k=2), Sampler(3, 3.0, 1.0, 32))
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert metrics["grad_steps"].item() == 2
    trainable = {id(p) for p in params}
    frozen = [p for m in [family.vae, family.denoiser, *family.text_encoders()] for p in m.parameters()]
    assert all(p.grad is None for p in frozen if id(p) not in trainable)
    assert all("lora_" in n for n, p in family.denoiser.named_parameters() if p.requires_grad)


def test_full_finetune_trains_the_denoiser_against_its_frozen_copy():
    family = build_family("sd")
    params = family.enable_full_finetune()
    _, metrics, grads = step_grads(family, params, AlignPropConfig(kl_weight=1.0), Sampler(2, 3.0, 0.0, 32))
    assert metrics["drift"].item() == 0.0  # the policy equals its frozen reference copy before any update
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) > 0.9 * len(params)
    assert all(p.grad is None for p in family.vae.parameters())


def test_with_last_k_a_parameter_used_only_before_the_cut_gets_no_gradient():
    """A hook adds p_i - p_i.detach() (zero, but differentiable) to the denoiser's output at sampling step i: only the
    last K steps' p_i may receive a gradient."""
    family, params = lora_family()
    num_steps, k = 4, 2
    timesteps = family.schedule(num_steps, torch.zeros(1)).timesteps.tolist()
    probes = [torch.zeros((), requires_grad=True) for _ in range(num_steps)]

    def hook(module, args, output):
        step = timesteps.index(int(args[1].reshape(-1)[0]))
        return (output[0] + (probes[step] - probes[step].detach()), *output[1:])

    handle = family.denoiser.register_forward_hook(hook)
    try:
        step_grads(family, params, AlignPropConfig(truncation="last_k", k=k), Sampler(num_steps, 3.0, 1.0, 32))
    finally:
        handle.remove()
    assert [p.grad is None for p in probes] == [True, True, False, False]
    assert all(p.grad.abs() > 0 for p in probes[num_steps - k :])


@pytest.mark.parametrize("truncation", ["last_k", "lv"])
def test_checkpointed_and_plain_gradients_agree(truncation):
    """Per-step denoiser and VAE-decode checkpointing change memory, not numbers: same loss, same LoRA gradients
    (with DDIM noise, CFG and the KL regulariser on)."""
    family, params = lora_family()
    sampler = Sampler(4, 3.0, 1.0, 32)
    plain, checkpointed = (
        step_grads(family, params, AlignPropConfig(k=2, truncation=truncation, kl_weight=10.0, checkpoint=c), sampler)
        for c in (False, True)
    )
    torch.testing.assert_close(plain[0], checkpointed[0], atol=1e-5, rtol=0)
    assert plain[1]["drift"] > 0 and plain[1]["grad_steps"].item() == 2  # last 2 steps / 2 DRaFT-LV samples
    for a, b in zip(plain[2], checkpointed[2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "kind"), [("sd15", "sd"), ("sdxl", "sdxl"), ("sd3", "sd3"), ("flux", "flux")])
def test_shipped_configs_carry_the_official_settings(name, kind):
    """The official HPSv2 K = 1 run (mihirp1998/AlignProp HEAD b22918a, hps_k1.sh) where the family samples like
    SD 1.5; that each config runs on its family's tiny model: tests/test_gpu_check.py."""
    shipped = load_train_config(CONFIGS / f"{name}.yaml")
    assert (shipped.alignprop.reward, shipped.alignprop.k, shipped.data.source) == ("hpsv2:version=2.0", 1, PROMPT_FILE)
    assert shipped.optim.lr == 1e-3 and shipped.validation.best_by == "val/heldout"
    if kind in ("sd", "sdxl"):
        assert (shipped.alignprop.num_steps, shipped.alignprop.guidance_scale, shipped.alignprop.eta) == (50, 5.0, 1.0)


def test_the_sd15_config_validates_with_the_optimised_reward_and_keeps_the_best(tmp_path):
    """SD 1.5's config on its tiny model with everything it turns on (half-precision frozen parts, bf16 autocast):
    the loss is -scale x reward, validation uses the optimised reward, the best step is recorded."""
    out = tmp_path / "sd15"
    prompts = tmp_path / PROMPT_FILE  # what a user fetches; the official list is not shipped
    prompts.write_text("a red circle\na blue square\n")
    overrides = [
        *tiny_overrides(out, "sd"), "data.prompts=[]", f"data.source={prompts}", "max_steps=1",
        "gradient_accumulation_steps=1", "validation.prompts=[a red circle]", "validation.every=1",
        "validation.num_steps=2", "validation.heldout_reward=toy-clip",
    ]  # fmt: skip
    cfg = load_train_config(CONFIGS / "sd15.yaml", overrides)
    assert train_alignprop(overrides, CONFIGS / "sd15.yaml") == out / "lora"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (step,) = [r for r in rows if "loss" in r]
    assert step["step"] == 1 and step["loss"] == pytest.approx(-cfg.alignprop.reward_scale * step["reward"])
    assert [r["step"] for r in rows if "val/reward" in r] == [0, 1]  # validated with the optimised reward
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer_steps"] == 1 and summary["skipped_prompts"] == 0 and summary["best"]["step"] in (0, 1)


def test_eta_on_a_flow_model_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"alignprop.eta=1.0: sd3 samples with the deterministic flow-matching Euler"):
        train_alignprop([*tiny_overrides(tmp_path, "sd3"), "alignprop.eta=1", "max_steps=1"])


def test_best_weights_are_kept_and_a_falling_heldout_reward_stops_the_run(tmp_path):
    """The held-out reward (scripted: 1, 2, 1.5, 1, ...) peaks at step 1 and falls at steps 2 and 3: with early_stop 2
    the run stops at step 3 and output_dir/best holds the weights of step 1."""
    guards = [
        "max_steps=8",
        "validation.prompts=[a red circle]",
        "validation.every=1",
        "validation.num_steps=1",
        "validation.heldout_reward=alignprop_rewards:Scripted",
        "validation.best_by=val/heldout",
        "validation.early_stop=2",
        "checkpoint_every=1",
    ]
    train_alignprop([*tiny_overrides(tmp_path / "run"), *guards])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["stopped_early"] is True
    assert summary["best"] == {"metric": "val/heldout", "value": 2.0, "step": 1}
    best = tmp_path / "run" / "best"
    assert json.loads((best / "diffalign_best.json").read_text())["step"] == 1
    train_alignprop([*tiny_overrides(tmp_path / "one"), "max_steps=1"])  # the same run, stopped after step 1
    weights = lambda folder: load_file(folder / "pytorch_lora_weights.safetensors")  # noqa: E731
    one, kept, final = weights(tmp_path / "one" / "lora"), weights(best), weights(tmp_path / "run" / "lora")
    assert all(torch.equal(one[key], kept[key]) for key in one)
    assert any(not torch.equal(kept[key], final[key]) for key in kept)
    # resuming the stopped run from checkpoint-2 (its monitor state included) stops at the same step
    (tmp_path / "run" / "summary.json").unlink()
    for step, folder in checkpoint.complete_checkpoints(tmp_path / "run"):
        if step == 3:
            import shutil

            shutil.rmtree(folder)
    train_alignprop([*tiny_overrides(tmp_path / "run"), *guards])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3


def test_the_random_draws_resume_with_the_checkpointed_generator(tmp_path):
    """The random cut-off, the DDIM noise (eta 1) and the prompts' order come from the checkpointed generator and
    position: 2 steps then 2 resumed equal 4 straight, bit for bit (the kill -9 contract runs the toy config, which
    draws neither)."""
    random_draws = ["alignprop.truncation=random", "alignprop.eta=1.0", "alignprop.kl_weight=1.0", "checkpoint_every=2"]
    straight = train_alignprop([*tiny_overrides(tmp_path / "a"), *random_draws, "max_steps=4"])
    train_alignprop([*tiny_overrides(tmp_path / "b"), *random_draws, "max_steps=2"])
    resumed = train_alignprop([*tiny_overrides(tmp_path / "b"), *random_draws, "max_steps=4"])
    summaries = [json.loads((run.parent / "summary.json").read_text()) for run in (straight, resumed)]
    assert summaries[0]["rank_weight_sha256"] == summaries[1]["rank_weight_sha256"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["alignprop.reward=toy-gold"], "error: alignprop.reward: reward 'toy-gold' is not differentiable"),
        (["alignprop.reward=toy-clip,jpeg=0.1"], "error: alignprop.reward: reward 'jpeg' is not differentiable"),
        (["alignprop.reward=toy-clip", "data.source={tmp}/none.txt"], "error: prompt file not found"),
        (
            ["alignprop.reward=toy-clip", "validation.best_by=val/heldout", "validation.prompts=[a]"],
            "error: validation.best_by: val/heldout needs validation.prompts and validation.heldout_reward",
        ),
    ],
)
def test_cli_rejects_a_bad_reward_or_source_before_loading_the_model(overrides, message, tmp_path):
    (tmp_path / "empty").mkdir()  # a pipeline folder without components: loading it would fail with another error
    (tmp_path / "empty" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    config = tmp_path / "c.yaml"
    config.write_text("method: alignprop\ndata:\n  source: toy:train\n")
    result = run_cli(
        "train",
        str(config),
        f"model.name={tmp_path / 'empty'}",
        *[item.format(tmp=tmp_path) for item in overrides],
        f"output_dir={tmp_path / 'o'}",
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(message) and len([line for line in lines if line.startswith("error")]) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [([], [None, None]), (["alignprop.negative_prompt=blurry"], ["blurry", "blurry"]),
     (["alignprop.negative_prompt=blurry", "validation.negative_prompt=dark"], ["blurry", "dark"])],
)  # fmt: skip
def test_the_negative_prompt_conditions_training_and_by_default_validation(extra, expected, tmp_path, monkeypatch):
    """alignprop.negative_prompt (official `negative_prompts`) is the CFG negative of the training samples and, unless
    validation.negative_prompt is given, of the validation samples."""
    from diffalign.models.sd import SDFamily

    asked, encode = [], SDFamily.encode_negative

    def spy(self, negative_prompt=None):
        asked.append(negative_prompt)
        return encode(self, negative_prompt)

    monkeypatch.setattr(SDFamily, "encode_negative", spy)
    overrides = [*tiny_overrides(tmp_path / "run"), "max_steps=1", "alignprop.guidance_scale=3.0", *extra]
    train_alignprop([*overrides, "validation.prompts=[a red circle]", "validation.guidance_scale=3.0"])
    assert asked == expected  # once for training, once for the final validation
