"""Where images come from: pick a `Source` for a folder path, a `file://` or an `s3://` URI.

    Source (Protocol)      uri, iter_entries() -> Iterator[Entry]
    ├── FolderSource       a local folder tree (core.storage.folder_source)
    └── S3Source           an S3 bucket and prefix, any S3-compatible store (core.storage.s3_source)

Both report every file they list as an `Entry`, usable or skipped with a `Reason`.
"""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import ConfigError
from core.reasons import Reason
from core.storage.entries import Entry, Source
from core.storage.folder_source import FolderSource
from core.storage.s3_source import S3Source
from core.uris import FILE_SCHEME, S3_SCHEME, uri_to_path

__all__ = [
    "Entry",
    "FolderSource",
    "Reason",
    "S3Source",
    "Source",
    "open_source",
]


def open_source(
    uri_or_path: str,
    *,
    max_file_bytes: int,
    follow_symlinks: bool = True,
    endpoint_url: str | None = None,
    key: str | None = None,
    secret: str | None = None,
    region: str | None = None,
) -> Source:
    """The source for `s3://bucket/prefix`, `file:///folder` or a plain folder path.

    The S3 options are ignored for folders and `follow_symlinks` is ignored for S3.
    """
    if uri_or_path.startswith(S3_SCHEME):
        return S3Source(
            uri_or_path,
            endpoint_url=endpoint_url,
            key=key,
            secret=secret,
            region=region,
            max_file_bytes=max_file_bytes,
        )
    if uri_or_path.startswith(FILE_SCHEME):
        try:
            raw_path = uri_to_path(uri_or_path)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        folder = Path(os.fsdecode(raw_path))
    elif "://" in uri_or_path:
        scheme = uri_or_path.partition("://")[0]
        raise ConfigError(
            f"unsupported source {scheme}://; use a folder path or s3://bucket/prefix"
        )
    else:
        folder = Path(uri_or_path)
    return FolderSource(folder, max_file_bytes=max_file_bytes, follow_symlinks=follow_symlinks)
