"""diffalign: align text-to-image diffusion models with human preferences.

The folders are the layers. A module imports only from its own layer or lower ones (checked by tests/test_layers.py,
lazy imports inside functions included):

  0  errors, io, hub, processes    utilities (errors users can cause, atomic writes and image encoding, model and
                                   asset lookup, ranks under accelerate launch)
  1  losses, gym, config, methods  losses: pure tensor math, one file per paper (imports torch only); gym: the toy
                                   shapes world and its gold checker (numpy/torch, no diffusers); config: the typed
                                   YAML loader and the settings every training method shares; methods: one record
                                   per method, which everything else iterates over
  2  models, rewards               models: the ONE layer that knows UNet vs transformer (SD, SDXL, SD3, FLUX);
                                   rewards: differentiable image rewards, one registry (never imports diffusers or
                                   models; the toy rewards use gym)
  3  data, infer                   data: preference pairs, prompt lists, latent/embedding cache; infer: sampling and
                                   the inference-time methods
  4  train                         the one training loop and one short recipe per training method
  5  apps, smoke                   apps: the user commands composing everything: score, generate, pairs, demo (with
                                   its method sections), the toy evaluation and the HTML report; smoke: tiny runs
                                   of the shipped configs (the contract tests and the GPU check)
  6  cli, __main__                 the command line
"""

__version__ = "0.1.0"

LAYERS: dict[str, int] = {
    "errors": 0,
    "io": 0,
    "hub": 0,
    "processes": 0,
    "losses": 1,
    "gym": 1,
    "config": 1,
    "methods": 1,
    "models": 2,
    "rewards": 2,
    "data": 3,
    "infer": 3,
    "train": 4,
    "apps": 5,
    "smoke": 5,
    "cli": 6,
    "__main__": 6,
}
"""Top-level module or sub-package -> layer (see above)."""
