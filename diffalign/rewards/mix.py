"""A weighted sum of rewards: `total = sum_k w_k * r_k(images, prompts)`, with each r_k as a logged component."""

from __future__ import annotations

from torch import Tensor, nn

from diffalign.rewards.base import Reward, check_prompts


def unique_labels(names: list[str]) -> list[str]:
    """`names` with repeats numbered: ['clip', 'clip'] -> ['clip', 'clip#2']."""
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return labels


class WeightedSum(Reward):
    """Weighted sum of rewards. Differentiable only if every part is; needs prompts if any part does."""

    name = "mix"
    description = "weighted sum of rewards"

    def __init__(self, rewards: list[Reward], weights: list[float]) -> None:
        super().__init__()
        if len(rewards) != len(weights) or not rewards:
            raise ValueError("WeightedSum needs one weight per reward and at least one reward")
        self.rewards = nn.ModuleList(rewards)
        self.weights = [float(w) for w in weights]
        for reward, label in zip(rewards, unique_labels([r.name for r in rewards]), strict=True):
            reward.label = label
        self.differentiable = all(r.differentiable for r in rewards)
        self.needs_prompts = any(r.needs_prompts for r in rewards)
        self.label = "total"

    def components(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """{label: unweighted scores [B]} of each reward."""
        prompts = check_prompts(images, prompts)
        return {reward.label: reward(images, prompts) for reward in self.rewards}

    def combine(self, components: dict[str, Tensor]) -> Tensor:
        """sum_k w_k * components[label_k]."""
        device = components[self.rewards[0].label].device
        parts = [w * components[label].to(device) for label, w in self.weights_by_label().items()]
        return sum(parts[1:], parts[0])

    def weights_by_label(self) -> dict[str, float]:
        """{label_k: w_k}."""
        return {r.label: w for r, w in zip(self.rewards, self.weights, strict=True)}

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        """The weighted sum [B]."""
        return self.combine(self.components(images, prompts))

    def extra_repr(self) -> str:
        terms = ", ".join(f"{r.label}={w:g}" for r, w in zip(self.rewards, self.weights, strict=True))
        return f"{terms}, differentiable={self.differentiable}"
