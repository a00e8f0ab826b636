"""Hand-made image bytes shared by the tests."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from typing import Any

from PIL import Image

from core.reasons import Reason


def bomb_png(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def repeated_scan_jpeg(width: int, height: int, scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated until the file has `scans` scans.

    libjpeg warns about the repeats and decodes every one of them, a pass over the whole image
    each: a file of a few kilobytes that costs a lenient decoder minutes at a large size.
    """
    image = Image.new("RGB", (width, height), (90, 140, 200))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    last_scan = data.rindex(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    written = data.count(b"\xff\xda")
    repeats = data[last_scan:end] * max(0, scans - written)
    return data[:end] + repeats + data[end:]


def flat_png(width: int, height: int, *, channels: int = 4, bits: int = 8) -> bytes:
    """A valid PNG of one colour (half-transparent when it has alpha), made row by row.

    Every row after the first is filtered "Up" to zeros, so a 120-megapixel image deflates to
    under a megabyte and is written without ever holding its pixels.
    """
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    sample_bytes = bits // 8
    pixel = bytes([200, 100, 50, 128][:channels] if channels > 2 else [200, 128][:channels])
    pixel = b"".join(bytes([value]) * sample_bytes for value in pixel)
    first_row = b"\x00" + pixel * width
    other_row = b"\x02" + b"\x00" * (width * channels * sample_bytes)
    compressor = zlib.compressobj(6)
    parts = [compressor.compress(first_row)]
    rows_per_block = max(1, (1 << 22) // len(other_row))
    block = other_row * rows_per_block
    remaining = height - 1
    while remaining > 0:
        count = min(rows_per_block, remaining)
        parts.append(compressor.compress(block if count == rows_per_block else other_row * count))
        remaining -= count
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, bits, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", b"".join(parts))
        + _chunk(b"IEND", b"")
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def _encode(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


HOSTILE: dict[str, tuple[Callable[[], bytes], Reason | None]] = {
    # Inside every default limit, each once cost gigabytes or hours to decode (issue 14).
    # name: (bytes maker, the reason it is refused with, or None when it is labeled)
    "rgba-near-pixel-limit.png": (lambda: flat_png(10_950, 10_950), None),
    "rgba-16-bit.png": (lambda: flat_png(7_000, 7_000, bits=16), None),
    "rgba-16-bit-near-pixel-limit.png": (
        lambda: flat_png(10_950, 10_950, bits=16),
        Reason.TOO_LARGE,
    ),
    "repeated-scans.jpg": (
        lambda: repeated_scan_jpeg(2048, 2048, 300),
        Reason.UNSUPPORTED_TYPE,
    ),
    "repeated-scans-under-the-limit.jpg": (
        lambda: repeated_scan_jpeg(2048, 2048, 60),
        Reason.CORRUPT,
    ),
    "transparent.gif": (
        lambda: _encode(Image.new("P", (3000, 3000), 0), "GIF", transparency=0),
        None,
    ),
    "many-frames.gif": (
        lambda: _encode(
            Image.new("P", (1000, 1000), 0),
            "GIF",
            save_all=True,
            append_images=[Image.new("P", (1000, 1000), (i % 2) + 1) for i in range(200)],
        ),
        None,
    ),
}
