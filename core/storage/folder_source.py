"""A local folder tree as entries: every file reported with its type or skip reason.

The tree is walked by `core.storage.walk` (constant memory, names looked up relative to their
folder's descriptor). Only regular files are opened, non-blocking and with `O_NOFOLLOW`, and only
their first `HEAD_BYTES` are read: FIFOs, sockets and devices are reported, never opened.

A symbolic link whose target is inside the root adds nothing: the target is listed under its own
path, so the link is reported as `duplicate` and every image is labeled once. A link out of the
root is reported as `symlink_outside_root` and its target is neither opened nor stat'ed
(resolving the path is all).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Generator
from pathlib import Path

from core.errors import ConfigError
from core.reasons import Reason
from core.storage.entries import Entry
from core.storage.local import describe, file_kind, is_within
from core.storage.sniff import HEAD_BYTES, sniff_image_type
from core.storage.walk import Found, Refused, walk_tree
from core.uris import display_name, path_to_uri

# O_NONBLOCK: should a FIFO or device replace a file between lstat and open, neither the open
# nor the read waits for a writer. O_NOCTTY: a terminal that slips in is not adopted.
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC


class FolderSource:
    """Every file below a local folder, depth first, names sorted bytewise in each directory."""

    def __init__(self, root: Path, *, max_file_bytes: int, follow_symlinks: bool = True) -> None:
        """Check that `root` is a readable folder; `follow_symlinks=False` reports links unread.

        With `follow_symlinks` (the default) each link is resolved to say why it is skipped
        (duplicate, loop, outside the root, broken); without it, links are `not_a_file` and
        nothing they point to is looked at.
        """
        if max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be at least 1, got {max_file_bytes}")
        real_root = os.path.realpath(os.fsencode(root))
        try:
            status = os.stat(real_root)  # noqa: PTH116
        except OSError as error:
            raise ConfigError(f"cannot read folder {root}: {describe(error)}") from None
        if not stat.S_ISDIR(status.st_mode):
            raise ConfigError(f"not a folder: {root}")
        self._root = real_root
        self._max_file_bytes = max_file_bytes
        self._follow_symlinks = follow_symlinks

    @property
    def uri(self) -> str:
        """The `file://` URI of the resolved root folder."""
        return path_to_uri(self._root)

    def iter_entries(self) -> Generator[Entry, None, None]:
        """Yield an entry for every file, link and special file below the root, folders walked."""
        try:
            items = walk_tree(self._root)
        except OSError as error:
            raise ConfigError(
                f"cannot list folder {display_name(self.uri)}: {describe(error)}"
            ) from None
        try:
            for item in items:
                if isinstance(item, Refused):
                    yield _entry(item.path, item.status, item.reason, item.message)
                elif stat.S_ISLNK(item.status.st_mode):
                    yield self._symlink_entry(item)
                elif not stat.S_ISREG(item.status.st_mode):
                    message = f"{file_kind(item.status.st_mode)}, never opened"
                    yield _entry(item.path, item.status, Reason.NOT_A_FILE, message)
                else:
                    yield self._file_entry(item)
        finally:
            items.close()

    def _symlink_entry(self, found: Found) -> Entry:
        path, status = found.path, found.status
        if not self._follow_symlinks:
            message = "symbolic link, not followed (following links is turned off)"
            return _entry(path, status, Reason.NOT_A_FILE, message)
        target = os.path.realpath(path)
        if not is_within(target, self._root):
            message = "symbolic link to a path outside the root, not followed"
            return _entry(path, status, Reason.SYMLINK_OUTSIDE_ROOT, message)
        try:
            target_status = os.stat(path)  # noqa: PTH116
        except FileNotFoundError:
            return _entry(path, status, Reason.MISSING, "broken symbolic link")
        except OSError as error:
            if error.errno == errno.ELOOP:
                return _entry(path, status, Reason.SYMLINK_LOOP, "symbolic links form a loop")
            return _entry(path, status, Reason.UNREADABLE, describe(error))
        if stat.S_ISDIR(target_status.st_mode) and is_within(found.directory_path, target):
            message = "symbolic link to its own folder or a parent"
            return _entry(path, status, Reason.SYMLINK_LOOP, message)
        shown = target.decode("utf-8", errors="backslashreplace")
        message = f"symbolic link to {shown}, which is listed under its own path"
        return _entry(path, status, Reason.DUPLICATE, message)

    def _file_entry(self, found: Found) -> Entry:
        path, status = found.path, found.status
        problem = self._size_problem(status)
        if problem is not None:
            return _entry(path, status, *problem)
        try:
            descriptor = os.open(found.name, _FILE_FLAGS, dir_fd=found.directory)
        except FileNotFoundError:
            return _entry(path, status, Reason.MISSING, "deleted before it could be read")
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENXIO):
                message = "replaced by a link or socket while its folder was walked"
                return _entry(path, status, Reason.NOT_A_FILE, message)
            return _entry(path, status, Reason.UNREADABLE, describe(error))
        try:
            opened = os.fstat(descriptor)
            if not stat.S_ISREG(opened.st_mode):
                message = f"became a {file_kind(opened.st_mode)} while its folder was walked"
                return _entry(path, opened, Reason.NOT_A_FILE, message)
            head = _read_head(descriptor)
        except OSError as error:
            return _entry(path, status, Reason.UNREADABLE, describe(error))
        finally:
            os.close(descriptor)
        # The file may have been replaced since lstat; what was read belongs to `opened`.
        problem = self._size_problem(opened)
        if problem is not None:
            return _entry(path, opened, *problem)
        image_type = sniff_image_type(head)
        if image_type is None:
            message = f"content is not a supported image (starts with {head[:8].hex(' ')})"
            return _entry(path, opened, Reason.NOT_AN_IMAGE, message)
        return _entry(path, opened, None, None, image_type)

    def _size_problem(self, status: os.stat_result) -> tuple[Reason, str] | None:
        if status.st_size == 0:
            return Reason.EMPTY, "zero bytes"
        if status.st_size > self._max_file_bytes:
            limit = self._max_file_bytes
            return Reason.TOO_LARGE, f"{status.st_size} bytes, over the limit of {limit}"
        return None


def _read_head(descriptor: int) -> bytes:
    head = b""
    while len(head) < HEAD_BYTES:
        block = os.read(descriptor, HEAD_BYTES - len(head))
        if not block:
            break
        head += block
    return head


def _entry(
    path: bytes,
    status: os.stat_result | None,
    skip_reason: Reason | None,
    skip_message: str | None,
    image_type: str | None = None,
) -> Entry:
    size = status.st_size if status is not None else 0
    mtime_ns = status.st_mtime_ns if status is not None else 0
    return Entry(
        uri=path_to_uri(path),
        name_bytes=None if _is_utf8(path) else path,
        size_bytes=size,
        mtime_ns=mtime_ns,
        fingerprint=f"{size}-{mtime_ns}",
        image_type=image_type,
        skip_reason=skip_reason,
        skip_message=skip_message,
    )


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
