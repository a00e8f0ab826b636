"""The ledger as a worker sees a chunk message: the ledger decides, the message only carries.

A message names (job, chunk, URIs). `begin_delivery` checks it against the ledger and refuses
(`MessageRefused`) a message for an unknown job or chunk, or whose URIs are not exactly the
images the ledger put in that chunk (a forged message, another job's chunk, a reused number);
the worker records the refusal (`record_refusal`) and acknowledges the message, and the chunk
the ledger knows is untouched. Otherwise the delivery is counted (committed before any work,
so a process death inside the chunk is visible to the next delivery) and the worker labels the
chunk's pending images as the ledger lists them.

`record_crash` is called by the worker's parent process when the child holding a chunk dies:
only those deliveries count towards splitting the chunk and, in the end, `poison`. Splits take
their chunk numbers from the job row (`allocate_chunk_indices`), like every other writer.

Functions take the session keyword-only and never commit, as in `db.repository`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from core.reasons import Reason
from db.models import (
    ChunkStatus,
    ItemState,
    JobStatus,
    RefusedMessage,
    utc_now,
)
from db.repository import (
    ChunkImage,
    ChunkRow,
    NotFoundError,
    allocate_chunk_indices,
    record_chunks,
)
from db.repository.base import CHUNKS, IMAGES, JOB_ITEMS, JOBS

# A refusal's message is for people; a forged message must not fill the table.
_MESSAGE_LENGTH = 2000


class MessageRefused(ValueError):
    """A chunk message the ledger disagrees with; `reason` is a `Reason`."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ChunkDelivery:
    """A worker's view of the chunk it just started."""

    deliveries: int
    crashes: int
    status: ChunkStatus
    job_source: str
    job_status: JobStatus
    pending: list[ChunkImage]


def begin_delivery(
    *, session: Session, job_id: int, chunk_index: int, uris: Sequence[str]
) -> ChunkDelivery:
    """Check a message against the ledger, count the delivery and return the pending images.

    Raises `MessageRefused` when the ledger has no such job or chunk, or when the message's
    URIs are not exactly the chunk's images; nothing is written then. A chunk already done
    comes back with status DONE and nothing pending (a redelivery after its commit).
    """
    job = session.execute(select(JOBS.c.source, JOBS.c.status).where(JOBS.c.id == job_id)).first()
    if job is None:
        raise MessageRefused(Reason.UNKNOWN_JOB, f"no job with id {job_id}")
    chunk = session.execute(
        select(CHUNKS.c.status).where(
            CHUNKS.c.job_id == job_id, CHUNKS.c.chunk_index == chunk_index
        )
    ).first()
    if chunk is None:
        raise MessageRefused(Reason.UNKNOWN_CHUNK, f"job {job_id} has no chunk {chunk_index}")
    if chunk.status == ChunkStatus.DONE:
        return ChunkDelivery(0, 0, ChunkStatus.DONE, job.source, JobStatus(job.status), [])
    rows = session.execute(
        select(IMAGES.c.id, IMAGES.c.uri, IMAGES.c.fingerprint, JOB_ITEMS.c.state)
        .join(JOB_ITEMS, JOB_ITEMS.c.image_id == IMAGES.c.id)
        .where(JOB_ITEMS.c.job_id == job_id, JOB_ITEMS.c.chunk_index == chunk_index)
        .order_by(IMAGES.c.id)
    ).all()
    _check_same_images(job_id, chunk_index, {row.uri for row in rows}, set(uris))
    counted = session.execute(
        update(CHUNKS)
        .where(CHUNKS.c.job_id == job_id, CHUNKS.c.chunk_index == chunk_index)
        .values(deliveries=CHUNKS.c.deliveries + 1)
        .returning(CHUNKS.c.deliveries, CHUNKS.c.crashes, CHUNKS.c.status)
    ).one()
    if job.status == JobStatus.QUEUED:
        session.execute(
            update(JOBS)
            .where(JOBS.c.id == job_id, JOBS.c.status == JobStatus.QUEUED)
            .values(status=JobStatus.RUNNING, started_at=utc_now())
        )
    pending = [
        ChunkImage(row.id, row.uri, row.fingerprint)
        for row in rows
        if row.state == ItemState.PENDING
    ]
    return ChunkDelivery(
        counted.deliveries,
        counted.crashes,
        ChunkStatus(counted.status),
        job.source,
        JobStatus(job.status),
        pending,
    )


