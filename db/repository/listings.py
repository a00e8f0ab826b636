"""The `listings` table, and the files a job counted without a ledger row each (`jobs.unread`).

    settled_listings(keys=..., model_version=...)  the runs that model had settled, by key
    record_listings(settled=..., unsettled=...)    what a scan just learned of the runs it read
    count_unread(job_id=..., unread=...)           a scan's running count of unread files
    unread_counts(job_id=...)                      that count, {reason: files}

A run's row is replaced every time a scan reads the run, and deleted when the reading did not
find every file settled, so a stored digest always describes the run's latest reading: a file
changed and changed back (same size and time) is read again, because the row then holds the
digest of the changed listing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Table, delete, insert, select, update
from sqlalchemy.orm import Session

from db.models import Listing, utc_now
from db.repository.base import JOBS, NotFoundError, batches, check_text

LISTINGS = cast(Table, Listing.__table__)


@dataclass(frozen=True, slots=True)
class ListingRow:
    """A run a scan read whose files were all labeled or skipped for good by `model_version`.

    `counts` says how, {reason: files} (`already_labeled`, `not_an_image`, ...).
    """

    key: str
    digest: str
    model_version: str
    files: int
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_text(self.key, "listing key", max_length=32)
        check_text(self.digest, "listing digest", max_length=32)
        check_text(self.model_version, "model_version", max_length=128)
        if self.files != sum(self.counts.values()):
            raise ValueError(f"listing {self.key}: {self.files} files, counts {self.counts}")


def settled_listings(
    *, session: Session, keys: Sequence[str], model_version: str
) -> dict[str, ListingRow]:
    """The stored runs among `keys` that `model_version` had settled, by key."""
    found: dict[str, ListingRow] = {}
    for batch in batches(session, list(dict.fromkeys(keys)), 1):
        query = select(
            LISTINGS.c.key, LISTINGS.c.digest, LISTINGS.c.files, LISTINGS.c.counts
        ).where(LISTINGS.c.key.in_(batch), LISTINGS.c.model_version == model_version)
        for key, digest, files, counts in session.execute(query):
            found[key] = ListingRow(key, digest, model_version, files, dict(counts))
    return found


def record_listings(
    *, session: Session, settled: Sequence[ListingRow], unsettled: Sequence[str]
) -> None:
    """Replace the rows of the runs a scan read: `settled` ones stored, `unsettled` keys gone."""
    keys = [row.key for row in settled] + list(unsettled)
    for batch in batches(session, keys, 1):
        session.execute(delete(LISTINGS).where(LISTINGS.c.key.in_(batch)))
    now = utc_now()
    rows: list[dict[str, Any]] = [
        {
            "key": row.key,
            "digest": row.digest,
            "model_version": row.model_version,
            "files": row.files,
            "counts": row.counts,
            "updated_at": now,
        }
        for row in {row.key: row for row in settled}.values()
    ]
    if rows:
        session.execute(insert(LISTINGS), rows)


def count_unread(*, session: Session, job_id: int, unread: Mapping[str, int]) -> None:
    """Set the job's count of files counted from settled runs, {reason: files} (the scan's
    running total, written with each batch it records)."""
    if any(count < 0 for count in unread.values()):
        raise ValueError(f"unread counts must not be negative: {dict(unread)}")
    statement = update(JOBS).where(JOBS.c.id == job_id).values(unread=dict(unread) or None)
    if session.execute(statement).rowcount == 0:  # type: ignore[attr-defined]
        raise NotFoundError(f"no job with id {job_id}")


def unread_counts(*, session: Session, job_id: int) -> dict[str, int]:
    """{reason: files} the job counted without a ledger row each (see `count_unread`)."""
    unread = session.scalar(select(JOBS.c.unread).where(JOBS.c.id == job_id))
    return {str(reason): int(count) for reason, count in (unread or {}).items()}


__all__ = [
    "ListingRow",
    "count_unread",
    "record_listings",
    "settled_listings",
    "unread_counts",
]
