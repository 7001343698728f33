"""The model-family layer, checked on tiny same-class pipelines of every family."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_KINDS, build_family, build_pipeline
from safetensors.torch import load_file, save_file

from diffalign.models import FAMILIES, cond_select, family_for_pipeline
from diffalign.models.base import cond_cat, cond_expand

PROMPTS = ["a red circle on a black background", "a photo of a cat", ""]
EXPECTED_FAMILY = {"sd": "sd", "sd-v": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "flux-schnell": "flux"}
DENOISER_CLASS = {
    "sd": "UNet2DConditionModel",
    "sdxl": "UNet2DConditionModel",
    "sd3": "SD3Transformer2DModel",
    "flux": "FluxTransformer2DModel",
}


def perturb_lora(family, seed: int = 0, scale: float = 0.1) -> None:
    """Give the LoRA B matrices non-zero values (they start at zero, i.e. LoRA = identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in family.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def stock_images(pipe, prompt: str, seed: int, steps: int, family) -> torch.Tensor:
    """Images from the stock pipeline __call__ for one prompt, as [1,3,H,W] in [0,1]."""
    kwargs = {
        "num_inference_steps": steps,
        "height": 32,
        "width": 32,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(seed),
    }
    if family.name == "flux":
        kwargs.update(guidance_scale=family.embedded_guidance, max_sequence_length=family.max_sequence_length)
    else:
        kwargs.update(guidance_scale=3.0)
    if family.name == "sd3":
        kwargs.update(max_sequence_length=family.max_sequence_length)
    return pipe(prompt, **kwargs).images


# ------------------------------------------------------------------------------------------------------ building
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


def test_sdxl_negative_is_zero_when_the_pipeline_forces_it():
    family = build_family("sdxl")
    assert family.pipe.config.force_zeros_for_empty_prompt
    assert all((v == 0).all() for v in family.encode_negative().values())
    assert any((v != 0).any() for v in family.encode_negative("blurry").values())


# ------------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_training_input_and_target_match_the_scheduler(kind):
    """x_t and the target agree with the scheduler's own add_noise / get_velocity / scale_noise."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    family = build_family(kind)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 16, 16, generator=g)
    noise = torch.randn(4, 4, 16, 16, generator=g)
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
@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_sampler_matches_the_stock_pipeline(kind):
    """Our differentiable sampler + decode reproduces the stock pipeline __call__ (eta = 0, CFG as the pipeline)."""
    family = build_family(kind)
    prompt, seed, steps = "a blue square on a gray background", 3, 4
    if family.name != "flux":  # DDIM/flow-Euler with the pipeline's own CFG and negative
        guidance = 3.0
    else:  # FLUX: embedded guidance, no true CFG
        guidance = 1.0
    stock = stock_images(family.pipe, prompt, seed, steps, family)
    latents = family.initial_noise(1, 32, torch.Generator().manual_seed(seed))
    uncond = family.encode_negative() if guidance != 1.0 else None
    with torch.no_grad():
        ours = family.decode(
            family.sample(
                family.encode_prompts([prompt]), uncond, latents=latents, num_steps=steps, guidance_scale=guidance
            )
        )
    assert ours.shape == stock.shape
    torch.testing.assert_close(ours, stock.float(), atol=2e-4, rtol=0)


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
@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_saved_lora_loads_in_a_stock_pipeline(kind, tmp_path):
    """save_lora -> fresh stock pipeline + load_lora_weights == in-memory LoRA model, != base model."""
    family, _ = lora_family(kind, rank=4, alpha=8.0)  # alpha != rank: the scale must survive the round trip
    family.save_lora(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    prompt, seed = "a green triangle", 5
    in_memory = stock_images(family.pipe, prompt, seed, 3, family)
    fresh = build_pipeline(kind)
    base = stock_images(fresh, prompt, seed, 3, family)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    loaded = stock_images(fresh, prompt, seed, 3, family)
    assert (loaded - in_memory).abs().max() < 1e-4
    assert (loaded - base).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_reference_mode_is_the_base_model(kind):
    """Inside `reference()` the prediction is the base model's (adapters off), outside it is the LoRA model's."""
    family, _ = lora_family(kind)
    base = build_family(kind)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
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
