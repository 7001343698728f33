"""Weight digests of each training method's toy config after a few steps: a refactor that must not change numbers
shows here (the same digest before and after), in minutes on 2 cores.

    python scripts/toy_digests.py --pairs runs/toy-pairs.parquet [--steps dpo=60,300 inpo=20 alignprop=3]

Each run trains configs/<method>/toy.yaml (the pair methods on `--pairs`) for the given optimizer steps, validation
and checkpoints off, in this process, and prints `method steps sha256` (summary.json's rank_weight_sha256).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

DEFAULT_STEPS = ["dpo=60,300", "inpo=20", "alignprop=3"]


def digest(method: str, steps: int, pairs: Path, out: Path) -> str:
    """sha256 of the trainable weights of `method`'s toy config after `steps` optimizer steps."""
    from diffalign.hub import CONFIGS_DIR
    from diffalign.processes import reset_accelerate_state
    from diffalign.train import load_train_config, train

    overrides = [
        f"output_dir={out}", f"max_steps={steps}", "checkpoint_every=0", "report_to=none", "validation.enabled=false",
    ]  # fmt: skip
    cfg = load_train_config(CONFIGS_DIR / method / "toy.yaml", overrides)
    if hasattr(cfg.data, "image_columns"):  # preference pairs
        cfg = load_train_config(CONFIGS_DIR / method / "toy.yaml", [*overrides, f"data.source={pairs}"])
    reset_accelerate_state()
    try:
        train(cfg)
    finally:
        reset_accelerate_state()
    return json.loads((out / "summary.json").read_text())["rank_weight_sha256"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, required=True, help="a toy pairs file (diffalign pairs, see configs)")
    parser.add_argument("--steps", nargs="+", default=DEFAULT_STEPS, help="method=steps[,steps...]")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for item in args.steps:
            method, _, counts = item.partition("=")
            for steps in (int(s) for s in counts.split(",")):
                print(method, steps, digest(method, steps, args.pairs.resolve(), Path(tmp) / f"{method}-{steps}"))


if __name__ == "__main__":
    main()
