"""The reconciler: whatever a crash, a lost message or a restarted broker left half-done, it finds
in the ledger and finishes, so no operator has to (`emolabel reconcile`, and a beat task).

    for each job still scanning whose producer's heartbeat is older than producer_timeout:
        end the scan with an error (what it recorded stays; the rest of the source is not
        listed: scan it again), so its recorded chunks can go out below
    for each chunk not done, of a job no longer scanning:
        recorded but never published                                 -> publish it
        published longer ago than stale_after, and its task id is
        neither queued nor unacknowledged in Redis                   -> publish it again

Each resend takes the chunk's pending images from the ledger (`republish_chunk`). A chunk whose
message is merely slow to be seen is sent twice at worst: the worker finds it done the second
time (at-least-once delivery, exactly-once effect). What counts as "in Redis" is read from
kombu's Redis transport: the queue's lists (one per priority step) and the `unacked` hash of
delivered, unacknowledged messages (running, prefetched, or waiting for a retry's countdown).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from core.publishing import Publisher
from core.settings import ReconcileSettings
from db import repository
from db.models import ChunkStatus, ItemState, JobStatus
from db.repository import CHUNKS, JOB_ITEMS, JOBS
from producer import ledger_queries
from producer.enqueue import republish_chunk

logger = logging.getLogger(__name__)

# kombu's Redis transport: a queue with priorities is one list per step, named with this
# separator; delivered messages wait in this hash until acknowledged.
_PRIORITY_SEPARATOR = "\x06\x16"
_PRIORITY_STEPS = range(1, 10)
_UNACKED_KEY = "unacked"


@dataclass
class ReconcileReport:
    """What one run found and did."""

    scans_ended: list[int] = field(default_factory=list)
    chunks_sent: dict[int, int] = field(default_factory=dict)  # job id -> chunks published
    images_without_message: int = 0  # pending images whose chunk had no message, before the run

    def to_json(self) -> dict[str, Any]:
        return {
            "scans_ended": self.scans_ended,
            "chunks_sent": {str(job): count for job, count in self.chunks_sent.items()},
            "images_without_message": self.images_without_message,
        }


def task_ids_in_broker(client: Any, queue: str) -> set[str]:
    """Ids of the tasks queued on `queue` or delivered and not yet acknowledged (any queue)."""
    ids: set[str] = set()
    for key in [queue, *(f"{queue}{_PRIORITY_SEPARATOR}{step}" for step in _PRIORITY_STEPS)]:
        for raw in client.lrange(key, 0, -1):
            ids.update(_task_id(raw))
    for raw in client.hvals(_UNACKED_KEY):
        ids.update(_task_id(raw, wrapped=True))
    return ids


def _task_id(raw: bytes | str, *, wrapped: bool = False) -> Iterable[str]:
    try:
        document = json.loads(raw)
        envelope = document[0] if wrapped else document
        task_id = envelope["headers"]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ()
    return (task_id,) if isinstance(task_id, str) else ()


@dataclass(frozen=True)
class _OpenChunk:
    job_id: int
    chunk_index: int
    status: ChunkStatus
    task_id: str | None
    pending: int


def reconcile(
    *,
    sessions: sessionmaker[Session],
    publish: Publisher,
    broker_task_ids: Callable[[], set[str]],
    settings: ReconcileSettings,
    now: dt.datetime | None = None,
) -> ReconcileReport:
    """One pass over the ledger (see the module docstring); raises PublishError when the
    broker refuses a message (what was sent before is recorded)."""
    now = now or dt.datetime.now(dt.UTC)
    report = ReconcileReport()
    report.scans_ended = _end_abandoned_scans(sessions, now, settings.producer_timeout)
    stale_before = now - dt.timedelta(seconds=settings.stale_after)
    candidates = _open_chunks(sessions, stale_before)
    if not candidates:
        return report
    # Read the broker after the ledger: a chunk published in between is then seen as present.
    present = broker_task_ids()
    lost = [
        chunk
        for chunk in candidates
        if chunk.status is ChunkStatus.PENDING or chunk.task_id not in present
    ]
    report.images_without_message = sum(chunk.pending for chunk in lost)
    for chunk in lost:
        if republish_chunk(chunk.job_id, chunk.chunk_index, sessions=sessions, publish=publish):
            report.chunks_sent[chunk.job_id] = report.chunks_sent.get(chunk.job_id, 0) + 1
    if lost:
        logger.warning(
            "reconciler: %d chunk(s) (%d pending images) had no message; sent again: %s",
            len(lost), report.images_without_message, report.chunks_sent,
        )  # fmt: skip
    return report


def images_without_message(
    *, sessions: sessionmaker[Session], broker_task_ids: Callable[[], set[str]], stale_after: int
) -> int:
    """Pending images whose chunk has had no message for `stale_after` seconds (read only)."""
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=stale_after)
    candidates = _open_chunks(sessions, before)
    if not candidates:
        return 0
    present = broker_task_ids()
    return sum(
        chunk.pending
        for chunk in candidates
        if chunk.status is ChunkStatus.PENDING or chunk.task_id not in present
    )


def _end_abandoned_scans(
    sessions: sessionmaker[Session], now: dt.datetime, timeout: int
) -> list[int]:
    silent_since = now - dt.timedelta(seconds=timeout)
    ended: list[int] = []
    with sessions.begin() as session:
        abandoned = session.execute(
            select(JOBS.c.id, JOBS.c.producer, JOBS.c.heartbeat_at).where(
                JOBS.c.status == JobStatus.SCANNING,
                func.coalesce(JOBS.c.heartbeat_at, JOBS.c.created_at) < silent_since,
            )
        ).all()
        for job_id, producer, heartbeat in abandoned:
            items = session.scalar(
                select(func.count()).select_from(JOB_ITEMS).where(JOB_ITEMS.c.job_id == job_id)
            )
            seen = heartbeat.isoformat(timespec="seconds") if heartbeat else "never"
            ledger_queries.end_scan(
                session=session,
                job_id=job_id,
                enqueued=int(items or 0),
                error=(
                    f"scan stopped: its producer ({producer or 'unknown'}) was last seen at {seen};"
                    " the files it recorded are labeled, scan the source again for the rest"
                ),
            )
            repository.finish_job_if_complete(session=session, job_id=job_id)
            ended.append(job_id)
    if ended:
        logger.warning(
            "reconciler: ended %d scan(s) whose producer was gone: %s", len(ended), ended
        )
    return ended


def _open_chunks(sessions: sessionmaker[Session], stale_before: dt.datetime) -> list[_OpenChunk]:
    """Chunks not done, of jobs past their scan, quiet since `stale_before`."""
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
    with sessions() as session:
        return [
            _OpenChunk(job_id, index, ChunkStatus(status), task_id, int(pending))
            for job_id, index, status, task_id, pending in session.execute(query)
        ]


def redis_task_ids(broker_url: str, queue: str) -> Callable[[], set[str]]:
    """`task_ids_in_broker` against the broker at `broker_url` (redis:// or redis+socket://)."""

    def read() -> set[str]:
        client = redis_client(broker_url)
        try:
            return task_ids_in_broker(client, queue)
        finally:
            client.close()

    return read


def redis_client(broker_url: str) -> Any:
    """A redis-py client for a kombu broker URL, with timeouts (never waits forever)."""
    import redis

    # kombu spells a Unix socket redis+socket:///path; redis-py spells it unix:///path.
    url = broker_url
    if url.startswith("redis+socket://"):
        url = "unix://" + url.removeprefix("redis+socket://")
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)


__all__ = [
    "ReconcileReport",
    "images_without_message",
    "reconcile",
    "redis_client",
    "redis_task_ids",
    "task_ids_in_broker",
]
