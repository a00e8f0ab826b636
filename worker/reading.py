"""Read one image's bytes for a worker, confined to the allowed roots, with limits checked first.

Our code opens every file (OpenCV never sees a path): the path is resolved, must lie inside the
job's source root (and inside `worker.allowed_roots` when configured), must be a regular file,
and must be under the byte limit before a byte is read. A hand-written queue message naming
`/etc/passwd` is refused here and recorded, and nothing outside the roots is opened for reading.

On Linux the check is made on what was opened, not on a name: the path is opened with `O_PATH`
(a handle to a place in the tree: no read permission needed, nothing of a device or FIFO runs),
the kernel says where that handle really is (`/proc/self/fd/N`), and only a handle found inside
the roots is reopened for reading, through that same link, so the file read is the file checked.
Resolving a name first and opening it after left a window in which a directory on the way could
be swapped for a symbolic link; it also cost an lstat per path component in Python. Elsewhere
the name is resolved with `os.path.realpath` and opened with `O_NOFOLLOW`.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ImageError, ImageTooLarge
from core.reasons import Reason
from core.settings import S3Settings
from core.uris import S3_SCHEME, parse_s3_uri, s3_dot_segment, uri_to_path

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_REOPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_O_PATH: int = getattr(os, "O_PATH", 0)
# Where a descriptor's real path can be read: the kernel's own answer, not a resolved name.
_FD_LINKS = "/proc/self/fd"
CONFINE_BY_DESCRIPTOR = bool(_O_PATH) and Path(_FD_LINKS).is_dir()


ROOTS_CACHED = 64


def _inside(path: bytes, root: bytes) -> bool:
    return path == root or path.startswith(root.rstrip(b"/") + b"/")


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
        if CONFINE_BY_DESCRIPTOR:
            descriptor = _open_confined(path, roots)
        else:
            descriptor = _open_resolved(path, roots)
        try:
            status = os.fstat(descriptor)
            if not stat.S_ISREG(status.st_mode):
                raise ImageError(Reason.NOT_A_FILE, "not a regular file")
            if status.st_size > self.max_file_bytes:
                raise ImageTooLarge(
                    Reason.TOO_LARGE,
                    f"file is {status.st_size} bytes, over the {self.max_file_bytes} limit",
                )
            return _read_all(descriptor, self.max_file_bytes, expected=status.st_size)
        except OSError as error:
            raise ImageError(Reason.UNREADABLE, f"cannot read: {error.strerror}") from None
        finally:
            os.close(descriptor)

    def _read_s3(self, uri: str, job_root: str) -> bytes:
        try:
            bucket, key = parse_s3_uri(uri)
            root_bucket, root_prefix = parse_s3_uri(job_root)
        except ValueError as error:
            raise ImageError(Reason.OUTSIDE_ROOT, f"not in the job's bucket: {error}") from None
        segment = s3_dot_segment(key) or s3_dot_segment(root_bucket) or s3_dot_segment(root_prefix)
        if segment is not None:
            # Checked before the prefix: `photos/../private/x` starts with `photos/`.
            message = f"key or prefix has a {segment!r} segment, which may resolve elsewhere"
            raise ImageError(Reason.OUTSIDE_ROOT, message)
        if root_prefix and not root_prefix.endswith("/"):
            root_prefix += "/"  # a prefix names a folder: `photos` does not hold `photos2/x`
        if bucket != root_bucket or not key.startswith(root_prefix):
            raise ImageError(Reason.OUTSIDE_ROOT, "object is outside the job's bucket prefix")
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._s3_client()
        try:
            response = client.get_object(Bucket=bucket, Key=key)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in {"NoSuchKey", "404", "NotFound"}:
                raise ImageError(Reason.MISSING, "object no longer exists") from None
            raise ImageError(Reason.UNREADABLE, f"cannot read object: {code}") from None
        body = response["Body"]
        try:
            size = int(response.get("ContentLength", 0))
            if size > self.max_file_bytes:
                raise ImageTooLarge(
                    Reason.TOO_LARGE,
                    f"object is {size} bytes, over the {self.max_file_bytes} limit",
                )
            data: bytes = body.read(self.max_file_bytes + 1)
        except BotoCoreError as error:
            raise ImageError(Reason.UNREADABLE, f"cannot read object: {error}") from None
        finally:
            body.close()
        if len(data) > self.max_file_bytes:
            raise ImageTooLarge(Reason.TOO_LARGE, "object grew over the byte limit")
        return data

    def _s3_client(self) -> Any:
        if self._client is None:
            import boto3

            secret = self.s3.secret_key.get_secret_value() if self.s3.secret_key else None
            self._client = boto3.client(
                "s3",
                endpoint_url=self.s3.endpoint_url,
                aws_access_key_id=self.s3.access_key,
                aws_secret_access_key=secret,
                region_name=self.s3.region,
            )
        return self._client


def _allowed(real: bytes, roots: Sequence[bytes]) -> bool:
    """Inside the job's root and, when roots are configured, inside one of them too."""
    job_real, *configured = roots
    return _inside(real, job_real) and (not configured or any(_inside(real, r) for r in configured))


