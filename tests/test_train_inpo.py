"""The DDIM-InPO recipe: InPO is DPO on a forward-noised latent, the policy inverts (unless configured) along the
grid, each step asking the model at its start timestep (or at its destination, as the official code), in the calls
the grid needs, a full fine-tune. Every family and stock LoRA loading: tests/test_gpu_check.py; kill -9 and DDP:
tests/test_method_contracts.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clitools import train_in_process
from conftest import build_family
from distributed import failure, launch_two_ranks
from pairdata import write_parquet
from peft.tuners.tuners_utils import BaseTunerLayer

from diffalign.models import Family, cond_select
from diffalign.train import inpo, load_train_config
from diffalign.train.dpo import DPOConfig, dpo_step
from diffalign.train.inpo import InPOConfig, inpo_step


def train_inpo(overrides: list[str]) -> Path:
    return train_in_process(["method=inpo", *overrides])


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_parquet(tmp_path_factory.mktemp("data") / "pairs.parquet", 8)


def base_overrides(kind: str, pairs: Path, out: Path) -> list[str]:
    return [
        f"model.name=tiny-{kind}",
        f"data.source={pairs}",
        f"output_dir={out}",
        "batch_size=2",
        "max_steps=2",
        "checkpoint_every=0",
        "log_every=1",
        "report_to=none",
        "optim.lr=1e-3",
        "inpo.beta=500",
        "inpo.inversion_steps=2",
    ]


def perturbed_family(kind: str) -> Family:
    """A tiny family with a LoRA whose B matrices are non-zero (policy != reference)."""
    family = build_family(kind)
    torch.manual_seed(0)  # the LoRA A matrices come from the global RNG: the same ones whatever ran before
    family.add_lora(rank=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in family.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return family


def pair_batch(family: Family, pairs: int = 2):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(family.latent_shape(2 * pairs, 32), generator=g)
    cond = family.encode_prompts(["a red circle", "a blue square"] * pairs)
    return latents, cond, torch.ones(pairs)


@pytest.mark.parametrize("kind", ["sd", "sd-v", "flux"])
def test_inpo_on_a_forward_noised_latent_is_dpo(kind, monkeypatch):
    """When the inversion lands on the forward-noised latent sqrt(a) x0 + sqrt(1-a) eps (or the flow's), the
    reparametrised target is eps's target and the InPO loss and metrics are Diffusion-DPO's on the same numbers."""
    family = perturbed_family(kind)
    latents, cond, preference = pair_batch(family)
    t = torch.cat([family.timesteps_at(torch.tensor([100, 700]))] * 2)
    monkeypatch.setattr(family, "sample_train_timesteps", lambda n, *a, **k: t[:n])
    noise = torch.randn(latents[:2].shape, generator=torch.Generator().manual_seed(7))
    forward_noised = family.noisy_and_target(latents, torch.cat([noise, noise]), t)[0]
    monkeypatch.setattr(inpo, "invert_on_grid", lambda *a, **k: forward_noised)

    generator = torch.Generator().manual_seed(7)
    dpo, dpo_metrics = dpo_step(family, latents, cond, preference, DPOConfig(beta=500), generator)
    loss, inpo_metrics = inpo_step(family, latents, cond, preference, InPOConfig(beta=500), torch.Generator())
    assert abs(dpo.item() - 0.693147) > 1e-3  # the policy differs from the reference: a real comparison
    torch.testing.assert_close(loss, dpo, atol=1e-5, rtol=1e-4)
    for key, value in dpo_metrics.items():
        torch.testing.assert_close(inpo_metrics[key], value, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("inverter", ["policy", "reference"])
def test_the_inversion_uses_the_policy_unless_configured(inverter, monkeypatch):
    """What the step inverts with is the current policy (adapters on), or with `inverter: reference` the reference:
    the inverted latent the step used equals the one each model gives and differs from the other model's."""
    family = perturbed_family("sd")
    latents, cond, preference = pair_batch(family)
    used = []
    original = inpo.invert_on_grid
    monkeypatch.setattr(inpo, "invert_on_grid", lambda *a, **k: used.append((a, original(*a, **k))) or used[-1][1])
    cfg = InPOConfig(beta=500, eta=0.0, inversion_steps=3, inverter=inverter)
    inpo_step(family, latents, cond, preference, cfg, torch.Generator().manual_seed(0))
    assert len(used) == 1
    (_, _, _, t, steps, _, _), inverted = used[0]
    assert steps == 3 and torch.equal(t[:2], t[2:])  # winner and loser share t
    by_policy = original(family, latents, cond, t, 3, 0.0, None)
    with family.reference():
        by_reference = original(family, latents, cond, t, 3, 0.0, None)
    assert (by_policy - by_reference).abs().max() > 1e-3
    expected, other = (by_policy, by_reference) if inverter == "policy" else (by_reference, by_policy)
    torch.testing.assert_close(inverted, expected)
    assert (inverted - other).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["sd", "flux"])
