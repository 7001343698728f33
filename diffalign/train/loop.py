"""The one training loop every recipe calls: `fit(cfg, accelerator, family, params, make_batches, step)`.

A recipe supplies what differs between methods: a batch source (pairs for DPO/InPO, prompts for AlignProp) that knows
its resumable position, and a step function `step(batch, generator) -> (loss, metrics)` (the generator is the
process's training-noise RNG, saved in every checkpoint). Everything else exists only here: the optimizer and lr
schedule, gradient accumulation, clipping only on sync steps, `reduce_mean` of the metrics on every rank, the NaN/inf
stop before backward, logging, validation, atomic checkpoints with bit-exact resume, and the final save.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from diffalign.config import TrainConfig
from diffalign.models import Family
from diffalign.train import TrainingInterrupted, common

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

    common.prepare_output_dir(cfg, accelerator)
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
    batches = make_batches(state.data_position)
    runlog = common.RunLog(accelerator, cfg)
    validator = common.Validator(cfg, family)
    if state.step == 0 and validator.due(0, last=False) and accelerator.is_main_process:
        runlog.log(validator.run(0), step=0)

    bar = tqdm(total=cfg.max_steps, initial=state.step, desc=cfg.method, disable=not accelerator.is_local_main_process)
    try:
        _train_steps(cfg, accelerator, family, params, model, optimizer, state, batches, step, runlog, validator, bar,
                     bar_metric)  # fmt: skip
    except KeyboardInterrupt:
        bar.close()
        raise TrainingInterrupted(common.stopped_at(state.step, cfg.output_dir)) from None
    bar.close()
    final = common.save_final(family, cfg, accelerator, state, optimizer, unit=batches.unit)
    runlog.close()
    return final


def _train_steps(
    cfg, accelerator, family, params, model, optimizer, state, batches, step, runlog, validator, bar, bar_metric
) -> None:
    """The loop of `fit` (its arguments are fit's locals)."""
    with family.calling(model):
        while state.step < cfg.max_steps:
            batch = next(batches)
            state.data_position += batches.advance(batch)
            state.skipped += batches.skipped(batch)
            with accelerator.accumulate(model), accelerator.autocast():
                loss, metrics = step(batch, state.generator)
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
            shown = {"loss": f"{values['loss']:.4f}"}
            if bar_metric is not None:
                shown[bar_metric] = f"{values[bar_metric]:.2f}"
            bar.set_postfix(shown)
            if state.step % cfg.log_every == 0 or last:
                skipped = {f"skipped_{batches.unit}": state.skipped}
                runlog.log({**values, "lr": state.schedule.get_last_lr()[0], **skipped}, step=state.step)
            if validator.due(state.step, last) and accelerator.is_main_process:
                runlog.log(validator.run(state.step), step=state.step)
            if cfg.checkpoint_every > 0 and state.step % cfg.checkpoint_every == 0:
                common.save_checkpoint(accelerator, cfg.output_dir, state, cfg.checkpoints_keep)
