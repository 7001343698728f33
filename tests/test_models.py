"""The model-family layer, checked on tiny same-class pipelines of every family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ALL_KINDS, FAMILY_KINDS, build_family, build_pipeline, family_of
from safetensors.torch import load_file, save_file
from sampling import family_sampler_images, perturb_lora, stock_images, with_family_scheduler

from diffalign.models import FAMILIES, cond_select, family_for_pipeline, load_family
from diffalign.models.base import cond_cat, cond_expand

PROMPTS = ["a red circle on a black background", "a photo of a cat", ""]
EXPECTED_FAMILY = {"sd": "sd", "sd-v": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "flux-schnell": "flux"}
DENOISER_CLASS = {
    "sd": "UNet2DConditionModel",
    "sdxl": "UNet2DConditionModel",
    "sd3": "SD3Transformer2DModel",
    "flux": "FluxTransformer2DModel",
}


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_family_is_detected_from_the_pipeline_class(kind):
    family = build_family(kind)
    assert family.name == EXPECTED_FAMILY[kind]
    assert isinstance(family, FAMILIES[family.name])
    assert type(family.denoiser).__name__ == DENOISER_CLASS[family.name]
    assert family.latent_shape(2, 32) == (2, family.latent_channels, 16, 16)


def test_tiny_pipelines_are_deterministic_in_the_seed():
    a, b, c = (build_pipeline("sd", seed=s).unet.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_pipeline_class_is_a_user_error():
    from diffalign.errors import UserError

    with pytest.raises(UserError, match="not supported"):
        family_for_pipeline(object())


# ------------------------------------------------------------------------------------------------------- prompts
def test_prompt_encoding_shapes_and_cache_roundtrip(family, tmp_path):
    cond = family.encode_prompts(PROMPTS)
    uncond = family.encode_negative()
    assert set(cond) == set(uncond) and cond
    for key, value in cond.items():
        assert value.shape[0] == len(PROMPTS) and uncond[key].shape[0] == 1
        assert value.shape[1:] == uncond[key].shape[1:]
        assert torch.isfinite(value).all()
    # distinct prompts give distinct embeddings; one prompt alone encodes the same as in a batch
    assert not torch.allclose(cond["prompt_embeds"][0], cond["prompt_embeds"][1])
    single = family.encode_prompts(PROMPTS[1:2])
    for key in cond:
        torch.testing.assert_close(single[key][0], cond[key][1], atol=1e-5, rtol=1e-5)
    # cacheable: a safetensors round trip is exact, and helpers index/concat/broadcast it
    save_file({k: v.contiguous() for k, v in cond.items()}, tmp_path / "cond.safetensors")
    loaded = load_file(tmp_path / "cond.safetensors")
    assert all(torch.equal(loaded[k], cond[k]) for k in cond)
    both = cond_cat([cond_select(cond, [0]), cond_expand(uncond, 2)])
    assert all(v.shape[0] == 3 for v in both.values())


def test_sdxl_negative_is_zero_only_when_no_negative_prompt_is_given():
    """As the stock pipeline: force_zeros_for_empty_prompt zeroes the negative only when none is given; an explicit
    "" is encoded like any prompt."""
    family = build_family("sdxl")
    assert family.pipe.config.force_zeros_for_empty_prompt
    assert all((v == 0).all() for v in family.encode_negative().values())
    empty = family.encode_negative("")
    assert any((v != 0).any() for v in empty.values())
    for key, value in family.encode_prompts([""]).items():
        torch.testing.assert_close(empty[key], value)
    assert any((v != 0).any() for v in family.encode_negative("blurry").values())


def test_cond_cat_refuses_conditionings_with_different_keys():
    a = {"prompt_embeds": torch.zeros(1, 2)}
    b = {"prompt_embeds": torch.zeros(1, 2), "time_ids": torch.zeros(1, 6)}
    assert cond_cat([a, a])["prompt_embeds"].shape == (2, 2)
    for conds in ([a, b], [b, a]):
        with pytest.raises(ValueError, match="different keys"):
            cond_cat(conds)


# ------------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_training_input_and_target_match_the_scheduler(kind):
    """x_t and the target agree with the scheduler's own add_noise / get_velocity / scale_noise."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    family = build_family(kind)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, family.latent_channels, 16, 16, generator=g)
    noise = torch.randn(4, family.latent_channels, 16, 16, generator=g)
    t = family.sample_train_timesteps(4, generator=g)
    assert t.shape == (4,)
    noisy, target = family.noisy_and_target(x0, noise, t)
    if family.name in ("sd", "sdxl"):
        scheduler = DDPMScheduler.from_config(family.pipe.scheduler.config)
        torch.testing.assert_close(noisy, scheduler.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5)
        expected = noise if kind != "sd-v" else scheduler.get_velocity(x0, noise, t)
        assert family.prediction_type == ("v_prediction" if kind == "sd-v" else "epsilon")
    else:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(family.pipe.scheduler.config)
        torch.testing.assert_close(noisy, scheduler.scale_noise(x0, t, noise), atol=1e-5, rtol=1e-5)
        expected = noise - x0  # rectified-flow velocity target, as diffusers' SD3/FLUX training scripts
    torch.testing.assert_close(target, expected, atol=1e-5, rtol=1e-5)
    # a prediction has the target's shape
    cond = family.encode_prompts(["a red circle"] * 4)
    with torch.no_grad():
        pred = family.predict(noisy, t, cond)
    assert pred.shape == target.shape


