"""The training loop's guards in diffalign.train.common: the watched validation metric (best weights, early stop)."""

from __future__ import annotations

import pytest

from diffalign.config import ValidationConfig
from diffalign.errors import UserError
from diffalign.train.common import BestTracker, check_best_by


def test_best_tracker_keeps_the_best_and_counts_falls_in_a_row():
    tracker = BestTracker(metric="val/heldout")
    values = [0.5, 0.7, 0.6, 0.65, 0.6, 0.55, 0.8]
    # new best?            yes  yes  no   no    no   no    yes
    # falls in a row:      0    0    1    0     1    2     0
    seen = [(tracker.update({"val/heldout": v, "val/reward": 1.0}, i), tracker.falls) for i, v in enumerate(values)]
    assert seen == [(True, 0), (True, 0), (False, 1), (False, 0), (False, 1), (False, 2), (True, 0)]
    assert (tracker.best, tracker.best_step) == (0.8, 6)
    restored = BestTracker(metric="val/heldout")
    restored.load_state_dict(tracker.state_dict())
    assert restored == tracker
    with pytest.raises(UserError, match=r"'val/heldout' is not among the validation metrics \(val/reward\)"):
        BestTracker(metric="val/heldout").update({"val/reward": 1.0}, 0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"early_stop": 3}, "early_stop needs validation.best_by"),
        ({"best_by": "loss", "prompts": ["a"], "reward": "toy-clip"}, "'loss' is not a validation metric"),
        ({"best_by": "val/heldout", "prompts": ["a"], "reward": "toy-clip"}, "needs validation.prompts and "),
        ({"best_by": "val/reward", "reward": "toy-clip"}, "needs validation.prompts and validation.reward"),
        ({"best_by": "val/reward", "prompts": ["a"], "reward": "toy-clip", "early_stop": 2}, "every > 0"),
    ],
)
def test_best_by_settings_are_checked_before_training(settings, message):
    with pytest.raises(UserError, match=message):
        check_best_by(ValidationConfig(**settings))
    check_best_by(ValidationConfig(best_by="val/heldout/all_correct", prompts=["a"], heldout_reward="toy-gold"))
