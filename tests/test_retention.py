"""Retention (`db.repository.retention`, `emolabel prune`): an old done job's ledger rows and
chunks go, its counts stay (status reads them), its labels stay, and nothing else is touched.
Run on SQLite and PostgreSQL, through the repository and through the real command line."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.settings import load_settings
from db import repository
from db.delivery import begin_delivery
from db.models import Chunk, Job, JobItem, JobStatus, Result
from db.repository import FailureRow, NotFoundError, ResultRow
from producer.enqueue import run_scan
from tests.support.cli import cli
from tests.support.listed import Broker, ListSource, entries

LONG_AGO = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)


@pytest.fixture
def sessions(ledger_sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    return ledger_sessions


def finished_job(sessions: sessionmaker[Session], files: int, failing: int) -> int:
    """A scanned job whose images were all delivered: the last `failing` failed, the others
    labeled; it is done, and finished 40 days ago."""
    prefix = uuid.uuid4().hex
    broker = Broker()
    summary = run_scan(
        ListSource(prefix, entries(prefix, files)),
        sessions=sessions,
        publish=broker,
        chunk_size=4,
        model_version=None,
    )
    failed_uris = {uri for _, _, uris in broker.sent for uri in uris[-1:]}
    failed_uris = set(sorted(failed_uris)[:failing])
    for job_id, chunk_index, uris in broker.sent:
        with sessions.begin() as session:
            delivery = begin_delivery(
                session=session, job_id=job_id, chunk_index=chunk_index, uris=uris
            )
            repository.record_outcomes(
                session=session,
                job_id=job_id,
                results=[
                    ResultRow(image.id, "v1", "happy", 0.9, {"happy": 0.9, "sad": 0.1})
                    for image in delivery.pending
                    if image.uri not in failed_uris
                ],
                failures=[
                    FailureRow(image.id, "corrupt", "bad huffman table")
                    for image in delivery.pending
                    if image.uri in failed_uris
                ],
                chunk_index=chunk_index,
            )
            repository.finish_job_if_complete(session=session, job_id=job_id)
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == summary.job_id).values(finished_at=LONG_AGO))
    return summary.job_id


def queued_job(sessions: sessionmaker[Session], files: int) -> int:
    """A scanned job nobody delivered: queued, its images pending."""
    prefix = uuid.uuid4().hex
    return run_scan(
        ListSource(prefix, entries(prefix, files)),
        sessions=sessions,
        publish=Broker(),
        chunk_size=4,
        model_version=None,
    ).job_id


def rows_of(sessions: sessionmaker[Session], job_id: int) -> tuple[int, int]:
    with sessions() as session:
        items = session.scalar(select(func.count()).where(JobItem.job_id == job_id))
        chunks = session.scalar(select(func.count()).where(Chunk.job_id == job_id))
    return int(items or 0), int(chunks or 0)


def test_an_old_done_job_loses_its_rows_and_keeps_its_counts_and_labels(
    sessions: sessionmaker[Session],
) -> None:
    old = finished_job(sessions, files=10, failing=2)
    running = queued_job(sessions, 5)
    with sessions() as session:
        before = repository.job_counts(session=session, job_id=old)
        reasons = repository.outcome_reasons(session=session, job_id=old)
        labels = session.scalar(select(func.count()).where(Result.job_id == old))
        listed = repository.prunable_jobs(
            session=session, finished_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
        )
        recent = repository.prunable_jobs(session=session, finished_before=LONG_AGO)
    assert (before.labeled, before.failed, before.pending) == (8, 2, 0)
    assert reasons == [("failed", "corrupt", 2)]
    assert [job.job_id for job in listed] == [old]  # the queued job is never listed
    assert recent == []  # finished 40 days ago: not before a 40-day-old cutoff
    running_rows = rows_of(sessions, running)

    pruned = repository.prune_job(sessions=sessions, job_id=old, batch_rows=3)

    assert (pruned.items, pruned.chunks) == (10, 3)
    assert rows_of(sessions, old) == (0, 0)
    with sessions() as session:
        assert repository.job_counts(session=session, job_id=old) == before
        assert repository.outcome_reasons(session=session, job_id=old) == reasons
        assert session.scalar(select(func.count()).where(Result.job_id == old)) == labels == 8
        job = repository.get_job(session=session, job_id=old)
        assert job is not None and job.pruned_at is not None and job.status is JobStatus.DONE
        assert (
            repository.prunable_jobs(session=session, finished_before=dt.datetime.now(dt.UTC)) == []
        )
    assert rows_of(sessions, running) == running_rows

    # Again (a prune cut short is finished this way): nothing left, the counts unchanged.
    again = repository.prune_job(sessions=sessions, job_id=old)
    assert (again.items, again.chunks) == (0, 0)
    with sessions() as session:
        assert repository.job_counts(session=session, job_id=old) == before


def test_a_job_that_is_not_done_or_not_there_is_refused(sessions: sessionmaker[Session]) -> None:
    queued = queued_job(sessions, 3)
    before = rows_of(sessions, queued)
    with pytest.raises(ValueError, match="only a done job"):
        repository.prune_job(sessions=sessions, job_id=queued)
    with pytest.raises(NotFoundError):
        repository.prune_job(sessions=sessions, job_id=queued + 1000)
    with pytest.raises(ValueError, match="batch_rows"):
        repository.prune_job(sessions=sessions, job_id=queued, batch_rows=0)
    assert rows_of(sessions, queued) == before
    with sessions() as session:
        job = repository.get_job(session=session, job_id=queued)
        assert job is not None and job.pruned_at is None and job.summary is None


@pytest.fixture
def database_url(sessions: sessionmaker[Session]) -> Iterator[str]:
    engine = sessions.kw["bind"]
    yield engine.url.render_as_string(hide_password=False)


def test_prune_on_the_command_line_dry_run_first_then_status_shows_the_kept_counts(
    sessions: sessionmaker[Session], database_url: str, tmp_path: object
) -> None:
    old = finished_job(sessions, files=6, failing=1)
    settings = load_settings(database_url=database_url, home=str(tmp_path))

    dry = cli(settings, "prune", "--older-than", "30", "--dry-run")
    assert f"job {old}: finished" in dry.stdout and "would delete 6 ledger rows" in dry.stdout
    assert rows_of(sessions, old) == (6, 2)

    done = cli(settings, "prune", "--older-than", "30")
    assert f"job {old}: deleted 6 ledger rows and 2 chunks" in done.stdout
    assert rows_of(sessions, old) == (0, 0)

    shown = json.loads(cli(settings, "status", str(old), "--json").stdout)
    assert (shown["labeled"], shown["failed"], shown["pending"]) == (5, 1, 0)
    assert shown["pruned_at"] and shown["reasons"] == [
        {"state": "failed", "reason": "corrupt", "count": 1}
    ]
    assert "ledger pruned" in cli(settings, "status", str(old)).stdout
    assert "no done job" in cli(settings, "prune", "--older-than", "30").stdout
