"""One local file's bytes, with limits checked first: confined to roots for workers, or not.

`read_confined` is what a worker reads with: the path is resolved, must lie inside the job's
source root (and inside `worker.allowed_roots` when configured), must be a regular file, and must
be under the byte limit before a byte is read. A hand-written queue message naming `/etc/passwd`
is refused and recorded, and nothing outside the roots is opened for reading.

On Linux the check is made on what was opened, not on a name: the path is opened with `O_PATH`
(a handle to a place in the tree: no read permission needed, nothing of a device or FIFO runs),
the kernel says where that handle really is (`/proc/self/fd/N`), and only a handle found inside
the roots is reopened for reading, through that same link, so the file read is the file checked.
Resolving a name first and opening it after left a window in which a directory on the way could
be swapped for a symbolic link; it also cost an lstat per path component in Python. Elsewhere
the name is resolved with `os.path.realpath` and opened with `O_NOFOLLOW`.

`read_file` is what a dataset scan reads with: links are followed (a dataset may link its files
from elsewhere), but only a regular file under the limit is ever opened.

Every problem is an `ImageError` (`ImageTooLarge` for the byte limit) with its `Reason`. Paths
are raw bytes where names need not be UTF-8, hence `os` calls where ruff suggests `Path`.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from core.errors import ImageError, ImageTooLarge
from core.reasons import Reason

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: should a FIFO replace the file between stat and open, the open does not wait for
# a writer (and the fstat after it refuses what was opened).
_REOPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_O_PATH: int = getattr(os, "O_PATH", 0)
# Where a descriptor's real path can be read: the kernel's own answer, not a resolved name.
_FD_LINKS = "/proc/self/fd"
CONFINE_BY_DESCRIPTOR = bool(_O_PATH) and Path(_FD_LINKS).is_dir()


def read_confined(path: bytes, roots: Sequence[bytes], max_file_bytes: int) -> bytes:
    """The bytes of the regular file at `path`, which must resolve inside the roots.

    `roots` are resolved paths: the job's root first, then the configured roots (when there are
    any, the file must lie inside one of them too).
    """
    if CONFINE_BY_DESCRIPTOR:
        descriptor = _open_confined(path, roots)
    else:
        descriptor = _open_resolved(path, roots)
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise ImageError(Reason.NOT_A_FILE, "not a regular file")
        _refuse_over_limit(status.st_size, max_file_bytes)
        return _read_all(descriptor, max_file_bytes, expected=status.st_size)
    except OSError as error:
        raise ImageError(Reason.UNREADABLE, f"cannot read: {error.strerror}") from None
    finally:
        os.close(descriptor)


def read_file(path: str | os.PathLike[str], max_file_bytes: int) -> bytes:
    """The bytes of the regular file at `path`, links followed; nothing else is ever opened."""
    try:
        status = os.stat(path)  # noqa: PTH116 (follows a link, so its target is judged)
    except FileNotFoundError:
        missing = "broken symbolic link" if os.path.islink(path) else "file no longer exists"  # noqa: PTH114
        raise ImageError(Reason.MISSING, missing) from None
    except OSError as error:
        raise ImageError(Reason.UNREADABLE, f"cannot stat: {error.strerror}") from None
    if not stat.S_ISREG(status.st_mode):
        raise ImageError(Reason.NOT_A_FILE, f"{file_kind(status.st_mode)}; not opened")
    _refuse_over_limit(status.st_size, max_file_bytes)
    try:
        descriptor = os.open(path, _REOPEN_FLAGS)
    except FileNotFoundError:
        raise ImageError(Reason.MISSING, "file no longer exists") from None
    except OSError as error:
        raise ImageError(Reason.UNREADABLE, f"cannot read: {error.strerror}") from None
    try:
        opened = os.fstat(descriptor)
        if not stat.S_ISREG(opened.st_mode):
            kind = file_kind(opened.st_mode)
            raise ImageError(Reason.NOT_A_FILE, f"{kind} (replaced while being read); not read")
        return _read_all(descriptor, max_file_bytes, expected=opened.st_size)
    except OSError as error:
        raise ImageError(Reason.UNREADABLE, f"cannot read: {error.strerror}") from None
    finally:
        os.close(descriptor)


def is_within(path: bytes, root: bytes) -> bool:
    """Whether `path` is `root` or below it (both resolved; a prefix of a name is not enough)."""
    return path == root or path.startswith(root.rstrip(b"/") + b"/")


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
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
    if stat.S_ISLNK(mode):
        return "symbolic link"
    return "special file"


def describe(error: OSError) -> str:
    """An `OSError` in words, without the path (which the caller reports itself)."""
    return error.strerror or str(error)


def _refuse_over_limit(size: int, max_file_bytes: int) -> None:
    if size > max_file_bytes:
        raise ImageTooLarge(
            Reason.TOO_LARGE, f"file is {size} bytes, over the {max_file_bytes} limit"
        )


def _allowed(real: bytes, roots: Sequence[bytes]) -> bool:
    """Inside the job's root and, when roots are configured, inside one of them too."""
    job_real, *configured = roots
    return is_within(real, job_real) and (
        not configured or any(is_within(real, root) for root in configured)
    )


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
