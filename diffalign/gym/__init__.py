"""The toy shapes world: scene generator and captions (`world`) and the pixel-level gold checker (`gold`). Leaves:
numpy and torch only. The bundled toy model and proxy reward are built on it by `scripts/make_toy_assets.py`;
evaluating a model against the gold checker is `diffalign.apps.toy_evaluation`."""
