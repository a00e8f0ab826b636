"""A worker's reads: the bytes of a `file://` or `s3://` URI, confined to the job's root.

A local file must resolve inside the job's root folder (and inside `worker.allowed_roots` when
configured, `core.storage.local.read_confined`); an object must lie below the job's bucket
prefix, with no `.` or `..` segment (`core.storage.s3.confine`). Every refusal is an
`ImageError` with its reason, recorded as the image's failure.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import ImageError
from core.reasons import Reason
from core.settings import S3Settings
from core.storage import local
from core.storage import s3 as object_store  # not `s3`: `Reader.s3` holds the settings
from core.uris import S3_SCHEME, uri_to_path

ROOTS_CACHED = 64


@dataclass
class Reader:
    """Reads `file://` and `s3://` URIs for one worker process (the S3 client is made lazily)."""

    max_file_bytes: int
    allowed_roots: Sequence[bytes] = ()
    s3: S3Settings = field(default_factory=S3Settings)
    _client: Any = None
    # Resolved roots per job root: resolving them on every read cost as much as the read itself
    # for a face crop. A root re-pointed later can only make reads refused, never allowed.
    _roots: dict[str, list[bytes]] = field(default_factory=dict)

    def read(self, uri: str, job_root: str) -> bytes:
        """The bytes of `uri`, or an `ImageError` with the reason it cannot be read."""
        if uri.startswith(S3_SCHEME):
            return self._read_s3(uri, job_root)
        return self._read_file(uri, job_root)

    def _roots_for(self, job_root: str) -> list[bytes]:
        roots = self._roots.get(job_root)
        if roots is None:
            roots = [os.path.realpath(uri_to_path(job_root))]
            roots += [os.path.realpath(root) for root in self.allowed_roots]
            if len(self._roots) >= ROOTS_CACHED:
                self._roots.clear()
            self._roots[job_root] = roots
        return roots

    def _read_file(self, uri: str, job_root: str) -> bytes:
        try:
            path = uri_to_path(uri)
        except ValueError as error:
            raise ImageError(Reason.OUTSIDE_ROOT, f"not a file URI: {error}") from None
        try:
            roots = self._roots_for(job_root)
        except ValueError:
            raise ImageError(Reason.OUTSIDE_ROOT, "a local file in a bucket's job") from None
        return local.read_confined(path, roots, self.max_file_bytes)

    def _read_s3(self, uri: str, job_root: str) -> bytes:
        bucket, key = object_store.confine(uri, job_root)
        if self._client is None:
            self._client = object_store.client_from_settings(self.s3)
        return object_store.read_object(self._client, bucket, key, self.max_file_bytes)
