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
import hashlib
import os
import stat
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError
from core.reasons import Reason
from core.storage.entries import MAX_RUN_FILES, Entry, Run
from core.storage.local import describe, file_kind, is_within
from core.storage.sniff import HEAD_BYTES, sniff_image_type
from core.storage.walk import Found, Refused, walk_tree
from core.uris import display_name, path_to_uri

# O_NONBLOCK: should a FIFO or device replace a file between lstat and open, neither the open
# nor the read waits for a writer. O_NOCTTY: a terminal that slips in is not adopted.
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class FolderSpec:
    """What makes a `FolderSource`, as plain data: another process opens the same source from it
    (`producer.read_ahead`), its own walk confined to the same resolved root."""

    root: bytes
    max_file_bytes: int
    follow_symlinks: bool

    def open(self) -> FolderSource:
        """The source again; ConfigError when the root no longer resolves to itself (a link
        put in its place since), so the walk never leaves the root the scan was given."""
        source = FolderSource(
            Path(os.fsdecode(self.root)),
            max_file_bytes=self.max_file_bytes,
            follow_symlinks=self.follow_symlinks,
        )
        if source.spec.root != self.root:
            raise ConfigError(
                f"folder {display_name(path_to_uri(self.root))} now resolves elsewhere"
                f" ({display_name(source.uri)}): not scanned"
            )
        return source


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

    @property
    def spec(self) -> FolderSpec:
        """This source as plain data (its resolved root), for another process to open."""
        return FolderSpec(self._root, self._max_file_bytes, self._follow_symlinks)

    def iter_entries(self) -> Generator[Entry, None, None]:
        """Yield an entry for every file, link and special file below the root, folders walked."""
        items = self._walk()
        try:
            for item in items:
                yield self._item_entry(item, item.directory if isinstance(item, Found) else -1)
        finally:
            items.close()

    def iter_runs(self) -> Generator[Run, None, None]:
        """The entries of `iter_entries`, in the same order, as runs read only when asked.

        A run is the files of one folder listed one after another: a folder's files before its
        first subfolder, those between two subfolders, and so on, cut every `MAX_RUN_FILES`.
        It holds a duplicate of its folder's descriptor until it is read or released, so its
        files are opened relative to that folder as `iter_entries` opens them.
        """
        items = self._walk()
        folder: bytes | None = None
        after = b""
        piece = 0
        members: list[Found | Refused] = []
        descriptor: int | None = None
        previous = b""
        try:
            for item in items:
                parent = (
                    item.directory_path if isinstance(item, Found) else os.path.dirname(item.path)  # noqa: PTH120
                )
                if parent != folder or len(members) >= MAX_RUN_FILES:
                    if members:
                        assert folder is not None
                        # The run owns the descriptor from here: never closed here as well.
                        run = self._run(folder, after, piece, members, descriptor)
                        members, descriptor = [], None
                        yield run
                    if parent == folder:
                        piece += 1
                    else:
                        folder, after, piece = parent, _subfolder_left(parent, previous), 0
                if descriptor is None and isinstance(item, Found):
                    descriptor = os.dup(item.directory)
                members.append(item)
                previous = item.path
            if members:
                assert folder is not None
                run = self._run(folder, after, piece, members, descriptor)
                descriptor = None
                yield run
        finally:
            items.close()
            if descriptor is not None:
                os.close(descriptor)

    def _walk(self) -> Generator[Found | Refused, None, None]:
        try:
            return walk_tree(self._root)
        except OSError as error:
            raise ConfigError(
                f"cannot list folder {display_name(self.uri)}: {describe(error)}"
            ) from None

    def _run(
        self,
        folder: bytes,
        after: bytes,
        piece: int,
        members: list[Found | Refused],
        descriptor: int | None,
    ) -> Run:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{self._max_file_bytes}:{self._follow_symlinks}".encode())
        plain = True
        for member in members:
            name = os.path.basename(member.path)  # noqa: PTH119
            if isinstance(member, Refused) or not stat.S_ISREG(member.status.st_mode):
                plain = False
                digest.update(b"\0other\0" + name)
                continue
            status = member.status
            digest.update(b"\0%s\0%d\0%d" % (name, status.st_size, status.st_mtime_ns))
        key = hashlib.blake2b(b"\0".join((folder, after, b"%d" % piece)), digest_size=16)
        directory = -1 if descriptor is None else descriptor

        def read() -> list[Entry]:
            return [self._item_entry(member, directory) for member in members]

        def release() -> None:
            if descriptor is not None:
                os.close(descriptor)

        return Run(key.hexdigest(), digest.hexdigest(), len(members), plain, read, release)

    def _item_entry(self, item: Found | Refused, directory: int) -> Entry:
        """The entry for one walked name; `directory` is its folder's descriptor."""
        if isinstance(item, Refused):
            return _entry(item.path, item.status, item.reason, item.message)
        if stat.S_ISLNK(item.status.st_mode):
            return self._symlink_entry(item)
        if not stat.S_ISREG(item.status.st_mode):
            message = f"{file_kind(item.status.st_mode)}, never opened"
            return _entry(item.path, item.status, Reason.NOT_A_FILE, message)
        return self._file_entry(item, directory)

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

    def _file_entry(self, found: Found, directory: int) -> Entry:
        path, status = found.path, found.status
        problem = self._size_problem(status)
        if problem is not None:
            return _entry(path, status, *problem)
        try:
            descriptor = os.open(found.name, _FILE_FLAGS, dir_fd=directory)
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


def _subfolder_left(folder: bytes, previous: bytes) -> bytes:
    """The subfolder of `folder` the walk just came out of (b"" when it came from above): the
    name that tells a folder's runs apart."""
    prefix = folder.rstrip(b"/") + b"/"
    if not previous.startswith(prefix):
        return b""
    return previous[len(prefix) :].split(b"/", 1)[0]


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
