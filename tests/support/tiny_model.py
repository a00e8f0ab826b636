"""The tiny model's training settings: the `tiny_model` fixture (tests/conftest.py) trains it
once per session, and tests that train a model of their own use the same settings."""

from __future__ import annotations

from core.settings import TrainSettings

# Small enough to train in seconds on two cores, big enough to learn happy vs sad.
TINY = TrainSettings(epochs=3, batch_size=16, image_size=48, patience=2, seed=7)
