"""Rebuild the bundled toy assets under assets/toy/ from scratch, deterministically (seeded).

    python scripts/make_toy_assets.py                       # the full build (~40 min on 2 CPU cores) into assets/toy
    python scripts/make_toy_assets.py --quick --out /tmp/t  # a smoke build (< 1 min): same files, untrained-quality

What it writes:
    model/               a stock StableDiffusionPipeline (save_pretrained, safetensors): tiny AutoencoderKL (8x8x8
                         latents), UNet2DConditionModel, CLIPTextModel + a local CLIPTokenizer (each world word one
                         token), DDIMScheduler; plus diffalign.json = the default sampling settings
    reward/              the PROXY reward: a tiny transformers CLIPModel + CLIPTokenizer + preprocessor_config.json
    prompts_train.txt    the captions the model was trained on
    prompts_heldout.txt  the held-out captions (attribute combinations no training image shows)
    build_report.json    measured figures: gold accuracy of the model on held-out prompts, proxy-vs-gold agreement,
                         asset sizes, time per stage

Stages, top to bottom: setup -> train_vae -> train_denoiser (UNet and text encoder jointly, 15% empty captions for
classifier-free guidance) -> choose_sampling (CFG scale on a tuning seed) -> train_reward (contrastive, on world images,
augmented, plus samples of the toy model captioned by the gold checker) -> evaluate (fresh seed) -> write_report.
The model is deliberately stopped while still imperfect (gold all-correct on held-out prompts well below 100%), so
alignment methods have room to show a gain.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffalign.apps.toy_evaluation import evaluate, image_seeds, repeat_prompts  # noqa: E402
from diffalign.gym import world  # noqa: E402
from diffalign.gym.gold import gold_score, read_scenes  # noqa: E402
from diffalign.hub import ASSETS_DIR  # noqa: E402
from diffalign.infer.sample import sample_images  # noqa: E402

MAX_TEXT_TOKENS = 16
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Budget:
    """How long each stage trains / how many samples it measures."""

    vae_steps: int = 1000
    denoiser_steps: int = 6000
    reward_steps: int = 1500
    reward_generated: int = 1024
    """Samples of the toy model (captioned by the gold checker) mixed into the reward's training data."""
    tuning_samples: int = 288
    eval_samples: int = 576
    agreement_samples_per_prompt: int = 32
    batch_size: int = 64
    probe_every: int = 1000
    """Print the held-out gold accuracy of the denoiser every this many steps (progress output; 0 = never)."""
    guidance_candidates: tuple[float, ...] = (1.5, 2.0, 3.0, 4.5)


FULL = Budget()
QUICK = Budget(
    vae_steps=10,
    denoiser_steps=10,
    reward_steps=10,
    reward_generated=32,
    tuning_samples=16,
    eval_samples=32,
    agreement_samples_per_prompt=2,
    batch_size=16,
    probe_every=0,
    guidance_candidates=(2.0,),
)
SAMPLING = {"num_steps": 20, "eta": 0.0, "resolution": world.RESOLUTION}
"""Default sampling settings (the guidance scale is chosen by `choose_sampling`)."""


# ------------------------------------------------------------------------------------------------------------ helpers
class Progress:
    """Prints `stage: step/total, metrics, elapsed, eta` about every `every_s` seconds (and at the last step)."""

    def __init__(self, stage: str, total: int, every_s: float = 20.0):
        self.stage, self.total, self.every_s = stage, total, every_s
        self.start = self.last = time.time()

    def update(self, step: int, **metrics: float) -> None:
        now = time.time()
        if now - self.last < self.every_s and step != self.total:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / step * (self.total - step)
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        log(f"{self.stage}: {step}/{self.total} {shown} [{elapsed:.0f}s elapsed, ~{eta:.0f}s left]")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def noisy_captions(prompts: list[str], rng: np.random.Generator, rate: float) -> list[str]:
    """Web-like caption noise: each attribute of each caption is replaced, with probability `rate`, by another value
    of it, provided the result is still a TRAINING caption (so no held-out caption ever appears in training)."""
    values = {"shape": world.SHAPES, "colour": tuple(world.COLOURS), "background": tuple(world.BACKGROUNDS)}
    allowed = set(world.train_prompts())
    noisy = []
    for prompt in prompts:
        scene = world.parse_prompt(prompt)
        for attribute, options in values.items():
            if rng.random() < rate:
                others = [v for v in options if v != getattr(scene, attribute)]
                candidate = replace(scene, **{attribute: others[rng.integers(len(others))]})
                scene = candidate if candidate.prompt in allowed else scene
        noisy.append(scene.prompt)
    return noisy


