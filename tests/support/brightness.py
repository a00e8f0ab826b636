"""Models whose labels are fixed by construction, and data they judge with certainty: bright
"happy" and dark "sad" images, a model that calls bright images happy (or, inverted, sad).

A gate or churn decision between such models never rests on a training run's luck: the inverted
model has recall 0 for every class, the right one recall 1, and the two disagree on every image.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from core.settings import Settings
from training.artifacts import save_artifact
from training.metadata import InputMetadata, ModelMetadata, Subject

CLASSES = ["happy", "sad"]  # index order: the sigmoid gives the probability of "sad"


def bright_and_dark(target: Path, per_class: int, seed: int) -> Path:
    """`happy` images with every pixel in 200..255, `sad` ones in 0..55 (square PNGs)."""
    rng = np.random.default_rng(seed)
    for name, (low, high) in {"happy": (200, 256), "sad": (0, 56)}.items():
        folder = target / name
        folder.mkdir(parents=True)
        for index in range(per_class):
            side = int(rng.integers(64, 97))
            pixels = rng.integers(low, high, (side, side, 3), dtype=np.uint8)
            assert cv2.imwrite(str(folder / f"{name}-{index:03}.png"), pixels)
    return target


def brightness_model(
    settings: Settings, version: str, *, inverted: bool, subject: Subject = "image"
) -> Path:
    """A saved artifact whose fixed weights call mean brightness above one half "happy" (or,
    inverted, "sad"): p(sad) = sigmoid(-+20 x (mean - 0.5))."""
    import keras
    from keras import layers

    size = settings.train.image_size
    inputs = keras.Input(shape=(size, size, 3), name="image")
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    x = layers.GlobalAveragePooling2D(name="mean")(x)
    dense = layers.Dense(1, activation="sigmoid", name="probability")
    outputs = dense(x)
    sign = 1.0 if inverted else -1.0
    dense.set_weights([np.full((3, 1), sign * 20 / 3, np.float32), np.array([-sign * 10.0])])
    model = keras.Model(inputs, outputs, name=f"brightness_{version}")
    metadata = ModelMetadata(
        name=settings.model_name,
        version=version,
        class_names=CLASSES,
        head="sigmoid",
        input=InputMetadata(height=size, width=size, color_mode="rgb", scaling_in_model=True),
        source="imported",
        subject=subject,
        training={"fixed_weights": "inverted brightness" if inverted else "brightness"},
    )
    return save_artifact(model, metadata, settings.models_dir / settings.model_name / version)
