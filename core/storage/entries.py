"""What a source yields: one `Entry` per file or object it met, usable or skipped with a reason.

A source reports everything it lists except the folders it walks into, so the ledger can record
every skipped file with its reason and a job's counts balance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol


# Not frozen, though nothing changes an entry once made: a scan makes one per file, and a
# frozen dataclass's __init__ (object.__setattr__ per field) costs several times a plain one's.
@dataclass(slots=True)
class Entry:
    """One listed file or object.

    `name_bytes` holds the raw path (local) when it is not valid UTF-8, else None; the URI
    encodes it either way. `fingerprint` changes when the content may have changed. An entry is
    usable when `skip_reason` is None; then `image_type` is set.
    """

    uri: str
    name_bytes: bytes | None
    size_bytes: int
    mtime_ns: int
    fingerprint: str
    image_type: str | None
    skip_reason: str | None
    skip_message: str | None

    @property
    def usable(self) -> bool:
        """Whether the entry should go to a worker."""
        return self.skip_reason is None


MAX_RUN_FILES = 4096
"""A folder's files are listed in runs of at most this many (a run's entries are held whole)."""


@dataclass(slots=True)
class Run:
    """Files listed one after another in one folder, before their content is read.

    `key` names the run the same way on every scan of an unchanged tree (its folder, and the
    subfolder it follows); `digest` changes when any of its files is added, removed, renamed,
    resized or touched (or the source's own rules change). `plain` is False when the run holds
    anything but regular files (links, special files, names that could not be looked at): such
    runs are always read. `read()` returns the entries, content sniffed, once; `release()` frees
    what the run holds when it is not read. A run's key and digest let the producer skip
    reading a folder that it already knows to be labeled (`producer.enqueue`).
    """

    key: str
    digest: str
    files: int
    plain: bool
    _read: Callable[[], list[Entry]] = field(repr=False)
    _release: Callable[[], None] = field(repr=False, default=lambda: None)
    _prefetch: Callable[[], None] = field(repr=False, default=lambda: None)

    def prefetch(self) -> None:
        """Start reading the run's files where the source reads them concurrently (S3's ranged
        GETs), so that runs read one after another keep the store busy; `read()` collects."""
        prefetch, self._prefetch = self._prefetch, lambda: None
        prefetch()

    def read(self) -> list[Entry]:
        """The run's entries, its files' first bytes read; the run is released afterwards."""
        try:
            return self._read()
        finally:
            self.release()

    def release(self) -> None:
        """Free what the run holds (a folder descriptor); reading it afterwards is an error."""
        release, self._release = self._release, lambda: None
        self._read = _released
        self._prefetch = lambda: None
        release()


def _released() -> list[Entry]:
    raise RuntimeError("this run was released: its entries can no longer be read")


class Source(Protocol):
    """Somewhere images live: a folder tree or an S3 prefix."""

    @property
    def uri(self) -> str:
        """The URI of the root this source walks."""
        ...

    def iter_entries(self) -> Iterator[Entry]:
        """Yield every file below the root once, in a deterministic order, in constant memory."""
        ...


class RunSource(Source, Protocol):
    """A source that can list its files in runs before reading them (`Run`)."""

    def iter_runs(self) -> Iterator[Run]:
        """Every file below the root once, as `iter_entries` orders them, in runs."""
        ...
