"""The `chunks` table: each chunk recorded before its message is published, then published,
then done. Chunk numbers come only from `jobs.allocate_chunk_indices`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import (
    String,
    Update,
    and_,
    bindparam,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from db.models import (
    Chunk,
    ChunkStatus,
    ItemState,
    JobStatus,
    utc_now,
)
from db.repository.base import (
    CHUNKS,
    IMAGES,
    JOB_ITEMS,
    JOBS,
    batches,
    check_count,
    dialect_insert,
)


@dataclass(frozen=True, slots=True)
class ChunkRow:
    """A chunk of a job, recorded before its message is published."""

    chunk_index: int
    size: int
    task_id: str | None = None

    def __post_init__(self) -> None:
        check_count(self.chunk_index, "chunk_index")
        check_count(self.size, "size")


def record_chunks(*, session: Session, job_id: int, chunks: Sequence[ChunkRow]) -> None:
    """Record chunks as pending before publishing them.

    Their numbers must come from `allocate_chunk_indices`: a number recorded twice is a bug
    (two writers numbering chunks on their own) and raises IntegrityError instead of being
    silently ignored, which once left a job's images pending with every chunk done.
    """
    rows = list({chunk.chunk_index: chunk for chunk in chunks}.values())
    statement = dialect_insert(session, CHUNKS)
    for batch in batches(session, rows, parameters_per_item=6):
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


def mark_chunk_published(
    *, session: Session, job_id: int, chunk_index: int, task_id: str | None = None
) -> bool:
    """Count one more publication of a chunk; False when it is unknown or already done."""
    statement = _publication().returning(CHUNKS.c.chunk_index)
    parameters = {"b_job_id": job_id, "b_chunk_index": chunk_index, "b_task_id": task_id}
    return session.execute(statement, parameters).first() is not None


def mark_chunks_published(
    *, session: Session, job_id: int, published: Sequence[tuple[int, str | None]]
) -> None:
    """`mark_chunk_published` for several chunks (chunk index, task id) in one statement
    executed with a list of parameters (one round trip on PostgreSQL's pipeline)."""
    if not published:
        return
    session.execute(
        _publication(),
        [
            {"b_job_id": job_id, "b_chunk_index": index, "b_task_id": task_id}
            for index, task_id in published
        ],
    )


def _publication() -> Update:
    """One more publication of the chunk `b_chunk_index` of job `b_job_id`, unless it is done;
    a task id `b_task_id` (None keeps the one recorded)."""
    return (
        update(CHUNKS)
        .where(
            CHUNKS.c.job_id == bindparam("b_job_id"),
            CHUNKS.c.chunk_index == bindparam("b_chunk_index"),
            CHUNKS.c.status != ChunkStatus.DONE,
        )
        .values(
            status=ChunkStatus.PUBLISHED,
            published_at=utc_now(),
            attempts=CHUNKS.c.attempts + 1,
            task_id=func.coalesce(bindparam("b_task_id", type_=String), CHUNKS.c.task_id),
        )
    )


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


@dataclass(frozen=True, slots=True)
class ChunkImage:
    """A pending image of a chunk, as the worker's write needs it."""

    id: int
    uri: str
    fingerprint: str


def pending_images(*, session: Session, job_id: int, chunk_index: int) -> list[ChunkImage]:
    """The chunk's images still pending, as the ledger holds them, in image id order."""
    query = (
        select(IMAGES.c.id, IMAGES.c.uri, IMAGES.c.fingerprint)
        .join(JOB_ITEMS, JOB_ITEMS.c.image_id == IMAGES.c.id)
        .where(
            JOB_ITEMS.c.job_id == job_id,
            JOB_ITEMS.c.chunk_index == chunk_index,
            JOB_ITEMS.c.state == ItemState.PENDING,
        )
        .order_by(IMAGES.c.id)
    )
    return [ChunkImage(row.id, row.uri, row.fingerprint) for row in session.execute(query)]


def pending_uris(*, session: Session, job_id: int, chunk_index: int) -> list[str]:
    """The URIs of a chunk still pending, to publish it again."""
    return [
        image.uri
        for image in pending_images(session=session, job_id=job_id, chunk_index=chunk_index)
    ]


@dataclass(frozen=True, slots=True)
class OpenChunk:
    """A chunk not done, with how many of its images are still pending."""

    job_id: int
    chunk_index: int
    status: ChunkStatus
    task_id: str | None
    pending: int


def open_chunks(*, session: Session, stale_before: dt.datetime) -> list[OpenChunk]:
    """Chunks not done, of jobs past their scan (queued or running): recorded and never
    published, or published before `stale_before`."""
    pending_count = (
        select(func.count())
        .select_from(JOB_ITEMS)
        .where(
            JOB_ITEMS.c.job_id == CHUNKS.c.job_id,
            JOB_ITEMS.c.chunk_index == CHUNKS.c.chunk_index,
            JOB_ITEMS.c.state == ItemState.PENDING,
        )
        .scalar_subquery()
    )
    query = (
        select(
            CHUNKS.c.job_id,
            CHUNKS.c.chunk_index,
            CHUNKS.c.status,
            CHUNKS.c.task_id,
            pending_count,
        )
        .join(JOBS, JOBS.c.id == CHUNKS.c.job_id)
        .where(
            CHUNKS.c.status != ChunkStatus.DONE,
            JOBS.c.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
            or_(
                CHUNKS.c.status == ChunkStatus.PENDING,
                and_(
                    CHUNKS.c.status == ChunkStatus.PUBLISHED,
                    CHUNKS.c.published_at < stale_before,
                ),
            ),
        )
        .order_by(CHUNKS.c.job_id, CHUNKS.c.chunk_index)
    )
    return [
        OpenChunk(job_id, index, ChunkStatus(status), task_id, int(pending))
        for job_id, index, status, task_id, pending in session.execute(query)
    ]
