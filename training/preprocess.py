"""Bytes -> model-ready pixels: the ONLY place that sniffs, decodes and resizes an image.

Training, evaluation, `predict` and the workers all call `load_image`, so a served input is made
exactly like a trained one (colour order, resize method, reduced-scale JPEG decoding). Any change to
what this module outputs must bump `PREPROCESS_VERSION`, which every artifact records.

Decoders are given bytes, never a path: some file names crash OpenCV, and the caller owns file
access. The header is read first (libjpeg's header parser for a plain JPEG, Pillow's `Image.open`,
which reads only the header, for the rest), so size and pixel-count limits are enforced before a
decoder allocates anything.

A JPEG in YCbCr or grey is decoded by TurboJPEG through simplejpeg (and turned here as its EXIF
orientation says), every other image by OpenCV. Both wrap libjpeg-turbo and give the same pixels
(tests/test_preprocess.py compares them), but TurboJPEG decodes a face crop in ~20% less CPU than
`cv2.imdecode`, and a face crop's decode is a quarter of what the worker spends on it beside the
model. TurboJPEG
decodes strictly: a JPEG libjpeg warns about is refused as corrupt, never handed to OpenCV, which
would decode it leniently, however long its damaged or repeated scans take (a CMYK JPEG, which
OpenCV converts, is checked by a strict TurboJPEG decode first).

What a decode costs is bounded before it starts (`check_decode_budget`): a JPEG's scans are
counted in its bytes, and its passes over the image (pixels x scans) and the memory the decode
needs (estimated from the header: decoded pixels, a progressive JPEG's coefficients) are checked
against `LimitSettings`. A wall clock cannot stop a C call; these estimates are deterministic.
An image with alpha is composed over white in place, a tile at a time, and reduced before its
alpha channel is dropped, so it needs no full-size copy beyond the decoded pixels.
"""

from __future__ import annotations

import io
import itertools
import math
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import simplejpeg
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from core.errors import ImageTooLarge, UnsupportedImage
from core.reasons import Reason
from core.settings import LimitSettings
from training.metadata import PREPROCESS_VERSION as PREPROCESS_VERSION

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
    # Bits of the widest sample as stored (16 for a 16-bit PNG or TIFF): what OpenCV decodes
    # an image with alpha into, so what its decode costs in memory.
    bits_per_sample: int = 8


