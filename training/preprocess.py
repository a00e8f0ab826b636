"""Bytes -> model-ready pixels: the ONLY place that sniffs, decodes and resizes an image.

Training, evaluation, `predict` and the workers all call `load_image`, so a served input is made
exactly like a trained one (colour order, resize method, reduced-scale JPEG decoding). Any change to
what this module outputs must bump `PREPROCESS_VERSION`, which every artifact records.

Decoders are given bytes, never a path: some file names crash OpenCV, and the caller owns file
access. The header is read first (libjpeg's header parser for a plain JPEG, Pillow's `Image.open`,
which reads only the header, for the rest), so size and pixel-count limits are enforced before a
decoder allocates anything.

A plain JPEG (YCbCr or grey, not EXIF-rotated) is decoded by TurboJPEG through simplejpeg, every
other image by OpenCV. Both wrap libjpeg-turbo and give the same pixels (tests/test_preprocess.py
compares them), but TurboJPEG decodes a face crop in ~20% less CPU than `cv2.imdecode`, and a
face crop's decode is a quarter of what the worker spends on it beside the model.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import simplejpeg
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from emolabel.errors import ImageTooLarge, ReasonCode, UnsupportedImage
from emolabel.settings import LimitSettings

PREPROCESS_VERSION = 1

ColorMode = Literal["rgb", "grayscale"]

# Pillow format name -> our type name. Content decides the type; the file extension never does.
ACCEPTED_FORMATS: dict[str, str] = {
    "JPEG": "jpeg",
    "MPO": "jpeg",  # phone cameras write multi-picture JPEGs; the first picture is a plain JPEG
    "PNG": "png",
    "BMP": "bmp",
    "GIF": "gif",
    "WEBP": "webp",
    "TIFF": "tiff",
}

# Colour is decoded straight to RGB (the codec writes RGB; no BGR array and cvtColor pass after,
# ~10% of a face crop's decoding). Same pixels as BGR + cvtColor for every accepted type.
_COLOR = cv2.IMREAD_COLOR_RGB
_REDUCED_COLOR = {
    factor: (reduced & ~cv2.IMREAD_COLOR) | cv2.IMREAD_COLOR_RGB
    for factor, reduced in (
        (2, cv2.IMREAD_REDUCED_COLOR_2),
        (4, cv2.IMREAD_REDUCED_COLOR_4),
        (8, cv2.IMREAD_REDUCED_COLOR_8),
    )
}
_REDUCED_GRAY = {
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
# What TurboJPEG decodes to RGB and grey itself; OpenCV converts the rest (CMYK, YCCK).
_TURBO_COLORSPACES = frozenset({"YCbCr", "Gray"})


@dataclass(frozen=True)
class InputSpec:
    """What a model takes: size, colour mode, and the affine map from 0..255 pixels to its input.

    Our own models scale inside the model (a Rescaling layer), so their `pixel_scale` is 1 and
    `pixel_offset` 0; an imported model may need `pixel_scale=1/255` applied outside.
    """

    height: int
    width: int
    color_mode: ColorMode = "rgb"
    pixel_scale: float = 1.0
    pixel_offset: float = 0.0

    @property
    def channels(self) -> int:
        return 3 if self.color_mode == "rgb" else 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, before any pixel is decoded."""

    image_type: str
    width: int
    height: int
    has_alpha: bool
    frames: int
    # EXIF orientation (1 = as stored); 0 when the EXIF block is there but does not parse.
    orientation: int = 1


def read_header(data: bytes) -> ImageHeader:
    """Identify the image type from content and read its dimensions, without decoding pixels."""
    if not data:
        raise UnsupportedImage(ReasonCode.EMPTY, "file is empty (0 bytes)")
    if data.startswith(_JPEG_START):
        header = _plain_jpeg_header(data)
        if header is not None:
            return header
    return _pillow_header(data)


_JPEG_START = b"\xff\xd8\xff"
# Markers without a length field: TEM, RST0-7, SOI (a stray one), EOI.
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8), 0xD8, 0xD9})


def _plain_jpeg_header(data: bytes) -> ImageHeader | None:
    """A JPEG's header from libjpeg's own header parser, or None where Pillow must read it.

    Pillow's `Image.open` costs a face crop ~16 us of Python; this walk over the segments before
    the scan plus TurboJPEG's header read costs a few. None for what only Pillow tells apart:
    an EXIF block (the orientation), a multi-picture (MPO) index, junk between segments, or a
    header libjpeg refuses; Pillow then reads it, or refuses it, as before.
    """
    position, end = 2, len(data)
    while True:
        if position + 4 > end or data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == 0xDA:  # start of scan: every header segment has been seen
            break
        if marker in _STANDALONE_MARKERS:
            position += 2
            continue
        body = position + 4
        if (marker == 0xE1 and data.startswith(b"Exif\0\0", body)) or (
            marker == 0xE2 and data.startswith(b"MPF\0", body)
        ):
            return None
        position += 2 + ((data[position + 2] << 8) | data[position + 3])
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return ImageHeader("jpeg", int(width), int(height), has_alpha=False, frames=1)


