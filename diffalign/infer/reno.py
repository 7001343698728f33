"""ReNO (Eyring et al., NeurIPS 2024, arXiv 2406.04312): optimise the initial noise of a one- or few-step generator
against differentiable rewards, at inference time, for each prompt.

    from diffalign.infer.reno import reno
    result = reno(family, ["a red circle on a black background"], "toy-clip", num_steps=4, guidance_scale=4.5)
    result = reno(family, prompts, config=RenoConfig(iters=20, optimizer="adam"))   # settings as a config
    result.images            # [B, 3, H, W] the best image seen per prompt (regulariser excluded)
    result.initial_images    # the images of the initial noise: the model without ReNO, same seeds
    result.history           # one record per prompt, iteration (and start): every reward component, K(z), |grad|

Each iteration, exactly as the paper: generate image = decode(G(z, c)) with gradients through every sampling step
(per-step checkpointing when there is more than one), the reward loss -sum_k lambda_k R_k and the chi_d regulariser
K(z) (float32, `diffalign.losses.reno`), keep the image if its reward loss is the best so far, backpropagate, clip the
gradient norm of z to `grad_clip`, one SGD step (Nesterov momentum; Adam optional). Prompts in a batch are optimised
independently: the loss is summed over samples (each gradient is its own sample's), the clipping is per sample, and
SGD and Adam act elementwise, so a batch gives the one-by-one results (up to float rounding of batched kernels).

The paper's control and transfer step, as in the official code (ExplainableML/ReNO bd6f6ac, `training/trainer.py`,
`models/utils.py`): `imageselect=True` is best-of-N at equal reward evaluations — each iteration scores a fresh
random noise (iteration 0 the prompt's own, so `initial_images` are ReNO's), no gradient, and the best image is
kept; `multi_step=MultiStepConfig(model=...)` re-renders the initial and the optimised noise with a multi-step
model (the official `multi_apply`: FLUX-schnell itself at 4 steps, SDXL base at 50 with CFG 5 for SDXL-Turbo, SD 2.1
base at 50 with CFG 7.5 for SD-Turbo) into `multi_step_images` / `multi_step_initial_images`.

Beyond the paper, multi-start (`starts=S > 1`, off by default): `start_fraction` of the iteration budget is shared
by S initial noises per prompt (each runs start_fraction * iters / S iterations), then the start with the best reward
seen continues (its noise and optimiser state) for the rest of the budget. The number of generator forward+backward
passes per prompt is `iters` either way, so multi-start and one start compare at equal compute.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffalign.errors import UserError
from diffalign.infer.configs import RENO_REWARD, SAME_MODEL, MultiStepConfig, RenoConfig
from diffalign.infer.sample import initial_latents
from diffalign.losses.reno import clip_grad_rows_, reno_loss
from diffalign.models import Family, cond_select
from diffalign.rewards import Reward, WeightedSum, load_reward, parse_differentiable_spec

DEFAULT_LR = {"sgd": 5.0, "adam": 0.2}
"""The learning rate of each optimizer unless given. SGD: the paper's 5.0. Adam: the official code
(ExplainableML/ReNO `arguments.py`, bd6f6ac) has no lr of its own and runs Adam at the shared 5.0, which moves every
element of z by about lr per iteration (the toy's |z| of 23 became 76 in 5 iterations, even with eps 1e-2): 0.2 is
the largest of 0.02, 0.05, 0.1, 0.2, 0.5 that kept |z| within 2 % over 5 iterations on toy training prompts, as SGD
at 5.0 does (README, reno)."""
ADAM_EPS = 1e-2
"""Adam's eps as in the official code (`training/optim.py`): with gradients clipped to norm 0.1, torch's 1e-8 would
turn every element's update into a sign step of size lr."""


@dataclass
class RenoResult:
    """What `reno` returns, per prompt (index b): the best image seen and the whole optimisation history."""

    prompts: list[str]
    seeds: list[int]
    images: Tensor
    """[B, 3, H, W] float32 on the CPU: per prompt the image with the best reward seen (regulariser excluded)."""
    initial_images: Tensor
    """[B, 3, H, W]: the images of the initial noise of start 0 (the generator without ReNO, same seed)."""
    noise: Tensor
    """[B, C, h, w] float32: the noise that generated `images`."""
    best_reward: list[float]
    """Weighted reward sum_k lambda_k R_k of `images`."""
    initial_reward: list[float]
    best_iteration: list[int]
    """Iteration (of its start) at which each best image was seen; 0 = the initial noise."""
    best_start: list[int]
    followed_start: list[int]
    """The start continued after the multi-start phase (0 with one start)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One record per prompt, iteration and start: prompt (index), iteration, start, reward (weighted), rewards
    ({component: unweighted value}), regulariser K(z), grad_norm (before clipping), noise_norm, and with a
    `monitor` reward its components under monitor."""
    settings: dict[str, Any] = field(default_factory=dict)
    multi_step_images: Tensor | None = None
    """With `multi_step`: `noise` rendered by the multi-step model ([B, 3, H', W'], CPU)."""
    multi_step_initial_images: Tensor | None = None
    """With `multi_step`: the initial noise of start 0 rendered by the multi-step model."""

    def curve(self, key: str = "reward") -> Tensor:
        """[iterations, B]: `key` ("reward", "regulariser", "grad_norm", "noise_norm", a reward component or a
        monitor component) along the trajectory each prompt followed (its continued start)."""
        iterations = 1 + max(r["iteration"] for r in self.history)
        out = torch.full((iterations, len(self.prompts)), float("nan"))
        for record in self.history:
            if record["start"] == self.followed_start[record["prompt"]]:
                value = {**record, **record.get("monitor", {}), **record["rewards"]}[key]
                out[record["iteration"], record["prompt"]] = value
        return out

    def kept_curve(self, key: str = "reward") -> Tensor:
        """[iterations, B]: `key` of the image kept so far (the best reward up to each iteration) along the followed
        trajectory; its last row is the value for `images` when the best image lies on that trajectory."""
        rewards, values = self.curve("reward"), self.curve(key)
        kept = torch.empty_like(values)
        best = torch.full((values.shape[1],), -math.inf)
        current = torch.full((values.shape[1],), float("nan"))
        for i in range(values.shape[0]):
            better = rewards[i] > best
            best = torch.where(better, rewards[i], best)
            current = torch.where(better, values[i], current)
            kept[i] = current
        return kept


def resolve_reward(reward: str | Reward, family: Family) -> Reward:
    """The reward to optimise: a spec (checked to be differentiable, then loaded on the family's device, in its
    dtype on a GPU) or a Reward instance (which must be differentiable)."""
    if isinstance(reward, str):
        parse_differentiable_spec(reward, "reno --reward")
        on_gpu = family.device.type == "cuda"
        return load_reward(reward, device=family.device, dtype=family.dtype if on_gpu else None)
    if not reward.differentiable:
        raise UserError(f"reno: reward {reward.name!r} is not differentiable, and ReNO backpropagates through it")
    return reward


def reward_weights(reward: Reward) -> dict[str, float] | None:
    """{component label: lambda_k} of a weighted sum; None for a single reward (its total has weight 1)."""
    if isinstance(reward, WeightedSum):
        return {r.label: w for r, w in zip(reward.rewards, reward.weights, strict=True)}
    return None


def start_seed(seed: int, start: int) -> int:
    """The noise seed of multi-start `start` for a prompt with `seed` (start 0 is the prompt's own seed)."""
    return seed if start == 0 else seed + start * 100_000_007


def phase_lengths(iters: int, starts: int, start_fraction: float) -> tuple[int, int]:
    """(iterations of each start in the multi-start phase, iterations of the continued start after it), with
    starts * first + second == iters; (iters, 0) for one start."""
    if starts == 1:
        return iters, 0
    first = math.floor(start_fraction * iters / starts)
    if first < 1:
        raise UserError(
            f"reno: {starts} starts need at least {starts} iterations in the multi-start phase "
            f"(start_fraction {start_fraction} x iters {iters}): raise --iters or lower --starts"
        )
    return first, iters - starts * first


def check(config: RenoConfig) -> None:
    """One-line UserErrors for settings that cannot run: of the wrong type or out of a field's bounds, or not
    together."""
    from diffalign.config import check_values

    check_values(config)
    if config.imageselect and config.starts > 1:
        raise UserError("reno: imageselect draws a new noise every iteration: it takes no starts")
    phase_lengths(config.iters, config.starts, config.start_fraction)


def resolved(config: RenoConfig, family: Family) -> RenoConfig:
    """`config` checked (`check`) and with every default that depends on something else filled in: the reward
    (`RENO_REWARD`), 1 sampling step without CFG, the optimizer's lr, checkpointing when there is more than one
    step, the family's resolution."""
    check(config)
    num_steps = config.num_steps or 1
    return dataclasses.replace(
        config,
        reward=config.reward or RENO_REWARD,
        num_steps=num_steps,
        guidance_scale=1.0 if config.guidance_scale is None else config.guidance_scale,
        lr=DEFAULT_LR[config.optimizer] if config.lr is None else config.lr,
        checkpoint=num_steps > 1 if config.checkpoint is None else config.checkpoint,
        resolution=config.resolution or family.sampling_defaults["resolution"],
    )


def make_optimizer(noise: Tensor, optimizer: str, lr: float, momentum: float) -> torch.optim.Optimizer:
    """The paper's SGD (momentum, Nesterov) or Adam (the official code's eps, `ADAM_EPS`) on the noise."""
    if optimizer == "adam":
        return torch.optim.Adam([noise], lr=lr, eps=ADAM_EPS)
    return torch.optim.SGD([noise], lr=lr, momentum=momentum, nesterov=momentum > 0)


def select_rows(optimizer: torch.optim.Optimizer, noise: Tensor, rows: Tensor, lr: float, momentum: float, kind: str):
    """A new leaf noise made of `rows` of `noise` and an optimiser carrying those rows' state (momentum buffer, Adam
    moments; scalar state such as Adam's step count is kept as is)."""
    kept = noise.detach()[rows].clone().requires_grad_(True)
    new = make_optimizer(kept, kind, lr, momentum)
    old_state = optimizer.state.get(noise, {})
    new.state[kept] = {
        k: v[rows].clone() if isinstance(v, Tensor) and v.shape == noise.shape else v for k, v in old_state.items()
    }
    return kept, new


class _Tracker:
    """Best image, noise and reward per prompt (rows = prompt b, start s at row b * starts + s)."""

    def __init__(self, count: int) -> None:
        self.reward = torch.full((count,), -math.inf, dtype=torch.float64)
        self.iteration = [0] * count
        self.start = [0] * count
        self.images: Tensor | None = None
        self.noise: Tensor | None = None

    def update(self, prompt_of_row: list[int], start_of_row: list[int], it: int, reward: Tensor, images, noise):
        """Keep, per prompt, the row with the highest reward if it beats the best so far (earliest wins ties)."""
        reward = reward.detach().double().cpu()
        if self.images is None:
            self.images = torch.zeros(len(self.reward), *images.shape[1:])
            self.noise = torch.zeros(len(self.reward), *noise.shape[1:])
        for row, prompt in enumerate(prompt_of_row):
            if reward[row] > self.reward[prompt]:
                self.reward[prompt] = reward[row]
                self.iteration[prompt], self.start[prompt] = it, start_of_row[row]
                self.images[prompt] = images[row].detach().float().cpu()
                self.noise[prompt] = noise[row].detach().float().cpu()


def reno(
    family: Family,
    prompts: Sequence[str],
    reward: str | Reward | None = None,
    config: RenoConfig | None = None,
    *,
    seeds: Sequence[int] | None = None,
    monitor: Reward | None = None,
    on_progress: Callable[[int], None] | None = None,
    **settings: Any,
) -> RenoResult:
    """Optimise the initial noise of `family` for each prompt (see the module docstring); returns a RenoResult.

    The settings are those of `config` (default `RenoConfig()`: the paper's) with `settings` (its field names, e.g.
    iters=20, optimizer="adam") replacing them; `reward` (a spec or a Reward instance) replaces `config.reward`.
    `seeds[b]` seeds prompt b's initial noise (default: 0, 1, ...), as `sample_images` does, so `initial_images`
    are the family sampler's images for those seeds. The family is frozen (eval mode, no weight gradients).
    `monitor`: a reward (differentiable or not, e.g. toy-gold) scored on every iterate without gradient and logged
    in the history, never optimised. `on_progress(n)` is called after each iteration with the iterations of budget
    done. The settings the run used, every default resolved, are `result.settings`."""
    prompts = list(prompts)
    seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
    if not prompts or len(seeds) != len(prompts):
        raise ValueError("reno: give at least one prompt, and one seed per prompt")
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(RenoConfig)})
    if unknown:
        raise TypeError(f"reno: unknown settings {unknown}; the settings are RenoConfig's fields")
    cfg = resolved(dataclasses.replace(config or RenoConfig(), **settings), family)
    reward_module = resolve_reward(reward if reward is not None else cfg.reward, family)
    family.freeze()  # only the noise is optimised: no weight needs a gradient
    parts = []
    for begin in range(0, len(prompts), cfg.batch_size):
        span = slice(begin, begin + cfg.batch_size)
        parts.append(_optimise(family, prompts[span], seeds[span], reward_module, cfg, monitor, on_progress, begin))
    result = _merge(parts, prompts, seeds, dataclasses.asdict(cfg))
    if cfg.multi_step.model is not None:
        render_multi_step(result, family, cfg.multi_step)
    return result