def _outside() -> ImageError:
    return ImageError(Reason.OUTSIDE_ROOT, "path resolves outside the allowed roots")


def _refuse_outside(path: bytes, roots: Sequence[bytes]) -> None:
    # An error on a path outside the roots says only that it is outside: whether it exists or
    # can be opened there is none of a queue message's business.
    if not _allowed(os.path.realpath(path), roots):
        raise _outside()


def _open_confined(path: bytes, roots: Sequence[bytes]) -> int:
    """A read descriptor for `path`, checked on where the opened handle really is (Linux)."""
    try:
        handle = os.open(path, _O_PATH | os.O_CLOEXEC)
    except OSError as error:
        _refuse_outside(path, roots)
        raise _open_failure(error) from None
    try:
        link = f"{_FD_LINKS}/{handle}"
        # bytes in, bytes out: a file name need not be UTF-8 (Path.readlink would decode it).
        if not _allowed(os.readlink(os.fsencode(link)), roots):  # noqa: PTH115
            raise _outside()
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            # Checked before reopening: opening a FIFO or a device for reading can block or act.
            raise ImageError(Reason.NOT_A_FILE, "not a regular file")
        try:
            return os.open(link, _REOPEN_FLAGS)
        except OSError as error:
            raise _open_failure(error) from None
    finally:
        os.close(handle)


def _open_resolved(path: bytes, roots: Sequence[bytes]) -> int:
    """A read descriptor for `path`, resolved by name first (where `O_PATH` is missing)."""
    real = os.path.realpath(path)
    if not _allowed(real, roots):
        raise _outside()
    try:
        return os.open(real, _OPEN_FLAGS)
    except OSError as error:
        if error.errno == errno.ELOOP:  # O_NOFOLLOW met a link made after realpath
            raise ImageError(Reason.OUTSIDE_ROOT, "path became a symbolic link") from None
        raise _open_failure(error) from None


def _open_failure(error: OSError) -> ImageError:
    if isinstance(error, FileNotFoundError):
        return ImageError(Reason.MISSING, "file no longer exists")
    return ImageError(Reason.UNREADABLE, f"cannot open: {error.strerror}")


def _read_all(descriptor: int, limit: int, expected: int = 0) -> bytes:
    # The file may grow between fstat and read; never read past the limit. The first read asks
    # for the size fstat gave (+1 to see growth): one allocation and no join for nearly every
    # file, where fixed 1 MiB reads allocated 1 MiB per crop and copied a photo twice.
    parts: list[bytes] = []
    total = 0
    while True:
        wanted = expected + 1 if not parts and expected else 1 << 20
        block = os.read(descriptor, min(wanted, limit + 1 - total) or 1)
        if not block:
            break
        parts.append(block)
        total += len(block)
        if total > limit:
            raise ImageTooLarge(Reason.TOO_LARGE, "file grew over the byte limit")
    return b"".join(parts)
