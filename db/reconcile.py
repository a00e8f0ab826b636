"""The reconciler: whatever a crash, a lost message or a restarted broker left half-done, it finds
in the ledger and finishes, so no operator has to (`emolabel reconcile`, and a beat task).

    for each job still scanning whose producer's heartbeat is older than producer_timeout:
        end the scan with an error (what it recorded stays; the rest of the source is not
        listed: scan it again), so its recorded chunks can go out below
    for each chunk not done, of a job no longer scanning:
        recorded but never published                                 -> publish it
        published longer ago than stale_after, and its task id is
        not among the ids the broker holds (`broker_task_ids`)      -> publish it again

Each resend takes the chunk's pending images from the ledger (`db.outbox.republish_chunk`). A
chunk whose message is merely slow to be seen is sent twice at worst: the worker finds it done
the second time (at-least-once delivery, exactly-once effect). The broker is never asked here:
the caller injects `broker_task_ids`, a callable returning the ids of the tasks queued or
delivered and unacknowledged (`core.broker.redis_task_ids` reads them from Redis), and the
`Publisher` that sends a chunk.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from core.publishing import Publisher
from core.settings import ReconcileSettings
from db.models import ChunkStatus
from db.outbox import republish_chunk
from db.repository import (
    OpenChunk,
    count_job_items,
    end_scan,
    finish_job_if_complete,
    open_chunks,
    silent_scans,
    unread_counts,
)

logger = logging.getLogger(__name__)


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
        for scan in silent_scans(session=session, silent_since=silent_since):
            heartbeat = scan.heartbeat_at
            seen = heartbeat.isoformat(timespec="seconds") if heartbeat else "never"
            end_scan(
                session=session,
                job_id=scan.job_id,
                enqueued=count_job_items(session=session, job_id=scan.job_id)
                + sum(unread_counts(session=session, job_id=scan.job_id).values()),
                error=(
                    f"scan stopped: its producer ({scan.producer or 'unknown'}) was last seen at"
                    f" {seen}; the files it recorded are labeled, scan the source again for the"
                    " rest"
                ),
            )
            finish_job_if_complete(session=session, job_id=scan.job_id)
            ended.append(scan.job_id)
    if ended:
        logger.warning(
            "reconciler: ended %d scan(s) whose producer was gone: %s", len(ended), ended
        )
    return ended


def _open_chunks(sessions: sessionmaker[Session], stale_before: dt.datetime) -> list[OpenChunk]:
    """Chunks not done, of jobs past their scan, quiet since `stale_before`."""
    with sessions() as session:
        return open_chunks(session=session, stale_before=stale_before)


__all__ = ["ReconcileReport", "images_without_message", "reconcile"]
