"""diffalign: align text-to-image diffusion models with human preferences.

Sub-packages (import direction: cli/train/infer -> losses, sampling, models, rewards, data):
  models   the one layer that knows UNet vs transformer families (SD, SDXL, SD3, FLUX)
  rewards  differentiable image rewards, one registry
  losses   pure tensor math, one file per paper
  data     preference pairs, prompt lists, latent/embedding cache
  train    one short recipe per training method
  gym      the toy shapes world (generator, gold checker, bundled assets, demo)
"""

__version__ = "0.1.0"
