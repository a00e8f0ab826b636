"""A photo decoded for face detection: a reduced RGB image to look in, and pixels to crop from.

Shared by `emolabel predict` / `evaluate` and the worker, and built only from
`training.preprocess` (header, limits, decode budget, decode), so a photo is read the same way
whatever labels it. Three sizes are in play:

- the *original* size: the photo's pixels with its EXIF orientation applied (as `preprocess`
  turns it), the frame every reported box is in;
- the *decoded* image: a JPEG is decoded in the DCT domain at the largest reduction (1/2, 1/4,
  1/8) that still leaves at least `detect_side` on the longer side (`preprocess.jpeg_reduction`);
  any other type is decoded at full size;
- the *detection* image: the decoded one area-reduced so its longer side is at most
  `detect_side` (a smaller photo is not enlarged).

Crop source rule (`crop_source`): a face is cropped from the decoded image, which costs nothing
more, when every face's crop (its box squared, plus the margin) has at least the model's input
side in pixels there, or when the decoded image is already at full size (every non-JPEG, every
JPEG not reduced). Otherwise a JPEG is decoded once more, at the largest reduction that gives the
smallest face's crop that many pixels (full size if none does), so a small face in a large photo
is never enlarged from a coarse decode when finer pixels are one cheap decode away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from core.settings import LimitSettings
from training.faces import Face
from training.faces import boxes as box_math
from training.preprocess import (
    ImageHeader,
    InputSpec,
    check_decode_budget,
    check_limits,
    decode,
    read_header,
)

# EXIF orientations whose displayed image is the stored one transposed.
_TRANSPOSED = frozenset({5, 6, 7, 8})
_JPEG_REDUCTIONS = (8, 4, 2, 1)


@dataclass(frozen=True)
class FacePhoto:
    """One photo decoded for faces (see the module docstring for the three sizes).

    `detection`: (h, w, 3) uint8 RGB, longer side <= the `detect_side` asked for;
    `decoded`: (H, W, 3) uint8 RGB, the decode `detection` was reduced from (the same array when
    no reduction was needed); `width`, `height`: the original oriented size.
    """

    header: ImageHeader
    width: int
    height: int
    decoded: NDArray[np.uint8]
    detection: NDArray[np.uint8]

    @property
    def detection_scale(self) -> tuple[float, float]:
        """(x, y) factors from detection pixels to original pixels."""
        return _scale_to_original(self.detection, self.width, self.height)

    def to_original(self, faces: Sequence[Face]) -> list[Face]:
        """Faces found in `detection` with their boxes (and landmarks) in original pixels."""
        factor_x, factor_y = self.detection_scale
        return [_scaled_face(face, factor_x, factor_y, self.width, self.height) for face in faces]


def detection_size(width: int, height: int, detect_side: int) -> tuple[int, int]:
    """(width, height) of the detection image: longer side at most `detect_side`, aspect kept."""
    longer = max(width, height)
    if longer <= detect_side:
        return width, height
    factor = detect_side / longer
    return max(1, round(width * factor)), max(1, round(height * factor))


def oriented_size(header: ImageHeader, decoded: NDArray[np.uint8]) -> tuple[int, int]:
    """The original (width, height) with EXIF orientation applied, as `preprocess.decode` turns it.

    OpenCV decodes an image with alpha as stored; an EXIF block that does not parse
    (orientation 0) is turned as OpenCV reads it, so the decoded image's aspect decides.
    """
    width, height = header.width, header.height
    if header.has_alpha:
        return width, height
    if header.orientation == 0:
        decoded_height, decoded_width = decoded.shape[:2]
        turned = decoded_width != decoded_height and (decoded_width > decoded_height) != (
            width > height
        )
        return (height, width) if turned else (width, height)
    return (height, width) if header.orientation in _TRANSPOSED else (width, height)


def decode_for_faces(data: bytes, detect_side: int, limits: LimitSettings) -> FacePhoto:
    """Bytes -> a `FacePhoto`, or an `ImageError` (limits and decode budget as everywhere).

    A JPEG is decoded at the largest DCT-domain reduction that keeps the detection size; the
    result is area-reduced to `detect_side` on its longer side.
    """
    header = read_header(data)
    check_limits(header, len(data), limits)
    if header.image_type == "jpeg":
        target_width, target_height = detection_size(header.width, header.height, detect_side)
        # A square of the shorter target side asks `jpeg_reduction` for the same factor whichever
        # way the photo is turned (the target keeps the aspect).
        side = min(target_width, target_height)
        spec = InputSpec(side, side, "rgb")
    else:
        # Full size: nothing to reduce in the DCT domain, and an image with alpha comes back
        # already resized to `spec` by `decode`.
        spec = InputSpec(header.height, header.width, "rgb")
    decoded = _decode_rgb(data, header, spec, limits)
    width, height = oriented_size(header, decoded)
    target = detection_size(width, height, detect_side)
    detection = decoded
    if (decoded.shape[1], decoded.shape[0]) != target:
        detection = np.asarray(
            cv2.resize(decoded, target, interpolation=cv2.INTER_AREA), dtype=np.uint8
        )
    return FacePhoto(header, width, height, decoded, detection)


def crop_source(
    photo: FacePhoto,
    data: bytes,
    faces: Sequence[Face],
    input_side: int,
    margin: float,
    limits: LimitSettings,
) -> NDArray[np.uint8]:
    """The RGB pixels to crop `faces` (boxes in original pixels) from; see the module's rule.

    `input_side` is the model's larger input side; `data` is the photo's bytes again, decoded a
    second time only for a reduced JPEG whose smallest face would otherwise be enlarged.
    """
    decoded = photo.decoded
    if not faces or photo.header.image_type != "jpeg":
        return decoded
    factor_x, _ = _scale_to_original(decoded, photo.width, photo.height)
    if factor_x <= 1.0:
        return decoded
    smallest = min(max(face.box[2], face.box[3]) for face in faces) * (1.0 + 2.0 * margin)
    if smallest / factor_x >= input_side:
        return decoded
    reduction = next(
        (r for r in _JPEG_REDUCTIONS if r < factor_x and smallest / r >= input_side), 1
    )
    shorter = min(photo.header.width, photo.header.height)
    side = max(1, shorter // reduction)
    return _decode_rgb(data, photo.header, InputSpec(side, side, "rgb"), limits)


def _decode_rgb(
    data: bytes, header: ImageHeader, spec: InputSpec, limits: LimitSettings
) -> NDArray[np.uint8]:
    check_decode_budget(data, header, spec, limits)
    image = decode(data, header, spec)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image


def _scale_to_original(image: NDArray[np.uint8], width: int, height: int) -> tuple[float, float]:
    return width / image.shape[1], height / image.shape[0]


def _scaled_face(face: Face, factor_x: float, factor_y: float, width: int, height: int) -> Face:
    corners = box_math.xywh_to_corners(box_math.as_array([face.box]))
    corners = box_math.clipped(box_math.rescaled(corners, factor_x, factor_y), width, height)
    x, y, box_width, box_height = box_math.corners_to_xywh(corners)[0]
    landmarks = None
    if face.landmarks is not None:
        landmarks = tuple((px * factor_x, py * factor_y) for px, py in face.landmarks)
    return Face(
        box=(float(x), float(y), float(box_width), float(box_height)),
        score=face.score,
        landmarks=landmarks,
    )
