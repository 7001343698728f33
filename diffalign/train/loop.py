"""The one training loop every recipe calls: `fit(cfg, accelerator, family, params, make_batches, step)`.

A recipe supplies what differs between methods: a batch source (pairs for DPO/InPO, prompts for AlignProp) that knows
its resumable position, and a step function `step(batch, generator) -> (loss, metrics)` (the generator is the
process's training-noise RNG, saved in every checkpoint). Everything else exists only here: the optimizer and lr
schedule, gradient accumulation, clipping only on sync steps, `reduce_mean` of the metrics on every rank, the NaN/inf
stop before backward, logging, validation (with `validation.best_by`: the best weights kept in output_dir/best and,
with `validation.early_stop`, a stop when the metric falls that many validations in a row), atomic checkpoints with
bit-exact resume, and the final save with its model card (and the upload, with `push_to_hub`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from diffalign.config import TrainConfig
from diffalign.models import Family
from diffalign.train import TrainingInterrupted, checkpoint, outputs, run_dir, run_log, setup, validation

StepFn = Callable[[Any, torch.Generator], tuple[Tensor, dict[str, Tensor]]]
"""step(batch, generator) -> (loss, metrics): one micro-batch's loss (with its graph) and scalar metrics."""


class BatchSource(Protocol, Iterator[Any]):
    """An endless iterator of micro-batches for this process, created at a resumable position."""

    unit: str
    """What one item is ("pairs", "prompts"): names the skipped count in summary.json."""

    def advance(self, batch: Any) -> int:
        """How far `batch` moved this process's resumable position."""

    def skipped(self, batch: Any) -> int:
        """How many items were skipped (e.g. undecodable) to make `batch`."""


def fit(
    cfg: TrainConfig,
    accelerator,
    family: Family,
    params: list[torch.nn.Parameter],
    make_batches: Callable[[int], BatchSource],
    step: StepFn,
    *,
    bar_metric: str | None = None,
) -> Path:
    """Train `params` of `family` for `cfg.max_steps` optimizer steps (resuming from a checkpoint per `cfg.resume`);
    `make_batches(position)` opens the batch source at this process's saved position. Returns the final LoRA (or
    full denoiser) folder. `bar_metric` is shown beside the loss on the progress bar."""
    from tqdm.auto import tqdm

    run_dir.prepare_output_dir(cfg, accelerator)
    optimizer = setup.build_optimizer(params, cfg.optim, setup.effective_lr(cfg, accelerator.num_processes))
    state = checkpoint.TrainState(
        generator=checkpoint.noise_generator(cfg.seed, accelerator.process_index),
        schedule=setup.build_lr_schedule(optimizer, cfg),
    )
    model, optimizer = accelerator.prepare(family.denoiser, optimizer)
    checkpoint.register_trainable_hooks(accelerator, family)
    resume_from = checkpoint.resolve_resume(cfg.output_dir, cfg.resume)
    if resume_from is not None:
        checkpoint.load_checkpoint(accelerator, resume_from, state)
        accelerator.print(f"resumed from {resume_from} (step {state.step})")
    batches = make_batches(state.data_position)
    runlog = run_log.RunLog(accelerator, cfg)
    validator = validation.Validator(cfg, family)
    state.best.metric = cfg.validation.best_by

    final_metrics: dict[str, float] = {}
    """The metrics last logged (training and validation): the model card's."""

    def validate() -> bool:
        """Validate on the main process, keep the best weights; whether to stop early (the same on every process)."""
        stop = False
        if accelerator.is_main_process:
            metrics = validator.run(state.step)
            runlog.log(metrics, step=state.step)
            final_metrics.update(metrics)
            if cfg.validation.best_by and state.best.update(metrics, state.step):
                validation.save_best(family, cfg, state.best)
            stop = 0 < cfg.validation.early_stop <= state.best.falls
        return validation.agree(accelerator, stop) if cfg.validation.early_stop else stop

    if state.step == 0 and validator.due(0, last=False):
        validate()

    bar = tqdm(total=cfg.max_steps, initial=state.step, desc=cfg.method, disable=not accelerator.is_local_main_process)

    def run_steps() -> bool:
        """Optimizer steps until max_steps; whether validation stopped the run early."""
        with family.calling(model):
            while state.step < cfg.max_steps:
                batch = next(batches)
                state.data_position += batches.advance(batch)
                state.skipped += batches.skipped(batch)
                with accelerator.accumulate(model), accelerator.autocast():
                    loss, metrics = step(batch, state.generator)
                    values = run_log.reduce_mean(accelerator, {"loss": loss, **metrics})
                    run_log.check_finite(values["loss"], state.step, cfg.output_dir)
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
                shown = {"loss": f"{values['loss']:.4f}"}
                if bar_metric is not None:
                    shown[bar_metric] = f"{values[bar_metric]:.2f}"
                bar.set_postfix(shown)
                if state.step % cfg.log_every == 0 or last:
                    skipped = {f"skipped_{batches.unit}": state.skipped}
                    runlog.log({**values, "lr": state.schedule.get_last_lr()[0], **skipped}, step=state.step)
                    final_metrics.update(values)
                stop = validate() if validator.due(state.step, last) else False
                if cfg.checkpoint_every > 0 and state.step % cfg.checkpoint_every == 0:
                    checkpoint.save_checkpoint(accelerator, cfg.output_dir, state, cfg.checkpoints_keep)
                if stop:
                    return True
        return False

    started, first_step = time.perf_counter(), state.step
    try:
        stopped_early = run_steps()
    except KeyboardInterrupt:
        bar.close()
        raise TrainingInterrupted(checkpoint.stopped_at(state.step, cfg.output_dir)) from None
    bar.close()
    if stopped_early:
        accelerator.print(
            f"early stop at step {state.step}: {cfg.validation.best_by} fell {state.best.falls} validations in a row"
        )
    # this process's optimizer steps and their wall time (validation and checkpoints included; not the model load)
    extra: dict[str, Any] = {"steps_run": state.step - first_step, "seconds": round(time.perf_counter() - started, 3)}
    if cfg.validation.best_by:
        extra |= {"best": validation.best_record(state.best), "stopped_early": stopped_early}
    final = outputs.save_final(
        family, cfg, accelerator, state, optimizer, unit=batches.unit, extra=extra, metrics=final_metrics
    )
    runlog.close()
    return final