def test_grid_inversion_takes_ceil_t_over_the_stride_steps_and_only_the_calls_they_need(kind, monkeypatch):
    """A sample at t is inverted in ceil(t/100) steps of the 10-step grid (Family.invert with that many steps); a
    batch costs the calls of its slowest sample, never a discarded call in a single process (the grid used to make
    all 10 calls at any t: 15.5 sample-forwards per pair at batch 1 against the official 10.9)."""
    family = perturbed_family(kind)
    x0, cond, _ = pair_batch(family, pairs=2)
    t = torch.tensor([50.0, 250.0, 650.0, 700.0])
    calls = []
    denoise = family.denoise
    monkeypatch.setattr(family, "denoise", lambda x, *a: calls.append(x.shape[0]) or denoise(x, *a))
    gridded = inpo.invert_on_grid(family, x0, cond, t, 10, 0.0, None)
    assert len(calls) == 7 and sum(calls) == 1 + 3 + 7 + 7
    for i, steps in enumerate([1, 3, 7, 7]):
        alone = family.invert(x0[i : i + 1], cond_select(cond, [i]), t[i : i + 1], steps)
        torch.testing.assert_close(gridded[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    calls.clear()
    inpo.invert_on_grid(family, x0[:2], cond_select(cond, [0, 1]), torch.full((2,), 30.0), 10, 0.1, None)
    assert calls == [2]  # a pair at batch 1 near t = 0: one step, one call


@pytest.mark.parametrize(("predict_at", "asked"), [("start", [0, 83, 167]), ("destination", [83, 167, 250])])
def test_each_inversion_step_asks_the_model_at_its_start_or_as_the_official_code_its_destination(
    predict_at, asked, monkeypatch
):
    """inpo.inversion_timestep: "start" (the default) asks at t_a, the first step the noise of the clean latent at
    t = 0; the official code (diffusers' DDIMInverseScheduler) asks at t_b with the latent at t_a."""
    family = perturbed_family("sd")
    x0, cond, preference = pair_batch(family, pairs=1)
    seen = []
    denoise = family.denoise
    monkeypatch.setattr(family, "denoise", lambda x, t, c: seen.append(t[0].item()) or denoise(x, t, c))
    monkeypatch.setattr(family, "sample_train_timesteps", lambda n, *a, **k: torch.full((n,), 250.0))
    inpo_step(family, x0, cond, preference, InPOConfig(inversion_timestep=predict_at), torch.Generator())
    assert seen[:3] == asked  # then the policy and reference forwards at t = 250


def test_ranks_make_the_same_number_of_inversion_calls(tmp_path):
    """Under 2 processes a rank whose samples arrived early keeps making (discarded) calls until the other's arrive:
    the collectives of DDP/FSDP stay matched, and each rank still inverts only as far as its own samples need."""
    result = launch_two_ranks([str(Path(__file__).parent / "scripts" / "inversion_calls.py"), str(tmp_path)])
    assert result.returncode == 0, failure(result)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["needed"] for r in ranks] == [2, 9]  # rank 0 inverts to t = 150, rank 1 to t = 850
    assert [len(r["calls"]) for r in ranks] == [9, 9] and ranks[0]["calls"] == [2, 2] + [1] * 7
    assert ranks[1]["calls"] == [2] * 9


def adapters_on(family: Family) -> bool:
    layers = [m for m in family.denoiser.modules() if isinstance(m, BaseTunerLayer)]
    return bool(layers) and not any(layer.disable_adapters for layer in layers)


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_the_policy_inverts_and_training_starts_at_the_reference(kind, pairs_file, tmp_path, monkeypatch):
    """A UNet and a flow family (every family runs and its LoRA loads in a stock pipeline: test_gpu_check)."""
    calls = []
    walk = Family.walk

    def spy(self, *args, **kwargs):  # the recipe's inversion steps: with the policy's adapters on, without gradient
        calls.append(adapters_on(self) and not torch.is_grad_enabled())
        return walk(self, *args, **kwargs)

    monkeypatch.setattr(Family, "walk", spy)
    out = tmp_path / "run"
    final = train_inpo([*base_overrides(kind, pairs_file, out), "validation.prompts=[a red circle]"])
    assert calls and all(calls)  # inverted by the policy (steps: 1 or 2 per step, by t)
    assert final == out / "lora" and (final / "pytorch_lora_weights.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-4)  # LoRA starts as the identity: policy == reference
    assert all(0 <= r["implicit_accuracy"] <= 1 for r in steps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer_steps"] == 2 and (out / "validation" / "step-000002.png").is_file()
    assert load_train_config(out / "config.yaml").method == "inpo"


@pytest.mark.parametrize("name,kind", [("sd15", "sd"), ("sdxl", "sdxl"), ("sd3", "sd3"), ("flux", "flux")])
def test_shipped_config_loads_with_the_paper_defaults(name, kind):
    cfg = load_train_config(Path(__file__).parents[1] / "configs" / "inpo" / f"{name}.yaml")
    assert cfg.method == "inpo" and cfg.inpo.inversion_steps == 10 and cfg.inpo.eta == 0.1
    assert cfg.inpo.inverter == "policy" and cfg.inpo.beta == {"sd15": 2000, "sdxl": 5000}.get(name, cfg.inpo.beta)


def test_full_finetune_with_the_reference_inverting_saves_the_denoiser(pairs_file, tmp_path):
    """The optional path: no LoRA (the reference is a frozen copy), inverted by that reference, bf16 autocast."""
    out = tmp_path / "full"
    overrides = [*base_overrides("sd", pairs_file, out), "lora.enabled=false", "max_steps=1", "mixed_precision=bf16"]
    final = train_inpo([*overrides, "inpo.inverter=reference", "optim.optimizer=adafactor"])
    assert (final / "config.json").is_file() and list(final.glob("*.safetensors"))
