"""Datasets and splits, augmentation presets, the cached backbone features."""
