"""Label a sample of the archive with two models, the way workers would, to measure churn.

A whole-image model labels each photo through `preprocess.load_image` and `inference.
predict_scores`; a face model through `faces.labeling.find_faces` and `classify_faces`, and its
photo-level label is the largest face's (None: no face), as `results` stores it. A photo that
cannot be read or decoded for either model is left out of the churn and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import islice

import numpy as np

from core.errors import ImageError
from core.settings import FaceSettings, LimitSettings
from training.artifacts import Artifact
from training.churn import Churn, churn_from_labels
from training.faces import FaceDetector
from training.faces.labeling import classify_faces, find_faces
from training.inference import predict_scores, to_predictions
from training.preprocess import load_image

logger = logging.getLogger(__name__)

BATCH = 32
Photo = tuple[int, bytes]  # image id, file bytes
Label = str | None
LabelOrError = Label | ImageError


@dataclass(frozen=True)
class Labeler:
    """What a model needs to label whole photos: the model, and for a face model, the detector."""

    artifact: Artifact
    limits: LimitSettings
    faces: FaceSettings
    detector: FaceDetector | None = None

    def labels(self, photos: Sequence[bytes]) -> list[LabelOrError]:
        """Each photo's label (None: no face), or the `ImageError` it failed with."""
        if self.artifact.metadata.subject == "face":
            return self._face_labels(photos)
        return self._image_labels(photos)

    def _image_labels(self, photos: Sequence[bytes]) -> list[LabelOrError]:
        spec = self.artifact.spec
        decoded: list[np.ndarray] = []
        outcome: list[LabelOrError] = []
        for data in photos:
            try:
                decoded.append(load_image(data, spec, self.limits))
                outcome.append(None)
            except ImageError as error:
                outcome.append(error)
        if decoded:
            scores = predict_scores(self.artifact, np.stack(decoded), BATCH)
            names = iter(to_predictions(scores, self.artifact.metadata.class_names))
            outcome = [
                item if isinstance(item, ImageError) else next(names).label for item in outcome
            ]
        return outcome

    def _face_labels(self, photos: Sequence[bytes]) -> list[LabelOrError]:
        if self.detector is None:
            raise ValueError("a face model needs a face detector to label photos")
        found = []
        outcome: list[LabelOrError] = []
        for data in photos:
            try:
                found.append(
                    find_faces(data, self.detector, self.artifact.spec, self.faces, self.limits)
                )
                outcome.append(None)
            except ImageError as error:
                outcome.append(error)
        labeled = iter(classify_faces(self.artifact, found, BATCH))
        return [item if isinstance(item, ImageError) else next(labeled).label for item in outcome]


def _chunks(photos: Iterable[Photo], size: int) -> Iterator[list[Photo]]:
    iterator = iter(photos)
    while chunk := list(islice(iterator, size)):
        yield chunk


def archive_churn(
    before: Labeler,
    after: Labeler,
    photos: Iterable[Photo],
    *,
    unreadable: int = 0,
    progress: Callable[[str], None] = logger.info,
) -> Churn:
    """The churn from `before`'s labels to `after`'s over `photos` (read lazily, a batch at a
    time); `unreadable` photos the caller could not read are counted as left out too."""
    rows: list[tuple[int, Label, Label]] = []
    left_out = unreadable
    for chunk in _chunks(photos, BATCH):
        data = [content for _, content in chunk]
        for (image_id, _), old, new in zip(
            chunk, before.labels(data), after.labels(data), strict=True
        ):
            if isinstance(old, ImageError) or isinstance(new, ImageError):
                left_out += 1
                continue
            rows.append((image_id, old, new))
    churn = replace(churn_from_labels(rows), left_out=left_out)
    progress(
        f"churn on {churn.sample} archive images: {churn.changed} labels would change "
        f"({churn.rate:.1%}); {left_out} left out"
    )
    return churn
