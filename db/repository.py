"""Every read and write of the ledger, the same on PostgreSQL and SQLite.

Each function takes the session keyword-only and never commits, rolls back or closes it: the
caller owns the transaction (`with Session() as session, session.begin(): ...`). The hot paths
(`upsert_images`, `add_job_items`, `record_outcomes`, `labeled_fingerprints`) are bulk statements
(`INSERT ... ON CONFLICT`, `UPDATE ... WHERE ... IN`) cut into batches that stay under the
database's bound-parameter limit (SQLite's is the small one). An INSERT is one statement executed
with a list of rows (SQLAlchemy's "insertmanyvalues" still sends multi-row VALUES), so it is
compiled once and cached: `insert().values([...rows])` is never cached, and compiling its
thousands of parameters again for every batch cost the producer more than the database did.

Delivery is at least once, the effect exactly once: a redelivered chunk inserts no second result
and leaves every ledger row in the state it reached. A result is written again only for an image
whose fingerprint changed since it was labeled.

Rows come in as small frozen dataclasses (`ImageRow`, `JobItemRow`, `ChunkRow`, `ResultRow`,
`FailureRow`) that check themselves; bad input raises `ValueError`, an unknown job or model raises
`NotFoundError` (a `LookupError`).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from sqlalchemy import Table, and_, bindparam, case, exists, func, null, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from db.models import (
    NAME_LENGTH,
    REASON_LENGTH,
    Chunk,
    ChunkStatus,
    Image,
    ItemState,
    Job,
    JobItem,
    JobStatus,
    ModelStatus,
    ModelVersion,
    Result,
    RetrainDecision,
    RetrainRun,
    utc_now,
)

T = TypeVar("T")

IMAGES = cast(Table, Image.__table__)
JOBS = cast(Table, Job.__table__)
CHUNKS = cast(Table, Chunk.__table__)
JOB_ITEMS = cast(Table, JobItem.__table__)
RESULTS = cast(Table, Result.__table__)

# Large statements hold locks longer; a thousand rows is plenty per round trip.
MAX_ROWS_PER_STATEMENT = 1000
# psycopg can bind 65535 parameters; stay well below.
POSTGRESQL_MAX_PARAMETERS = 32_000
# Constants that a statement binds besides the rows (job id, timestamps, states).
_PARAMETER_HEADROOM = 16

TERMINAL_JOB_STATUSES = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED})


class NotFoundError(LookupError):
    """No job, or no model version, with the identifier given."""


# --- row inputs -------------------------------------------------------------------------------


def _check_text(value: str, what: str, *, max_length: int | None = None) -> None:
    if not value:
        raise ValueError(f"{what} must not be empty")
    if "\x00" in value:
        raise ValueError(f"{what} {value!r} contains a NUL character, which PostgreSQL refuses")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{what} {value!r} is not valid UTF-8: percent-encode raw bytes (urllib.parse.quote"
            " of os.fsencode(path)) and keep the bytes in name_bytes"
        ) from None
    if max_length is not None and len(value) > max_length:
        raise ValueError(f"{what} {value[:40]!r}... is longer than {max_length} characters")


def _check_count(value: int | None, what: str) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{what} must not be negative, got {value}")


@dataclass(frozen=True, slots=True)
class ImageRow:
    """A file as the producer saw it: `uri` is valid UTF-8 (raw name bytes go in `name_bytes`)."""

    uri: str
    fingerprint: str
    size_bytes: int | None = None
    mtime_ns: int | None = None
    name_bytes: bytes | None = None
    content_sha256: str | None = None
    width: int | None = None
    height: int | None = None

    def __post_init__(self) -> None:
        _check_text(self.uri, "uri")
        _check_text(self.fingerprint, "fingerprint", max_length=NAME_LENGTH)
        for what, value in (
            ("size_bytes", self.size_bytes),
            ("width", self.width),
            ("height", self.height),
        ):
            _check_count(value, what)
        if self.content_sha256 is not None and len(self.content_sha256) != 64:
            raise ValueError(f"content_sha256 must be 64 hex digits, got {self.content_sha256!r}")


@dataclass(frozen=True, slots=True)
class JobItemRow:
    """An image entering a job's ledger: pending in a chunk, or skipped/failed while scanning."""

    image_id: int
    chunk_index: int | None = None
    state: ItemState = ItemState.PENDING
    reason: str | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        if self.state is ItemState.LABELED:
            raise ValueError("an item enters the ledger pending, skipped or failed, not labeled")
        if self.state is not ItemState.PENDING and self.reason is None:
            raise ValueError(f"a {self.state} item needs a reason code")
        if self.reason is not None:
            _check_text(self.reason, "reason", max_length=REASON_LENGTH)


