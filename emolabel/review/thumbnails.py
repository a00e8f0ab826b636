"""A thumbnail of an image, or of one face with some of its surroundings, as a small JPEG.

The file is read exactly as a worker reads it (`core.storage.reader.Reader`: confined to the root
of the job that labeled it and to `worker.allowed_roots`, under the byte limit) and decoded by
`training.preprocess` (limits checked from the header first, EXIF orientation applied), so the
page can show nothing a worker could not have read, and sees the pixels the model saw. Face boxes
are in pixels of the full-size oriented image, so a face's photo is decoded at full size.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import cv2
import numpy as np
from numpy.typing import NDArray

from core.errors import ImageError
from core.reasons import Reason
from core.settings import LimitSettings
from training.preprocess import InputSpec, check_decode_budget, check_limits, decode, read_header

# A face is shown with a quarter of its size around it on every side: the expression's context.
FACE_MARGIN = 0.25
JPEG_QUALITY = 85
# EXIF orientations that turn the image a quarter: the stored width is the shown height.
_QUARTER_TURNS = frozenset({5, 6, 7, 8})

Box = tuple[int, int, int, int]


def crop_with_margin(image: NDArray[np.uint8], box: Box, margin: float) -> NDArray[np.uint8]:
    """The box (x, y, width, height) grown by `margin` of its size on every side, clipped."""
    x, y, width, height = box
    grow_x, grow_y = round(width * margin), round(height * margin)
    rows, columns = image.shape[:2]
    top, bottom = max(0, y - grow_y), min(rows, y + height + grow_y)
    left, right = max(0, x - grow_x), min(columns, x + width + grow_x)
    if bottom <= top or right <= left:
        raise ImageError(Reason.CORRUPT, f"face box {box} lies outside the {columns}x{rows} image")
    return image[top:bottom, left:right]


def fit_within(image: NDArray[np.uint8], size: int) -> NDArray[np.uint8]:
    """Shrink (never enlarge) so the longest side is at most `size`, keeping the aspect."""
    rows, columns = image.shape[:2]
    scale = size / max(rows, columns)
    if scale >= 1:
        return image
    shape = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    return np.asarray(cv2.resize(image, shape, interpolation=cv2.INTER_AREA), dtype=np.uint8)


def make_thumbnail(data: bytes, box: Box | None, size: int, limits: LimitSettings) -> bytes:
    """JPEG bytes of the image (or its face `box`) at most `size` pixels on its longest side."""
    header = read_header(data)
    check_limits(header, len(data), limits)
    if box is None and not header.has_alpha:
        # A whole image may be decoded at reduced scale (JPEG DCT scaling), down to `size`.
        spec = InputSpec(height=size, width=size)
    else:
        # Full size: a face box is in full-size pixels, and an image with alpha comes back
        # resized to the spec, which must then keep its aspect.
        turned = header.orientation in _QUARTER_TURNS
        spec = InputSpec(
            height=header.width if turned else header.height,
            width=header.height if turned else header.width,
        )
    check_decode_budget(data, header, spec, limits)
    image = decode(data, header, spec)
    if box is not None:
        image = crop_with_margin(image, box, FACE_MARGIN)
    image = fit_within(image, size)
    if image.shape[2] == 1:
        image = np.ascontiguousarray(image[:, :, 0])
    else:
        image = np.ascontiguousarray(image[:, :, ::-1])  # OpenCV encodes BGR
    encoded, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not encoded:
        raise ImageError(Reason.CORRUPT, "thumbnail does not encode as JPEG")
    return bytes(buffer)


class ThumbnailCache:
    """The most recently made thumbnails, by a key that names the image's version."""

    def __init__(self, capacity: int = 512) -> None:
        self._capacity = capacity
        self._items: OrderedDict[object, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_make(self, key: object, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        made = make()  # outside the lock: a slow decode must not hold up the other requests
        with self._lock:
            self._items[key] = made
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)
        return made
