"""The outbox: the one way a chunk goes from the ledger to the queue.

    record_and_publish(sessions=..., publish=..., job_id=..., record=...)
      record(session) writes the chunk(s) in the ledger and names them, COMMIT
      for each chunk, in order: publish it; then mark them all published, COMMIT

A chunk is committed before its message is sent, so a message the broker never took (or a
process that died in between) leaves the chunk recorded and unpublished, and it is sent again
from the ledger: `republish_chunk` (the reconciler, `republish`) takes its pending images from
the ledger and goes through the same loop. On `PublishError` the loop stops: what was recorded
stays recorded, what was published is marked, and the error is raised as it is. The marks of a
batch's chunks go in one commit after the last publish (two commits per batch, however many
chunks it holds): a process that dies in between leaves chunks that were sent unmarked, and
they are sent again, which delivery tolerates (a second message for a chunk changes nothing).

`failures --retry` (`db.requeue`), a worker splitting a chunk and the republishers call
`record_and_publish`, each with its own `record`. The scan records a batch and may hand its
chunks to a thread of its own that runs the second half, `publish_recorded`, while it records
the next batch (`ScanSettings.overlap_publish`): the order above holds for every chunk.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from core.publishing import Publisher
from db.models import ChunkStatus
from db.repository import (
    NotFoundError,
    finish_job_if_complete,
    get_job,
    mark_chunks_published,
    pending_uris,
    record_outcomes,
    unfinished_chunks,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OutgoingChunk:
    """A chunk recorded in the ledger, with the URIs its message carries."""

    chunk_index: int
    uris: list[str]


def record_and_publish(
    *,
    sessions: sessionmaker[Session],
    publish: Publisher,
    job_id: int,
    record: Callable[[Session], Sequence[OutgoingChunk]],
    committed: Callable[[Sequence[OutgoingChunk]], None] | None = None,
    published: Callable[[OutgoingChunk], None] | None = None,
) -> list[OutgoingChunk]:
    """Run `record` in one transaction, commit, then publish each chunk it returns in order and
    mark them all published (one more commit); returns the chunks.

    `committed` is called once the record transaction has committed (before any publishing),
    `published` for each chunk, in order, once the marks are committed. Raises `PublishError`
    when the broker refuses a message: the chunks published before it are marked, those not
    published yet stay recorded (pending) for a republish.
    """
    with sessions.begin() as session:
        chunks = list(record(session))
    if committed is not None:
        committed(chunks)
    publish_recorded(
        sessions=sessions, publish=publish, job_id=job_id, chunks=chunks, published=published
    )
    return chunks


def publish_recorded(
    *,
    sessions: sessionmaker[Session],
    publish: Publisher,
    job_id: int,
    chunks: Sequence[OutgoingChunk],
    published: Callable[[OutgoingChunk], None] | None = None,
) -> None:
    """The second half of `record_and_publish`, for chunks whose record has committed: publish
    each in order, then mark them all published in one commit, then call `published` for each.
    Raises `PublishError` as `record_and_publish` does (what the broker took is marked first).
    A scan on PostgreSQL calls it in a thread of its own, a batch behind its records."""
    sent: list[tuple[OutgoingChunk, str | None]] = []
    try:
        for chunk in chunks:
            sent.append((chunk, publish(job_id, chunk.chunk_index, chunk.uris)))
    finally:
        # Also when a publish failed: what the broker took is marked before the error goes up.
        if sent:
            with sessions.begin() as session:
                mark_chunks_published(
                    session=session,
                    job_id=job_id,
                    published=[(chunk.chunk_index, task_id) for chunk, task_id in sent],
                )
            if published is not None:
                for chunk, _ in sent:
                    published(chunk)


def republish_unpublished(
    job_id: int,
    *,
    sessions: sessionmaker[Session],
    publish: Publisher,
    older_than: float | None = None,
) -> int:
    """Publish the job's chunks that were recorded but never published; return how many.

    With `older_than` (seconds), also chunks published that long ago and still not done: their
    message was lost (choose it above the time the queue takes to drain, or chunks that are
    merely waiting get a second message, harmless but wasted work). Chunks whose images are no
    longer pending are marked done instead. Raises `PublishError` when the broker refuses; what
    was published before is recorded. Not while the job's scan still runs: it is about to
    publish the chunks it just recorded, which would then go out twice.
    """
    if older_than is not None and older_than < 0:
        raise ValueError(f"older_than must not be negative, got {older_than}")
    with sessions() as session, session.begin():
        if get_job(session=session, job_id=job_id) is None:
            raise NotFoundError(f"no job with id {job_id}")
        if older_than is None:
            chunks = unfinished_chunks(session=session, job_id=job_id)
            indexes = [c.chunk_index for c in chunks if c.status is ChunkStatus.PENDING]
        else:
            before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=older_than)
            chunks = unfinished_chunks(session=session, job_id=job_id, published_before=before)
            indexes = [c.chunk_index for c in chunks]
    published = 0
    for chunk_index in indexes:
        if republish_chunk(job_id, chunk_index, sessions=sessions, publish=publish):
            published += 1
    logger.info("job %d: published %d chunk(s) again", job_id, published)
    return published


def republish_chunk(
    job_id: int, chunk_index: int, *, sessions: sessionmaker[Session], publish: Publisher
) -> bool:
    """Publish a chunk's pending images (from the ledger) again; False when none are left,
    and then the chunk is marked done (only its row lagged behind)."""

    def record(session: Session) -> list[OutgoingChunk]:
        uris = pending_uris(session=session, job_id=job_id, chunk_index=chunk_index)
        if uris:
            return [OutgoingChunk(chunk_index, uris)]
        # Every image of the chunk has an outcome; only the chunk row lagged behind.
        record_outcomes(
            session=session, job_id=job_id, results=[], failures=[], chunk_index=chunk_index
        )
        finish_job_if_complete(session=session, job_id=job_id)
        return []

    sent = record_and_publish(sessions=sessions, publish=publish, job_id=job_id, record=record)
    return bool(sent)


__all__ = [
    "OutgoingChunk",
    "publish_recorded",
    "record_and_publish",
    "republish_chunk",
    "republish_unpublished",
]
