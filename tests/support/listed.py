"""A scan without files or Redis, for ledger tests: listed entries, a source that lists them and
a broker that records every message it is given (and can act at a given one)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from core.storage.entries import Entry


def entries(prefix: str, count: int, *, repeat: int | None = None) -> list[Entry]:
    """`count` usable entries; `repeat` lists that one a second time at the end."""
    made = [
        Entry(
            uri=f"file:///{prefix}/{index:05d}.jpg",
            name_bytes=None,
            size_bytes=1000,
            mtime_ns=index,
            fingerprint=f"1000-{index}",
            image_type="jpeg",
            skip_reason=None,
            skip_message=None,
        )
        for index in range(count)
    ]
    if repeat is not None:
        made.append(made[repeat])
    return made


class ListSource:
    def __init__(self, prefix: str, listed: list[Entry]) -> None:
        self.uri = f"file:///{prefix}"
        self.listed = listed

    def iter_entries(self) -> Iterator[Entry]:
        return iter(self.listed)


class Broker:
    """Keeps every message published, as (job, chunk, uris); `during` runs at a given one."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int, list[str]]] = []
        self.during: dict[int, object] = {}

    def __call__(self, job_id: int, chunk_index: int, uris: list[str]) -> str:
        self.sent.append((job_id, chunk_index, list(uris)))
        action = self.during.pop(len(self.sent), None)
        if callable(action):
            action(job_id)
        return f"task-{uuid.uuid4().hex}"
