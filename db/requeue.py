"""Enqueue a job's failed images again (`emolabel failures --retry --job N`).

The images stay in their job: their ledger rows go back to pending in new chunks, recorded
before they are published (through `db.outbox`), and the job reopens until they end in a state
again.
"""

from __future__ import annotations

import math

from sqlalchemy.orm import Session, sessionmaker

from core.publishing import Publisher
from db.outbox import OutgoingChunk, record_and_publish
from db.repository import (
    ChunkRow,
    NotFoundError,
    allocate_chunk_indices,
    failed_images,
    get_job,
    record_chunks,
    reopen_job,
    return_to_pending,
)


def requeue_failed(
    job_id: int, *, sessions: sessionmaker[Session], publish: Publisher, chunk_size: int
) -> int:
    """Put every failed image of `job_id` back on the queue; returns how many."""
    requeued = 0

    def record(session: Session) -> list[OutgoingChunk]:
        nonlocal requeued
        if get_job(session=session, job_id=job_id) is None:
            raise NotFoundError(f"no job with id {job_id}")
        failed = failed_images(session=session, job_id=job_id)
        if not failed:
            return []
        requeued = len(failed)
        # Numbers from the job row: a scan or a worker's split may be numbering chunks too.
        first = allocate_chunk_indices(
            session=session, job_id=job_id, count=math.ceil(len(failed) / chunk_size)
        )
        chunks: list[OutgoingChunk] = []
        for offset in range(0, len(failed), chunk_size):
            part = failed[offset : offset + chunk_size]
            index = first + len(chunks)
            chunks.append(OutgoingChunk(index, [image.uri for image in part]))
            return_to_pending(
                session=session,
                job_id=job_id,
                image_ids=[image.image_id for image in part],
                chunk_index=index,
            )
        record_chunks(
            session=session,
            job_id=job_id,
            chunks=[ChunkRow(chunk.chunk_index, len(chunk.uris)) for chunk in chunks],
        )
        reopen_job(session=session, job_id=job_id)
        return chunks

    record_and_publish(sessions=sessions, publish=publish, job_id=job_id, record=record)
    return requeued


__all__ = ["requeue_failed"]
