"""The `jobs` table: a job's life (scanning, queued, running, a final status), its chunk-number
counter and the producer's heartbeat, and its counts.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    case,
    exists,
    func,
    null,
    select,
    update,
)
from sqlalchemy.orm import Session

from db.models import (
    ItemState,
    Job,
    JobStatus,
    utc_now,
)
from db.repository.base import (
    JOB_ITEMS,
    JOBS,
    NotFoundError,
    check_count,
    check_text,
    json_document,
)
from db.repository.job_items import outcome_reasons

TERMINAL_JOB_STATUSES = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED})


@dataclass(frozen=True, slots=True)
class JobCounts:
    """How a job's images stand; `enqueued` is what the producer recorded.

    `no_face` counts the images a face model found no face in: done, neither labeled nor failed.
    `uncertain` counts the images labeled below their class's calibrated threshold (not in
    `labeled`): done, waiting for a person's look.
    """

    enqueued: int
    labeled: int
    failed: int
    skipped: int
    pending: int
    no_face: int = 0
    uncertain: int = 0

    @property
    def total(self) -> int:
        """Ledger rows: labeled + uncertain + no_face + failed + skipped + pending."""
        return self.done + self.skipped + self.pending

    @property
    def done(self) -> int:
        """Images a worker finished: labeled + uncertain + no_face + failed."""
        return self.labeled + self.uncertain + self.no_face + self.failed

    @property
    def balanced(self) -> bool:
        """True when every enqueued image has exactly one ledger row."""
        return self.enqueued == self.total


def create_job(
    *,
    session: Session,
    source: str,
    options: Mapping[str, Any] | None = None,
    model_version: str | None = None,
) -> int:
    """Start a job in status `scanning` and return its id."""
    check_text(source, "source")
    job = Job(
        source=source,
        options=json_document(dict(options or {}), "options"),
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
    check_count(enqueued, "enqueued")
    now = utc_now()
    values: dict[str, Any] = {"status": status, "summary": _summary_cleared()}
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
    check_count(count, "count")
    values: dict[str, Any] = {"next_chunk_index": JOBS.c.next_chunk_index + count}
    if producer is not None:
        values |= {"producer": producer, "heartbeat_at": utc_now()}
    row = session.execute(
        update(JOBS).where(JOBS.c.id == job_id).values(values).returning(JOBS.c.next_chunk_index)
    ).first()
    if row is None:
        raise NotFoundError(f"no job with id {job_id}")
    return int(row[0]) - count


# The counts a job's summary keeps (JobCounts' fields besides `enqueued`).
SUMMARY_STATES = ("labeled", "failed", "skipped", "pending", "no_face", "uncertain")


def job_counts(*, session: Session, job_id: int) -> JobCounts:
    """How many of a job's images are labeled, uncertain, no_face, failed, skipped, pending."""
    job = session.execute(
        select(
            JOBS.c.enqueued, JOBS.c.status, JOBS.c.pruned_at, JOBS.c.summary, JOBS.c.unread
        ).where(JOBS.c.id == job_id)
    ).first()
    if job is None:
        raise NotFoundError(f"no job with id {job_id}")
    enqueued = job.enqueued
    if (job.pruned_at is not None or job.status == JobStatus.DONE) and job.summary is not None:
        # A finished job's counts, kept when it finished; a pruned one's, kept before its rows
        # were deleted (`db.repository.retention`).
        states = job.summary.get("states", {})
        return JobCounts(
            enqueued=enqueued,
            **{state: int(states.get(state, 0)) for state in SUMMARY_STATES},
        )
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
        # Files the scan counted from runs it knew settled, without a row each (`listings`).
        skipped=by_state.get(ItemState.SKIPPED, 0) + sum((job.unread or {}).values()),
        pending=by_state.get(ItemState.PENDING, 0),
        no_face=by_state.get(ItemState.NO_FACE, 0),
        uncertain=by_state.get(ItemState.UNCERTAIN, 0),
    )