# ------------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("kind", [*ALL_KINDS, "toy", "toy-flow"])
@pytest.mark.parametrize(("steps", "resolution"), [(1, 32), (3, 48)])
def test_sampler_matches_the_stock_pipeline(kind, steps, resolution):
    """Our differentiable sampler + decode reproduces the stock pipeline __call__ (eta = 0, CFG on; FLUX-dev with
    true CFG) for every published scheduler config. Where the stock scheduler is not DDIM / flow-match Euler (PNDM,
    Euler, Euler-Ancestral), the stock pipeline runs with the family's DDIM swapped in: the family sampler is a
    DDIM of the same model, not a copy of another scheduler."""
    family = family_of(kind)
    guidance = 1.0 if kind == "flux-schnell" else 3.0
    prompt, seed = "a blue square on a gray background", 3
    stock = stock_images(with_family_scheduler(family), prompt, seed, steps, family, guidance, resolution)
    ours = family_sampler_images(family, prompt, seed, steps, guidance, resolution)
    assert ours.shape == stock.shape == (1, 3, resolution, resolution)
    torch.testing.assert_close(ours, stock.float(), atol=2e-4, rtol=0)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_initial_noise_is_unit_gaussian_whatever_the_pipeline_scheduler(kind):
    """x_T of the family sampler is N(0, I): never scaled by an Euler scheduler's init_noise_sigma (~14.6), which
    made every sample start 14.6x too loud on SDXL and the Turbos."""
    family = build_family(kind)
    noise = family.initial_noise(64, 32, torch.Generator().manual_seed(0))
    assert abs(noise.std().item() - 1) < 0.02 and abs(noise.mean().item()) < 0.02
    if "Euler" in type(family.pipe.scheduler).__name__ and kind != "sd3" and "flux" not in kind:
        assert float(family.pipe.scheduler.init_noise_sigma) > 10  # the stock sigma the noise must not carry