@dataclass(frozen=True, slots=True)
class ChunkRow:
    """A chunk of a job, recorded before its message is published."""

    chunk_index: int
    size: int
    task_id: str | None = None

    def __post_init__(self) -> None:
        _check_count(self.chunk_index, "chunk_index")
        _check_count(self.size, "size")


@dataclass(frozen=True, slots=True)
class ResultRow:
    """A label for one image by one model version, with every class score.

    `fingerprint` is the version of the image that was read; None takes the one in `images`.
    """

    image_id: int
    model_version: str
    label: str
    confidence: float
    scores: Mapping[str, float]
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        _check_text(self.model_version, "model_version", max_length=NAME_LENGTH)
        _check_text(self.label, "label", max_length=NAME_LENGTH)
        if not math.isfinite(self.confidence):
            raise ValueError(f"confidence of image {self.image_id} is {self.confidence}")
        if not all(math.isfinite(score) for score in self.scores.values()):
            raise ValueError(f"scores of image {self.image_id} are not all finite: {self.scores}")
        if self.fingerprint is not None:
            _check_text(self.fingerprint, "fingerprint", max_length=NAME_LENGTH)


@dataclass(frozen=True, slots=True)
class FailureRow:
    """An image a worker could not label: a stable `reason` code and a message for people."""

    image_id: int
    reason: str
    message: str | None = None

    def __post_init__(self) -> None:
        _check_text(self.reason, "reason", max_length=REASON_LENGTH)


# --- row outputs ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobCounts:
    """How a job's images stand; `enqueued` is what the producer recorded."""

    enqueued: int
    labeled: int
    failed: int
    skipped: int
    pending: int

    @property
    def total(self) -> int:
        """Ledger rows: labeled + failed + skipped + pending."""
        return self.labeled + self.failed + self.skipped + self.pending

    @property
    def balanced(self) -> bool:
        """True when every enqueued image has exactly one ledger row."""
        return self.enqueued == self.total


@dataclass(frozen=True, slots=True)
class FailedItem:
    """A failed ledger row with its image's URI."""

    job_id: int
    image_id: int
    uri: str
    reason: str | None
    message: str | None
    attempts: int
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class ExportRow:
    """One result with its image's URI, for export."""

    image_id: int
    uri: str
    model_version: str
    label: str
    confidence: float
    scores: dict[str, float]
    job_id: int | None
    created_at: dt.datetime


# --- helpers ----------------------------------------------------------------------------------


def _insert(session: Session, table: Table) -> postgresql.Insert | sqlite.Insert:
    """The dialect's INSERT, which has ON CONFLICT."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"database {name!r} is not supported: use PostgreSQL or SQLite")


def _parameter_limit(session: Session) -> int:
    """How many bound parameters one statement may carry on this connection."""
    connection = session.connection()
    if connection.dialect.name != "sqlite":
        return POSTGRESQL_MAX_PARAMETERS
    getlimit = getattr(connection.connection.dbapi_connection, "getlimit", None)
    if getlimit is None:
        return 999  # SQLite's historical default, true for every build before 3.32
    return int(getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))


def _batches(
    session: Session, items: Sequence[T], parameters_per_item: int
) -> Iterator[Sequence[T]]:
    usable = max(1, _parameter_limit(session) - _PARAMETER_HEADROOM)
    size = max(1, min(MAX_ROWS_PER_STATEMENT, usable // parameters_per_item))
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _json_document(value: Any, what: str) -> Any:
    """`value` as plain JSON (lists, not tuples); NaN and infinity refused, as PostgreSQL does."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} is not a JSON document: {error}") from None


# --- images -----------------------------------------------------------------------------------


def upsert_images(*, session: Session, rows: Sequence[ImageRow]) -> dict[str, int]:
    """Insert or refresh images by URI and return uri -> id for every row.

    A row whose fingerprint changed replaces what was known of the old version (checksum and
    size); an unchanged row is not rewritten. A URI given twice keeps its last row.
    """
    latest = {row.uri: row for row in rows}
    # Every process takes row locks in the same order, so two producers cannot deadlock.
    ordered = [latest[uri] for uri in sorted(latest)]
    now = utc_now()
    ids: dict[str, int] = {}
    statement = _image_upsert(session).returning(IMAGES.c.uri, IMAGES.c.id)
    for batch in _batches(session, ordered, parameters_per_item=10):
        returned = session.execute(statement, [_image_values(row, now) for row in batch])
        ids.update({uri: image_id for uri, image_id in returned})
    # Unchanged rows were not touched, so RETURNING left them out.
    ids.update(image_ids_for_uris(session=session, uris=[uri for uri in latest if uri not in ids]))
    return ids


