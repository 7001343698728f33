"""Does the GRPO update point up the reward? The recipe's policy-gradient (REINFORCE) ascent direction against the
pathwise gradient of the same expected reward, on the toy world, on CPU.

    python scripts/grpo_direction.py [--model toy] [--rollouts 16] [--prompts 8] [--group 8] [--steps 10]
                                     [--window K] [--same-noise]

Per rollout (P training prompts x G images, the family's default noise level, the toy's CFG), with a LoRA a small
random step away from the identity (so every LoRA weight has gradient):
1. REINFORCE: the rollout's images scored by the proxy toy-clip, group-normalised advantages, and the gradient of
   -(the GRPO loss at ratio 1, no clipping) summed over the sampling steps: what the recipe's first update follows.
2. Pathwise: the same initial noise and step noises replayed with gradient through the sampler, the decode and the
   reward: the gradient of the mean reward of exactly those samples through the stochastic steps' means (what
   REINFORCE estimates: with a window, the weights' use in the deterministic steps is left out of both).
Both are summed over rollouts; the cosine between them is printed after each. A correct estimator's cosine is
positive and grows like sqrt(samples) while it is small; a sign error makes it negative.
"""

from __future__ import annotations

import argparse

import torch
import torch.utils.checkpoint

from diffalign.gym.world import train_prompts
from diffalign.losses.grpo import group_advantages, ppo_loss
from diffalign.models import load_family
from diffalign.rewards import load_reward


def gradient(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The parameters' gradients as one vector, then cleared."""
    flat = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", choices=("toy", "toy-flow"))
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--window", type=int, default=None, help="the first K steps stochastic and trained")
    parser.add_argument("--same-noise", action="store_true", help="a group's images share their initial noise")
    args = parser.parse_args()
    window = range(args.window if args.window else args.steps)
    torch.manual_seed(0)
    family = load_family(args.model)
    params = family.add_lora(rank=8, alpha=8)
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    reward = load_reward("toy-clip")
    noise_level, guidance = family.default_noise_level, family.sampling_defaults["guidance_scale"]
    resolution = family.sampling_defaults["resolution"]
    prompts = [p for p in train_prompts()[: args.prompts] for _ in range(args.group)]
    cond, uncond = family.encode_prompts(prompts), family.encode_negative()
    groups = torch.arange(args.prompts).repeat_interleave(args.group)
    reinforce = pathwise = None
    for index in range(args.rollouts):
        generator = torch.Generator().manual_seed(index)
        if args.same_noise:
            latents = family.initial_noise(args.prompts, resolution, generator).repeat_interleave(args.group, dim=0)
        else:
            latents = family.initial_noise(len(prompts), resolution, generator)
        replay = generator.get_state()
        trajectory = family.rollout(
            cond, uncond, latents=latents, num_steps=args.steps, guidance_scale=guidance, noise_level=noise_level,
            window=window, generator=generator,
        )  # fmt: skip
        with torch.no_grad():
            rewards = reward(family.decode(trajectory.latents[:, -1]), prompts)
        advantages = group_advantages(rewards, groups)
        schedule = family.schedule(args.steps, latents)
        for i in window:
            t = schedule.timesteps[i]
            x, x_next = trajectory.latents[:, i], trajectory.latents[:, i + 1]
            pred = family.predict(x, t, cond, uncond, guidance, detach_uncond=True)
            log_prob, _, _ = family.transition_log_prob(x, x_next, pred, schedule, i, noise_level)
            loss, _ = ppo_loss(log_prob, trajectory.log_probs[:, i], advantages, clip_range=1e9, adv_clip=1e9)
            loss.backward()
        ascent = -gradient(params)
        generator.set_state(replay)
        x, means = latents, []
        for i, t in enumerate(schedule.timesteps):
            pred = torch.utils.checkpoint.checkpoint(family.predict, x, t, cond, uncond, guidance, use_reentrant=False)
            if i in window:
                mean, std = family.transition(x, pred, schedule, i, noise_level)
                means.append(mean.float())
                x = means[-1] + std * torch.randn(x.shape, generator=generator)
            else:
                x = family.step(x, pred, schedule, i).float()
        if not torch.allclose(x.detach(), trajectory.latents[:, -1], atol=1e-4):
            raise SystemExit("the pathwise replay does not reproduce the rollout")
        # the gradient through the stochastic steps' means only: what REINFORCE estimates (it leaves out the
        # weights' use in the deterministic steps outside the window and in the detached CFG branch)
        mean_grads = torch.autograd.grad(reward(family.decode(x), prompts).mean(), means)
        for i, grad in zip(window, mean_grads, strict=True):
            x = trajectory.latents[:, i]
            pred = family.predict(x, schedule.timesteps[i], cond, uncond, guidance, detach_uncond=True)
            mean, _ = family.transition(x, pred, schedule, i, noise_level)
            (mean.float() * grad).sum().backward()
        true = gradient(params)
        reinforce = ascent if reinforce is None else reinforce + ascent
        pathwise = true if pathwise is None else pathwise + true
        cosine = torch.nn.functional.cosine_similarity(reinforce, pathwise, dim=0)
        print(f"rollout {index + 1}: {len(prompts) * (index + 1)} samples, mean reward {float(rewards.mean()):.2f}, "
              f"cosine(REINFORCE, pathwise) {float(cosine):+.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
