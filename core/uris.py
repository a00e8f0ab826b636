"""URIs for the files we label: `file://` for local paths and `s3://bucket/key` for objects.

A local URI carries the path's raw bytes percent-encoded, so a name that is not valid UTF-8
(`b"caf\\xe9.jpg"`) still makes a valid UTF-8 text URI and comes back byte for byte. S3 keys are
encoded the same way, so `%`, `#`, `?` and spaces in a key survive the trip through a message.
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote, unquote, unquote_to_bytes

FILE_SCHEME = "file://"
S3_SCHEME = "s3://"

_DOT_SEGMENTS = frozenset({".", ".."})
# `\\` too: some S3-compatible stores and proxies (on Windows, say) take it for a `/`.
_S3_SEPARATORS = re.compile(r"[/\\]")


def path_to_uri(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """The `file://` URI of a local path: its absolute bytes, percent-encoded except `/`."""
    # Not Path.resolve(): symbolic links are kept as named, and the path stays raw bytes.
    absolute = os.path.abspath(os.fsencode(path))  # noqa: PTH100
    return FILE_SCHEME + quote(absolute, safe="/")


def uri_to_path(uri: str) -> bytes:
    """The raw path bytes of a `file://` URI made by `path_to_uri`."""
    if not uri.startswith(FILE_SCHEME):
        raise ValueError(f"not a file:// URI: {uri!r}")
    rest = uri[len(FILE_SCHEME) :]
    if not rest.startswith("/"):
        # RFC 8089 allows an authority; only the local machine makes sense here.
        host, slash, path = rest.partition("/")
        if host.lower() != "localhost" or not slash:
            raise ValueError(f"file:// URI names another host or no path: {uri!r}")
        rest = "/" + path
    return unquote_to_bytes(rest)


def s3_uri(bucket: str, key: str) -> str:
    """The `s3://bucket/key` URI of an object, the key percent-encoded like a local path."""
    return f"{S3_SCHEME}{bucket}/{quote(key, safe='/')}"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/key` into bucket and decoded key (the key may be empty)."""
    if not uri.startswith(S3_SCHEME):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"s3:// URI without a bucket: {uri!r}")
    # S3 keys are UTF-8 by definition, so a key that does not decode is a broken URI.
    return bucket, unquote(key, errors="strict")


def s3_dot_segment(key: str) -> str | None:
    """The first `.` or `..` segment of an S3 key, prefix or bucket, or None when there is none.

    S3 stores `photos/../private/x.jpg` as a name like any other, but HTTP clients, proxies and
    several S3-compatible stores remove dot segments from a request path (RFC 3986, 5.2.4): that
    key would read `private/x.jpg`, outside the prefix it was checked against, and a path-style
    `../other-bucket/x` another bucket. Such a name is refused, never read. Segments that
    percent-decoded name counts too (`%2e%2e%2f`, for a proxy that decodes twice). Empty segments
    (`a//b`) are allowed: no normalization turns them into a step up.
    """
    for name in (key, unquote(key)):
        for segment in _S3_SEPARATORS.split(name):
            if segment in _DOT_SEGMENTS:
                return segment
    return None


def display_name(uri: str) -> str:
    """A readable form of a URI for logs and reports; bytes that are not UTF-8 show as `\\xe9`."""
    if uri.startswith(FILE_SCHEME):
        try:
            return uri_to_path(uri).decode("utf-8", errors="backslashreplace")
        except ValueError:
            return uri
    if uri.startswith(S3_SCHEME):
        bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
        return f"{S3_SCHEME}{bucket}/{unquote(key, errors='backslashreplace')}"
    return uri