def _image_values(row: ImageRow, now: dt.datetime) -> dict[str, Any]:
    return {
        "uri": row.uri,
        "name_bytes": row.name_bytes,
        "size_bytes": row.size_bytes,
        "mtime_ns": row.mtime_ns,
        "fingerprint": row.fingerprint,
        "content_sha256": row.content_sha256,
        "width": row.width,
        "height": row.height,
        "first_seen_at": now,
        "updated_at": now,
    }


def _image_upsert(session: Session) -> postgresql.Insert | sqlite.Insert:
    """The upsert of one image row, to execute with a list of rows."""
    statement = _insert(session, IMAGES)
    new = statement.excluded
    same_version = IMAGES.c.fingerprint == new.fingerprint
    learned = ("content_sha256", "width", "height")
    return statement.on_conflict_do_update(
        index_elements=[IMAGES.c.uri],
        set_={
            "fingerprint": new.fingerprint,
            "size_bytes": new.size_bytes,
            "mtime_ns": new.mtime_ns,
            "name_bytes": new.name_bytes,
            "updated_at": new.updated_at,
            # What we learned about this version stays unless the new row knows it too.
            **{
                column: func.coalesce(
                    new[column], case((same_version, IMAGES.c[column]), else_=null())
                )
                for column in learned
            },
        },
        where=or_(
            ~same_version,
            IMAGES.c.size_bytes.is_distinct_from(new.size_bytes),
            IMAGES.c.mtime_ns.is_distinct_from(new.mtime_ns),
            IMAGES.c.name_bytes.is_distinct_from(new.name_bytes),
            *(
                and_(new[column].is_not(None), IMAGES.c[column].is_distinct_from(new[column]))
                for column in learned
            ),
        ),
    )


def image_ids_for_uris(*, session: Session, uris: Iterable[str]) -> dict[str, int]:
    """uri -> id for the URIs that are known (unknown ones are left out)."""
    wanted = sorted(set(uris))
    ids: dict[str, int] = {}
    for batch in _batches(session, wanted, parameters_per_item=1):
        query = select(IMAGES.c.uri, IMAGES.c.id).where(IMAGES.c.uri.in_(batch))
        ids.update({uri: image_id for uri, image_id in session.execute(query)})
    return ids


def labeled_fingerprints(
    *, session: Session, uris: Iterable[str], model_version: str
) -> dict[str, str]:
    """uri -> fingerprint of the image version that `model_version` labeled, for labeled URIs.

    The producer skips a URI whose current fingerprint equals the one returned.
    """
    wanted = sorted(set(uris))
    found: dict[str, str] = {}
    for batch in _batches(session, wanted, parameters_per_item=1):
        query = (
            select(IMAGES.c.uri, RESULTS.c.fingerprint)
            .join(RESULTS, RESULTS.c.image_id == IMAGES.c.id)
            .where(RESULTS.c.model_version == model_version, IMAGES.c.uri.in_(batch))
        )
        found.update({uri: fingerprint for uri, fingerprint in session.execute(query)})
    return found


# --- jobs, chunks and the ledger --------------------------------------------------------------


def create_job(
    *,
    session: Session,
    source: str,
    options: Mapping[str, Any] | None = None,
    model_version: str | None = None,
) -> int:
    """Start a job in status `scanning` and return its id."""
    _check_text(source, "source")
    job = Job(
        source=source,
        options=_json_document(dict(options or {}), "options"),
        model_version=model_version,
        status=JobStatus.SCANNING,
    )
    session.add(job)
    session.flush()
    return job.id


def set_job_status(
    *,
    session: Session,
    job_id: int,
    status: JobStatus,
    enqueued: int | None = None,
    error: str | None = None,
) -> None:
    """Move a job to `status`; `running` stamps started_at once, a final status finished_at.

    The producer records `enqueued` (every image in the ledger) when it stops scanning.
    """
    _check_count(enqueued, "enqueued")
    now = utc_now()
    values: dict[str, Any] = {"status": status}
    if status is JobStatus.RUNNING:
        values["started_at"] = func.coalesce(JOBS.c.started_at, now)
    if status in TERMINAL_JOB_STATUSES:
        values["finished_at"] = now
    if enqueued is not None:
        values["enqueued"] = enqueued
    if error is not None:
        values["error"] = error
    statement = update(JOBS).where(JOBS.c.id == job_id).values(values).returning(JOBS.c.id)
    if session.execute(statement).first() is None:
        raise NotFoundError(f"no job with id {job_id}")