def _pillow_header(data: bytes) -> ImageHeader:
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies below; Pillow's bomb warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image_format = image.format or ""
                width, height = image.size
                has_alpha = image.mode in {"RGBA", "LA", "PA", "RGBa", "La"} or (
                    image.mode == "P" and "transparency" in image.info
                )
                frames = int(getattr(image, "n_frames", 1))
                orientation = _orientation(image)
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(
            ReasonCode.TOO_MANY_PIXELS, f"image dimensions refused: {error}"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UnsupportedImage(
            ReasonCode.NOT_AN_IMAGE, "content is not a recognised image"
        ) from None
    if image_format not in ACCEPTED_FORMATS:
        raise UnsupportedImage(
            ReasonCode.UNSUPPORTED_TYPE,
            f"image type {image_format or 'unknown'} is not accepted "
            f"(accepted: {', '.join(sorted(set(ACCEPTED_FORMATS.values())))})",
        )
    return ImageHeader(
        ACCEPTED_FORMATS[image_format], width, height, has_alpha, frames, orientation
    )


_ORIENTATION_TAG = 0x0112


def _orientation(image: Image.Image) -> int:
    if "exif" not in image.info:  # most face crops: nothing to parse
        return 1
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a malformed EXIF block: Pillow's parser raises many types
        return 0


def check_limits(header: ImageHeader, size_bytes: int, limits: LimitSettings) -> None:
    """Refuse an image by its byte size or header dimensions, before it is decoded."""
    if size_bytes > limits.max_file_bytes:
        raise ImageTooLarge(
            ReasonCode.TOO_LARGE,
            f"file is {size_bytes} bytes, over the {limits.max_file_bytes} limit",
        )
    pixels = header.width * header.height
    if pixels > limits.max_pixels:
        raise ImageTooLarge(
            ReasonCode.TOO_MANY_PIXELS,
            f"{header.width}x{header.height} is {pixels} pixels, "
            f"over the {limits.max_pixels} limit",
        )
    if min(header.width, header.height) < limits.min_side:
        raise UnsupportedImage(
            ReasonCode.TOO_SMALL,
            f"{header.width}x{header.height} is below the {limits.min_side}-pixel minimum side",
        )


def jpeg_reduction(header: ImageHeader, spec: InputSpec) -> int:
    """The largest DCT-domain reduction (1, 2, 4 or 8) that still leaves >= the model's input size.

    Decoding a 12 MP JPEG at 1/8 scale skips most of the IDCT work; the result is then resized
    down as usual, so the model sees the same kind of input in training and serving.
    """
    if header.image_type != "jpeg":
        return 1
    factor = 1
    for candidate in (2, 4, 8):
        if header.width // candidate >= spec.width and header.height // candidate >= spec.height:
            factor = candidate
    return factor


def _jpeg_is_truncated(data: bytes) -> bool:
    # libjpeg fills a cut-off JPEG with grey and only warns; a missing end-of-image marker near the
    # end is the reliable sign. Trailing vendor data after the marker is allowed.
    return data.find(b"\xff\xd9", max(0, len(data) - 4096)) == -1  # no copy of the tail


def decode(
    data: bytes, header: ImageHeader, spec: InputSpec, out: NDArray[np.uint8] | None = None
) -> NDArray[np.uint8]:
    """Decode to an (H, W, C) uint8 array in RGB (or one grey channel), EXIF orientation applied.

    `out`, an (H, W, C) C-contiguous array, is where TurboJPEG writes when the image decodes at
    exactly that shape (a face crop at the model's size): `out` itself is then returned, and no
    copy of the pixels is made. Any other image ignores it.
    """
    if header.image_type == "jpeg" and _jpeg_is_truncated(data):
        raise UnsupportedImage(ReasonCode.CORRUPT, "JPEG is truncated (no end-of-image marker)")
    grayscale = spec.color_mode == "grayscale"
    image: NDArray[Any]  # OpenCV's stubs type every array loosely
    if header.has_alpha:
        image = _decode_with_alpha(np.frombuffer(data, dtype=np.uint8))
    else:
        factor = jpeg_reduction(header, spec)
        decoded: NDArray[Any] | None = None
        if header.image_type == "jpeg":
            decoded = _decode_plain_jpeg(data, header, factor, grayscale, out)
            if decoded is not None and decoded is out:
                return out
        if decoded is None:
            decoded = _decode_with_opencv(data, factor, grayscale)
        if decoded is None:
            raise UnsupportedImage(ReasonCode.CORRUPT, f"{header.image_type} data does not decode")
        image = decoded
    if grayscale and image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    return np.ascontiguousarray(image, dtype=np.uint8)


def _decode_plain_jpeg(
    data: bytes,
    header: ImageHeader,
    factor: int,
    grayscale: bool,
    out: NDArray[np.uint8] | None = None,
) -> NDArray[np.uint8] | None:
    """TurboJPEG's decode at 1/`factor` scale, or None where OpenCV must decode it.

    None for an EXIF-rotated JPEG (OpenCV turns it), for colour spaces outside
    `_TURBO_COLORSPACES`, and for any libjpeg warning (`strict`): OpenCV then decodes
    what it can, or refuses it, as it always did. Decodes into `out` (and returns it) when
    `out` has exactly the decoded shape; a refused decode may leave `out` half written.
    """
    if header.orientation != 1:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in _TURBO_COLORSPACES:
            return None
        # TurboJPEG scales by M/8; asking for at least 1/factor of each side and a factor of at
        # least `factor` leaves exactly 1/factor, the scale OpenCV's IMREAD_REDUCED_* decodes at.
        height, width = -(-int(height) // factor), -(-int(width) // factor)
        into = (
            out is not None
            and out.shape == (height, width, 1 if grayscale else 3)
            and out.flags.c_contiguous
        )
        image: NDArray[np.uint8] = simplejpeg.decode_jpeg(
            data,
            "GRAY" if grayscale else "RGB",
            min_height=height,
            min_width=width,
            min_factor=factor,
            buffer=out if into else None,
        )
    except ValueError:
        return None
    if image.shape[:2] != (height, width):
        return None
    if into and out is not None:
        return out
    return image.reshape(height, width) if grayscale else image  # OpenCV's grey is 2-D


def _decode_with_opencv(data: bytes, factor: int, grayscale: bool) -> NDArray[Any] | None:
    if factor > 1:
        flags = (_REDUCED_GRAY if grayscale else _REDUCED_COLOR)[factor]
    else:
        flags = cv2.IMREAD_GRAYSCALE if grayscale else _COLOR
    decoded: NDArray[Any] | None = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    return decoded


def _decode_with_alpha(buffer: NDArray[np.uint8]) -> NDArray[np.uint8]:
    # IMREAD_COLOR would drop alpha and expose whatever colour hides under transparent pixels;
    # compose over white instead, as a viewer shows it.
    image: NDArray[Any] | None = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UnsupportedImage(ReasonCode.CORRUPT, "image with alpha does not decode")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGRA)
    if image.shape[2] == 2:  # grey + alpha
        grey, alpha_channel = image[:, :, 0], image[:, :, 1]
        image = np.dstack([grey, grey, grey, alpha_channel])
    if image.shape[2] == 3:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), dtype=np.uint8)
    alpha = image[:, :, 3:4].astype(np.float32) / 255.0
    colour = image[:, :, :3].astype(np.float32)
    composed = np.clip(colour * alpha + 255.0 * (1.0 - alpha) + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(cv2.cvtColor(composed, cv2.COLOR_BGR2RGB), dtype=np.uint8)


def resize(image: NDArray[np.uint8], spec: InputSpec) -> NDArray[np.uint8]:
    """Resize to the model's size (aspect not kept, as Keras' image loaders do by default)."""
    height, width = image.shape[:2]
    if (height, width) == (spec.height, spec.width):
        return image
    shrinking = height * width > spec.height * spec.width
    method = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = np.asarray(
        cv2.resize(image, (spec.width, spec.height), interpolation=method), dtype=np.uint8
    )
    if resized.ndim == 2:
        resized = resized[:, :, np.newaxis]
    return resized


def load_image(
    data: bytes, spec: InputSpec, limits: LimitSettings, out: NDArray[np.uint8] | None = None
) -> NDArray[np.uint8]:
    """Bytes -> (height, width, channels) uint8, or an `ImageError` saying why not.

    With `out` (an array of `spec.shape`, say one slot of a batch) the pixels land there and
    `out` is returned: a face crop is decoded straight into it, anything else is copied in.
    """
    header = read_header(data)
    check_limits(header, len(data), limits)
    image = resize(decode(data, header, spec, out), spec)
    if out is None or image is out:
        return image
    out[...] = image
    return out


def load_image_file(path: Path, spec: InputSpec, limits: LimitSettings) -> NDArray[np.uint8]:
    """Read one local file (refusing one over the byte limit unread) and `load_image` it."""
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise ImageTooLarge(
            ReasonCode.TOO_LARGE, f"file is {size} bytes, over the {limits.max_file_bytes} limit"
        )
    return load_image(path.read_bytes(), spec, limits)


def to_model_input(batch: NDArray[np.uint8], spec: InputSpec) -> NDArray[np.float32]:
    """(N, H, W, C) uint8 -> float32 with the artifact's outside-the-model scaling applied."""
    values = batch.astype(np.float32)
    if spec.pixel_scale != 1.0:
        values *= np.float32(spec.pixel_scale)
    if spec.pixel_offset != 0.0:
        values += np.float32(spec.pixel_offset)
    return values