def test_ddim_settings_are_explicit_never_ddims_defaults():
    """The family DDIM takes the model's schedule, prediction type and step grid from the pipeline scheduler, but
    clip_sample only from a DDIM config (DDIM's default True clamped x0 in latent space under DPM-Solver and
    Euler-Ancestral configs that lack the key) and ends at the clean sample unless a DDIM/PNDM config says not to."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    from diffalign.models.sd import ddim_settings

    dpm = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert "clip_sample" not in dpm.config
    settings = ddim_settings(dpm)
    assert settings["clip_sample"] is False and settings["set_alpha_to_one"] is True
    assert (settings["beta_start"], settings["beta_schedule"]) == (0.00085, "scaled_linear")
    turbo = EulerAncestralDiscreteScheduler(timestep_spacing="trailing", steps_offset=1)
    assert ddim_settings(turbo)["timestep_spacing"] == "trailing"
    assert ddim_settings(DDIMScheduler(clip_sample=True))["clip_sample"] is True  # the pipeline runs DDIM itself
    assert ddim_settings(DDIMScheduler(set_alpha_to_one=False))["set_alpha_to_one"] is False
    one_step = DDIMScheduler(**ddim_settings(turbo))
    one_step.set_timesteps(1)
    assert one_step.timesteps.tolist() == [999]  # a Turbo's single step starts from pure noise
    from diffalign.errors import UserError

    with pytest.raises(UserError, match="thresholding"):
        ddim_settings(DDIMScheduler(thresholding=True))


def test_toy_with_a_dpm_solver_config_samples_like_with_its_ddim():
    """The toy model with its scheduler swapped to a DPM-Solver config (no clip_sample key): the family sampler
    gives nearly the toy's own DDIM images (they differ only in the last step landing on alpha = 1, as DPM-Solver's
    does). Before, DDIM's default clip_sample=True clamped x0 in latent space: mean pixel difference 0.73, gold
    all-correct 0.79 -> 0.04."""
    from diffusers import DPMSolverMultistepScheduler

    from diffalign.models import family_for_pipeline

    reference = load_family("toy")
    swapped = load_family("toy")
    swapped.pipe.scheduler = DPMSolverMultistepScheduler.from_config(reference.pipe.scheduler.config)
    swapped = family_for_pipeline(swapped.pipe)
    assert not swapped.ddim.config.clip_sample
    a = family_sampler_images(reference, "a red circle on a black background", 0, 20, 4.5)
    b = family_sampler_images(swapped, "a red circle on a black background", 0, 20, 4.5)
    assert (a - b).abs().mean() < 0.02 and (a - b).abs().max() < 0.1


@pytest.mark.parametrize("kind", ["sd", "sd3", "flux"])
def test_a_resolution_the_model_cannot_take_is_one_error_line(kind):
    from diffalign.errors import UserError

    family = build_family(kind)
    step = family.resolution_multiple
    assert step == (2 if kind == "sd" else 4)  # tiny VAE factor 2; SD3 patches 2x2, FLUX packs 2x2
    assert family.latent_shape(1, 8 * step)[-1] == 8 * step // family.vae_scale_factor
    with pytest.raises(UserError, match=f"multiple of {step}"):
        family.initial_noise(1, 8 * step + 1)


@pytest.mark.parametrize("kind", ["sd3", "flux", "sd"])
def test_training_timestep_weighting_follows_the_reference_scripts(kind):
    """SD3 defaults to diffusers' logit-normal weighting (its training scripts' default), FLUX and the UNets to
    uniform; the non-uniform schemes index the scheduler's timesteps exactly as diffusers' SD3 script does."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    family = build_family(kind)
    n = 4000
    default = family.sample_train_timesteps(n, torch.Generator().manual_seed(0))
    uniform = family.sample_train_timesteps(n, torch.Generator().manual_seed(0), "uniform")
    expected_default = {"sd3": "logit_normal", "flux": "uniform", "sd": "uniform"}[kind]
    assert family.default_timestep_weighting == expected_default
    if expected_default == "uniform":
        assert torch.equal(default, uniform)
    for scheme in ("logit_normal", "mode"):
        drawn = family.sample_train_timesteps(64, torch.Generator().manual_seed(1), scheme, mode_scale=1.29)
        generator = torch.Generator().manual_seed(1)
        u = compute_density_for_timestep_sampling(scheme, 64, 0.0, 1.0, 1.29, generator=generator)
        if kind == "sd":
            expected = 999 - (u * 1000).long()
        else:
            expected = family.pipe.scheduler.__class__.from_config(family.pipe.scheduler.config).timesteps[
                (u * 1000).long()
            ]
        torch.testing.assert_close(drawn.float(), expected.float())
    logit = family.sample_train_timesteps(n, torch.Generator().manual_seed(0), "logit_normal").float()
    # logit-normal concentrates on the middle noise levels: fewer draws in the outer 10% of positions each side
    outer = lambda t: ((t < 100) | (t > 900)).float().mean()  # noqa: E731
    assert outer(logit) < 0.5 * outer(uniform.float())