def render_multi_step(result: RenoResult, family: Family, multi_step: MultiStepConfig) -> None:
    """Fill `result.multi_step_images` / `multi_step_initial_images`: the best and the initial noise rendered by the
    multi-step model (loaded on the family's device and in its dtype; 'same': the family itself)."""
    from diffalign.infer.sample import sample_from_noise
    from diffalign.models import load_family

    target = family
    if multi_step.model != SAME_MODEL:
        target = load_family(multi_step.model, dtype=str(family.dtype).removeprefix("torch."), device=family.device)
    initial = initial_latents(family, result.seeds, result.settings["resolution"]).cpu()
    options = {"num_steps": multi_step.num_steps, "guidance_scale": multi_step.guidance_scale}
    result.multi_step_images = sample_from_noise(target, result.prompts, result.noise, **options)
    result.multi_step_initial_images = sample_from_noise(target, result.prompts, initial, **options)


def _merge(parts: list[RenoResult], prompts: list[str], seeds: list[int], settings: dict) -> RenoResult:
    """One result from the results of consecutive prompt chunks."""
    return RenoResult(
        prompts=prompts,
        seeds=seeds,
        images=torch.cat([p.images for p in parts]),
        initial_images=torch.cat([p.initial_images for p in parts]),
        noise=torch.cat([p.noise for p in parts]),
        best_reward=[v for p in parts for v in p.best_reward],
        initial_reward=[v for p in parts for v in p.initial_reward],
        best_iteration=[v for p in parts for v in p.best_iteration],
        best_start=[v for p in parts for v in p.best_start],
        followed_start=[v for p in parts for v in p.followed_start],
        history=[r for p in parts for r in p.history],
        settings=settings,
    )


