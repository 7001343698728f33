"""Inference: sampling images from any family (`sample`); inference-time alignment methods live here too."""