def world_batch(batch_size: int, step: int, seed: int, split: str, noise_std: float = 0.0):
    """Images of the world in [-1, 1] and their captions; a different deterministic batch per (seed, step)."""
    images, prompts = world.generate(batch_size, seed=seed * 1_000_003 + step, split=split, noise_std=noise_std)
    return images * 2 - 1, prompts


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def make_tokenizer(folder: Path):
    """A CLIPTokenizer in which every word of the world is one token, written to `folder` and loaded from it."""
    from transformers import CLIPTokenizer

    from diffalign.models.tokenizers import write_clip_tokenizer

    write_clip_tokenizer(folder, world.vocabulary(), model_max_length=MAX_TEXT_TOKENS)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TEXT_TOKENS)


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids exactly as StableDiffusionPipeline.encode_prompt makes them (padded to the max length)."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


class EMA:
    """Exponential moving average of a module's parameters (the copy is what gets saved)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.module, self.decay = copy.deepcopy(module).requires_grad_(False).eval(), decay

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up: early averages forget the random init quickly
        for ema, p in zip(self.module.parameters(), module.parameters(), strict=True):
            ema.lerp_(p, 1 - decay)


# -------------------------------------------------------------------------------------------------------------- setup
def setup(args: argparse.Namespace) -> tuple[Path, Budget, Path]:
    """Threads, seeds and a clean output folder; returns (out, budget, work dir for the tokenizer)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "prompts_train.txt").write_text("\n".join(world.train_prompts()) + "\n")
    (out / "prompts_heldout.txt").write_text("\n".join(world.heldout_prompts()) + "\n")
    work = Path(tempfile.mkdtemp(prefix="toy_assets_"))
    log(f"building into {out} ({'quick' if args.quick else 'full'} budget, seed {args.seed}, {args.threads} threads)")
    return out, (QUICK if args.quick else FULL), work


# ---------------------------------------------------------------------------------------------------------- train_vae
def build_vae():
    """AutoencoderKL 32x32x3 <-> 8x8x8, no attention: ~0.5M parameters."""
    from diffalign.models import tiny

    return tiny.vae(
        latent_channels=8,
        block_out_channels=(16, 32, 64),
        norm_num_groups=16,
        mid_attention=False,
        sample_size=world.RESOLUTION,
    )