def lora_family(kind: str, rank: int = 4, alpha: float = 8.0):
    family = build_family(kind)
    params = family.add_lora(rank=rank, alpha=alpha)
    perturb_lora(family)
    return family, params


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_sampling_loss_backpropagates_into_lora_only(kind):
    family, lora_params = lora_family(kind)
    assert lora_params and all("lora_" in n for n, p in family.denoiser.named_parameters() if p.requires_grad)
    cond, uncond = family.encode_prompts(["a red circle"]), family.encode_negative()
    latents = family.initial_noise(1, 32, torch.Generator().manual_seed(0))
    images = family.decode(family.sample(cond, uncond, latents=latents, num_steps=3, guidance_scale=2.0))
    images.mean().backward()
    grads = [p.grad for p in lora_params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    frozen = [
        p for m in [family.vae, family.denoiser, *family.text_encoders()] for p in m.parameters() if not p.requires_grad
    ]
    assert frozen and all(p.grad is None for p in frozen)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_checkpointed_and_plain_sampling_agree(kind):
    """Same images and same LoRA gradients with and without per-step checkpointing (also truncated, and eta > 0)."""
    family, params = lora_family(kind)
    cond, uncond = family.encode_prompts(["a red circle"]), family.encode_negative()
    eta = 1.0 if family.stochastic_sampler else 0.0

    def run(checkpoint: bool, detach_before: int):
        for p in params:
            p.grad = None
        latents = family.initial_noise(1, 32, torch.Generator().manual_seed(0)).requires_grad_(True)
        images = family.decode(
            family.sample(
                cond,
                uncond,
                latents=latents,
                num_steps=4,
                guidance_scale=2.0,
                eta=eta,
                generator=torch.Generator().manual_seed(1),
                checkpoint=checkpoint,
                detach_before=detach_before,
            )
        )
        (images**2).mean().backward()
        return images.detach(), [p.grad.clone() for p in params], latents.grad

    for detach_before in (0, 2):
        img_a, grads_a, lat_a = run(True, detach_before)
        img_b, grads_b, lat_b = run(False, detach_before)
        torch.testing.assert_close(img_a, img_b, atol=1e-5, rtol=0)
        for ga, gb in zip(grads_a, grads_b, strict=True):
            torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)
        if detach_before == 0:  # gradient reaches the initial noise (what ReNO optimises)
            torch.testing.assert_close(lat_a, lat_b, atol=1e-5, rtol=1e-4)
            assert lat_a.abs().sum() > 0
        else:
            assert lat_a is None and lat_b is None
    full = run(False, 0)[1]
    truncated = run(False, 2)[1]
    assert any(not torch.allclose(a, b) for a, b in zip(full, truncated, strict=True))


def test_flow_sampler_refuses_eta():
    family = build_family("sd3")
    latents = family.initial_noise(1, 32)
    with pytest.raises(ValueError, match="deterministic"), torch.no_grad():
        family.sample(family.encode_prompts(["x"]), latents=latents, num_steps=2, eta=0.5)


# ---------------------------------------------------------------------------------------------------------- LoRA
def shipped_lora_settings() -> list[tuple[str, str, list[str] | None]]:
    """(config name, tiny kind of its family, lora.targets or None for the family default) of every shipped config."""
    import yaml

    kinds = {"sd15": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "toy": "sd", "toy-flow": "sd3"}
    settings = []
    for path in sorted((Path(__file__).parents[1] / "configs").glob("*/*.yaml")):
        if path.parent.name == "accelerate":
            continue
        config = yaml.safe_load(path.read_text())
        settings.append((f"{path.parent.name}/{path.stem}", kinds[path.stem], config.get("lora", {}).get("targets")))
    return settings


def adapted_modules(denoiser) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name for name, module in denoiser.named_modules() if isinstance(module, LoraLayer)]


LORA_CASES = [
    *shipped_lora_settings(),
    *((f"default/{kind}", kind, None) for kind in FAMILY_KINDS),
    ("sdxl+proj_in,ff", "sdxl", ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "ff.net.2"]),
]


