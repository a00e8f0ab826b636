"""A photo with its faces drawn on it (box, index, label, confidence), for a person to look at."""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

from training.faces.labeling import PhotoFaces

_BOX_COLOUR = (255, 200, 0)  # RGB
_TEXT_COLOUR = (0, 0, 0)
_NO_FACE_COLOUR = (255, 80, 80)


def draw_faces(rgb: NDArray[np.uint8], result: PhotoFaces) -> NDArray[np.uint8]:
    """A copy of `rgb` (the photo at any scale, RGB) with each face's box and label drawn.

    Boxes are in the photo's original pixels (`result.width` x `result.height`) and are scaled
    to `rgb`; a photo without a face gets `no_face` written in its corner.
    """
    canvas = np.ascontiguousarray(rgb[..., :3]).copy()
    height, width = canvas.shape[:2]
    factor_x, factor_y = width / result.width, height / result.height
    thickness = max(1, round(max(width, height) / 400))
    font_scale = max(0.4, max(width, height) / 1000)
    if not result.faces:
        _label(canvas, "no_face", (4, 4), font_scale, thickness, _NO_FACE_COLOUR)
        return canvas
    for face in result.faces:
        x, y, box_width, box_height = face.box
        left, top = round(x * factor_x), round(y * factor_y)
        right, bottom = round((x + box_width) * factor_x), round((y + box_height) * factor_y)
        cv2.rectangle(canvas, (left, top), (right - 1, bottom - 1), _BOX_COLOUR, thickness)
        text = f"{face.index}: {face.label} {face.confidence:.2f}"
        _label(canvas, text, (left, top), font_scale, thickness, _BOX_COLOUR)
    return canvas


def _label(
    canvas: NDArray[np.uint8],
    text: str,
    corner: tuple[int, int],
    font_scale: float,
    thickness: int,
    colour: tuple[int, int, int],
) -> None:
    """`text` on a filled band just above `corner` (below it when there is no room above)."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    (text_width, text_height), baseline = cv2.getTextSize(text, font, font_scale, thickness)
    band = text_height + baseline + 4
    left = min(max(corner[0], 0), max(canvas.shape[1] - text_width - 4, 0))
    top = corner[1] - band if corner[1] - band >= 0 else corner[1]
    cv2.rectangle(canvas, (left, top), (left + text_width + 4, top + band), colour, cv2.FILLED)
    origin = (left + 2, top + text_height + 2)
    cv2.putText(canvas, text, origin, font, font_scale, _TEXT_COLOUR, thickness, cv2.LINE_AA)