def _optimise(
    family: Family,
    prompts: list[str],
    seeds: list[int],
    reward: Reward,
    cfg: RenoConfig,
    monitor: Reward | None,
    on_progress: Callable[[int], None] | None,
    offset: int,
) -> RenoResult:
    """ReNO on one chunk of prompts (history records carry prompt indices shifted by `offset`)."""
    starts, kind, lr, momentum = cfg.starts, cfg.optimizer, cfg.lr, cfg.momentum
    first, rest = phase_lengths(cfg.iters, starts, cfg.start_fraction)
    count = len(prompts)
    cond_all = family.encode_prompts(prompts)
    uncond = family.encode_negative(cfg.negative_prompt) if cfg.guidance_scale != 1.0 else None
    weights = reward_weights(reward)
    # Rows: prompt b, start s at row b * starts + s.
    prompt_of_row = [b for b in range(count) for _ in range(starts)]
    start_of_row = [s for _ in range(count) for s in range(starts)]
    row_seeds = [start_seed(seeds[b], s) for b, s in zip(prompt_of_row, start_of_row, strict=True)]
    select = cfg.imageselect
    noise = initial_latents(family, row_seeds, cfg.resolution).float().requires_grad_(not select)
    opt = None if select else make_optimizer(noise, kind, lr, momentum)
    tracker = _Tracker(count)
    history: list[dict[str, Any]] = []
    initial: dict[str, Any] = {}

    def iterate(it: int, noise: Tensor, opt: torch.optim.Optimizer | None) -> None:
        """One iteration: generate, score, keep the best; then one optimiser step (none when selecting)."""
        rows_prompts = [prompts[b] for b in prompt_of_row]
        cond = cond_select(cond_all, torch.tensor(prompt_of_row, device=family.device))
        if opt is None and it > 0:  # best-of-N: a fresh noise per iteration, iteration 0 the prompt's own
            noise = initial_latents(family, [start_seed(seed, it) for seed in row_seeds], cfg.resolution)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(opt is not None):
            latents = family.sample(
                cond, uncond, latents=noise, num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                checkpoint=cfg.checkpoint,
            )  # fmt: skip
            images = family.decode(latents)
        components = reward.components(images, rows_prompts)
        if weights is None:
            loss = reno_loss({"reward": reward.combine(components)}, {"reward": 1.0}, noise, cfg.reg_weight)
        else:
            loss = reno_loss(components, weights, noise, cfg.reg_weight)
        weighted = -loss.reward_loss.detach()
        if it == 0:
            initial.setdefault("images", images.detach().float().cpu()[::starts].clone())
            initial.setdefault("reward", weighted.cpu()[::starts].tolist())
        tracker.update(prompt_of_row, start_of_row, it, weighted, images, noise)
        if opt is None:
            grad_norms = torch.zeros(len(prompt_of_row))
        else:
            loss.total.sum().backward()
            grad_norms = clip_grad_rows_(noise.grad, cfg.grad_clip)
        values = {name: value.detach().float().cpu().tolist() for name, value in components.items()}
        regulariser = loss.regulariser.detach().cpu().tolist()
        watched = {}
        if monitor is not None:
            with torch.no_grad():
                parts = monitor.components(images.detach(), rows_prompts)
            watched = {name: value.float().cpu().tolist() for name, value in parts.items()}
        noise_norms = torch.linalg.vector_norm(noise.detach().float().flatten(1), dim=1).cpu().tolist()
        for row, b in enumerate(prompt_of_row):
            history.append({
                "prompt": offset + b, "iteration": it, "start": start_of_row[row],
                "reward": float(weighted[row]), "rewards": {k: v[row] for k, v in values.items()},
                "regulariser": regulariser[row], "grad_norm": float(grad_norms[row]),
                "noise_norm": noise_norms[row],
                **({"monitor": {k: v[row] for k, v in watched.items()}} if watched else {}),
            })  # fmt: skip
        if opt is not None:
            opt.step()

    for it in range(first):
        iterate(it, noise, opt)
        if on_progress is not None:
            on_progress(starts)
    followed = [0] * count
    if starts > 1:
        best_seen = best_reward_per_row(history, count, starts, offset)
        followed = best_seen.argmax(dim=1).tolist()
        rows = torch.tensor([b * starts + s for b, s in enumerate(followed)])
        noise, opt = select_rows(opt, noise, rows, lr, momentum, kind)
        prompt_of_row, start_of_row = list(range(count)), followed
        for it in range(first, first + rest):
            iterate(it, noise, opt)
            if on_progress is not None:
                on_progress(1)
    return RenoResult(
        prompts=prompts,
        seeds=seeds,
        images=tracker.images,
        initial_images=initial["images"],
        noise=tracker.noise,
        best_reward=tracker.reward.tolist(),
        initial_reward=initial["reward"],
        best_iteration=tracker.iteration,
        best_start=tracker.start,
        followed_start=followed,
        history=history,
        settings=dataclasses.asdict(cfg),
    )


def best_reward_per_row(history: list[dict[str, Any]], count: int, starts: int, offset: int) -> Tensor:
    """[count, starts]: the best weighted reward each start has seen so far."""
    best = torch.full((count, starts), -math.inf, dtype=torch.float64)
    for record in history:
        b, s = record["prompt"] - offset, record["start"]
        best[b, s] = max(best[b, s].item(), record["reward"])
    return best
