"""From a loaded artifact and uint8 images to class scores, labels and confidences.

Used by `evaluate`, `emolabel predict` and the workers, so every caller maps a sigmoid or softmax
output to class names the same way, with names taken from the artifact's metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from training.artifacts import Artifact
from training.metadata import ModelMetadata
from training.preprocess import to_model_input


@dataclass(frozen=True)
class Prediction:
    """One image's label, the confidence in it, and the score of every class."""

    label: str
    confidence: float
    scores: dict[str, float]


def class_scores(raw: NDArray[np.float32], metadata: ModelMetadata) -> NDArray[np.float32]:
    """Model output (N, 1) sigmoid or (N, C) softmax -> (N, C) scores in class order."""
    raw = np.asarray(raw, dtype=np.float32)
    if metadata.head == "sigmoid":
        positive = raw.reshape(-1)
        return np.stack([1.0 - positive, positive], axis=1)
    return raw.reshape(raw.shape[0], -1)


def predict_scores(
    artifact: Artifact, images: NDArray[np.uint8], batch_size: int = 64
) -> NDArray[np.float32]:
    """(N, H, W, C) uint8 -> (N, classes) float32 scores, in batches of `batch_size`."""
    spec = artifact.spec
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = to_model_input(images[start : start + batch_size], spec)
        outputs.append(np.asarray(artifact.model.predict_on_batch(batch)))
    if not outputs:
        return np.zeros((0, len(artifact.metadata.class_names)), dtype=np.float32)
    return class_scores(np.concatenate(outputs), artifact.metadata)


def to_predictions(scores: NDArray[np.float32], class_names: Sequence[str]) -> list[Prediction]:
    """(N, C) scores -> one Prediction per row (argmax label, its score as confidence)."""
    indices = np.argmax(scores, axis=1)
    return [
        Prediction(
            label=class_names[int(index)],
            confidence=float(row[index]),
            scores={name: float(value) for name, value in zip(class_names, row, strict=True)},
        )
        for row, index in zip(scores, indices, strict=True)
    ]