def record_chunks(*, session: Session, job_id: int, chunks: Sequence[ChunkRow]) -> None:
    """Record chunks as pending before publishing them.

    Their numbers must come from `allocate_chunk_indices`: a number recorded twice is a bug
    (two writers numbering chunks on their own) and raises IntegrityError instead of being
    silently ignored, which once left a job's images pending with every chunk done.
    """
    rows = list({chunk.chunk_index: chunk for chunk in chunks}.values())
    statement = _insert(session, CHUNKS)
    for batch in _batches(session, rows, parameters_per_item=6):
        session.execute(
            statement,
            [
                {
                    "job_id": job_id,
                    "chunk_index": chunk.chunk_index,
                    "size": chunk.size,
                    "status": ChunkStatus.PENDING,
                    "attempts": 0,
                    "task_id": chunk.task_id,
                }
                for chunk in batch
            ],
        )


def allocate_chunk_indices(
    *, session: Session, job_id: int, count: int, producer: str | None = None
) -> int:
    """Take `count` chunk numbers from the job's counter and return the first of them.

    The only source of chunk numbers, for the producer, splits, retries and anything else: the
    UPDATE locks the job row until the caller commits (SQLite: the whole database), so two
    writers of one job get disjoint ranges. `producer` (host:pid) also stamps the scan's
    heartbeat, which the reconciler reads to find scans whose producer is gone; `count` 0 with
    a producer is a heartbeat alone.
    """
    _check_count(count, "count")
    values: dict[str, Any] = {"next_chunk_index": JOBS.c.next_chunk_index + count}
    if producer is not None:
        values |= {"producer": producer, "heartbeat_at": utc_now()}
    row = session.execute(
        update(JOBS).where(JOBS.c.id == job_id).values(values).returning(JOBS.c.next_chunk_index)
    ).first()
    if row is None:
        raise NotFoundError(f"no job with id {job_id}")
    return int(row[0]) - count


def mark_chunk_published(
    *, session: Session, job_id: int, chunk_index: int, task_id: str | None = None
) -> bool:
    """Count one more publication of a chunk; False when it is unknown or already done."""
    statement = (
        update(CHUNKS)
        .where(
            CHUNKS.c.job_id == job_id,
            CHUNKS.c.chunk_index == chunk_index,
            CHUNKS.c.status != ChunkStatus.DONE,
        )
        .values(
            status=ChunkStatus.PUBLISHED,
            published_at=utc_now(),
            attempts=CHUNKS.c.attempts + 1,
            task_id=func.coalesce(task_id, CHUNKS.c.task_id),
        )
        .returning(CHUNKS.c.chunk_index)
    )
    return session.execute(statement).first() is not None


def unfinished_chunks(
    *, session: Session, job_id: int, published_before: dt.datetime | None = None
) -> list[Chunk]:
    """Chunks not done yet (optionally only those never published or published before a time)."""
    query = select(Chunk).where(Chunk.job_id == job_id, Chunk.status != ChunkStatus.DONE)
    if published_before is not None:
        query = query.where(
            or_(Chunk.published_at.is_(None), Chunk.published_at < published_before)
        )
    return list(session.scalars(query.order_by(Chunk.chunk_index)))


def pending_uris(*, session: Session, job_id: int, chunk_index: int) -> list[str]:
    """The URIs of a chunk still pending, to publish it again."""
    query = (
        select(IMAGES.c.uri)
        .join(JOB_ITEMS, JOB_ITEMS.c.image_id == IMAGES.c.id)
        .where(
            JOB_ITEMS.c.job_id == job_id,
            JOB_ITEMS.c.chunk_index == chunk_index,
            JOB_ITEMS.c.state == ItemState.PENDING,
        )
        .order_by(IMAGES.c.id)
    )
    return list(session.scalars(query))