def _check_same_images(job_id: int, chunk_index: int, ledger: set[str], message: set[str]) -> None:
    if ledger == message:
        return
    extra, missing = sorted(message - ledger), sorted(ledger - message)
    raise MessageRefused(
        Reason.NOT_THE_CHUNKS_IMAGES,
        f"the message for chunk {chunk_index} of job {job_id} names {len(extra)} image(s) the"
        f" chunk does not hold (first: {extra[:3]}) and leaves out {len(missing)} it holds"
        f" (first: {missing[:3]})",
    )


def record_refusal(
    *,
    session: Session,
    reason: Reason,
    message: str,
    job_id: int | None = None,
    chunk_index: int | None = None,
    task_id: str | None = None,
) -> None:
    """Keep a refused message on record (the operator sees it in `status` and the metrics)."""
    session.add(
        RefusedMessage(
            job_id=job_id,
            chunk_index=chunk_index,
            task_id=task_id[:128] if task_id else None,
            reason=reason.value,
            message=message[:_MESSAGE_LENGTH],
        )
    )


def record_crash(*, session: Session, job_id: int, chunk_index: int) -> bool:
    """Count a delivery of a chunk that ended with its worker process dead; False if unknown."""
    counted = session.execute(
        update(CHUNKS)
        .where(
            CHUNKS.c.job_id == job_id,
            CHUNKS.c.chunk_index == chunk_index,
            CHUNKS.c.status != ChunkStatus.DONE,
        )
        .values(crashes=CHUNKS.c.crashes + 1)
        .returning(CHUNKS.c.crashes)
    ).first()
    return counted is not None


def split_chunk(
    *, session: Session, job_id: int, chunk_index: int, parts: Sequence[Sequence[int]]
) -> list[int]:
    """Move a chunk's pending images (by image id, one list per part) into new chunks, recorded
    before publishing, and mark the old chunk done. Returns the new chunk numbers.

    The numbers come from the job row, so a split while the producer is still scanning (or
    while `failures --retry` runs) can never reuse a number it hands out.
    """
    first = allocate_chunk_indices(session=session, job_id=job_id, count=len(parts))
    indices = list(range(first, first + len(parts)))
    record_chunks(
        session=session,
        job_id=job_id,
        chunks=[ChunkRow(index, len(part)) for index, part in zip(indices, parts, strict=True)],
    )
    for index, part in zip(indices, parts, strict=True):
        session.execute(
            update(JOB_ITEMS)
            .where(
                JOB_ITEMS.c.job_id == job_id,
                JOB_ITEMS.c.chunk_index == chunk_index,
                JOB_ITEMS.c.image_id.in_(list(part)),
            )
            .values(chunk_index=index)
        )
    session.execute(
        update(CHUNKS)
        .where(CHUNKS.c.job_id == job_id, CHUNKS.c.chunk_index == chunk_index)
        .values(status=ChunkStatus.DONE)
    )
    return indices


def refusals_since(*, session: Session, since: dt.datetime) -> dict[str, int]:
    """How many messages were refused since `since`, by reason."""
    query = (
        select(RefusedMessage.reason, func.count())
        .where(RefusedMessage.received_at >= since)
        .group_by(RefusedMessage.reason)
    )
    return {reason: count for reason, count in session.execute(query)}


__all__ = [
    "ChunkDelivery",
    "MessageRefused",
    "NotFoundError",
    "begin_delivery",
    "record_crash",
    "record_refusal",
    "refusals_since",
    "split_chunk",
]