@pytest.mark.parametrize(("case", "kind", "targets"), LORA_CASES, ids=[c[0] for c in LORA_CASES])
def test_saved_lora_restores_every_adapted_module_in_a_stock_pipeline(case, kind, targets, tmp_path):
    """save_lora -> fresh stock pipeline + load_lora_weights: the same modules adapted (count and names), the same
    images as the in-memory LoRA model, different from the base model. Runs over every shipped config's targets:
    the diffusers-converted format kept only to_q/k/v/out adapters (SD3's config: 15 modules -> 7)."""
    family = build_family(kind)
    family.add_lora(rank=4, alpha=8.0, targets=targets)  # alpha != rank: the scale must survive the round trip
    perturb_lora(family)
    family.save_lora(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    prompt, seed = "a green triangle", 5
    in_memory = stock_images(family.pipe, prompt, seed, 3, family)
    fresh = build_pipeline(kind)
    base = stock_images(fresh, prompt, seed, 3, family)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    expected = adapted_modules(family.denoiser)
    assert len(expected) > 0 and adapted_modules(getattr(fresh, family.denoiser_attr)) == expected
    loaded = stock_images(fresh, prompt, seed, 3, family)
    assert (loaded - in_memory).abs().max() < 1e-4
    assert (loaded - base).abs().max() > 1e-3


def test_flux_default_targets_are_diffusers_flux_lora_defaults():
    family = build_family("flux")
    family.add_lora(rank=2)
    adapted = {name.split(".", 2)[-1] for name in adapted_modules(family.denoiser)}
    for target in ("attn.add_k_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.2"):
        assert target in adapted


def test_loaded_lora_has_a_reference_and_unloads(tmp_path):
    """After load_lora, reference() is the base model (it was the LoRA model); unload_lora restores the base."""
    trained = build_family("sd")
    trained.add_lora(rank=4)
    perturb_lora(trained)
    folder = trained.save_lora(tmp_path / "lora")
    family, base = build_family("sd"), build_family("sd")
    family.load_lora(folder)
    assert family.lora is not None and family.lora.rank == 4
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t, cond = torch.tensor([500]), family.encode_prompts(["a"])
    with torch.no_grad():
        expected_base, policy = base.predict(x, t, cond), family.predict(x, t, cond)
    assert (policy - expected_base).abs().max() > 1e-4
    with family.reference():
        torch.testing.assert_close(family.predict(x, t, cond), expected_base, atol=1e-6, rtol=0)
    family.unload_lora()
    assert family.lora is None and not adapted_modules(family.denoiser)
    with torch.no_grad():
        torch.testing.assert_close(family.predict(x, t, cond), expected_base, atol=1e-6, rtol=0)
    trained.unload_lora()  # an adapter added in memory unloads too
    assert not adapted_modules(trained.denoiser)


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_reference_mode_is_the_base_model(kind):
    """Inside `reference()` the prediction is the base model's (adapters off), outside it is the LoRA model's."""
    family, _ = lora_family(kind)
    base = build_family(kind)
    x = torch.randn(2, family.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    t = family.sample_train_timesteps(2, torch.Generator().manual_seed(1))
    cond = family.encode_prompts(["a", "b"])
    with torch.no_grad():
        expected_ref = base.predict(x, t, cond)
        policy = family.predict(x, t, cond)
    with family.reference():
        ref = family.predict(x, t, cond)
    torch.testing.assert_close(ref, expected_ref, atol=1e-6, rtol=0)
    assert (policy - ref).abs().max() > 1e-4
    with torch.no_grad():  # adapters are back on after the block
        torch.testing.assert_close(family.predict(x, t, cond), policy)


def test_full_finetune_reference_is_a_frozen_copy():
    family = build_family("sd")
    params = family.enable_full_finetune()
    assert len(params) == len(list(family.denoiser.parameters()))
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    x = torch.randn(1, 4, 16, 16)
    t = torch.tensor([500])
    cond = family.encode_prompts(["a"])
    with torch.no_grad():
        expected = build_family("sd").predict(x, t, cond)
    with family.reference():
        torch.testing.assert_close(family.predict(x, t, cond), expected, atol=1e-6, rtol=0)


def test_full_finetune_trains_float32_master_weights_over_half_precision_parts():
    """Loaded in bfloat16, a full fine-tune trains float32 weights (an lr 1e-5 step is lost in bf16), keeps the
    reference copy in bfloat16, and both predict."""
    family = load_family("tiny-sd", dtype="bfloat16")
    params = family.enable_full_finetune()
    assert {p.dtype for p in params} == {torch.float32}
    assert {p.dtype for p in family._reference_module.parameters()} == {torch.bfloat16}
    assert family.vae.dtype == torch.bfloat16 and family.text_encoders()[0].dtype == torch.bfloat16
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    before = [p.detach().clone() for p in params]
    x, t, cond = torch.randn(1, 4, 16, 16), torch.tensor([500]), family.encode_prompts(["a"])
    family.predict(x, t, cond).float().square().mean().backward()
    optimizer.step()
    changed = sum((p != b).float().mean().item() for p, b in zip(params, before, strict=True)) / len(params)
    assert changed > 0.9  # nearly every weight moved by ~1e-5 (in bf16 only ~7% did)
    with family.reference():
        assert torch.isfinite(family.predict(x, t, cond)).all()


def test_tiny_models_are_built_in_the_asked_dtype_and_in_eval_mode():
    from diffalign.models.tiny import build_tiny_sd3

    family = load_family("tiny-sd3", dtype="bfloat16")
    assert family.denoiser.dtype == torch.bfloat16
    assert all(encoder.dtype == torch.bfloat16 for encoder in family.text_encoders())
    pipe = build_tiny_sd3()
    assert not any(m.training for m in pipe.text_encoder_3.modules())  # T5 dropout off, as from_pretrained


def test_a_float16_vae_that_asks_for_upcast_runs_in_float32_and_an_override_is_honoured(tmp_path):
    """SDXL's VAE config sets force_upcast: in float16 it runs in float32 (as the stock SDXL pipeline); an fp16-fix
    VAE (force_upcast false), given with `vae=`, stays float16."""
    from diffalign.models.tiny import published, published_vae

    family = load_family("tiny-sdxl", dtype="float16")
    assert family.denoiser.dtype == torch.float16 and family.vae.dtype == torch.float32
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(family.decode(family.encode_images(images))).all()
    torch.manual_seed(1)
    fp16_fix = published_vae(published("sdxl")["vae"] | {"force_upcast": False})
    fp16_fix.save_pretrained(tmp_path / "vae")
    family = load_family("tiny-sdxl", dtype="float16", vae=str(tmp_path / "vae"))
    assert family.vae.dtype == torch.float16 and not family.vae.config.force_upcast
    assert not any(p.requires_grad for p in family.vae.parameters())
    expected = fp16_fix.decoder.conv_out.weight.half().float()
    torch.testing.assert_close(family.vae.decoder.conv_out.weight.float(), expected)
    from diffalign.errors import UserError

    with pytest.raises(UserError, match="no config.json"):
        load_family("tiny-sdxl", vae=str(tmp_path))


def test_vae_roundtrip_applies_scale_and_shift():
    """encode -> decode inverts the scaling/shift (checked on the SD3 VAE, which has a shift factor)."""
    family = build_family("sd3")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    latents = family.encode_images(images, sample=False)
    scale, shift = family._vae_scale_shift
    assert shift != 0
    raw = family.vae.encode(images * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(latents, (raw - shift) * scale)
    decoded = family.decode(latents)
    expected = (family.vae.decode(raw).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ hooks for methods
@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_sample_prediction_hook_replaces_every_model_call(kind):
    """`sample(predict=fn)` calls fn at every step with the sampler's arguments (also under checkpointing with grad):
    the way guidance mixes predictions without touching a family."""
    family = build_family(kind)
    cond, uncond = family.encode_prompts(["a red circle"]), family.encode_negative()
    latents = family.initial_noise(1, 32, torch.Generator().manual_seed(0))
    calls = []

    def counting(x, t, c, u, g):
        calls.append(float(torch.as_tensor(t).reshape(-1)[0]))
        return family.predict(x, t, c, u, g)

    with torch.no_grad():
        plain = family.sample(cond, uncond, latents=latents, num_steps=3, guidance_scale=2.0)
        hooked = family.sample(cond, uncond, latents=latents, num_steps=3, guidance_scale=2.0, predict=counting)
        halved = family.sample(
            cond, uncond, latents=latents, num_steps=3, guidance_scale=2.0,
            predict=lambda *args: 0.5 * family.predict(*args),
        )  # fmt: skip
    torch.testing.assert_close(hooked, plain)
    assert calls == family.schedule(3, latents).timesteps.float().tolist()
    assert (halved - plain).abs().max() > 1e-3
    params = family.add_lora(rank=2)
    perturb_lora(family)
    out = family.sample(cond, uncond, latents=latents, num_steps=2, guidance_scale=2.0, predict=counting)
    out.mean().backward()  # checkpointed, through the hook
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def true_target_denoiser(family, x0: torch.Tensor, noise: torch.Tensor):
    """A perfect model for one trajectory: the prediction that exactly denoises x_t = forward_noising(x0, noise, t)."""

    def denoise(x, t, cond):
        if family.name in ("sd3", "flux"):
            return noise - x0
        if family.prediction_type == "epsilon":
            return noise
        alpha = family._alpha_or_one(t.float(), x0)
        return alpha.sqrt() * noise - (1 - alpha).sqrt() * x0  # v

    return denoise


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_inversion_with_a_perfect_model_is_the_forward_noising(kind, monkeypatch):
    """invert(x0, t) with a model that returns the true target equals noisy_and_target(x0, noise, t): the inversion
    is scheduler-consistent (DDIM for eps and v UNets, reverse Euler on the flow), per-sample t included; asking the
    model at each step's destination too, where the true target does not depend on t (eps, flow)."""
    family = build_family(kind)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(family.latent_shape(4, 32), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    monkeypatch.setattr(family, "denoise", true_target_denoiser(family, x0, noise))
    t = family.sample_train_timesteps(4, g, "uniform")
    cond = family.encode_prompts(["a"] * 4)
    forward = family.noisy_and_target(x0, noise, t)[0]
    torch.testing.assert_close(family.invert(x0, cond, t, num_steps=10), forward, atol=1e-4, rtol=1e-4)
    if getattr(family, "prediction_type", "flow") != "v_prediction":
        at_destination = family.invert(x0, cond, t, num_steps=10, predict_at="destination")
        torch.testing.assert_close(at_destination, forward, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_implied_target_inverts_noisy_and_target(kind):
    """The InPO reparametrisation: for x_t = noisy_and_target(x0, noise, t)[0], implied_target(x0, x_t, t) is the
    target noisy_and_target returned (eps, v or the flow velocity), on every family and per-sample t."""
    family = build_family(kind)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(family.latent_shape(6, 32), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.cat([family.sample_train_timesteps(4, g, "uniform"), family.timesteps_at(torch.tensor([0, 500]))])
    noisy, target = family.noisy_and_target(x0, noise, t)
    torch.testing.assert_close(family.implied_target(x0, noisy, t), target, atol=2e-4, rtol=2e-4)
    # a latent that is not forward-noised x0 implies another target
    assert (family.implied_target(x0, noisy + 0.1, t) - target).abs().min() > 1e-3


@pytest.mark.parametrize("kind", [*FAMILY_KINDS, "toy", "toy-flow"])
def test_inverting_then_walking_back_reconstructs_x0(kind):
    """invert to t, then denoise along the same grid with eta = 0: x0 comes back. Measured relative errors at 50
    steps: to t = 500 at most 3% on every tiny model (1-3% UNets, 0.1-0.2% flow); to the noisiest step 6% on the
    trained toy model and under 1% on the flow models (a random epsilon-predicting UNet does not invert there: x0
    is read as (x - sqrt(1 - a) eps) / sqrt(a) with sqrt(a) = 0.07)."""
    family = family_of(kind)
    if kind.startswith("toy"):
        from diffalign.gym.world import generate

        images, prompts = generate(4, seed=0)
        x0 = family.encode_images(images, sample=False)
    else:
        x0, prompts = torch.randn(family.latent_shape(4, 32), generator=torch.Generator().manual_seed(0)), ["a"] * 4
    cond = family.encode_prompts(prompts)

    def error(t_end: float, steps: int) -> float:
        t = torch.full((4,), t_end)
        with torch.no_grad():
            back = family.walk(family.invert(x0, cond, t, steps), cond, t, torch.zeros(4), steps)
        return ((back - x0).norm() / x0.norm()).item()

    assert error(500, 50) < 0.04 and error(500, 50) < error(500, 10)
    if kind.startswith("toy") or family.name in ("sd3", "flux"):
        assert error(1000 if family.name in ("sd3", "flux") else 999, 50) < 0.08


@pytest.mark.parametrize("kind", ["sd", "flux"])
def test_inversion_noise_is_eta_scaled_and_seeded(kind):
    family = build_family(kind)
    x0 = torch.randn(family.latent_shape(2, 32), generator=torch.Generator().manual_seed(0))
    cond, t = family.encode_prompts(["a", "b"]), torch.tensor([300.0, 700.0])
    plain = family.invert(x0, cond, t, 5)
    noisy = [family.invert(x0, cond, t, 5, eta=0.1, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    torch.testing.assert_close(noisy[0], noisy[1])
    assert (noisy[0] - noisy[2]).abs().max() > 1e-4
    assert 0 < (noisy[0] - plain).std() < 0.1  # eta 0.1 of per-step stds below 1
