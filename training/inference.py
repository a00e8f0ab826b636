"""From a loaded artifact and uint8 images to class scores, labels and confidences.

Used by `evaluate`, `emolabel predict` and the workers, so every caller maps a sigmoid or softmax
output to class names the same way, with names taken from the artifact's metadata.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from training.artifacts import Artifact
from training.calibration import calibrate_scores, is_uncertain
from training.metadata import ModelMetadata
from training.preprocess import to_model_input


@dataclass(frozen=True)
class Prediction:
    """One image's label, the confidence in it, and the score of every class.

    `uncertain`: the confidence is below the label's calibrated threshold; `runner_up` is the
    second likeliest class (what a reviewer most often picks instead) and its score.
    """

    label: str
    confidence: float
    scores: dict[str, float]
    uncertain: bool = False
    runner_up: str | None = None
    runner_up_confidence: float | None = None


def class_scores(
    raw: NDArray[np.float32], metadata: ModelMetadata, *, calibrated: bool = True
) -> NDArray[np.float32]:
    """Model output (N, 1) sigmoid or (N, C) softmax -> (N, C) scores in class order,
    calibrated with the artifact's calibration unless `calibrated` is False (to fit one)."""
    raw = np.asarray(raw, dtype=np.float32)
    if metadata.head == "sigmoid":
        positive = raw.reshape(-1)
        scores = np.stack([1.0 - positive, positive], axis=1)
    else:
        scores = raw.reshape(raw.shape[0], -1)
    if calibrated and metadata.calibration is not None and len(scores):
        return calibrate_scores(scores, metadata.calibration)
    return scores


def padded_sizes(batch_size: int, smallest: int = 8) -> tuple[int, ...]:
    """The batch shapes a model is run at: powers of two from `smallest` below `batch_size`,
    and it. A short batch is padded to the smallest that holds it (at most twice its work)."""
    sizes = []
    size = smallest
    while size < batch_size:
        sizes.append(size)
        size *= 2
    return (*sizes, batch_size)


def predict_scores(
    artifact: Artifact,
    images: NDArray[np.uint8],
    batch_size: int = 64,
    *,
    calibrated: bool = True,
) -> NDArray[np.float32]:
    """(N, H, W, C) uint8 -> (N, classes) float32 scores, in batches of `batch_size`
    (calibrated as the artifact says, unless `calibrated` is False)."""
    spec = artifact.spec
    sizes = padded_sizes(batch_size)
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = to_model_input(images[start : start + batch_size], spec)
        count = len(batch)
        # Padded to one of a few sizes: a new batch shape is a new trace of the model's predict
        # function (on JAX a new compilation), and a face model sees a different count of faces
        # in every photo, the last batch of `evaluate` any size.
        size = next(size for size in sizes if size >= count)
        if size > count:
            padding = np.zeros((size - count, *batch.shape[1:]), dtype=batch.dtype)
            batch = np.concatenate([batch, padding])
        outputs.append(np.asarray(artifact.model.predict_on_batch(batch))[:count])
    if not outputs:
        return np.zeros((0, len(artifact.metadata.class_names)), dtype=np.float32)
    return class_scores(np.concatenate(outputs), artifact.metadata, calibrated=calibrated)


def thresholds_of(metadata: ModelMetadata) -> dict[str, float | None] | None:
    """The per-class thresholds of a calibrated model; None: it never says uncertain."""
    return None if metadata.calibration is None else dict(metadata.calibration.thresholds)


def to_predictions(
    scores: NDArray[np.float32],
    class_names: Sequence[str],
    thresholds: Mapping[str, float | None] | None = None,
) -> list[Prediction]:
    """(N, C) scores -> one Prediction per row (argmax label, its score as confidence, the
    runner-up, and whether the label is below its class's threshold)."""
    if len(scores) == 0:
        return []
    order = np.argsort(-scores, axis=1, kind="stable")
    predictions = []
    for row, ranked in zip(scores, order, strict=True):
        label = class_names[int(ranked[0])]
        confidence = float(row[ranked[0]])
        predictions.append(
            Prediction(
                label=label,
                confidence=confidence,
                scores={name: float(value) for name, value in zip(class_names, row, strict=True)},
                uncertain=is_uncertain(label, confidence, thresholds),
                runner_up=class_names[int(ranked[1])] if len(ranked) > 1 else None,
                runner_up_confidence=float(row[ranked[1]]) if len(ranked) > 1 else None,
            )
        )
    return predictions
