"""Walk a local folder tree in constant memory, depth first, names sorted bytewise per folder.

The walk holds one open directory per level and the sorted names of those directories, never a
list of the whole tree. Every name is looked up relative to its directory's descriptor (`dir_fd`)
and folders are opened with `O_NOFOLLOW`, so swapping a folder for a symbolic link mid-walk
cannot lead the walk outside the root. Symbolic links are never walked through: they are handed
to the caller, like files and special files, which decides what to make of them.

Paths are raw bytes throughout, so that names that are not UTF-8 survive; pathlib has no bytes
paths, hence the `os` calls where ruff would suggest `Path` (the `noqa: PTH` comments).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Generator, Iterator
from dataclasses import dataclass

from core.reasons import Reason
from core.storage.local import describe

_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_DIRECTORY_FLAGS = _ROOT_FLAGS | os.O_NOFOLLOW


@dataclass(frozen=True, slots=True)
class Found:
    """A name that is not a folder: a file, a link or a special file, with its `lstat`.

    `directory` is the descriptor of the folder holding `name`, valid only until the walk is
    asked for its next item; `directory_path` is that folder's path.
    """

    path: bytes
    name: bytes
    directory: int
    directory_path: bytes
    status: os.stat_result


@dataclass(frozen=True, slots=True)
class Refused:
    """A name the walk could not look at or enter, and why (`status` when it had one)."""

    path: bytes
    status: os.stat_result | None
    reason: Reason
    message: str


@dataclass
class _OpenDirectory:
    """A directory being walked: its descriptor, path, identity and names still to visit."""

    descriptor: int
    path: bytes
    identity: tuple[int, int]
    names: Iterator[bytes]


def walk_tree(
    root: bytes, *, skip_folders: Collection[bytes] = ()
) -> Generator[Found | Refused, None, None]:
    """Every name below the folder `root` except folders, which are walked into.

    `root` itself may be given through a link; nothing below it is. Folders named in
    `skip_folders` are neither walked nor reported. Opening `root` happens now, so an `OSError`
    for it is raised by this call, not by the first item.
    """
    top = _open_directory(None, root, root, flags=_ROOT_FLAGS)
    return _walk(top, frozenset(skip_folders))


def _walk(top: _OpenDirectory, skip_folders: frozenset[bytes]) -> Generator[Found | Refused]:
    stack = [top]
    # Identities of the directories on the current path: meeting one again is a loop
    # (a bind mount of a parent), which symbolic links alone cannot cause here.
    on_path = {top.identity}
    try:
        while stack:
            directory = stack[-1]
            name = next(directory.names, None)
            if name is None:
                stack.pop()
                on_path.discard(directory.identity)
                os.close(directory.descriptor)
                continue
            visited = _visit(directory, name, on_path, skip_folders)
            if isinstance(visited, _OpenDirectory):
                stack.append(visited)
                on_path.add(visited.identity)
            elif visited is not None:
                yield visited
    finally:
        for directory in stack:
            os.close(directory.descriptor)


def _visit(
    directory: _OpenDirectory,
    name: bytes,
    on_path: set[tuple[int, int]],
    skip_folders: frozenset[bytes],
) -> Found | Refused | _OpenDirectory | None:
    path = os.path.join(directory.path, name)  # noqa: PTH118
    try:
        status = os.stat(name, dir_fd=directory.descriptor, follow_symlinks=False)
    except FileNotFoundError:
        return Refused(path, None, Reason.MISSING, "deleted while its folder was walked")
    except OSError as error:
        return Refused(path, None, Reason.UNREADABLE, describe(error))
    if not stat.S_ISDIR(status.st_mode):
        return Found(path, name, directory.descriptor, directory.path, status)
    if name in skip_folders:
        return None
    return _enter_directory(directory, name, path, status, on_path)


def _open_directory(
    parent: int | None, name: bytes, path: bytes, *, flags: int = _DIRECTORY_FLAGS
) -> _OpenDirectory:
    """Open a directory (without following a link, by default) and read its names; OSError."""
    descriptor = os.open(name, flags, dir_fd=parent)
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
) -> Refused | _OpenDirectory:
    try:
        child = _open_directory(parent.descriptor, name, path)
    except FileNotFoundError:
        return Refused(path, status, Reason.MISSING, "deleted while its folder was walked")
    except OSError as error:
        return Refused(path, status, Reason.UNREADABLE, f"cannot list: {describe(error)}")
    if child.identity in on_path:
        os.close(child.descriptor)
        message = "folder contains itself (a bind mount loop)"
        return Refused(path, status, Reason.SYMLINK_LOOP, message)
    return child
