"""Face detection: find the faces in a photo, so that a face model labels each one by itself.

A detector takes one RGB image and returns its faces; `training.faces.mtcnn.load_mtcnn` gives the
one emolabel ships (MTCNN as Keras 3 models, on any backend). `boxes` holds the box arithmetic
(overlap, suppression, orientation and scale mapping, margin crops) that detection and serving
share, in plain numpy.

Boxes are `(x, y, width, height)` floats in the pixels of the image given to `detect`: `x, y` is
the top-left corner (pixel edges, so a box of the whole image is `(0, 0, W, H)`), always inside
the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from core.settings import FaceSettings

Point = tuple[float, float]
Box = tuple[float, float, float, float]  # x, y, width, height (pixels of the detected image)


@dataclass(frozen=True)
class Face:
    """One detected face.

    `box` is `(x, y, width, height)` in the given image's pixels (floats, inside the image);
    `score` is the detector's face probability in [0, 1]; `landmarks`, when the detector gives
    them, are five `(x, y)` points in the same pixels, in the order of `LANDMARKS` ("left" is
    the image's left, not the person's).
    """

    box: Box
    score: float
    landmarks: tuple[Point, ...] | None = None

    @property
    def area(self) -> float:
        return self.box[2] * self.box[3]


LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


class FaceDetector(Protocol):
    """Anything that finds faces: one call per image, best face first."""

    def detect(self, rgb: NDArray[np.uint8]) -> list[Face]:
        """Faces in an (H, W, 3) uint8 RGB image, highest score first; [] when there are none."""
        ...


@dataclass(frozen=True)
class FaceDetectorConfig:
    """How hard to look for faces (MTCNN's image pyramid and stage thresholds).

    - `min_face_size`: the smallest face, in pixels of the image given to `detect` (after the
      `max_side` reduction below), that the pyramid looks for; smaller faces are dropped from the
      result. The pyramid's first level scales the image by 12 / min_face_size (P-Net sees
      12-pixel windows), so halving it roughly quadruples P-Net's work.
    - `pyramid_scale`: each pyramid level is this fraction of the one before (0.709: the area
      halves per level, the value MTCNN was trained with).
    - `proposal_threshold`, `refine_threshold`: the face probability P-Net's and R-Net's
      candidates need to go on to the next stage.
    - `min_score`: O-Net's face probability a face needs to be reported (its `score`).
    - `max_faces`: at most this many faces per image, the highest scores kept.
    - `max_side`: an image whose longer side is larger is area-reduced to this side before
      detection (boxes still come back in the given image's pixels); None detects at full size.
    """

    min_face_size: int = 20
    pyramid_scale: float = 0.709
    proposal_threshold: float = 0.6
    refine_threshold: float = 0.7
    min_score: float = 0.9
    max_faces: int = 32
    max_side: int | None = 1280

    def __post_init__(self) -> None:
        if self.min_face_size < 12:
            raise ValueError(
                f"min_face_size is {self.min_face_size}: it must be at least 12 pixels (the "
                "detector's smallest window); upscale the image instead"
            )
        if not 0.3 <= self.pyramid_scale <= 0.9:
            raise ValueError(f"pyramid_scale is {self.pyramid_scale}: use 0.3 to 0.9 (0.709)")
        for name in ("proposal_threshold", "refine_threshold", "min_score"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} is {value}: it must be in [0, 1)")
        if self.max_faces < 1:
            raise ValueError(f"max_faces is {self.max_faces}: it must be at least 1")
        if self.max_side is not None and self.max_side < self.min_face_size:
            raise ValueError(
                f"max_side ({self.max_side}) is below min_face_size ({self.min_face_size})"
            )


def detector_config(faces: FaceSettings) -> FaceDetectorConfig:
    """The detector configuration that `EMOLABEL_FACES__*` settings ask for."""
    return FaceDetectorConfig(
        min_face_size=faces.min_face_size,
        min_score=faces.min_score,
        max_faces=faces.max_faces,
        max_side=faces.detect_side,
    )
