"""URIs, content sniffing and chunking: the producer's pure helpers."""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.storage.sniff import HEAD_BYTES, sniff_image_type
from core.uris import display_name, parse_s3_uri, path_to_uri, s3_uri, uri_to_path
from producer.chunking import chunked, cut_chunks


def png_bytes() -> bytes:
    """A real 1x1 grey PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\x80"))
        + chunk(b"IEND", b"")
    )


BMP_HEAD = b"BM" + struct.pack("<IHHI", 70, 0, 0, 54) + struct.pack("<I", 40) + b"\x00" * 14


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (png_bytes(), "png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "jpeg"),
        (b"\xff\xd8\xff\xe1\x00\x10Exif\x00", "jpeg"),
        (b"GIF89a\x01\x00\x01\x00", "gif"),
        (b"GIF87a\x01\x00\x01\x00", "gif"),
        (BMP_HEAD, "bmp"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "webp"),
        (b"II*\x00\x08\x00\x00\x00", "tiff"),
        (b"MM\x00*\x00\x00\x00\x08", "tiff"),
        (b"BMW drivers and their cars, a text file", None),  # "BM" alone is not a bitmap
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", None),  # RIFF but audio
        (b"<html><body>not a photo</body></html>", None),
        (b"\x89PN", None),  # truncated signature
        (b"", None),
        (b"\x00" * HEAD_BYTES, None),
    ],
)
def test_sniff_image_type_reads_magic_numbers(head: bytes, expected: str | None) -> None:
    assert sniff_image_type(head[:HEAD_BYTES]) == expected


@pytest.mark.parametrize(
    "path",
    [
        b"/photos/caf\xe9.jpg",  # Latin-1, not UTF-8
        b"/photos/\xff\xfe/\x80.png",
        "/photos/café 100% #1?.jpg",
        "/photos/a" * 30 + ".png",
        b"/with\nnewline/and;semicolon=x&y+z",
    ],
)
def test_path_uri_round_trip_keeps_every_byte(path: bytes | str) -> None:
    uri = path_to_uri(path)

    assert uri.startswith("file:///")
    assert uri.isascii() and uri.isprintable()
    assert uri_to_path(uri) == os.fsencode(path)


def test_path_to_uri_makes_relative_paths_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    assert uri_to_path(path_to_uri("a/../b.jpg")) == os.fsencode(tmp_path / "b.jpg")


def test_uri_to_path_accepts_localhost_and_refuses_other_hosts() -> None:
    assert uri_to_path("file://localhost/x/y%20z.jpg") == b"/x/y z.jpg"
    with pytest.raises(ValueError, match="another host"):
        uri_to_path("file://server/x.jpg")
    with pytest.raises(ValueError, match="not a file"):
        uri_to_path("s3://bucket/x.jpg")


@pytest.mark.parametrize(
    "key", ["a.jpg", "deep/er/a.png", "café 100% #1?.jpg", "x?versionId=3", "  spaced  ", ""]
)
def test_s3_uri_round_trip(key: str) -> None:
    uri = s3_uri("my-bucket", key)

    assert uri.isascii()
    assert parse_s3_uri(uri) == ("my-bucket", key)


def test_parse_s3_uri_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="without a bucket"):
        parse_s3_uri("s3:///key")
    with pytest.raises(ValueError, match="not an s3"):
        parse_s3_uri("/local/path")
    with pytest.raises(ValueError):
        parse_s3_uri("s3://bucket/%ff")  # a key must be UTF-8


def test_display_name_is_readable() -> None:
    assert display_name(path_to_uri(b"/p/caf\xe9.jpg")) == "/p/caf\\xe9.jpg"
    assert display_name(path_to_uri("/p/café 1.jpg")) == "/p/café 1.jpg"
    assert display_name(s3_uri("b", "k/café 100%.jpg")) == "s3://b/k/café 100%.jpg"
    assert display_name("https://example.org/x.jpg") == "https://example.org/x.jpg"


def test_cut_chunks_closes_at_the_count_or_before_the_byte_budget_is_passed() -> None:
    def sizes(*values: int) -> tuple[list[list[int]], list[int]]:
        return cut_chunks(list(values), size=3, max_bytes=10, weight=lambda value: value)

    # By count: three small items close a chunk; what is left stays open.
    assert sizes(1, 1, 1, 1) == ([[1, 1, 1]], [1])
    # By bytes: 6 + 5 > 10 closes [6] before the 5; exactly 10 still fits.
    assert sizes(6, 5, 5, 2) == ([[6], [5, 5]], [2])
    # An item over the budget travels alone, never dropped or split.
    assert sizes(2, 50, 3) == ([[2], [50]], [3])
    assert sizes() == ([], [])
    with pytest.raises(ValueError, match="at least 1"):
        cut_chunks([1], size=1, max_bytes=0, weight=lambda value: value)


def test_chunked_cuts_in_order_with_a_short_tail() -> None:
    assert list(chunked(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunked([], 3)) == []
    assert list(chunked("ab", 5)) == [["a", "b"]]


def test_a_listing_that_fails_midway_gives_up_what_it_read_before_the_error() -> None:
    def listing() -> Iterator[int]:
        yield from range(5)
        raise OSError("SlowDown")

    batches = chunked(listing(), 3)
    assert next(batches) == [0, 1, 2]
    assert next(batches) == [3, 4]
    with pytest.raises(OSError, match="SlowDown"):
        next(batches)


def test_chunked_is_lazy() -> None:
    first_two = list(itertools.islice(chunked(itertools.count(), 1000), 2))

    assert first_two[1][0] == 1000


@pytest.mark.parametrize("size", [0, -1])
def test_chunked_refuses_sizes_below_one(size: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        list(chunked([1], size))