def read_header(data: bytes) -> ImageHeader:
    """Identify the image type from content and read its dimensions, without decoding pixels."""
    if not data:
        raise UnsupportedImage(Reason.EMPTY, "file is empty (0 bytes)")
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
                bits_per_sample = _bits_per_sample(image, data)
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(Reason.TOO_MANY_PIXELS, f"image dimensions refused: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UnsupportedImage(Reason.NOT_AN_IMAGE, "content is not a recognised image") from None
    if image_format not in ACCEPTED_FORMATS:
        raise UnsupportedImage(
            Reason.UNSUPPORTED_TYPE,
            f"image type {image_format or 'unknown'} is not accepted "
            f"(accepted: {', '.join(sorted(set(ACCEPTED_FORMATS.values())))})",
        )
    return ImageHeader(
        ACCEPTED_FORMATS[image_format],
        width,
        height,
        has_alpha,
        frames,
        orientation,
        bits_per_sample,
    )


_TIFF_BITS_PER_SAMPLE = 258


def _bits_per_sample(image: Image.Image, data: bytes) -> int:
    """Bits per sample as stored; Pillow's mode says 8 for a 16-bit RGBA PNG, the file does not."""
    if image.format == "PNG" and data[12:16] == b"IHDR" and len(data) > 24:
        return int(data[24])
    if image.format == "TIFF":
        bits = getattr(image, "tag_v2", {}).get(_TIFF_BITS_PER_SAMPLE, 8)
        return max(int(bit) for bit in bits) if isinstance(bits, tuple) and bits else int(bits)
    return 8


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
            Reason.TOO_LARGE,
            f"file is {size_bytes} bytes, over the {limits.max_file_bytes} limit",
        )
    pixels = header.width * header.height
    if pixels > limits.max_pixels:
        raise ImageTooLarge(
            Reason.TOO_MANY_PIXELS,
            f"{header.width}x{header.height} is {pixels} pixels, "
            f"over the {limits.max_pixels} limit",
        )
    if min(header.width, header.height) < limits.min_side:
        raise UnsupportedImage(
            Reason.TOO_SMALL,
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


# Start-of-frame markers (C4 is DHT, C8 JPG, CC DAC) and those of progressive frames.
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE_FRAME_MARKERS = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# The end of entropy-coded data: 0xFF then a byte that is neither a stuffed 0x00 nor a restart
# marker, which both belong to the data, nor a fill byte (the last 0xFF of a run then matches).
_MARKER_AFTER_SCAN = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")
_START_OF_SCAN = re.compile(rb"\xff\xda")


@dataclass(frozen=True)
class JpegFrame:
    """What a JPEG's frame header and first scan header say about the work of decoding it."""

    progressive: bool
    sampling: tuple[tuple[int, int], ...]  # (horizontal, vertical) per component
    # False for a sequential frame whose first scan holds every component: libjpeg then decodes
    # that one scan and refuses any other ("Didn't expect more than one scan"), so more cost
    # nothing. Otherwise every scan is read, and every coefficient kept until the last.
    multiple_scans: bool = True


# Sequential Huffman frames (baseline, extended), the ones whose single-scan rule is relied on.
_SEQUENTIAL_FRAME_MARKERS = frozenset({0xC0, 0xC1})


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """The frame header (SOF) and first scan header of a JPEG, or None where they do not parse."""
    position, end = 2, len(data)
    frame: JpegFrame | None = None
    marker_of_frame = 0
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:
            position += 1
            continue
        if marker in _STANDALONE_MARKERS:
            position += 2
            continue
        if marker == 0xDA:
            if frame is None or position + 5 > end:
                return None
            in_first_scan = data[position + 4]
            single = marker_of_frame in _SEQUENTIAL_FRAME_MARKERS and (
                in_first_scan == len(frame.sampling)
            )
            return JpegFrame(frame.progressive, frame.sampling, multiple_scans=not single)
        length = (data[position + 2] << 8) | data[position + 3]
        if marker in _FRAME_MARKERS and frame is None:
            count = data[position + 9] if position + 10 <= end else 0
            fields = data[position + 10 : position + 10 + 3 * count]
            if count == 0 or len(fields) < 3 * count:
                return None
            sampling = tuple(
                (fields[i + 1] >> 4, fields[i + 1] & 0x0F) for i in range(0, len(fields), 3)
            )
            frame = JpegFrame(marker in _PROGRESSIVE_FRAME_MARKERS, sampling)
            marker_of_frame = marker
        position += 2 + length
    return None


def count_jpeg_scans(data: bytes, stop_at: int | None = None) -> int:
    """The scans (SOS segments) libjpeg would read in the first picture, up to its end marker.

    Segments are skipped by their lengths and entropy-coded data up to the next marker, so an EXIF
    thumbnail or an MPO's second picture is not counted; bytes between segments are skipped as
    libjpeg skips them (with a warning), so junk cannot hide a scan. Counting ends at `stop_at`.
    """
    position, end, scans = 2, len(data), 0
    while position + 2 <= end:
        if data[position] != 0xFF:
            position = data.find(b"\xff", position)
            if position < 0:
                break
            continue
        marker = data[position + 1]
        if marker == 0xFF:
            position += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if marker in _STANDALONE_MARKERS:
            position += 2
            continue
        if position + 4 > end:
            break
        position += 2 + ((data[position + 2] << 8) | data[position + 3])
        if marker == 0xDA:
            scans += 1
            if scans == stop_at:
                break
            found = _MARKER_AFTER_SCAN.search(data, position)
            if found is None:
                break
            position = found.start()
    return scans


@dataclass(frozen=True)
class DecodeCost:
    """What decoding one image will take, from its header and bytes, before any pixel exists."""

    scans: int  # JPEG scans (an upper bound where that is already within the limits); 1 otherwise
    work: int  # pixels x passes over them
    memory_bytes: int  # peak memory of the decode, estimated


# Peak bytes per pixel of OpenCV's decode of each type, 8 bits per sample, measured as the growth
# of the peak resident size in a fresh process (`python -m bench decode_memory`): the decoder's own
# array and the copy the Python binding returns make every decoded pixel count twice; the GIF and
# WebP decoders add a canvas, the TIFF decoder a converted copy. With alpha, decoded as stored
# (4 channels), composed in place.
_ALPHA_BYTES_PER_PIXEL = {"png": 8.5, "bmp": 8.5, "webp": 9.5, "gif": 9.5, "tiff": 12.5}
_RGB_BYTES_PER_PIXEL = {"png": 6.5, "bmp": 6.5, "webp": 6.5, "gif": 8.5, "tiff": 10.5}
_GREY_BYTES_PER_PIXEL = {"png": 2.5, "bmp": 2.5, "webp": 4.5, "gif": 6.5, "tiff": 10.5}
# A fixed allowance for each decode: tiles of float32 composition, row buffers, the resized output.
_DECODE_OVERHEAD_BYTES = 16 * 1024 * 1024


def decode_cost(
    data: bytes, header: ImageHeader, spec: InputSpec, limits: LimitSettings
) -> DecodeCost:
    """Estimate the passes and peak memory of decoding `data` as `decode` will (no decoding).

    A sequential JPEG whose first scan holds every component (nearly every face crop) is one
    pass whatever follows it, and only its headers are read; any other JPEG's scans are counted.
    """
    pixels = header.width * header.height
    if header.image_type == "jpeg":
        frame = jpeg_frame(data) or _UNKNOWN_FRAME
        scans = _jpeg_scans(data, pixels, limits) if frame.multiple_scans else 1
        return DecodeCost(scans, pixels * scans, _jpeg_memory(header, spec, scans, frame))
    # 16-bit samples: OpenCV keeps them where alpha is kept, and its TIFF decoder converts late.
    wide = 2 if header.bits_per_sample > 8 else 1
    if header.has_alpha:
        per_pixel = _ALPHA_BYTES_PER_PIXEL.get(header.image_type, 12.5) * wide
    else:
        table = _GREY_BYTES_PER_PIXEL if spec.color_mode == "grayscale" else _RGB_BYTES_PER_PIXEL
        per_pixel = table.get(header.image_type, 10.5) * (
            wide if header.image_type == "tiff" else 1
        )
    return DecodeCost(1, pixels, math.ceil(pixels * per_pixel) + _DECODE_OVERHEAD_BYTES)


def _jpeg_scans(data: bytes, pixels: int, limits: LimitSettings) -> int:
    """The scans to budget for: every FF DA pair while that is within the limits, else exact.

    The pairs (thumbnails' included) are an upper bound found in C, a few microseconds for a face
    crop; the exact walk, a Python step per segment and scan, runs only when that bound is over.
    Both stop one past what the limits allow, so a file of millions of scans costs no more than
    one just over the limit (the count is then a lower bound, and over the limits).
    """
    allowed = min(limits.max_jpeg_scans, limits.max_decode_work // max(1, pixels))
    pairs = sum(1 for _ in itertools.islice(_START_OF_SCAN.finditer(data), allowed + 1))
    return pairs if pairs <= allowed else count_jpeg_scans(data, stop_at=allowed + 1)


# What a frame header that cannot be parsed is taken to say: the most memory a decode can need
# (libjpeg's MAX_COMPONENTS is 10, each at full resolution, every coefficient kept).
_UNKNOWN_FRAME = JpegFrame(progressive=True, sampling=((1, 1),) * 10)


def _jpeg_memory(header: ImageHeader, spec: InputSpec, scans: int, frame: JpegFrame) -> int:
    factor = jpeg_reduction(header, spec)
    decoded = -(-header.width // factor) * -(-header.height // factor) * spec.channels
    if header.orientation != 1:
        decoded *= 2  # and the turned copy
    if len(frame.sampling) not in (1, 3):
        decoded *= 4  # TurboJPEG's strict CMYK check, then OpenCV's array and the binding's copy
    coefficients = 0
    if frame.multiple_scans:
        # libjpeg keeps every DCT coefficient (2 bytes each, 64 a block, whole MCUs) of an image
        # that comes in more than one scan, whatever scale it is decoded at.
        coefficients = _coefficient_bytes(header, frame)
    return decoded + coefficients + _DECODE_OVERHEAD_BYTES


def _coefficient_bytes(header: ImageHeader, frame: JpegFrame) -> int:
    sampling = frame.sampling
    horizontal = max(1, *(h for h, _ in sampling))
    vertical = max(1, *(v for _, v in sampling))
    mcu_columns = -(-header.width // (8 * horizontal))
    mcu_rows = -(-header.height // (8 * vertical))
    blocks = sum(max(1, h) * max(1, v) for h, v in sampling) * mcu_columns * mcu_rows
    return blocks * 64 * 2


def check_decode_budget(
    data: bytes, header: ImageHeader, spec: InputSpec, limits: LimitSettings
) -> DecodeCost:
    """Refuse an image whose decode would take too many scans, passes or bytes; before decoding."""
    cost = decode_cost(data, header, spec, limits)
    if cost.scans > limits.max_jpeg_scans:
        raise UnsupportedImage(
            Reason.UNSUPPORTED_TYPE,
            f"JPEG has {cost.scans} scans or more, over the {limits.max_jpeg_scans} limit "
            "(encoders write at most about a dozen)",
        )
    if cost.work > limits.max_decode_work:
        raise ImageTooLarge(
            Reason.TOO_LARGE,
            f"decoding {header.width}x{header.height} in {cost.scans} scans or more is "
            f"{cost.work} pixel passes or more, over the {limits.max_decode_work} limit",
        )
    if cost.memory_bytes > limits.max_decode_bytes:
        raise ImageTooLarge(
            Reason.TOO_LARGE,
            f"decoding {header.width}x{header.height} needs about "
            f"{cost.memory_bytes // (1024 * 1024)} MiB, over the "
            f"{limits.max_decode_bytes // (1024 * 1024)} MiB limit",
        )
    return cost


def _jpeg_is_truncated(data: bytes) -> bool:
    # libjpeg fills a cut-off JPEG with grey and only warns; a missing end-of-image marker near the
    # end is the reliable sign. Trailing vendor data after the marker is allowed.
    return data.find(b"\xff\xd9", max(0, len(data) - 4096)) == -1  # no copy of the tail


def decode(
    data: bytes, header: ImageHeader, spec: InputSpec, out: NDArray[np.uint8] | None = None
) -> NDArray[np.uint8]:
    """Decode to an (H, W, C) uint8 array in RGB (or one grey channel), EXIF orientation applied.

    An image with alpha comes back already resized to `spec`: it is composed over white in place
    and reduced before its alpha channel is dropped (the pixels `resize` of a full-size composed
    copy would give, without that copy). Call `check_decode_budget` first; `load_image` does.

    `out`, an (H, W, C) C-contiguous array, is where TurboJPEG writes when the image decodes at
    exactly that shape (a face crop at the model's size): `out` itself is then returned, and no
    copy of the pixels is made. Any other image ignores it.
    """
    if header.image_type == "jpeg" and _jpeg_is_truncated(data):
        raise UnsupportedImage(Reason.CORRUPT, "JPEG is truncated (no end-of-image marker)")
    grayscale = spec.color_mode == "grayscale"
    image: NDArray[Any]  # OpenCV's stubs type every array loosely
    if header.has_alpha:
        return _decode_with_alpha(np.frombuffer(data, dtype=np.uint8), spec)
    factor = jpeg_reduction(header, spec)
    decoded: NDArray[Any] | None = None
    if header.image_type == "jpeg":
        decoded = _decode_plain_jpeg(data, header, factor, grayscale, out)
        if decoded is not None and decoded is out:
            return out
    if decoded is None:
        decoded = _decode_with_opencv(data, factor, grayscale)
    if decoded is None:
        raise UnsupportedImage(Reason.CORRUPT, f"{header.image_type} data does not decode")
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
    """TurboJPEG's decode at 1/`factor` scale, EXIF orientation applied, or None for OpenCV.

    None for colour spaces outside `_TURBO_COLORSPACES` (CMYK, YCCK: TurboJPEG checks them
    strictly first, then OpenCV converts them) and for an EXIF block that does not parse
    (orientation 0: OpenCV reads it its own way). Any libjpeg warning (`strict`) is refused as
    corrupt: OpenCV would decode the same damage leniently, and a file built of hundreds of
    damaged or repeated scans costs it minutes. Decodes into `out` (and returns it)
    when `out` has exactly the decoded shape; a refused decode may leave `out` half written.
    """
    if header.orientation not in _ORIENTATIONS:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as error:
        raise UnsupportedImage(
            Reason.CORRUPT, f"JPEG header does not parse (libjpeg: {error})"
        ) from None
    if colorspace not in _TURBO_COLORSPACES:
        _check_strictly(data, int(height), int(width), factor)
        return None
    try:
        # TurboJPEG scales by M/8; asking for at least 1/factor of each side and a factor of at
        # least `factor` leaves exactly 1/factor, the scale OpenCV's IMREAD_REDUCED_* decodes at.
        height, width = -(-int(height) // factor), -(-int(width) // factor)
        into = (
            out is not None
            and header.orientation == 1
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
    except ValueError as error:
        raise UnsupportedImage(
            Reason.CORRUPT, f"JPEG does not decode cleanly (libjpeg: {error})"
        ) from None
    if image.shape[:2] != (height, width):
        return None
    if into and out is not None:
        return out
    if grayscale:
        image = image.reshape(height, width)  # OpenCV's grey is 2-D
    return _orient(image, header.orientation)


def _check_strictly(data: bytes, height: int, width: int, factor: int) -> None:
    """Decode a CMYK or YCCK JPEG with TurboJPEG, strictly, only to refuse what libjpeg warns of.

    TurboJPEG gives these as CMYK, not RGB; OpenCV converts them, leniently. Decoding twice costs
    a rare type one more reduced-scale decode, so that damage is refused as for every JPEG.
    """
    try:
        simplejpeg.decode_jpeg(
            data,
            "CMYK",
            min_height=-(-height // factor),
            min_width=-(-width // factor),
            min_factor=factor,
        )
    except ValueError as error:
        raise UnsupportedImage(
            Reason.CORRUPT, f"JPEG does not decode cleanly (libjpeg: {error})"
        ) from None


# EXIF orientation -> (transpose first, then cv2.flip code or None), as OpenCV applies it.
_ORIENTATIONS: dict[int, tuple[bool, int | None]] = {
    1: (False, None),
    2: (False, 1),
    3: (False, -1),
    4: (False, 0),
    5: (True, None),
    6: (True, 1),
    7: (True, -1),
    8: (True, 0),
}


def _orient(image: NDArray[np.uint8], orientation: int) -> NDArray[np.uint8]:
    """Turn a decoded image as its EXIF orientation says (1: as stored)."""
    transpose, flip = _ORIENTATIONS[orientation]
    turned: NDArray[Any] = cv2.transpose(image) if transpose else image
    if flip is not None:
        turned = cv2.flip(turned, flip)
    return np.asarray(turned, dtype=np.uint8)


def _decode_with_opencv(data: bytes, factor: int, grayscale: bool) -> NDArray[Any] | None:
    if factor > 1:
        flags = (_REDUCED_GRAY if grayscale else _REDUCED_COLOR)[factor]
    else:
        flags = cv2.IMREAD_GRAYSCALE if grayscale else _COLOR
    decoded: NDArray[Any] | None = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    return decoded


# Composition works on tiles of this many pixels: ~3 MiB of float32 temporaries, whatever the
# image's size (a full-size float32 copy of 120 Mpx was 48 bytes a pixel, ~6 GiB).
_TILE_PIXELS = 1 << 16


def _decode_with_alpha(buffer: NDArray[np.uint8], spec: InputSpec) -> NDArray[np.uint8]:
    """Decode keeping alpha, compose over white in place and resize: (H, W, C) at `spec`'s size."""
    # IMREAD_COLOR would drop alpha and expose whatever colour hides under transparent pixels;
    # compose over white instead, as a viewer shows it.
    decoded: NDArray[Any] | None = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise UnsupportedImage(Reason.CORRUPT, "image with alpha does not decode")
    if decoded.dtype == np.uint16:
        decoded = _high_bytes(decoded)
    elif decoded.dtype != np.uint8:
        raise UnsupportedImage(
            Reason.UNSUPPORTED_TYPE, f"{decoded.dtype} samples with alpha are not accepted"
        )
    image: NDArray[np.uint8] = decoded if decoded.ndim == 3 else decoded[:, :, np.newaxis]
    channels = image.shape[2]
    if channels in (2, 4):  # grey + alpha, or BGRA
        _compose_over_white(image)
    grey_source = channels <= 2
    if spec.color_mode == "grayscale" and not grey_source:
        code = cv2.COLOR_BGRA2GRAY if channels == 4 else cv2.COLOR_BGR2GRAY
        grey: NDArray[np.uint8] = np.asarray(cv2.cvtColor(image, code), dtype=np.uint8)
        return resize(grey[:, :, np.newaxis], spec)
    # Resizing works on each channel alone, so the alpha channel rides along harmlessly and the
    # colour channels come out as a 3-channel copy would have.
    reduced = resize(image, spec)
    if grey_source:
        reduced = reduced[:, :, :1]
        return reduced if spec.color_mode == "grayscale" else np.repeat(reduced, 3, axis=2)
    return np.ascontiguousarray(reduced[:, :, 2::-1])  # BGR(A) -> RGB


def _high_bytes(image: NDArray[np.uint16]) -> NDArray[np.uint8]:
    """`image >> 8` as uint8, written over the first half of `image`'s own buffer (destroying it).

    A 16-bit RGBA image at the pixel limit is ~1 GiB decoded; a converted copy would add half
    that again. Each value's high byte moves to a lower address than it is read from, so a
    forward copy in blocks never reads a byte it has already written.
    """
    count = image.size
    raw = np.ascontiguousarray(image).reshape(-1).view(np.uint8)
    high = raw[1::2] if sys.byteorder == "little" else raw[0::2]
    block = 1 << 20
    for start in range(0, count, block):
        end = min(start + block, count)
        raw[start:end] = high[start:end]
    return raw[:count].reshape(image.shape)


def _compose_over_white(image: NDArray[np.uint8]) -> None:
    """Compose the colour channels over white in place (alpha last), one tile at a time."""
    height, width, _ = image.shape
    columns = min(width, _TILE_PIXELS)
    rows = max(1, _TILE_PIXELS // columns)
    for top in range(0, height, rows):
        for left in range(0, width, columns):
            tile = image[top : top + rows, left : left + columns]
            alpha = tile[:, :, -1:].astype(np.float32) / 255.0
            colour = tile[:, :, :-1].astype(np.float32)
            composed = np.clip(colour * alpha + 255.0 * (1.0 - alpha) + 0.5, 0, 255)
            tile[:, :, :-1] = composed.astype(np.uint8)


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
    check_decode_budget(data, header, spec, limits)
    image = resize(decode(data, header, spec, out), spec)
    if out is None or image is out:
        return image
    out[...] = image
    return out


def read_image_file(path: Path, limits: LimitSettings) -> bytes:
    """One local file's bytes, refusing one over the byte limit unread."""
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise ImageTooLarge(
            Reason.TOO_LARGE, f"file is {size} bytes, over the {limits.max_file_bytes} limit"
        )
    return path.read_bytes()


def load_image_file(path: Path, spec: InputSpec, limits: LimitSettings) -> NDArray[np.uint8]:
    """Read one local file (refusing one over the byte limit unread) and `load_image` it."""
    return load_image(read_image_file(path, limits), spec, limits)


def to_model_input(batch: NDArray[np.uint8], spec: InputSpec) -> NDArray[np.float32]:
    """(N, H, W, C) uint8 -> float32 with the artifact's outside-the-model scaling applied."""
    values = batch.astype(np.float32)
    if spec.pixel_scale != 1.0:
        values *= np.float32(spec.pixel_scale)
    if spec.pixel_offset != 0.0:
        values += np.float32(spec.pixel_offset)
    return values