def job_summary(*, session: Session, job_id: int) -> dict[str, Any]:
    """The counts a job's ledger rows add up to: by state, and failed/skipped by reason.

    Kept in the job row when the job finishes (`status` of a finished 10M-image job then reads
    one row, not 10M) and when `prune_job` deletes its rows.
    """
    counts = job_counts(session=session, job_id=job_id)
    return {
        "states": {state: getattr(counts, state) for state in SUMMARY_STATES},
        "reasons": [
            [state, reason, count]
            for state, reason, count in outcome_reasons(session=session, job_id=job_id)
        ],
    }


def keep_job_summary(*, session: Session, job_id: int) -> None:
    """Count the job's rows into `jobs.summary` (what finishing a job does; see `job_summary`)."""
    summary = job_summary(session=session, job_id=job_id)
    session.execute(update(JOBS).where(JOBS.c.id == job_id).values(summary=summary))


def _summary_cleared() -> Any:
    """The summary column once a job's rows may change again: a pruned job keeps its own."""
    return case((JOBS.c.pruned_at.is_(None), null()), else_=JOBS.c.summary)


def finish_job_if_complete(*, session: Session, job_id: int) -> bool:
    """Mark a queued or running job done when no item is pending; True if this call did it.

    Labeled, uncertain, no_face, failed and skipped items are all finished.

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
    if session.execute(statement).first() is None:
        return False
    # Counted once, here, in the transaction that finished it: nothing changes a done job's
    # rows until `reopen_job`, which clears this again.
    keep_job_summary(session=session, job_id=job_id)
    return True


def end_scan(
    *, session: Session, job_id: int, enqueued: int, error: str | None = None
) -> JobStatus:
    """Record a job's ledger size when its scan ends; a scanning job becomes queued.

    A job that has left `scanning` meanwhile (cancelled by someone, say) keeps its status, which
    is returned either way; `error` records why a scan stopped early.
    """
    if enqueued < 0:
        raise ValueError(f"enqueued must not be negative, got {enqueued}")
    values: dict[str, object] = {
        "enqueued": enqueued,
        "status": case(
            (JOBS.c.status == JobStatus.SCANNING, JobStatus.QUEUED.value), else_=JOBS.c.status
        ),
    }
    if error is not None:
        values["error"] = error
    statement = update(JOBS).where(JOBS.c.id == job_id).values(values).returning(JOBS.c.status)
    status = session.execute(statement).scalar()
    if status is None:
        raise NotFoundError(f"no job with id {job_id}")
    return JobStatus(status)


def get_job(*, session: Session, job_id: int) -> Job | None:
    """The job with id `job_id`, or None."""
    return session.get(Job, job_id)


def latest_jobs(*, session: Session, limit: int) -> list[Job]:
    """The `limit` most recent jobs, newest first."""
    return list(session.scalars(select(Job).order_by(Job.id.desc()).limit(limit)))


def reopen_job(*, session: Session, job_id: int) -> None:
    """Reopen a job that has images pending again (`failures --retry`): a finished job becomes
    queued; a job still scanning or running keeps its status."""
    # A job still scanning keeps its status: were it queued now, a worker finishing the
    # last chunk recorded so far would mark it done mid-scan (and a producer that died then
    # would leave it without its `enqueued` count, out of the reconciler's sight).
    reopened = case(
        (JOBS.c.status.in_([JobStatus.SCANNING, JobStatus.RUNNING]), JOBS.c.status),
        else_=JobStatus.QUEUED.value,
    )
    session.execute(
        update(JOBS)
        .where(JOBS.c.id == job_id)
        .values(status=reopened, finished_at=None, summary=_summary_cleared())
    )


@dataclass(frozen=True, slots=True)
class SilentScan:
    """A job still scanning whose producer has not been heard from."""

    job_id: int
    producer: str | None
    heartbeat_at: dt.datetime | None


def silent_scans(*, session: Session, silent_since: dt.datetime) -> list[SilentScan]:
    """Jobs still scanning whose last heartbeat (or creation, without one) is before
    `silent_since`."""
    query = select(JOBS.c.id, JOBS.c.producer, JOBS.c.heartbeat_at).where(
        JOBS.c.status == JobStatus.SCANNING,
        func.coalesce(JOBS.c.heartbeat_at, JOBS.c.created_at) < silent_since,
    )
    return [SilentScan(*row) for row in session.execute(query).all()]
