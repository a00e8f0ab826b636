"""Walk a local folder tree in constant memory, reporting every file with its type or skip reason.

The walk holds one open directory per level and the sorted names of those directories, never a
list of the whole tree. Every name is looked up relative to its directory's descriptor (`dir_fd`)
and opened with `O_NOFOLLOW`, so swapping a folder for a symbolic link mid-walk cannot lead the
walk outside the root. Only regular files are opened, non-blocking, and only their first
`HEAD_BYTES` are read: FIFOs, sockets and devices are reported, never opened.

Symbolic links are never walked through. A link whose target is inside the root adds nothing:
the target is listed under its own path, so the link is reported as `duplicate` and every image is
labeled once. A link out of the root is reported as `symlink_outside_root` and its target is
neither opened nor stat'ed (resolving the path is all).

Paths are raw bytes throughout, so that names that are not UTF-8 survive; pathlib has no bytes
paths, hence the `os` calls where ruff would suggest `Path` (the `noqa: PTH` comments).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError
from core.reasons import Reason
from core.uris import display_name, path_to_uri
from producer.entries import Entry
from producer.sniff import HEAD_BYTES, sniff_image_type

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: should a FIFO or device replace a file between lstat and open, neither the open
# nor the read waits for a writer. O_NOCTTY: a terminal that slips in is not adopted.
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC


@dataclass
class _OpenDirectory:
    """A directory being walked: its descriptor, real path, identity and names still to visit."""

    descriptor: int
    path: bytes
    identity: tuple[int, int]
    names: Iterator[bytes]


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
            raise ConfigError(f"cannot read folder {root}: {_describe(error)}") from None
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
            root = _open_directory(None, self._root, self._root)
        except OSError as error:
            raise ConfigError(
                f"cannot list folder {display_name(self.uri)}: {_describe(error)}"
            ) from None
        stack = [root]
        # Identities of the directories on the current path: meeting one again is a loop
        # (a bind mount of a parent), which symbolic links alone cannot cause here.
        on_path = {root.identity}
        try:
            while stack:
                directory = stack[-1]
                name = next(directory.names, None)
                if name is None:
                    stack.pop()
                    on_path.discard(directory.identity)
                    os.close(directory.descriptor)
                    continue
                visited = self._visit(directory, name, on_path)
                if isinstance(visited, _OpenDirectory):
                    stack.append(visited)
                    on_path.add(visited.identity)
                else:
                    yield visited
        finally:
            for directory in stack:
                os.close(directory.descriptor)

    def _visit(
        self, directory: _OpenDirectory, name: bytes, on_path: set[tuple[int, int]]
    ) -> Entry | _OpenDirectory:
        path = os.path.join(directory.path, name)  # noqa: PTH118
        try:
            status = os.stat(name, dir_fd=directory.descriptor, follow_symlinks=False)
        except FileNotFoundError:
            return _entry(path, None, Reason.MISSING, "deleted while its folder was walked")
        except OSError as error:
            return _entry(path, None, Reason.UNREADABLE, _describe(error))
        if stat.S_ISDIR(status.st_mode):
            return _enter_directory(directory, name, path, status, on_path)
        if stat.S_ISLNK(status.st_mode):
            return self._symlink_entry(directory, path, status)
        if not stat.S_ISREG(status.st_mode):
            message = f"{_kind(status.st_mode)}, never opened"
            return _entry(path, status, Reason.NOT_A_FILE, message)
        return self._file_entry(directory, name, path, status)

    def _symlink_entry(
        self, directory: _OpenDirectory, path: bytes, status: os.stat_result
    ) -> Entry:
        if not self._follow_symlinks:
            message = "symbolic link, not followed (following links is turned off)"
            return _entry(path, status, Reason.NOT_A_FILE, message)
        target = os.path.realpath(path)
        if not _is_within(target, self._root):
            message = "symbolic link to a path outside the root, not followed"
            return _entry(path, status, Reason.SYMLINK_OUTSIDE_ROOT, message)
        try:
            target_status = os.stat(path)  # noqa: PTH116
        except FileNotFoundError:
            return _entry(path, status, Reason.MISSING, "broken symbolic link")
        except OSError as error:
            if error.errno == errno.ELOOP:
                return _entry(path, status, Reason.SYMLINK_LOOP, "symbolic links form a loop")
            return _entry(path, status, Reason.UNREADABLE, _describe(error))
        if stat.S_ISDIR(target_status.st_mode) and _is_within(directory.path, target):
            message = "symbolic link to its own folder or a parent"
            return _entry(path, status, Reason.SYMLINK_LOOP, message)
        shown = target.decode("utf-8", errors="backslashreplace")
        message = f"symbolic link to {shown}, which is listed under its own path"
        return _entry(path, status, Reason.DUPLICATE, message)

    def _file_entry(
        self, directory: _OpenDirectory, name: bytes, path: bytes, status: os.stat_result
    ) -> Entry:
        problem = self._size_problem(status)
        if problem is not None:
            return _entry(path, status, *problem)
        try:
            descriptor = os.open(name, _FILE_FLAGS, dir_fd=directory.descriptor)
        except FileNotFoundError:
            return _entry(path, status, Reason.MISSING, "deleted before it could be read")
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENXIO):
                message = "replaced by a link or socket while its folder was walked"
                return _entry(path, status, Reason.NOT_A_FILE, message)
            return _entry(path, status, Reason.UNREADABLE, _describe(error))
        try:
            opened = os.fstat(descriptor)
            if not stat.S_ISREG(opened.st_mode):
                message = f"became a {_kind(opened.st_mode)} while its folder was walked"
                return _entry(path, opened, Reason.NOT_A_FILE, message)
            head = _read_head(descriptor)
        except OSError as error:
            return _entry(path, status, Reason.UNREADABLE, _describe(error))
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


def _open_directory(parent: int | None, name: bytes, path: bytes) -> _OpenDirectory:
    """Open a directory without following a link and read its names; raises OSError."""
    descriptor = os.open(name, _DIRECTORY_FLAGS, dir_fd=parent)
    try:
        status = os.fstat(descriptor)
        names: list[bytes] = []
        # Listing a descriptor yields str names (surrogate-escaped); fsencode restores the bytes.
        with os.scandir(descriptor) as listing:
            names.extend(os.fsencode(item.name) for item in listing)
    except BaseException:
        os.close(descriptor)
        raise
    names.sort()
    return _OpenDirectory(descriptor, path, (status.st_dev, status.st_ino), iter(names))


def _enter_directory(
    parent: _OpenDirectory,
    name: bytes,
    path: bytes,
    status: os.stat_result,
    on_path: set[tuple[int, int]],
) -> Entry | _OpenDirectory:
    try:
        child = _open_directory(parent.descriptor, name, path)
    except FileNotFoundError:
        return _entry(path, status, Reason.MISSING, "deleted while its folder was walked")
    except OSError as error:
        return _entry(path, status, Reason.UNREADABLE, f"cannot list: {_describe(error)}")
    if child.identity in on_path:
        os.close(child.descriptor)
        message = "folder contains itself (a bind mount loop)"
        return _entry(path, status, Reason.SYMLINK_LOOP, message)
    return child


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


def _is_within(path: bytes, root: bytes) -> bool:
    if root == b"/":
        return path.startswith(b"/")
    return path == root or path.startswith(root + b"/")


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISDIR(mode):
        return "folder"
    return "special file"


def _describe(error: OSError) -> str:
    return error.strerror or str(error)
