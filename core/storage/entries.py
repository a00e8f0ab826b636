"""What a source yields: one `Entry` per file or object it met, usable or skipped with a reason.

A source reports everything it lists except the folders it walks into, so the ledger can record
every skipped file with its reason and a job's counts balance.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
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


class Source(Protocol):
    """Somewhere images live: a folder tree or an S3 prefix."""

    @property
    def uri(self) -> str:
        """The URI of the root this source walks."""
        ...

    def iter_entries(self) -> Iterator[Entry]:
        """Yield every file below the root once, in a deterministic order, in constant memory."""
        ...
