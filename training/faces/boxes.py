"""Box arithmetic in plain numpy: overlap, suppression, scale and EXIF-orientation mapping, crops.

Two layouts: `Box` tuples and (N, 4) "xywh" arrays are `(x, y, width, height)`; (N, 4) "corners"
arrays are `(x1, y1, x2, y2)`. Coordinates are continuous pixel edges: pixel column 0 spans
x in [0, 1), so an image W pixels wide spans [0, W] and mirroring maps x to W - x exactly.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import NDArray

from training.faces import Box

Boxes = NDArray[np.float64]  # (N, 4)

# EXIF orientations whose stored pixels are the displayed image transposed (width and height swap).
_TRANSPOSED = frozenset({5, 6, 7, 8})
# EXIF orientation -> the orientation that undoes it.
_INVERSE = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


def as_array(boxes: list[Box] | Boxes) -> Boxes:
    """Boxes as an (N, 4) float64 array (an empty list gives shape (0, 4))."""
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def xywh_to_corners(boxes: Boxes) -> Boxes:
    corners = boxes.astype(np.float64, copy=True)
    corners[:, 2:] += corners[:, :2]
    return corners


def corners_to_xywh(corners: Boxes) -> Boxes:
    boxes = corners.astype(np.float64, copy=True)
    boxes[:, 2:] -= boxes[:, :2]
    return boxes


def overlap(
    first: Boxes, second: Boxes, *, over: Literal["union", "min"] = "union"
) -> NDArray[np.float64]:
    """(N, M) overlap of corner boxes: intersection over union, or over the smaller box's area."""
    top_left = np.maximum(first[:, None, :2], second[None, :, :2])
    bottom_right = np.minimum(first[:, None, 2:], second[None, :, 2:])
    intersection = np.prod(np.clip(bottom_right - top_left, 0.0, None), axis=2)
    area_first = np.prod(np.clip(first[:, 2:] - first[:, :2], 0.0, None), axis=1)
    area_second = np.prod(np.clip(second[:, 2:] - second[:, :2], 0.0, None), axis=1)
    if over == "union":
        denominator = area_first[:, None] + area_second[None, :] - intersection
    else:
        denominator = np.minimum(area_first[:, None], area_second[None, :])
    return np.asarray(intersection / np.maximum(denominator, 1e-12), dtype=np.float64)


def iou(first: Box, second: Box) -> float:
    """Intersection over union of two (x, y, width, height) boxes."""
    corners = xywh_to_corners(as_array([first, second]))
    return float(overlap(corners[:1], corners[1:])[0, 0])


def suppress(
    corners: Boxes,
    scores: NDArray[np.floating],
    threshold: float,
    *,
    over: Literal["union", "min"] = "union",
) -> NDArray[np.intp]:
    """Greedy non-maximum suppression: indices of the boxes kept, best score first.

    A box is dropped when it overlaps an already kept, higher-scoring box by more than
    `threshold` (ties keep the earlier box, so the result is deterministic).
    """
    order = np.argsort(-np.asarray(scores), kind="stable")
    kept: list[int] = []
    while order.size:
        best = int(order[0])
        kept.append(best)
        rest = order[1:]
        if rest.size == 0:
            break
        overlaps = overlap(corners[best : best + 1], corners[rest], over=over)[0]
        order = rest[overlaps <= threshold]
    return np.asarray(kept, dtype=np.intp)


def squared(corners: Boxes) -> Boxes:
    """Each box grown to a square of its longer side, about the same centre."""
    sides = np.max(corners[:, 2:] - corners[:, :2], axis=1, keepdims=True)
    centres = (corners[:, :2] + corners[:, 2:]) / 2.0
    return np.concatenate([centres - sides / 2.0, centres + sides / 2.0], axis=1)


def clipped(corners: Boxes, width: int, height: int) -> Boxes:
    """Corner boxes cut to the image [0, width] x [0, height]."""
    limits = np.array([width, height, width, height], dtype=np.float64)
    return np.clip(corners, 0.0, limits)


def rescaled(boxes: Boxes, factor_x: float, factor_y: float | None = None) -> Boxes:
    """Boxes (either layout) in an image resized by `factor_x` (and `factor_y`, default the same).

    From a reduced decode back to full size, the factor is full size / reduced size.
    """
    factor = np.array([factor_x, factor_y if factor_y is not None else factor_x] * 2)
    return np.asarray(boxes * factor, dtype=np.float64)


def oriented(corners: Boxes, orientation: int, stored_width: int, stored_height: int) -> Boxes:
    """Corner boxes in an image's stored pixels -> the same boxes, its EXIF orientation applied.

    Orientation follows EXIF (1: as stored, 3: turned 180°, 6: turned 90° clockwise to display,
    8: 90° anticlockwise, 2/4/5/7: the mirrored forms), as `training.preprocess` applies it.
    """
    if orientation not in _INVERSE:
        raise ValueError(f"EXIF orientation {orientation} is not one of 1 to 8")
    x1, y1, x2, y2 = (corners[:, index] for index in range(4))
    width, height = float(stored_width), float(stored_height)
    if orientation in _TRANSPOSED:  # transpose first, then flip: the order OpenCV applies them
        x1, y1, x2, y2 = y1, x1, y2, x2
        width, height = height, width
    if orientation in (2, 3, 6, 7):  # mirrored left to right
        x1, x2 = width - x2, width - x1
    if orientation in (3, 4, 7, 8):  # mirrored top to bottom
        y1, y2 = height - y2, height - y1
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float64)


def stored(corners: Boxes, orientation: int, oriented_width: int, oriented_height: int) -> Boxes:
    """The inverse of `oriented`: boxes in a displayed (oriented) image -> its stored pixels."""
    if orientation not in _INVERSE:
        raise ValueError(f"EXIF orientation {orientation} is not one of 1 to 8")
    return oriented(corners, _INVERSE[orientation], oriented_width, oriented_height)


def margin_region(
    box: Box, margin: float, width: int, height: int, *, square: bool = True
) -> tuple[int, int, int, int]:
    """The pixel region `(x1, y1, x2, y2)` (end exclusive) to crop for a face, inside the image.

    The box grows by `margin` times its side on every side (0.1: 10%); with `square`, first to a
    square of its longer side about its centre, so a classifier trained on square faces sees
    the face undistorted. The region is cut to the image, so a face at the edge gives a smaller
    (possibly not square) crop rather than padding.
    """
    if margin < 0:
        raise ValueError(f"margin is {margin}: it must be 0 or more")
    corners = xywh_to_corners(as_array([box]))
    if square:
        corners = squared(corners)
    sides = corners[:, 2:] - corners[:, :2]
    grown = np.concatenate([corners[:, :2] - margin * sides, corners[:, 2:] + margin * sides], 1)
    x1, y1, x2, y2 = clipped(grown, width, height)[0]
    left, top = int(np.floor(x1)), int(np.floor(y1))
    right, bottom = max(int(np.ceil(x2)), left + 1), max(int(np.ceil(y2)), top + 1)
    return left, top, min(right, width), min(bottom, height)


def crop_with_margin(
    image: NDArray[np.uint8], box: Box, margin: float, *, square: bool = True
) -> NDArray[np.uint8]:
    """An (h, w, C) view of `image` around `box` (see `margin_region`); copy it to keep it."""
    height, width = image.shape[:2]
    left, top, right, bottom = margin_region(box, margin, width, height, square=square)
    return image[top:bottom, left:right]