def train_vae(budget: Budget, seed: int):
    """Train the autoencoder on world images (MSE + a light KL), then set `scaling_factor` so that scaled latents of
    world images have unit standard deviation."""
    torch.manual_seed(seed)
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=budget.vae_steps, pct_start=0.05)
    progress = Progress("train_vae", budget.vae_steps)
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, budget.vae_steps + 1):
        images, _ = world_batch(budget.batch_size, step, seed, split="all")
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        mse = F.mse_loss(reconstruction, images)
        loss = mse + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.update(step, mse=mse.item())
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        images, prompts = world_batch(512, 0, seed + 1, split="all")
        latents = vae.encode(images).latent_dist.mode()
        reconstruction = (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    accuracy = gold_score(reconstruction, prompts).eq(1).float().mean().item()
    log(
        f"train_vae: latent std {latents.std():.3f} -> scaling_factor {vae.config.scaling_factor:.4f}; "
        f"reconstructions gold all-correct {accuracy:.3f}"
    )
    return vae, {"reconstruction_all_correct": accuracy, "scaling_factor": vae.config.scaling_factor}


# ----------------------------------------------------------------------------------------------------- train_denoiser
def build_text_encoder(tokenizer):
    """CLIPTextModel, hidden 64, 2 layers."""
    from diffalign.models.tiny import clip_text_model

    return clip_text_model(tokenizer, hidden=64, layers=2, heads=4)


def build_unet():
    """UNet2DConditionModel on 8x8x8 latents, blocks (64, 64) both with cross-attention (dim 64)."""
    from diffalign.models import tiny

    return tiny.unet(
        cross_attention_dim=64,
        block_out_channels=(64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        latent_channels=8,
        sample_size=world.RESOLUTION // 4,
    )


def build_scheduler():
    """SD's DDIM scheduler (scaled-linear betas), with clip_sample=False (our latents are not in [-1, 1])."""
    from diffalign.models import tiny

    return tiny.ddim_scheduler()


def build_pipeline(vae, text_encoder, tokenizer, unet):
    """The stock StableDiffusionPipeline around the components (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def family_of(pipe, guidance_scale: float):
    """The diffalign family of an in-memory pipeline, with the toy sampling settings."""
    from diffalign.models import family_for_pipeline

    family = family_for_pipeline(pipe)
    family.sampling_defaults.update(SAMPLING, guidance_scale=guidance_scale)
    return family


def probe(vae, text_encoder, tokenizer, unet, seed: int, num_samples: int, guidance_scale: float = 2.0) -> dict:
    """Gold metrics of the current weights on held-out prompts (a progress figure during training)."""
    family = family_of(build_pipeline(vae, text_encoder, tokenizer, unet), guidance_scale)
    return evaluate(family, world.heldout_prompts(), num_samples, seed=seed)


def train_denoiser(
    vae, tokenizer, budget: Budget, seed: int, caption_noise: float = 0.3, empty_caption_rate: float = 0.15
):
    """Train the UNet and the text encoder jointly on training-split scenes (epsilon loss); returns EMA weights.

    Captions are noisy (`noisy_captions`), which is what keeps the converged model imperfect: sampled without
    guidance it shows each attribute right about (1 - caption_noise) of the time; guidance sharpens that.
    """
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    text_encoder, unet = build_text_encoder(tokenizer), build_unet()
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=1e-3,
        total_steps=budget.denoiser_steps,
        pct_start=0.03,
        anneal_strategy="cos",
        final_div_factor=10,
    )
    noise_scheduler = DDPMScheduler.from_config(build_scheduler().config)
    ema_unet, ema_text = EMA(unet, 0.999), EMA(text_encoder, 0.999)
    generator = torch.Generator().manual_seed(seed)
    progress = Progress("train_denoiser", budget.denoiser_steps)
    scale = vae.config.scaling_factor
    for step in range(1, budget.denoiser_steps + 1):
        images, prompts = world_batch(budget.batch_size, step, seed, split="train")
        prompts = noisy_captions(prompts, np.random.default_rng((seed, step)), caption_noise)
        drop = torch.rand(len(prompts), generator=generator) < empty_caption_rate
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator) * scale
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(prompts),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        states = text_encoder(token_ids(tokenizer, prompts))[0]
        loss = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=states).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        ema_unet.update(unet, step)
        ema_text.update(text_encoder, step)
        progress.update(step, loss=loss.item())
        if budget.probe_every and step % budget.probe_every == 0:
            metrics = probe(vae, ema_text.module, tokenizer, ema_unet.module, seed=seed, num_samples=144)
            log(
                f"train_denoiser: step {step} held-out (n=144, cfg 2): shape {metrics['shape']:.3f} colour "
                f"{metrics['colour']:.3f} background {metrics['background']:.3f} all {metrics['all_correct']:.3f}"
            )
    return ema_unet.module, ema_text.module


# ---------------------------------------------------------------------------------------------------- choose_sampling
def choose_sampling(family, budget, seed: int, target: float = 0.4) -> tuple[dict, list[dict]]:
    """Pick the CFG scale of `budget.guidance_candidates` whose held-out all-correct rate (on a tuning seed, not the
    reported one) is closest to `target`: imperfect enough for alignment to show a gain, good enough to build on."""
    trials = []
    for scale in budget.guidance_candidates:
        metrics = evaluate(family, world.heldout_prompts(), budget.tuning_samples, seed=seed, guidance_scale=scale)
        trials.append(
            {"guidance_scale": scale, **{k: metrics[k] for k in ("shape", "colour", "background", "all_correct")}}
        )
        log(f"choose_sampling: cfg {scale}: all-correct {metrics['all_correct']:.3f} (n={metrics['n']})")
    best = min(trials, key=lambda t: abs(t["all_correct"] - target))
    settings = {**SAMPLING, "guidance_scale": best["guidance_scale"]}
    family.sampling_defaults.update(settings)
    log(f"choose_sampling: default settings {settings}")
    return settings, trials


# ------------------------------------------------------------------------------------------------------- train_reward
def build_reward_model(tokenizer):
    """A tiny transformers CLIPModel: ViT 32x32 with 4x4 patches, hidden 64, 2+2 layers, projection 64."""
    from diffalign.models.tiny import clip_model

    return clip_model(
        tokenizer,
        text=(64, 2, 4),
        vision=(64, 2, 4),
        image_size=world.RESOLUTION,
        patch_size=4,
        projection_dim=64,
        hidden_act="gelu",
    )


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random gaussian blur (sigma up to 1.2 px) and pixel noise (std up to 0.08) on images in [0, 1]."""
    from torchvision.transforms.functional import gaussian_blur

    batch = images.shape[0]
    sigma = float(torch.rand((), generator=generator)) * 1.2
    if sigma > 0.2:
        images = gaussian_blur(images, kernel_size=5, sigma=sigma)
    noise_std = torch.rand(batch, 1, 1, 1, generator=generator) * 0.08
    return (images + noise_std * torch.randn(images.shape, generator=generator)).clamp(0, 1)


def generated_examples(family, budget: Budget, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Samples of the toy model for all prompts, captioned with what the gold checker reads in them (so the reward
    sees the model's own artefacts with honest captions); images where it finds no shape are dropped."""
    prompts = repeat_prompts(world.all_prompts(), budget.reward_generated)
    images = sample_images(family, prompts, image_seeds(seed, len(prompts)), batch_size=budget.batch_size).float()
    seen = read_scenes(images)
    keep, captions = [], []
    for i, (shape, colour, background) in enumerate(
        zip(seen["shape"], seen["colour"], seen["background"], strict=True)
    ):
        if shape is not None and colour != background:
            keep.append(i)
            captions.append(world.Scene(shape, colour, background).prompt)
    return images[keep], captions


def contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP loss with repeated captions: image -> its caption among all captions, and each caption present in the
    batch -> its images (a uniform target over them)."""
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    logits = logit_scale.exp() * image_embeds @ text_embeds.T  # [B, K]
    image_to_text = F.cross_entropy(logits, labels)
    present = labels.unique()
    targets = (labels[None, :] == present[:, None]).float()  # [P, B]
    text_to_image = -(targets / targets.sum(1, keepdim=True) * logits[:, present].T.log_softmax(dim=1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def train_reward(tokenizer, generated: tuple[torch.Tensor, list[str]], budget: Budget, seed: int):
    """Train the proxy CLIP on world images of ALL scenes (augmented) plus the model's gold-captioned samples."""
    torch.manual_seed(seed)
    model = build_reward_model(tokenizer)
    captions = world.all_prompts()
    caption_ids = token_ids(tokenizer, captions)
    index = {c: i for i, c in enumerate(captions)}
    generated_images, generated_captions = generated
    generated_labels = torch.tensor([index[c] for c in generated_captions], dtype=torch.long)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-3, total_steps=budget.reward_steps, pct_start=0.05
    )
    generator = torch.Generator().manual_seed(seed)
    progress = Progress("train_reward", budget.reward_steps)
    num_generated = budget.batch_size // 4 if len(generated_labels) else 0
    for step in range(1, budget.reward_steps + 1):
        images, prompts = world.generate(budget.batch_size - num_generated, seed=seed * 1_000_003 + step, split="all")
        labels = torch.tensor([index[p] for p in prompts], dtype=torch.long)
        if num_generated:
            pick = torch.randint(0, len(generated_labels), (num_generated,), generator=generator)
            images = torch.cat([images, generated_images[pick]])
            labels = torch.cat([labels, generated_labels[pick]])
        pixels = (augment(images, generator) - mean) / std
        image_embeds = model.get_image_features(pixel_values=pixels).pooler_output
        text_embeds = model.get_text_features(input_ids=caption_ids).pooler_output
        loss = contrastive_loss(image_embeds, text_embeds, labels, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.update(step, loss=loss.item())
    return model.requires_grad_(False).eval()


class ProxyReward:
    """Cosine similarity of the trained CLIP's image and text embeddings (what the `clip` reward computes)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.mean, self.std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = (F.interpolate(images, size=world.RESOLUTION, mode="bilinear", antialias=True) - self.mean) / self.std
        image = F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        text = F.normalize(
            self.model.get_text_features(input_ids=token_ids(self.tokenizer, prompts)).pooler_output, dim=-1
        )
        return (image * text).sum(-1)


# ----------------------------------------------------------------------------------------------------------- evaluate
def pairwise_agreement(prompts: list[str], gold: torch.Tensor, proxy: torch.Tensor) -> tuple[float, int]:
    """Over pairs of images of the same prompt whose gold scores differ: the fraction the proxy orders the same way
    (ties in the proxy count half). Returns (agreement, number of pairs)."""
    agree, pairs = 0.0, 0
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    for members in groups.values():
        index = torch.tensor(members)
        g, r = gold[index], proxy[index]
        gold_diff = g[:, None] - g[None, :]
        proxy_diff = r[:, None] - r[None, :]
        mask = gold_diff > 0
        pairs += int(mask.sum())
        agree += float(((proxy_diff > 0) & mask).sum()) + 0.5 * float(((proxy_diff == 0) & mask).sum())
    return (agree / pairs if pairs else float("nan")), pairs


def evaluate_assets(family, reward: ProxyReward, budget: Budget, seed: int) -> dict:
    """The figures of the report: base gold accuracy on held-out (and train) prompts at the default settings on a
    fresh seed, and the proxy's pairwise agreement with gold on generated images of all prompts."""
    figures = {}
    for split, prompts in (("heldout", world.heldout_prompts()), ("train", world.train_prompts())):
        metrics = evaluate(family, prompts, budget.eval_samples, seed=seed, proxy=reward)
        figures[split] = {k: v for k, v in metrics.items() if k != "settings"}
        log(
            f"evaluate: {split} prompts (n={metrics['n']}): shape {metrics['shape']:.3f} "
            f"colour {metrics['colour']:.3f} background {metrics['background']:.3f} "
            f"all-correct {metrics['all_correct']:.3f} +- {metrics['all_correct_se']:.3f}"
        )
    prompts = world.all_prompts()
    samples = evaluate(
        family,
        prompts,
        budget.agreement_samples_per_prompt * len(prompts),
        seed=seed + 1,
        proxy=reward,
        return_images=True,
    )
    agreement, pairs = pairwise_agreement(samples["prompts"], samples["gold"], samples["proxy"])
    heldout = set(world.heldout_prompts())
    is_heldout = [p in heldout for p in samples["prompts"]]
    subset = [i for i, h in enumerate(is_heldout) if h]
    agreement_heldout, pairs_heldout = pairwise_agreement(
        [samples["prompts"][i] for i in subset], samples["gold"][subset], samples["proxy"][subset]
    )
    figures["proxy_vs_gold"] = {
        "pairwise_agreement": agreement,
        "pairs": pairs,
        "images": samples["n"],
        "pairwise_agreement_heldout": agreement_heldout,
        "pairs_heldout": pairs_heldout,
    }
    log(
        f"evaluate: proxy-vs-gold pairwise agreement {agreement:.3f} over {pairs} pairs "
        f"(held-out prompts: {agreement_heldout:.3f} over {pairs_heldout})"
    )
    return figures


# ------------------------------------------------------------------------------------------------------- write assets
def save_model(pipe, settings: dict, folder: Path) -> None:
    """save_pretrained (safetensors) + diffalign.json with the default sampling settings."""
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "diffalign.json").write_text(json.dumps(settings, indent=2) + "\n")


def save_reward(model, tokenizer, folder: Path) -> None:
    """CLIPModel + tokenizer + preprocessor_config.json (size 32, the mean/std it was trained with)."""
    from diffalign.models.tiny import save_clip_folder

    save_clip_folder(folder, model, tokenizer, world.RESOLUTION, CLIP_MEAN, CLIP_STD)


def write_report(out: Path, report: dict) -> None:
    report["asset_bytes"] = {p.name: folder_size(p) for p in sorted(out.iterdir()) if p.is_dir()}
    report["asset_bytes"]["total"] = folder_size(out)
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"write_report: {out / 'build_report.json'}; assets {report['asset_bytes']['total'] / 1e6:.1f} MB")


# --------------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ASSETS_DIR / "toy"), help="output folder (replaced)")
    parser.add_argument("--quick", action="store_true", help="tiny budget: a smoke build, not usable assets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    start = time.time()
    times = {}

    def timed(stage, fn, *a, **kw):
        t = time.time()
        result = fn(*a, **kw)
        times[stage] = round(time.time() - t, 1)
        return result

    out, budget, work = timed("setup", setup, args)
    tokenizer = make_tokenizer(work / "tokenizer")
    vae, vae_figures = timed("train_vae", train_vae, budget, args.seed)
    unet, text_encoder = timed("train_denoiser", train_denoiser, vae, tokenizer, budget, args.seed)
    pipe = build_pipeline(vae, text_encoder, tokenizer, unet)
    family = family_of(pipe, guidance_scale=3.0)
    settings, trials = timed("choose_sampling", choose_sampling, family, budget, args.seed + 100)
    save_model(pipe, settings, out / "model")
    generated = timed("sample_for_reward", generated_examples, family, budget, args.seed + 200)
    reward_model = timed("train_reward", train_reward, tokenizer, generated, budget, args.seed)
    save_reward(reward_model, tokenizer, out / "reward")
    figures = timed("evaluate", evaluate_assets, family, ProxyReward(reward_model, tokenizer), budget, args.seed + 300)
    times["total"] = round(time.time() - start, 1)
    report = {
        "seed": args.seed,
        "quick": args.quick,
        "budget": asdict(budget),
        "sampling_defaults": settings,
        "guidance_trials": trials,
        "vae": vae_figures,
        **figures,
        "seconds": times,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": args.threads,
    }
    write_report(out, report)
    shutil.rmtree(work, ignore_errors=True)
    log(f"done in {times['total']:.0f}s")
    return report


if __name__ == "__main__":
    main()
