"""Enqueue a job's failed images again (`emolabel failures --retry --job N`).

The images stay in their job: their ledger rows go back to pending in new chunks, recorded
before they are published, and the job reopens until they end in a state again.
"""

from __future__ import annotations

import math

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.publishing import Publisher
from db.models import Image, ItemState, Job, JobItem, JobStatus
from db.repository import (
    ChunkRow,
    NotFoundError,
    allocate_chunk_indices,
    mark_chunk_published,
    record_chunks,
)


def requeue_failed(
    job_id: int, *, sessions: sessionmaker[Session], publish: Publisher, chunk_size: int
) -> int:
    """Put every failed image of `job_id` back on the queue; returns how many."""
    with sessions.begin() as session:
        if session.get(Job, job_id) is None:
            raise NotFoundError(f"no job with id {job_id}")
        failed = list(
            session.execute(
                select(JobItem.image_id, Image.uri)
                .join(Image, Image.id == JobItem.image_id)
                .where(JobItem.job_id == job_id, JobItem.state == ItemState.FAILED)
                .order_by(JobItem.image_id)
            )
        )
        if not failed:
            return 0
        # Numbers from the job row: a scan or a worker's split may be numbering chunks too.
        first = allocate_chunk_indices(
            session=session, job_id=job_id, count=math.ceil(len(failed) / chunk_size)
        )
        chunks: list[tuple[int, list[str]]] = []
        for offset in range(0, len(failed), chunk_size):
            part = failed[offset : offset + chunk_size]
            index = first + len(chunks)
            chunks.append((index, [row.uri for row in part]))
            session.execute(
                update(JobItem)
                .where(
                    JobItem.job_id == job_id, JobItem.image_id.in_([row.image_id for row in part])
                )
                .values(state=ItemState.PENDING, reason=None, message=None, chunk_index=index)
            )
        record_chunks(
            session=session,
            job_id=job_id,
            chunks=[ChunkRow(index, len(uris)) for index, uris in chunks],
        )
        # A job still scanning keeps its status: were it queued now, a worker finishing the
        # last chunk recorded so far would mark it done mid-scan (and a producer that died then
        # would leave it without its `enqueued` count, out of the reconciler's sight).
        reopened = case(
            (Job.status.in_([JobStatus.SCANNING, JobStatus.RUNNING]), Job.status),
            else_=JobStatus.QUEUED.value,
        )
        session.execute(
            update(Job).where(Job.id == job_id).values(status=reopened, finished_at=None)
        )
    for index, uris in chunks:
        task_id = publish(job_id, index, uris)
        with sessions.begin() as session:
            mark_chunk_published(session=session, job_id=job_id, chunk_index=index, task_id=task_id)
    return len(failed)
