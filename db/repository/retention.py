"""Retention: delete the ledger rows (job_items, chunks) of jobs finished long ago.

At archive scale the ledger is most of the database: every scan writes one job_items row per
file (~110 bytes with its index entries), so a nightly rescan of ten million files adds about a
gigabyte each night, most of it saying "nothing changed". Labels live in `results` and stay; the
job row stays too, with `pruned_at` and a `summary` of the counts its rows had, so `status` still
tells what it did.

    prunable_jobs(finished_before=...)   done jobs finished before the cutoff, not pruned yet
    prune_job(sessions=..., job_id=...)  summary + pruned_at (one commit), then the rows go in
                                         batches of `batch_rows` (a commit each), chunks last

Only jobs in status `done` are pruned: a job still scanning, queued or running has rows a
worker or the reconciler needs. What goes with the rows: `failures` and `export` of that job
(the summary keeps the counts by reason), and the "failed and unchanged since" memory, so an
image that failed in a pruned job is tried again by the next scan.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, Delete, delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import JobStatus, utc_now
from db.repository.base import CHUNKS, JOB_ITEMS, JOBS, NotFoundError
from db.repository.jobs import job_summary

# Rows deleted per transaction: short transactions, and the WAL of one is a few megabytes.
PRUNE_BATCH_ROWS = 50_000


@dataclass(frozen=True, slots=True)
class PrunableJob:
    """A done job whose ledger rows may go: its id, when it finished, its source."""

    job_id: int
    finished_at: dt.datetime
    source: str


@dataclass(frozen=True, slots=True)
class PrunedJob:
    """What `prune_job` deleted."""

    job_id: int
    items: int
    chunks: int


def prunable_jobs(*, session: Session, finished_before: dt.datetime) -> list[PrunableJob]:
    """Done jobs finished before `finished_before` whose rows are still there, oldest first."""
    query = (
        select(JOBS.c.id, JOBS.c.finished_at, JOBS.c.source)
        .where(
            JOBS.c.status == JobStatus.DONE,
            JOBS.c.finished_at.is_not(None),
            JOBS.c.finished_at < finished_before,
            JOBS.c.pruned_at.is_(None),
        )
        .order_by(JOBS.c.finished_at, JOBS.c.id)
    )
    return [PrunableJob(*row) for row in session.execute(query)]


def prune_job(
    *, sessions: sessionmaker[Session], job_id: int, batch_rows: int = PRUNE_BATCH_ROWS
) -> PrunedJob:
    """Keep the job's counts in its row, then delete its ledger rows and chunks.

    The summary is committed first: from then on `status` reads it, and a prune cut short (a
    killed process, a lost connection) is finished by running it again. Raises `NotFoundError`
    for an unknown job and `ValueError` for a job that is not done.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    with sessions.begin() as session:
        row = session.execute(
            select(JOBS.c.status, JOBS.c.pruned_at).where(JOBS.c.id == job_id).with_for_update()
        ).first()
        if row is None:
            raise NotFoundError(f"no job with id {job_id}")
        if row.status != JobStatus.DONE:
            raise ValueError(f"job {job_id} is {row.status}: only a done job can be pruned")
        if row.pruned_at is None:
            summary = job_summary(session=session, job_id=job_id)
            session.execute(
                update(JOBS).where(JOBS.c.id == job_id).values(pruned_at=utc_now(), summary=summary)
            )
    items = 0
    while True:
        with sessions.begin() as session:
            batch = (
                select(JOB_ITEMS.c.image_id)
                .where(JOB_ITEMS.c.job_id == job_id)
                .limit(batch_rows)
                .scalar_subquery()
            )
            deleted = _deleted(
                session,
                delete(JOB_ITEMS).where(
                    JOB_ITEMS.c.job_id == job_id, JOB_ITEMS.c.image_id.in_(batch)
                ),
            )
        items += deleted
        if deleted < batch_rows:
            break
    with sessions.begin() as session:
        chunks = _deleted(session, delete(CHUNKS).where(CHUNKS.c.job_id == job_id))
    return PrunedJob(job_id=job_id, items=items, chunks=chunks)


def _deleted(session: Session, statement: Delete) -> int:
    """Run a DELETE and return how many rows it deleted."""
    return int(cast(CursorResult[Any], session.execute(statement)).rowcount)