def add_job_items(*, session: Session, job_id: int, items: Sequence[JobItemRow]) -> set[int]:
    """Put images into a job's ledger, once each (the first row given for an image wins);
    return the ids of the images whose row is new."""
    rows = list({item.image_id: item for item in reversed(items)}.values())
    now = utc_now()
    inserted: set[int] = set()
    statement = (
        _insert(session, JOB_ITEMS)
        .on_conflict_do_nothing(index_elements=["job_id", "image_id"])
        .returning(JOB_ITEMS.c.image_id)
    )
    for batch in _batches(session, rows, parameters_per_item=8):
        parameters = [
            {
                "job_id": job_id,
                "image_id": item.image_id,
                "chunk_index": item.chunk_index,
                "state": item.state,
                "reason": item.reason,
                "message": item.message,
                "attempts": 0,
                "updated_at": now,
            }
            for item in batch
        ]
        inserted.update(session.scalars(statement, parameters))
    return inserted


def record_outcomes(
    *,
    session: Session,
    job_id: int,
    results: Sequence[ResultRow],
    failures: Sequence[FailureRow],
    chunk_index: int | None = None,
) -> int:
    """Write a chunk's labels and failures in bulk; return how many result rows were written.

    Results are upserted on (image_id, model_version) and rewritten only when the image's
    fingerprint changed, so a redelivered chunk writes no result twice. Ledger rows become
    labeled or failed (a labeled row never turns failed) and count one more attempt. With
    `chunk_index`, the chunk is marked done.
    """
    labeled_ids = {row.image_id for row in results}
    both = labeled_ids & {row.image_id for row in failures}
    if both:
        raise ValueError(f"images {sorted(both)[:10]} are both labeled and failed")
    now = utc_now()
    written = _upsert_results(session=session, job_id=job_id, results=results, now=now)
    _mark_labeled(session=session, job_id=job_id, image_ids=sorted(labeled_ids), now=now)
    _mark_failed(session=session, job_id=job_id, failures=failures, now=now)
    if chunk_index is not None:
        session.execute(
            update(CHUNKS)
            .where(CHUNKS.c.job_id == job_id, CHUNKS.c.chunk_index == chunk_index)
            .values(status=ChunkStatus.DONE)
        )
    return written


def _upsert_results(
    *, session: Session, job_id: int, results: Sequence[ResultRow], now: dt.datetime
) -> int:
    latest = {(row.image_id, row.model_version): row for row in results}
    ordered = [latest[key] for key in sorted(latest)]
    # One statement executed with a list of rows: it compiles once and is cached. A multi-row
    # `.values([...])` (with a fingerprint subquery per row) recompiled on every chunk and was
    # most of a worker's write time (bench/RESULTS.md).
    insert = _insert(session, RESULTS)
    new = insert.excluded
    statement = insert.on_conflict_do_update(
        index_elements=["image_id", "model_version"],
        set_={
            column: new[column]
            for column in ("label", "confidence", "scores", "fingerprint", "job_id", "created_at")
        },
        where=RESULTS.c.fingerprint != new.fingerprint,
    ).returning(RESULTS.c.image_id)
    written = 0
    for batch in _batches(session, ordered, parameters_per_item=9):
        fingerprints = _fingerprints(
            session, [row.image_id for row in batch if row.fingerprint is None]
        )
        parameters = [
            {
                "image_id": row.image_id,
                "model_version": row.model_version,
                "label": row.label,
                "confidence": float(row.confidence),
                "scores": {str(name): float(score) for name, score in row.scores.items()},
                "fingerprint": (
                    row.fingerprint if row.fingerprint is not None else fingerprints[row.image_id]
                ),
                "job_id": job_id,
                "created_at": now,
            }
            for row in batch
        ]
        written += len(session.execute(statement, parameters).all())
    return written


def _fingerprints(session: Session, image_ids: Sequence[int]) -> dict[int, str]:
    if not image_ids:
        return {}
    query = select(IMAGES.c.id, IMAGES.c.fingerprint).where(IMAGES.c.id.in_(image_ids))
    found = {image_id: fingerprint for image_id, fingerprint in session.execute(query)}
    missing = [image_id for image_id in image_ids if image_id not in found]
    if missing:
        raise NotFoundError(f"no images with ids {missing[:10]}")
    return found


def _mark_labeled(
    *, session: Session, job_id: int, image_ids: Sequence[int], now: dt.datetime
) -> None:
    for batch in _batches(session, image_ids, parameters_per_item=1):
        session.execute(
            update(JOB_ITEMS)
            .where(JOB_ITEMS.c.job_id == job_id, JOB_ITEMS.c.image_id.in_(batch))
            .values(
                state=ItemState.LABELED,
                reason=None,
                message=None,
                attempts=JOB_ITEMS.c.attempts + 1,
                updated_at=now,
            )
        )


