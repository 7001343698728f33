"""The linear MLP head shared by the LAION improved aesthetic predictor and ImageReward.

Both publish `layers.{0,2,4,6,7}.{weight,bias}` of `nn.Sequential(Linear(768, 1024), Dropout(0.2), Linear(1024, 128),
Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1))`: no activations between the layers.
"""

from __future__ import annotations

from torch import Tensor, nn

from diffalign.errors import UserError

LINEAR_INDICES = (0, 2, 4, 6, 7)
DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}


class LinearHead(nn.Module):
    """The 5-linear head with the published module indices, so its state dict loads unchanged."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        if len(widths) != len(LINEAR_INDICES) + 1:
            raise ValueError(f"LinearHead needs {len(LINEAR_INDICES) + 1} widths, got {widths}")
        modules: list[nn.Module] = []
        linear = iter(zip(widths[:-1], widths[1:], strict=True))
        for index in range(LINEAR_INDICES[-1] + 1):
            modules.append(nn.Dropout(DROPOUTS[index]) if index in DROPOUTS else nn.Linear(*next(linear)))
        self.layers = nn.Sequential(*modules)

    @property
    def input_width(self) -> int:
        """The embedding width the head takes."""
        return self.layers[0].in_features

    def forward(self, embeds: Tensor) -> Tensor:
        """Scores [B] of embeddings [B, D]."""
        return self.layers(embeds).squeeze(-1)


def head_from_state_dict(state_dict: dict[str, Tensor], prefix: str, what: str) -> LinearHead:
    """A `LinearHead` with the widths of `state_dict[prefix + 'layers.i.weight']`, loaded strictly."""
    try:
        weights = [state_dict[f"{prefix}layers.{i}.weight"] for i in LINEAR_INDICES]
    except KeyError as e:
        raise UserError(f"{what}: the checkpoint has no MLP head weight {e.args[0]!r}") from e
    widths = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    head = LinearHead(widths)
    own = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(f"{prefix}layers.")}
    head.load_state_dict(own, strict=True)
    return head
