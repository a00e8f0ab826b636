"""Face-aware labeling: detect -> crop -> classify, one result per face, `no_face` for none.

The pure steps a face model (metadata `subject: face`) is served with, shared by `emolabel
predict`, `evaluate` and the worker:

1. `find_faces(data, detector, spec, faces, limits)`: one photo's bytes -> its faces (boxes in
   original oriented pixels, largest first) and their crops, preprocessed as training
   preprocesses an image (`face_crops`);
2. `face_batch(photos, spec)`: the crops of many photos as one uint8 model batch (scale it with
   `preprocess.to_model_input` at predict time, as `inference.predict_scores` does);
3. `label_photos(photos, scores, class_names)`: that batch's class scores back to each photo as
   `PhotoFaces` (one `FaceLabel` per face, or the `no_face` outcome).

Faces are indexed by descending box area (ties: the detector's order, best score first), so face
0 is the largest. The photo-level label, for those who want one per file, is face 0's: the
largest face is the photo's main subject more often than the most confident one. A photo without
a face is `no_face`: an outcome, neither a failure nor a label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

from core.settings import FaceSettings, LimitSettings
from training.artifacts import Artifact
from training.faces import Box, Face, FaceDetector
from training.faces import boxes as box_math
from training.faces.scene import crop_source, decode_for_faces
from training.inference import predict_scores, thresholds_of, to_predictions
from training.preprocess import InputSpec, resize

NO_FACE: Final = "no_face"
LABELED: Final = "labeled"
Outcome = Literal["labeled", "uncertain", "no_face"]
PixelBox = tuple[int, int, int, int]  # x, y, width, height in original oriented pixels


@dataclass(frozen=True)
class DetectedFaces:
    """One photo's faces, ready to classify.

    `faces`: boxes in original oriented pixels (floats), largest first; `crops`: (N, H, W, C)
    uint8 at the model's `InputSpec`, one per face in the same order.
    """

    width: int
    height: int
    faces: tuple[Face, ...]
    crops: NDArray[np.uint8]


@dataclass(frozen=True)
class FaceLabel:
    """One face's result: its index in the photo, box, detector score, label and class scores."""

    index: int
    box: PixelBox
    detector_score: float
    label: str
    confidence: float
    scores: dict[str, float]
    uncertain: bool = False
    runner_up: str | None = None
    runner_up_confidence: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "box": list(self.box),
            "detector_score": round(self.detector_score, 6),
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "uncertain": self.uncertain,
            "runner_up": self.runner_up,
            "scores": {name: round(value, 6) for name, value in self.scores.items()},
        }


@dataclass(frozen=True)
class PhotoFaces:
    """One photo's outcome: `labeled` with its faces (largest first), or `no_face`."""

    width: int
    height: int
    faces: tuple[FaceLabel, ...]

    @property
    def outcome(self) -> Outcome:
        if not self.faces:
            return "no_face"
        return "uncertain" if self.uncertain else "labeled"

    @property
    def uncertain(self) -> bool:
        """Any face below its class's threshold: the photo needs a person's look."""
        return any(face.uncertain for face in self.faces)

    @property
    def label(self) -> str | None:
        """The photo-level label: the largest face's (None for `no_face`)."""
        return self.faces[0].label if self.faces else None

    @property
    def confidence(self) -> float | None:
        return self.faces[0].confidence if self.faces else None

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "width": self.width,
            "height": self.height,
            "label": self.label,
            "confidence": None if self.confidence is None else round(self.confidence, 6),
            "faces": [face.to_json() for face in self.faces],
        }


def ordered(faces: Sequence[Face]) -> tuple[Face, ...]:
    """Faces by descending box area; equal areas keep the detector's order (stable sort)."""
    return tuple(sorted(faces, key=lambda face: -face.area))


def pixel_box(box: Box, width: int, height: int) -> PixelBox:
    """A float (x, y, w, h) box as whole pixels: corners rounded, inside the image, >= 1 wide."""
    x1, y1 = round(box[0]), round(box[1])
    x2, y2 = round(box[0] + box[2]), round(box[1] + box[3])
    x1, y1 = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
    x2, y2 = min(max(x2, x1 + 1), width), min(max(y2, y1 + 1), height)
    return x1, y1, x2 - x1, y2 - y1