def _mark_failed(
    *, session: Session, job_id: int, failures: Sequence[FailureRow], now: dt.datetime
) -> None:
    if not failures:
        return
    statement = (
        update(JOB_ITEMS)
        .where(
            JOB_ITEMS.c.job_id == job_id,
            JOB_ITEMS.c.image_id == bindparam("failed_image_id"),
            # A redelivery must not undo a label, nor touch what the producer skipped.
            or_(JOB_ITEMS.c.state == ItemState.PENDING, JOB_ITEMS.c.state == ItemState.FAILED),
        )
        .values(
            state=ItemState.FAILED,
            reason=bindparam("failed_reason"),
            message=bindparam("failed_message"),
            attempts=JOB_ITEMS.c.attempts + 1,
            updated_at=now,
        )
    )
    latest = {row.image_id: row for row in failures}
    session.execute(
        statement,
        [
            {
                "failed_image_id": row.image_id,
                "failed_reason": row.reason,
                "failed_message": row.message,
            }
            for row in (latest[image_id] for image_id in sorted(latest))
        ],
    )


def job_counts(*, session: Session, job_id: int) -> JobCounts:
    """How many of a job's images are labeled, failed, skipped and pending."""
    enqueued = session.execute(select(JOBS.c.enqueued).where(JOBS.c.id == job_id)).scalar()
    if enqueued is None:
        raise NotFoundError(f"no job with id {job_id}")
    query = (
        select(JOB_ITEMS.c.state, func.count())
        .where(JOB_ITEMS.c.job_id == job_id)
        .group_by(JOB_ITEMS.c.state)
    )
    by_state: dict[ItemState, int] = {
        ItemState(state): count for state, count in session.execute(query)
    }
    return JobCounts(
        enqueued=enqueued,
        labeled=by_state.get(ItemState.LABELED, 0),
        failed=by_state.get(ItemState.FAILED, 0),
        skipped=by_state.get(ItemState.SKIPPED, 0),
        pending=by_state.get(ItemState.PENDING, 0),
    )


def finish_job_if_complete(*, session: Session, job_id: int) -> bool:
    """Mark a queued or running job done when no item is pending; True if this call did it.

    Call it in the transaction that recorded outcomes, after them: on PostgreSQL the job row is
    locked first, so of two workers finishing the last chunks at once the second to take the
    lock sees the first one's committed rows, and the job cannot be left running.
    """
    # FOR NO KEY UPDATE, not FOR UPDATE: the caller's inserts took FOR KEY SHARE on this row (the
    # foreign keys), which FOR UPDATE conflicts with, so a producer ending its scan and a worker
    # ending a chunk of the same job deadlocked, each waiting for the other's key share.
    locked = session.execute(
        select(JOBS.c.id).where(JOBS.c.id == job_id).with_for_update(key_share=True)
    ).first()
    if locked is None:
        raise NotFoundError(f"no job with id {job_id}")
    anything_pending = exists().where(
        JOB_ITEMS.c.job_id == job_id, JOB_ITEMS.c.state == ItemState.PENDING
    )
    statement = (
        update(JOBS)
        .where(
            JOBS.c.id == job_id,
            JOBS.c.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
            ~anything_pending,
        )
        .values(status=JobStatus.DONE, finished_at=utc_now())
        .returning(JOBS.c.id)
    )
    return session.execute(statement).first() is not None


def failed_items(
    *, session: Session, job_id: int | None = None, batch_size: int = 1000
) -> Iterator[FailedItem]:
    """Stream the failed ledger rows (of one job, or of all), oldest job first."""
    query = (
        select(
            JOB_ITEMS.c.job_id,
            JOB_ITEMS.c.image_id,
            IMAGES.c.uri,
            JOB_ITEMS.c.reason,
            JOB_ITEMS.c.message,
            JOB_ITEMS.c.attempts,
            JOB_ITEMS.c.updated_at,
        )
        .join(IMAGES, IMAGES.c.id == JOB_ITEMS.c.image_id)
        .where(JOB_ITEMS.c.state == ItemState.FAILED)
        .order_by(JOB_ITEMS.c.job_id, JOB_ITEMS.c.image_id)
    )
    if job_id is not None:
        query = query.where(JOB_ITEMS.c.job_id == job_id)
    for row in session.execute(query.execution_options(yield_per=batch_size)):
        yield FailedItem(*row)


