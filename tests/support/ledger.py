"""Reading the ledger back in the end-to-end tests: a job's counts and rows, results per image,
and `wait_for_job`, which waits until a job is done (bounded)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from db.models import Image, Job, JobItem, JobStatus, Result
from db.repository import JobCounts, job_counts
from tests.support.workers import worker_log

# Seconds before a job that has not finished is called hung: a bound on a hang, not a speed
# check (a job of a few dozen small images takes seconds, minutes on a heavily loaded machine).
JOB_TIMEOUT = 600.0


def counts(sessions: sessionmaker[Session], job_id: int) -> JobCounts:
    with sessions() as session:
        return job_counts(session=session, job_id=job_id)


def job(sessions: sessionmaker[Session], job_id: int) -> Job:
    with sessions() as session:
        found = session.get(Job, job_id)
        assert found is not None
        return found


def wait_for_job(
    sessions: sessionmaker[Session],
    job_id: int,
    settings: Settings,
    *,
    timeout: float = JOB_TIMEOUT,
) -> JobCounts:
    """Wait until the job is done; on timeout, fail with its counts and the worker's log."""
    deadline = time.monotonic() + timeout
    while True:
        with sessions() as session:
            status = session.scalar(select(Job.status).where(Job.id == job_id))
            balance = job_counts(session=session, job_id=job_id)
        if status is JobStatus.DONE:
            return balance
        if time.monotonic() > deadline:
            pytest.fail(
                f"job {job_id} not done after {timeout:g} s: {status}, {balance}\n"
                f"worker log:\n{worker_log(settings)}"
            )
        time.sleep(0.2)


@dataclass(frozen=True)
class LedgerRow:
    uri: str
    state: str
    reason: str | None
    name_bytes: bytes | None


def ledger(sessions: sessionmaker[Session], job_id: int) -> dict[str, LedgerRow]:
    """uri -> the job's ledger row for it."""
    query = (
        select(Image.uri, JobItem.state, JobItem.reason, Image.name_bytes)
        .join(JobItem, JobItem.image_id == Image.id)
        .where(JobItem.job_id == job_id)
    )
    with sessions() as session:
        return {
            uri: LedgerRow(uri, str(state), reason, name_bytes)
            for uri, state, reason, name_bytes in session.execute(query)
        }


def results_per_image(sessions: sessionmaker[Session]) -> dict[str, int]:
    """uri -> how many result rows it has (one per model version at most)."""
    query = (
        select(Image.uri, func.count())
        .join(Result, Result.image_id == Image.id)
        .group_by(Image.uri)
    )
    with sessions() as session:
        return {uri: number for uri, number in session.execute(query)}


def assert_balanced(balance: JobCounts) -> None:
    assert balance.pending == 0, balance
    assert (
        balance.enqueued
        == balance.labeled + balance.uncertain + balance.no_face + balance.failed + balance.skipped
    ), balance
