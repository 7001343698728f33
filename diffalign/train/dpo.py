"""Diffusion-DPO recipe (Wallace et al. 2023): LoRA (or full fine-tune) of any family on preference pairs.

    accelerate launch -m diffalign train configs/dpo/sd15.yaml        # or: diffalign train configs/dpo/toy.yaml

Per step: winner and loser share one noise and one timestep; the policy (adapters on) and the reference (adapters
off, no grad) predict the family's target; `dpo_loss` turns the four errors into the loss.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from diffalign.config import DPOConfig, TimestepConfig, TrainConfig
from diffalign.data.loader import PairBatches, pair_model_inputs
from diffalign.data.pairs import open_pairs
from diffalign.hub import resolve_model
from diffalign.losses.dpo import dpo_loss, per_sample_error
from diffalign.models import Cond, Family, load_family
from diffalign.rewards import parse_spec
from diffalign.train import common


def dpo_step(
    family: Family,
    latents: Tensor,
    cond: Cond,
    preference: Tensor,
    cfg: DPOConfig,
    generator: torch.Generator,
    timesteps: TimestepConfig | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss and metrics of one batch: latents/cond hold winners then losers ([2B]); noise and t shared per pair."""
    half = latents.shape[0] // 2
    noise = torch.randn(latents[:half].shape, generator=generator).to(latents)
    t = family.sample_train_timesteps(half, generator, **asdict(timesteps or TimestepConfig()))
    noise, t = torch.cat([noise, noise]), torch.cat([t, t])
    noisy, target = family.noisy_and_target(latents, noise, t)
    err = per_sample_error(family.predict(noisy, t, cond), target)
    with family.reference():
        ref_err = per_sample_error(family.predict(noisy, t, cond), target)
    return dpo_loss(
        *err.chunk(2),
        *ref_err.chunk(2),
        beta=cfg.beta,
        kind=cfg.loss,
        label_smoothing=cfg.label_smoothing,
        preference=preference,
    )


def train(cfg: TrainConfig) -> Path:
    """Run the recipe; returns the folder of the final LoRA (or full denoiser)."""
    accelerator = common.make_accelerator(cfg)
    table = open_pairs(cfg.data)  # a bad source or a missing column fails here, before any model loads
    if cfg.validation.reward:
        parse_spec(cfg.validation.reward)  # so does a bad reward spec
    model_path = resolve_model(cfg.model.name, cfg.model.revision)
    family = load_family(
        cfg.model.name,
        dtype=cfg.model.dtype,
        device=accelerator.device,
        revision=cfg.model.revision,
        seed=cfg.seed,
        vae=cfg.model.vae,
    )
    params = common.add_trainable(family, cfg.lora, cfg.seed)
    if cfg.gradient_checkpointing:
        family.denoiser.enable_gradient_checkpointing()
    optimizer = common.build_optimizer(params, cfg.optim, common.effective_lr(cfg, accelerator.num_processes))
    state = common.TrainState(
        generator=common.noise_generator(cfg.seed, accelerator.process_index),
        schedule=common.build_lr_schedule(optimizer, cfg),
    )
    model, optimizer = accelerator.prepare(family.denoiser, optimizer)
    common.register_trainable_hooks(accelerator, family)
    resume_from = common.resolve_resume(cfg.output_dir, cfg.resume)
    if resume_from is not None:
        common.load_checkpoint(accelerator, resume_from, state)
        accelerator.print(f"resumed from {resume_from} (step {state.step})")

    resolution = family.check_resolution(
        cfg.model.resolution or family.sampling_defaults["resolution"] or family.native_resolution
    )
    batches = PairBatches(
        cfg.data,
        family,
        model_name=cfg.model.name,
        model_path=model_path,
        resolution=resolution,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        position=state.data_position,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        accelerator=accelerator,
        table=table,
    )
    runlog = common.RunLog(accelerator, cfg)
    validator = common.Validator(cfg, family, is_toy=cfg.model.name == "toy")
    if state.step == 0 and validator.enabled and accelerator.is_main_process:
        runlog.log(validator.run(0), step=0)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="dpo", disable=not accelerator.is_local_main_process)
    with family.calling(model):
        while state.step < cfg.max_steps:
            batch = next(batches)
            state.data_position += batches.advance(batch)
            state.skipped_pairs += batch["skipped"]
            with accelerator.accumulate(model), accelerator.autocast():
                latents, cond, preference = pair_model_inputs(family, batch)
                loss, metrics = dpo_step(family, latents, cond, preference, cfg.dpo, state.generator, cfg.timesteps)
                values = common.reduce_mean(accelerator, {"loss": loss, **metrics})
                common.check_finite(values["loss"], state.step, cfg.output_dir)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            state.schedule.step()
            state.step += 1
            last = state.step == cfg.max_steps
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['implicit_accuracy']:.2f}")
            if state.step % cfg.log_every == 0 or last:
                runlog.log(
                    {**values, "lr": state.schedule.get_last_lr()[0], "skipped_pairs": state.skipped_pairs},
                    step=state.step,
                )
            if validator.due(state.step, last) and accelerator.is_main_process:
                runlog.log(validator.run(state.step), step=state.step)
            if cfg.checkpoint_every > 0 and state.step % cfg.checkpoint_every == 0:
                common.save_checkpoint(accelerator, cfg.output_dir, state, cfg.checkpoints_keep)
    bar.close()
    final = common.save_final(family, cfg, accelerator, state, optimizer)
    runlog.close()
    return final
