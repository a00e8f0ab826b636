"""A loaded artifact behind the `ModelRunner` seam: what the worker calls to predict a batch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from training.artifacts import Artifact, load_artifact
from training.inference import predict_scores
from training.preprocess import InputSpec


class KerasRunner:
    """Predicts with one artifact; its version, classes and input come from the metadata."""

    def __init__(self, artifact: Artifact, batch_size: int) -> None:
        self.artifact = artifact
        self.version: str = artifact.metadata.version
        self.spec: InputSpec = artifact.spec
        self.class_names: Sequence[str] = artifact.metadata.class_names
        self.batch_size = batch_size

    @classmethod
    def from_path(cls, directory: Path, batch_size: int) -> KerasRunner:
        return cls(
            load_artifact(directory, directory.parent.parent, directory.parent.name), batch_size
        )

    def predict(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        return predict_scores(self.artifact, images, self.batch_size)