def iter_results(
    *,
    session: Session,
    job_id: int | None = None,
    model_version: str | None = None,
    batch_size: int = 1000,
) -> Iterator[ExportRow]:
    """Stream results for export, by image id.

    With `job_id`, the results of the images in that job's ledger (also those the job skipped
    as already labeled); with `model_version`, only that version's.
    """
    query = select(
        RESULTS.c.image_id,
        IMAGES.c.uri,
        RESULTS.c.model_version,
        RESULTS.c.label,
        RESULTS.c.confidence,
        RESULTS.c.scores,
        RESULTS.c.job_id,
        RESULTS.c.created_at,
    ).join(IMAGES, IMAGES.c.id == RESULTS.c.image_id)
    if job_id is not None:
        query = query.join(
            JOB_ITEMS,
            and_(JOB_ITEMS.c.image_id == RESULTS.c.image_id, JOB_ITEMS.c.job_id == job_id),
        )
    if model_version is not None:
        query = query.where(RESULTS.c.model_version == model_version)
    query = query.order_by(RESULTS.c.image_id, RESULTS.c.model_version)
    for row in session.execute(query.execution_options(yield_per=batch_size)):
        yield ExportRow(*row)


# --- the model registry -----------------------------------------------------------------------


def register_model(
    *,
    session: Session,
    version: str,
    name: str,
    artifact_path: str,
    class_names: Sequence[str],
    metrics: Mapping[str, Any] | None = None,
    notes: str | None = None,
    model_sha256: str | None = None,
    metadata_sha256: str | None = None,
) -> ModelVersion:
    """Register a model version as a candidate; registering the same artifact again is a no-op.

    The hashes of `model.keras` and `metadata.json` are stored with a new row. Registering again
    with other hashes is refused; a row without hashes keeps none (`set_model_hashes` is the
    explicit way to record them).
    """
    _check_text(version, "version", max_length=NAME_LENGTH)
    _check_text(name, "name", max_length=NAME_LENGTH)
    _check_text(artifact_path, "artifact_path")
    classes = list(class_names)
    if not classes or len(set(classes)) != len(classes) or not all(classes):
        raise ValueError(f"class_names must be distinct non-empty names, got {classes}")
    statement = _insert(session, cast(Table, ModelVersion.__table__)).values(
        version=version,
        name=name,
        artifact_path=artifact_path,
        class_names=classes,
        metrics=_json_document(dict(metrics or {}), "metrics"),
        status=ModelStatus.CANDIDATE,
        created_at=utc_now(),
        notes=notes,
        model_sha256=model_sha256,
        metadata_sha256=metadata_sha256,
    )
    # Two workers may register the version they both loaded at the same moment.
    session.execute(statement.on_conflict_do_nothing(index_elements=["version"]))
    model = session.scalars(
        select(ModelVersion).where(ModelVersion.version == version),
        execution_options={"populate_existing": True},
    ).one()
    if model.class_names != classes or model.artifact_path != artifact_path:
        raise ValueError(
            f"model version {version} is already registered with {model.artifact_path} and"
            f" classes {model.class_names}: give the new artifact a new version"
        )
    recorded = (model.model_sha256, model.metadata_sha256)
    if None not in recorded and recorded != (model_sha256, metadata_sha256):
        raise ValueError(
            f"model version {version} is already registered with other files (model.keras or"
            " metadata.json changed since): give the new artifact a new version"
        )
    return model


def set_model_hashes(
    *, session: Session, version: str, model_sha256: str, metadata_sha256: str
) -> ModelVersion:
    """Record the SHA-256 of a version's `model.keras` and `metadata.json` (an operator's act)."""
    for value, what in ((model_sha256, "model_sha256"), (metadata_sha256, "metadata_sha256")):
        if len(value) != 64 or value.strip("0123456789abcdef"):
            raise ValueError(f"{what} must be 64 lowercase hex digits, got {value!r}")
    model = session.get(ModelVersion, version)
    if model is None:
        raise NotFoundError(f"no model version {version!r} is registered")
    model.model_sha256, model.metadata_sha256 = model_sha256, metadata_sha256
    session.flush()
    return model


def set_active_model(*, session: Session, version: str) -> ModelVersion:
    """Promote `version` to the one active model, retiring the previous one."""
    model = session.scalars(
        select(ModelVersion).where(ModelVersion.version == version).with_for_update()
    ).one_or_none()
    if model is None:
        raise NotFoundError(f"no model version {version!r} is registered")
    if model.status is ModelStatus.ACTIVE:
        return model
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.status == ModelStatus.ACTIVE)
        .values(status=ModelStatus.RETIRED)
    )
    # Retire first: the partial unique index refuses two active rows even for a moment.
    session.flush()
    model.status = ModelStatus.ACTIVE
    model.promoted_at = utc_now()
    session.flush()
    return model


