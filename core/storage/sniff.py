"""Tell an image's type from its first bytes, never from its name.

Only the types the worker can decode are recognised; anything else is `None` and a source
skips it as `not_an_image`.
"""

from __future__ import annotations

from typing import Final, Literal

ImageType = Literal["jpeg", "png", "gif", "bmp", "webp", "tiff"]

HEAD_BYTES: Final = 32
"""How many leading bytes `sniff_image_type` needs; the producer reads no more than this."""

_PREFIXES: Final[tuple[tuple[bytes, ImageType], ...]] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
)

# "BM" alone starts plenty of text files, so a BMP must also carry a known DIB header size.
_BMP_DIB_HEADER_SIZES: Final = frozenset({12, 40, 52, 56, 64, 108, 124})


def sniff_image_type(head: bytes) -> ImageType | None:
    """The image type that `head` (a file's first bytes) starts with, or None."""
    for prefix, image_type in _PREFIXES:
        if head.startswith(prefix):
            return image_type
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_DIB_HEADER_SIZES:
        return "bmp"
    return None