def face_crops(
    source: NDArray[np.uint8],
    boxes: Sequence[Box],
    width: int,
    height: int,
    spec: InputSpec,
    margin: float,
) -> NDArray[np.uint8]:
    """(N, H, W, C) uint8 crops at `spec`, one per box (original pixels of a `width` x `height`
    photo), cut from `source` (RGB, the photo at any scale) squared and grown by `margin`.

    Each crop is preprocessed as `preprocess.load_image` preprocesses an image file of it: grey
    (when the model takes grey) at its own size, then `preprocess.resize`.
    """
    crops = np.empty((len(boxes), *spec.shape), dtype=np.uint8)
    factor_x, factor_y = source.shape[1] / width, source.shape[0] / height
    for slot, box in enumerate(boxes):
        scaled = box_math.rescaled(box_math.as_array([box]), factor_x, factor_y)[0]
        crop = np.ascontiguousarray(
            box_math.crop_with_margin(source, tuple(float(v) for v in scaled), margin)  # type: ignore[arg-type]
        )
        if spec.color_mode == "grayscale":
            crop = np.asarray(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), dtype=np.uint8)[..., None]
        crops[slot] = resize(crop, spec)
    return crops


def find_faces(
    data: bytes,
    detector: FaceDetector,
    spec: InputSpec,
    faces: FaceSettings,
    limits: LimitSettings,
) -> DetectedFaces:
    """A photo's bytes -> its faces and their crops (`ImageError` if it cannot be decoded).

    Detection runs on the photo reduced to `faces.detect_side`; crops come from the source
    `scene.crop_source` chooses. No face gives an empty `DetectedFaces` (the `no_face` outcome).
    """
    photo = decode_for_faces(data, faces.detect_side, limits)
    found = ordered(photo.to_original(detector.detect(photo.detection)))
    if not found:
        return DetectedFaces(photo.width, photo.height, (), np.empty((0, *spec.shape), np.uint8))
    side = max(spec.height, spec.width)
    source = crop_source(photo, data, found, side, faces.margin, limits)
    boxes = [face.box for face in found]
    crops = face_crops(source, boxes, photo.width, photo.height, spec, faces.margin)
    return DetectedFaces(photo.width, photo.height, found, crops)


def face_batch(photos: Sequence[DetectedFaces], spec: InputSpec) -> NDArray[np.uint8]:
    """Every photo's crops, in photo then face order, as one (N, H, W, C) uint8 batch."""
    if not photos:
        return np.empty((0, *spec.shape), dtype=np.uint8)
    return np.concatenate([photo.crops for photo in photos]).reshape(-1, *spec.shape)


def label_photos(
    photos: Sequence[DetectedFaces],
    scores: NDArray[np.float32],
    class_names: Sequence[str],
    thresholds: Mapping[str, float | None] | None = None,
) -> list[PhotoFaces]:
    """The (N, C) scores of `face_batch(photos)` back to one `PhotoFaces` per photo."""
    total = sum(len(photo.faces) for photo in photos)
    if len(scores) != total:
        raise ValueError(f"{len(scores)} rows of scores for {total} faces")
    predictions = (
        to_predictions(np.asarray(scores, dtype=np.float32), class_names, thresholds)
        if total
        else []
    )
    results: list[PhotoFaces] = []
    start = 0
    for photo in photos:
        labels = tuple(
            FaceLabel(
                index=index,
                box=pixel_box(face.box, photo.width, photo.height),
                detector_score=face.score,
                label=prediction.label,
                confidence=prediction.confidence,
                scores=prediction.scores,
                uncertain=prediction.uncertain,
                runner_up=prediction.runner_up,
                runner_up_confidence=prediction.runner_up_confidence,
            )
            for index, (face, prediction) in enumerate(
                zip(photo.faces, predictions[start : start + len(photo.faces)], strict=True)
            )
        )
        start += len(photo.faces)
        results.append(PhotoFaces(photo.width, photo.height, labels))
    return results


def classify_faces(
    artifact: Artifact,
    photos: Sequence[DetectedFaces],
    batch_size: int = 64,
    *,
    calibrated: bool = True,
) -> list[PhotoFaces]:
    """Label every face of `photos` with the model, all photos' faces sharing model batches
    (raw, uncalibrated scores with `calibrated` False: to measure or fit a calibration)."""
    batch = face_batch(photos, artifact.spec)
    scores = predict_scores(artifact, batch, batch_size, calibrated=calibrated)
    return label_photos(
        photos, scores, artifact.metadata.class_names, thresholds_of(artifact.metadata)
    )