def promote_if_active(*, session: Session, version: str, expected: str | None) -> bool:
    """Compare and set: make `version` active only while `expected` is still the active model
    (None: while no model is active). False, changing nothing, when another promotion or a
    rollback came first.

    The comparison is the database's, in the same statement as the change: the row of `expected`
    is retired only `WHERE` it is still active (or the new one activated only `WHERE NOT EXISTS`
    an active row), so a promotion committed between a read and this write is never overwritten.
    """
    model = session.get(ModelVersion, version)
    if model is None:
        raise NotFoundError(f"no model version {version!r} is registered")
    if expected is not None:
        retired = session.execute(
            update(ModelVersion)
            .where(ModelVersion.version == expected, ModelVersion.status == ModelStatus.ACTIVE)
            .values(status=ModelStatus.RETIRED)
            .execution_options(synchronize_session=False)
        )
        if _rowcount(retired) != 1:
            return False
        # Retired before the new one is activated: the partial unique index allows one active.
        promoted = session.execute(
            update(ModelVersion)
            .where(ModelVersion.version == version)
            .values(status=ModelStatus.ACTIVE, promoted_at=utc_now())
            .execution_options(synchronize_session=False)
        )
    else:
        active = aliased(ModelVersion)
        promoted = session.execute(
            update(ModelVersion)
            .where(
                ModelVersion.version == version,
                ~select(active.version).where(active.status == ModelStatus.ACTIVE).exists(),
            )
            .values(status=ModelStatus.ACTIVE, promoted_at=utc_now())
            .execution_options(synchronize_session=False)
        )
    session.expire_all()
    return _rowcount(promoted) == 1


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0))


def set_model_status(*, session: Session, version: str, status: ModelStatus) -> ModelVersion:
    """Reject or retire a model version (promotion goes through `set_active_model`)."""
    if status is ModelStatus.ACTIVE:
        raise ValueError("use set_active_model to promote a model, so only one is active")
    model = session.get(ModelVersion, version)
    if model is None:
        raise NotFoundError(f"no model version {version!r} is registered")
    model.status = status
    session.flush()
    return model


def active_model(*, session: Session) -> ModelVersion | None:
    """The active model version, or None before the first promotion."""
    query = select(ModelVersion).where(ModelVersion.status == ModelStatus.ACTIVE)
    return session.scalars(query).one_or_none()


def list_models(
    *, session: Session, name: str | None = None, status: ModelStatus | None = None
) -> list[ModelVersion]:
    """Registered model versions, oldest first."""
    query = select(ModelVersion).order_by(ModelVersion.created_at, ModelVersion.version)
    if name is not None:
        query = query.where(ModelVersion.name == name)
    if status is not None:
        query = query.where(ModelVersion.status == status)
    return list(session.scalars(query))


def record_retrain_run(
    *,
    session: Session,
    started_at: dt.datetime,
    decision: RetrainDecision,
    reason: str | None = None,
    finished_at: dt.datetime | None = None,
    challenger_version: str | None = None,
    champion_version: str | None = None,
    data_fingerprint: str | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> int:
    """Record one retraining attempt and its decision; return its id."""
    run = RetrainRun(
        started_at=started_at,
        finished_at=finished_at if finished_at is not None else utc_now(),
        challenger_version=challenger_version,
        champion_version=champion_version,
        data_fingerprint=data_fingerprint,
        metrics=_json_document(dict(metrics or {}), "metrics"),
        decision=decision,
        reason=reason,
    )
    session.add(run)
    session.flush()
    return run.id


__all__ = [
    "ChunkRow",
    "ExportRow",
    "FailedItem",
    "FailureRow",
    "ImageRow",
    "JobCounts",
    "JobItemRow",
    "NotFoundError",
    "ResultRow",
    "active_model",
    "add_job_items",
    "allocate_chunk_indices",
    "create_job",
    "failed_items",
    "finish_job_if_complete",
    "image_ids_for_uris",
    "iter_results",
    "job_counts",
    "labeled_fingerprints",
    "list_models",
    "mark_chunk_published",
    "pending_uris",
    "promote_if_active",
    "record_chunks",
    "record_outcomes",
    "record_retrain_run",
    "register_model",
    "set_active_model",
    "set_job_status",
    "set_model_hashes",
    "set_model_status",
    "unfinished_chunks",
    "upsert_images",
]
