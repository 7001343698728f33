"""The toy shapes world: scene generator and captions (`world`), pixel-level gold checker (`gold`), and evaluation of a
model family against the gold checker (`evaluate`). See `scripts/make_toy_assets.py` for the bundled toy model and
proxy reward built on it."""
